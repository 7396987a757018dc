"""What the JAX sections of one worker share (the model config, graphdefs, the current random
parameters, facts earlier sections found), and the section that measures the device's ceilings
every later row is compared with."""
from __future__ import annotations

import gc
import time

import jax
from flax import nnx

from hbpo_jax import sharding
from hbpo_jax.bench.common import (
    bench_model_config,
    copy_bandwidth,
    failure_reason,
    format_rate,
    matmul_flops,
    progress,
)
from hbpo_jax.models import Qwen2, create_model


class JaxContext:
    """s: settings.bench_settings(); emit: the worker's message function (runner.emit).

    Graphdefs per attention / remat setting all share the same parameters. The benchmark is one
    card: `mesh` is a one-device mesh (the update batch's layout, batching.put, wants one)."""

    def __init__(self, s: dict, emit):
        self.s, self.emit = s, emit
        self.cfg = bench_model_config(s["model"], s["dtype"], **s.get("model_changes", {}))
        self.platform = jax.default_backend()
        self.mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        self.rules = sharding.DEFAULT_RULES
        self._graphdefs: dict = {}
        self._params = None
        self.facts: dict = {}

    def impl(self, attention_impl: str) -> str:
        # cuDNN attention exists only on NVIDIA GPUs; the smoke run takes jax.nn's XLA version.
        on_gpu = self.platform in ("gpu", "cuda")  # jax names NVIDIA GPUs "gpu" (the plugin: "cuda")
        return "dot_product" if attention_impl == "cudnn" and not on_gpu else attention_impl

    def graphdef(self, attention_impl: str = "xla", remat: str = "none"):
        key = (self.impl(attention_impl), remat)
        if key not in self._graphdefs:
            cfg = self.cfg.replace(attention_impl=key[0], remat=remat)
            self._graphdefs[key] = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))[0]
        return self._graphdefs[key]

    def params(self):
        """The current parameters; random ones again when an update consumed (donated) them."""
        if self._params is None or any(x.is_deleted() for x in jax.tree.leaves(self._params)):
            self._params = None
            gc.collect()
            t = time.time()
            _, self._params = nnx.split(create_model(self.cfg, seed=0))
            jax.block_until_ready(self._params)
            progress(f"random {self.cfg.num_params() / 1e9:.3f}B-parameter model in {time.time() - t:.1f} s")
        return self._params

    def take_params(self):
        """The parameters for a train state that will donate them."""
        p = self.params()
        self._params = None
        return p

    def set_params(self, params) -> None:
        self._params = params


def ceilings(ctx: JaxContext) -> None:
    """Copy bandwidth and matmul FLOP/s of the device, as "ceiling" messages."""
    s = ctx.s
    bw = copy_bandwidth(s["copy_bytes"], repeats=10)
    progress(f"copy bandwidth {format_rate(bw, 'B')} ({s['copy_bytes'] / 2**30:.2f} GiB array, read + write)")
    ctx.emit("ceiling", name="copy_bandwidth", value=bw, note=f"jitted x + 1 over {s['copy_bytes'] / 2**30:.2f} "
             "GiB, read + written bytes, best of 10")
    mm = matmul_flops(s["matmul_n"], ctx.cfg.compute_dtype)
    progress(f"matmul {format_rate(mm, 'FLOP')} ({s['matmul_n']}^3 {s['dtype']})")
    ctx.emit("ceiling", name="matmul_flops", value=mm,
             note=f"{s['matmul_n']}^3 {s['dtype']} matmul, best of 3 x 10 calls")


def jax_info() -> dict:
    """Versions and the device, for the table's header."""
    info = dict(jax=jax.__version__, jaxlib=dist_version("jaxlib"), flax=dist_version("flax"),
                optax=dist_version("optax"),
                jax_plugin=next((f"{n} {v}" for n in ("jax-cuda13-plugin", "jax-cuda12-plugin")
                                 if (v := dist_version(n))), None))
    try:
        dev = jax.devices()[0]
        info.update(jax_device=dev.device_kind, jax_platform=jax.default_backend(),
                    jax_device_count=jax.device_count())
    except Exception as e:  # noqa: BLE001 - the sections will report it too
        info.update(jax_device=f"unavailable ({failure_reason(e)[:80]})")
    return info


def dist_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None

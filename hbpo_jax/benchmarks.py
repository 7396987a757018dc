"""GPU benchmarks (issue 8): sampler, training step, transformers baseline, one HBPO step.

Two entry points:
* `run_sampler_benchmark` (launch/bench_sampler.py): sampler throughput against the memory-
  bandwidth ceiling, optionally against transformers' generate, in this process.
* `run` (launch/bench.py): the whole benchmark within a time budget. Each group of sections runs
  in its own worker process (`python -m hbpo_jax.benchmarks --worker ...`: JAX sections in one,
  torch sections in another, so the two never hold GPU memory at once). A worker reports rows as
  JSON lines; a section that raises, runs out of memory, hangs past its time limit or kills its
  worker is recorded as "failed: <reason>" and the rest still run (in a fresh worker when the
  old one died); sections that would overrun the budget are recorded as "skipped: time". The
  table (markdown + json) is rewritten after every section.

Decoding is memory bound: every step reads all weights and, with whole-cache attention, the whole
preallocated KV cache [B, P + N, K, D] of every layer. The rows report that byte count per step,
the bytes a step needs (the KV cache only up to each row's position), the measured copy bandwidth
and the fraction of it reached. Training rows report MFU = 6 x parameters x tokens/s / 989e12.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbpo_jax import sampler, trainer
from hbpo_jax.models import ModelConfig, Qwen2, create_model

# Used when configs/<name>.py is absent or cannot be read.
SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=512),
    "qwen1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                     num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10000.0,
                     tie_word_embeddings=False, max_position_embeddings=131072),
}
# Measured device-to-device copy bandwidth (bytes/s), by substring of jax's device_kind.
BANDWIDTH = {"H200": 4.2e12, "H100": 3.0e12}


def model_config(name: str, dtype: str = "float32", config_dir: str | None = None) -> ModelConfig:
    """configs/<name>.py's get_config().model when readable, else SHAPES[name]; weights and
    compute in `dtype`."""
    fields = None
    path = os.path.join(config_dir or os.path.join(os.path.dirname(__file__), "..", "configs"), f"{name}.py")
    if os.path.exists(path):
        try:
            spec = importlib.util.spec_from_file_location(f"_bench_cfg_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            fields = dict(module.get_config().model)
        except Exception:  # the config module is someone else's: fall back to the table
            fields = None
    if fields is None:
        if name not in SHAPES:
            raise ValueError(f"--model must be one of {sorted(SHAPES)}, got {name!r}.")
        fields = dict(SHAPES[name])
    known = set(ModelConfig.__dataclass_fields__)
    fields = {k: v for k, v in fields.items() if k in known}
    fields.update(dtype=dtype, param_dtype=dtype, eos_token_ids=())
    return ModelConfig(**fields)


def copy_bandwidth(nbytes: int = 1 << 27, repeats: int = 5) -> float:
    """Bytes/s of a jitted elementwise copy (read + write) on the default device."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def device_bandwidth() -> tuple[float, str]:
    """(bytes/s, where the figure comes from) for jax's first device."""
    kind = jax.devices()[0].device_kind
    for name, bw in BANDWIDTH.items():
        if name in kind:
            return bw, f"{kind} (table)"
    return copy_bandwidth(), f"{kind} (measured copy)"


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_sampler(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Times `sampler.generate` (random weights and prompts, no EOS, T = 1) for N and for 1 new
    token; the difference over N - 1 steps is the decode step time."""
    model = create_model(cfg, seed=seed)
    graphdef, state = nnx.split(model)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)

    def run(n):
        out = sampler.generate((graphdef, state), ids, key=jax.random.key(seed), max_new_tokens=n,
                               temperature=1.0, prompt_bucket=None)
        out.tokens.block_until_ready()
        return out

    run(new_tokens), run(1)  # compile both
    t_all = _best_time(lambda: run(new_tokens), repeats)
    t_one = _best_time(lambda: run(1), repeats)
    step = max(t_all - t_one, 1e-9) / max(new_tokens - 1, 1)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    kv_item = jnp.dtype(cfg.compute_dtype).itemsize
    cache_bytes = 2 * cfg.num_layers * batch * (prompt_len + new_tokens) * cfg.num_kv_heads * cfg.head_dim * kv_item
    return dict(impl="hbpo_jax", tokens_per_s=batch * new_tokens / t_all, ms_per_step=1e3 * step,
                prefill_ms=1e3 * t_one, weight_bytes=weight_bytes, kv_bytes=cache_bytes,
                bytes_per_step=weight_bytes + cache_bytes)


def bench_transformers(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, seed: int = 0) -> dict:
    """transformers' Qwen2ForCausalLM.generate, random weights, same shape, sampling at T = 1 with
    min_new_tokens = max_new_tokens; torch on cuda when available (on a CPU, the better of torch's
    default thread count and one thread)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf().items()
                                         if k not in ("torch_dtype", "dtype", "architectures")})
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    ids = torch.as_tensor(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len)),
                          device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
              pad_token_id=0, eos_token_id=None)

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device == "cuda":
            torch.cuda.synchronize()

    run(2)  # warm-up
    t = _best_time(lambda: run(new_tokens), 1)
    if device == "cpu" and torch.get_num_threads() > 1:
        # Intra-op threads can thrash on a small, busy CPU: report the better of default and one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t = min(t, _best_time(lambda: run(new_tokens), 1))
        finally:
            torch.set_num_threads(threads)
    return dict(impl=f"transformers ({device})", tokens_per_s=batch * new_tokens / t,
                ms_per_step=1e3 * t / new_tokens)


def format_table(cfg_name: str, batch: int, prompt_len: int, new_tokens: int, rows: list[dict],
                 bandwidth: float, bandwidth_source: str) -> str:
    lines = [f"model={cfg_name} batch={batch} prompt={prompt_len} new_tokens={new_tokens} "
             f"device={bandwidth_source} bandwidth={bandwidth / 1e9:.1f} GB/s"]
    head = f"{'impl':<24}{'tokens/s':>12}{'ms/step':>10}{'MB/step':>10}{'GB/s':>9}{'of peak':>9}"
    lines += [head, "-" * len(head)]
    for r in rows:
        mb = r.get("bytes_per_step")
        gbs = mb / (r["ms_per_step"] / 1e3) if mb else None
        lines.append(f"{r['impl']:<24}{r['tokens_per_s']:>12.1f}{r['ms_per_step']:>10.3f}"
                     + (f"{mb / 1e6:>10.2f}{gbs / 1e9:>9.1f}{gbs / bandwidth:>9.1%}" if mb else f"{'':>28}"))
    if len(rows) > 1:
        lines.append(f"speed-up over {rows[1]['impl']}: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")
    if "weight_bytes" in rows[0]:
        r = rows[0]
        lines.append(f"bytes/step = weights {r['weight_bytes'] / 1e6:.2f} MB + whole KV cache "
                     f"{r['kv_bytes'] / 1e6:.2f} MB; prefill + first token {r['prefill_ms']:.1f} ms")
    return "\n".join(lines)


def run_sampler_benchmark(model: str = "tiny", batch: int = 8, prompt_len: int = 64, new_tokens: int = 64,
                          dtype: str = "float32", baseline: bool = False) -> str:
    """The table `launch/bench_sampler.py` prints."""
    cfg = model_config(model, dtype)
    rows = [bench_sampler(cfg, batch, prompt_len, new_tokens)]
    if baseline:
        rows.append(bench_transformers(cfg, batch, prompt_len, new_tokens))
    bw, source = device_bandwidth()
    return format_table(model, batch, prompt_len, new_tokens, rows, bw, source)


# ============================================================================= launch/bench.py
# Settings, sections, worker processes and the table. Everything a worker sends is a JSON line
# "@@BENCH {...}" on its stdout: info, ceiling, start, row, end.

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)
PAPER = dict(steps=629, prompts=64, rollouts=16, prompt_len=256, mean_response=2400, max_response=4096,
             max_batch=256)  # HBPO.md's training setup, as the projection row uses it
_OPTIM = types.SimpleNamespace(learning_rate=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.01,
                               b1=0.9, b2=0.999, grad_clip=1.0)  # configs/qwen1_5b.py's optim
_LOSS_KW = tuple(sorted(dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.0,
                             aggregation="token-mean").items()))
_TAG = "@@BENCH "
_FAULT_ENV = "HBPO_BENCH_FAULT"  # "section:raise|crash|hang", for the tests of the failure paths


def bench_settings(smoke: bool = False) -> dict:
    """What `run` measures. Full: the Qwen2-1.5B shape in bf16 (estimates in seconds on an H100,
    compilation included). Smoke: the same code paths at toy size, on a CPU in a minute or two."""
    if smoke:
        return dict(
            mode="smoke", model="tiny", model_changes=dict(num_layers=1), dtype="float32", prompt_len=8,
            new_tokens=8, sampler_batches=[2, 1], sampler_repeats=2, train_batch=2, train_seq=32, train_prompt=1,
            train_repeats=2,
            train_large=[[4, "full"], [2, "full"]],
            hbpo=dict(prompts=1, rollouts=2, prompt_len=8, response_len=8, mini_batches=2, micro=1, remat="full"),
            copy_bytes=1 << 24, matmul_n=256, hf_warmup_tokens=2, hf_repeats=1, hf_train_repeats=2,
            budget_s=420.0, grace_s=30.0, section_timeout_s=None,
            startup_est={"jax": 8.0, "torch": 10.0}, est_scale=0.1)
    return dict(
        mode="full", model="qwen1_5b", model_changes={}, dtype="bfloat16", prompt_len=256, new_tokens=512,
        sampler_batches=[256, 64], sampler_repeats=3, train_batch=4, train_seq=2048, train_prompt=1, train_repeats=3,
        train_large=[[16, "full"], [8, "full"]],
        # rows = prompts x rollouts = the small sampler batch and the same lengths, so the rollout
        # reuses that section's compiled sampler; the paper's remat for the update.
        hbpo=dict(prompts=4, rollouts=16, prompt_len=256, response_len=512, mini_batches=4, micro=16, remat="full"),
        copy_bytes=1 << 31, matmul_n=8192, hf_warmup_tokens=4, hf_repeats=1, hf_train_repeats=3,
        budget_s=375.0, grace_s=15.0, section_timeout_s=None,
        startup_est={"jax": 25.0, "torch": 20.0}, est_scale=1.0)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    group: str  # "jax" or "torch": the worker process kind
    priority: int  # lower runs first when time is short; higher-priority work keeps its time
    est_s: float  # full-mode estimate on an H100, compilation included
    job: str
    impl: str


SECTIONS = {s.name: s for s in [
    Section("ceilings", "jax", 0, 8, "ceilings", "jax"),
    Section("sampler_large", "jax", 1, 50, "sampler (generate)", "hbpo_jax"),
    Section("sampler_small", "jax", 2, 40, "sampler (generate)", "hbpo_jax"),
    Section("train_small", "jax", 3, 70, "training step", "hbpo_jax"),
    Section("hf_sampler_large", "torch", 4, 40, "sampler (generate)", "transformers"),
    Section("hf_sampler_small", "torch", 5, 32, "sampler (generate)", "transformers"),
    Section("hf_train", "torch", 6, 12, "training step", "transformers"),
    Section("hbpo_fraction", "jax", 7, 70, "HBPO step (fraction)", "hbpo_jax"),
    Section("train_large", "jax", 8, 75, "training step (largest batch)", "hbpo_jax"),
    Section("train_xla", "jax", 9, 60, "training step", "hbpo_jax (xla attention)"),
]}
PLAN = [("jax", ["ceilings", "sampler_large", "sampler_small", "train_small", "hbpo_fraction", "train_large",
                 "train_xla"]),
        ("torch", ["hf_sampler_large", "hf_sampler_small", "hf_train"])]

DISPLAY = ["ceilings", "sampler_large", "hf_sampler_large", "sampler_small", "hf_sampler_small", "train_small",
           "train_xla", "train_large", "hf_train", "hbpo_fraction"]  # table order


def section_shape(name: str, s: dict) -> str:
    """The shape column of a section's rows (also of its failed/skipped row)."""
    p, n = s["prompt_len"], s["new_tokens"]
    if name in ("sampler_large", "hf_sampler_large"):
        return f"B={s['sampler_batches'][0]}, prompt {p}, +{n} tokens"
    if name in ("sampler_small", "hf_sampler_small"):
        return f"B={s['sampler_batches'][1]}, prompt {p}, +{n} tokens"
    if name in ("train_small", "hf_train", "train_xla"):
        return f"{s['train_batch']} x {s['train_seq']} tokens"
    if name == "train_large":
        return " or ".join(f"{b} x {s['train_seq']}" for b, _ in s["train_large"])
    if name == "hbpo_fraction":
        h = s["hbpo"]
        return (f"{h['prompts']} prompts x {h['rollouts']} rollouts, prompt {h['prompt_len']}, "
                f"+{h['response_len']} tokens")
    return ""


def bench_model_config(name: str, dtype: str, **changes) -> ModelConfig:
    """SHAPES[name] with weights and compute in `dtype` and no EOS (every row runs to its cap)."""
    known = set(ModelConfig.__dataclass_fields__)
    fields = {k: v for k, v in SHAPES[name].items() if k in known}
    fields.update(dtype=dtype, param_dtype=dtype, eos_token_ids=())
    fields.update(changes)
    return ModelConfig(**fields)


def decode_bytes(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                 cache_prompt: int | None = None) -> dict:
    """Bytes one decode step moves, averaged over `new_tokens` steps.

    weights: every parameter once, except an untied embedding table (only B rows are gathered);
    kv_needed: keys and values of every layer up to each row's position (prompt + n/2 on average);
    kv_read: the whole preallocated cache [B, cache_prompt + new_tokens] (what whole-cache
    attention reads; cache_prompt = the bucketed prompt length, default prompt_len).
    """
    w_item = jnp.dtype(cfg.weight_dtype).itemsize
    weights = cfg.num_params() * w_item
    if not cfg.tie_word_embeddings:
        weights -= cfg.vocab_size * cfg.hidden_size * w_item
    slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    return dict(weight_bytes=float(weights), kv_needed=float(slot * batch * (prompt_len + new_tokens / 2)),
                kv_read=float(slot * batch * ((cache_prompt or prompt_len) + new_tokens)))


# ----------------------------------------------------------------------------- worker side

def _emit(kind: str, **payload) -> None:
    print(_TAG + json.dumps(dict(payload, type=kind), default=str), flush=True)


def _progress(msg: str) -> None:
    print(f"    {msg}", flush=True)


def _reason(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text:
        text = "OOM: " + text
    return text[:240]


def _rate(v: float, unit: str) -> str:
    """1.23 TB/s, 45.6 GB/s, ... (v per second in base units)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}/s" if v < 100 * scale else f"{v / scale:.0f} {prefix}{unit}/s"
    return f"{v:.3g} {unit}/s"


def _median(xs):
    return float(statistics.median(xs))


class SectionSkipped(Exception):
    """Raised by a section that has nothing to measure; reported as "skipped: <message>"."""


def _fault(name: str) -> None:
    spec = os.environ.get(_FAULT_ENV, "")
    for item in filter(None, spec.split(",")):
        sec, _, mode = item.partition(":")
        if sec != name:
            continue
        if mode == "crash":
            os._exit(3)
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault in {name}")


def run_sections(names, fns, *, deadline: float, external=(), est=None, emit=_emit, scale_jax=True) -> None:
    """Runs sections in order, each guarded: an exception is reported as "failed: <reason>" and the
    next section runs. A section whose estimate, plus the estimates of more important sections
    still to run elsewhere (`external`: (priority, seconds) pairs), would pass `deadline` (a
    time.time() value) is reported "skipped: time". Estimates are scaled by how long this worker's
    sections took against theirs so far (clamped to [0.5, 2]). fns: name -> fn(emit_row)."""
    est = est or (lambda name: SECTIONS[name].est_s)
    spent, planned = 0.0, 0.0
    for name in names:
        sec = SECTIONS.get(name)
        factor = min(max(spent / planned, 0.5), 2.0) if (planned and scale_jax) else 1.0
        cost = est(name) * factor
        reserve = sum(e for p, e in external if sec is None or p < sec.priority)
        left = deadline - time.time()
        if cost + reserve > left:
            emit("end", section=name, status="skipped: time",
                 detail=f"estimate {cost:.0f}s + reserved {reserve:.0f}s > {max(left, 0):.0f}s left")
            continue
        emit("start", section=name, est_s=cost)
        t0 = time.time()
        status = "ok"
        try:
            _fault(name)
            fns[name](lambda **row: emit("row", row=dict(row, section=name)))
        except SectionSkipped as e:
            status = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - every failure is a table entry, never the end of the run
            status = "failed: " + _reason(e)
        gc.collect()
        spent += time.time() - t0
        planned += est(name)
        emit("end", section=name, status=status, seconds=time.time() - t0)


class _JaxCtx:
    """What the JAX sections share in one worker: the model config, graphdefs per attention/remat
    setting (all over the same parameters), the current parameters, facts from earlier sections."""

    def __init__(self, s: dict):
        self.s = s
        self.cfg = bench_model_config(s["model"], s["dtype"], **s.get("model_changes", {}))
        self.platform = jax.default_backend()
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
            _progress(f"random {self.cfg.num_params() / 1e9:.3f}B-parameter model in {time.time() - t:.1f} s")
        return self._params

    def take_params(self):
        """The parameters for a train state that will donate them."""
        p = self.params()
        self._params = None
        return p

    def set_params(self, params) -> None:
        self._params = params


def _matmul_flops(n: int, dtype, calls: int = 10, repeats: int = 3) -> float:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [f(a, b) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t) / calls)
        del outs
    return 2 * n ** 3 / best


def _sec_ceilings(ctx: _JaxCtx, emit_row) -> None:
    s = ctx.s
    bw = copy_bandwidth(s["copy_bytes"], repeats=10)
    _progress(f"copy bandwidth {_rate(bw, 'B')} ({s['copy_bytes'] / 2**30:.2f} GiB array, read + write)")
    _emit("ceiling", name="copy_bandwidth", value=bw, note=f"jitted x + 1 over {s['copy_bytes'] / 2**30:.2f} GiB, "
          "read + written bytes, best of 10")
    mm = _matmul_flops(s["matmul_n"], ctx.cfg.compute_dtype)
    _progress(f"matmul {_rate(mm, 'FLOP')} ({s['matmul_n']}^3 {s['dtype']})")
    _emit("ceiling", name="matmul_flops", value=mm, note=f"{s['matmul_n']}^3 {s['dtype']} matmul, best of 3 x 10 calls")


def _timed_generate(graphdef, params, ids, key, n: int):
    """One sampler.generate call as (prefill s, decode-loop s, SamplerOutput); no EOS, T = 1.
    Times the two jitted halves separately when the sampler exposes them (sampler._prepare)."""
    kw = dict(key=key, max_new_tokens=n, limits=None, eos_ids=(), pad_id=0, temperature=1.0, top_p=1.0,
              top_k=0, mesh=None, rules=None, prompt_bucket="pow2", cache_dtype=None)
    prepare = getattr(sampler, "_prepare", None)
    call = None
    if prepare is not None:
        try:
            call = prepare((graphdef, params), ids, None, **kw)
            fns = call.fns
            _ = (fns.prefill, fns.decode, call.state, call.cache, call.prompt_ids, call.prompt_mask,
                 call.prompt_lens, call.limits, call.key)
        except (TypeError, AttributeError):  # the sampler's internals changed: time generate() whole
            call = None
    if call is None:
        t = time.perf_counter()
        out = sampler.generate((graphdef, params), ids, **kw)
        jax.block_until_ready(out)
        return float("nan"), time.perf_counter() - t, out
    jax.block_until_ready(call.cache)
    t0 = time.perf_counter()
    try:
        logits, cache = call.fns.prefill(call.state, call.cache, call.prompt_ids, call.prompt_mask)
    except TypeError:  # raised before anything runs or is donated: time generate() whole
        del call
        t = time.perf_counter()
        out = sampler.generate((graphdef, params), ids, **kw)
        jax.block_until_ready(out)
        return float("nan"), time.perf_counter() - t, out
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out, cache = call.fns.decode(call.state, cache, logits, call.prompt_lens, call.limits, call.key)
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    del cache, call
    return t1 - t0, t2 - t1, out


def _sampler_section(ctx: _JaxCtx, emit_row, batch: int) -> None:
    s, cfg = ctx.s, ctx.cfg
    p, n = s["prompt_len"], s["new_tokens"]
    graphdef, params = ctx.graphdef("xla", "none"), ctx.params()
    ids = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, p)).astype(np.int32)
    calls = []
    for r in range(1 + s["sampler_repeats"]):
        pre, dec, out = _timed_generate(graphdef, params, ids, jax.random.key(r), n)
        calls.append((pre, dec))
        _progress(f"{'warm-up (compile)' if r == 0 else 'timed'} call: prefill {pre:.3f} s, decode {dec:.3f} s")
    lengths = np.asarray(out.lengths)
    pre = _median([c[0] for c in calls[1:]])
    dec = _median([c[1] for c in calls[1:]])
    total = dec + (0.0 if np.isnan(pre) else pre)
    warm = sum(x for x in calls[0] if not np.isnan(x))
    cache_prompt = sampler.bucket_length(p)
    notes = [f"median of {s['sampler_repeats']} timed calls", f"prefill {pre * 1e3:.0f} ms" if not np.isnan(pre)
             else "prefill not timed apart", f"decode loop {dec:.2f} s"]
    if int(lengths.min()) != n:
        notes.append(f"WARNING rows stopped early (min length {int(lengths.min())})")
    emit_row(kind="sampler", job="sampler (generate)", impl="hbpo_jax", shape=section_shape(
        "sampler_large" if batch == s["sampler_batches"][0] else "sampler_small", s),
        tokens_per_s=batch * n / total, step_s=dec / max(n - 1, 1), step_label="decode step",
        compile_s=max(warm - total, 0.0), prefill_s=pre, batch=batch,
        notes="; ".join(notes), **decode_bytes(cfg, batch, p, n, cache_prompt))


def _train_batch(batch: int, seq: int, prompt: int, vocab: int, seed: int = 0) -> dict:
    """One mini-batch for trainer.update, one micro-batch: arrays [1, b, ...]."""
    rng = np.random.default_rng(seed)
    n = seq - prompt
    return jax.tree.map(jnp.asarray, dict(
        tokens=rng.integers(0, vocab, (1, batch, seq)).astype(np.int32),
        attention_mask=np.ones((1, batch, seq), np.int32),
        response_mask=np.ones((1, batch, n), bool),
        old_logp=(-np.log(vocab) + 0.1 * rng.standard_normal((1, batch, n))).astype(np.float32),
        advantages=rng.choice([-1.0, 1.0], (1, batch)).astype(np.float32),
        weight=np.ones((1,), np.float32)))


def _train_once(ctx: _JaxCtx, batch: int, attention_impl: str, remat: str) -> dict:
    s, cfg = ctx.s, ctx.cfg
    seq, prompt = s["train_seq"], s["train_prompt"]
    graphdef = ctx.graphdef(attention_impl, remat)
    optimizer = trainer.make_optimizer(_OPTIM, total_updates=1000)
    state = trainer.init_state(ctx.take_params(), optimizer)
    mb = _train_batch(batch, seq, prompt, cfg.vocab_size)
    times = []
    try:
        for r in range(1 + s["train_repeats"]):
            t = time.perf_counter()
            state, metrics = trainer.update(graphdef, state, mb, optimizer=optimizer, prompt_len=prompt,
                                            temperature=1.0, loss_kwargs=_LOSS_KW)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
            _progress(f"{'warm-up (compile)' if r == 0 else 'timed'} step: {times[-1]:.3f} s")
    except Exception:
        if not any(x.is_deleted() for x in jax.tree.leaves(state.params)):
            ctx.set_params(state.params)  # failed before donating (e.g. at compilation): keep them
        raise
    ctx.set_params(state.params)
    loss = float(metrics["loss"])
    del state
    step = _median(times[1:])
    tokens = batch * seq
    impl = ctx.impl(attention_impl)
    return dict(kind="train", job="training step", impl=f"hbpo_jax ({impl} attention, remat {remat})",
                shape=f"{batch} x {seq} tokens", tokens_per_s=tokens / step, step_s=step, step_label="update",
                compile_s=max(times[0] - step, 0.0), flops_per_s=6 * cfg.num_params() * tokens / step,
                flops_rule="6N", batch=batch, attention=impl, remat=remat,
                notes=f"policy loss + backward + AdamW (clip 1.0), {s['dtype']} params and moments, one micro-batch, "
                      f"chunked log-probs; median of {s['train_repeats']}; loss {loss:.3f}")


def _train_attempts(ctx: _JaxCtx, emit_row, attempts) -> dict:
    """The first attempt (batch, attention, remat) that runs; failed ones are named in the notes."""
    failures = []
    for batch, attention_impl, remat in attempts:
        _progress(f"batch {batch}, {ctx.impl(attention_impl)} attention, remat {remat}")
        try:
            row = _train_once(ctx, batch, attention_impl, remat)
        except Exception as e:  # noqa: BLE001 - OOM or an unsupported kernel: try the next setting
            failures.append(f"{batch}/{ctx.impl(attention_impl)}/{remat}: {_reason(e)[:120]}")
            _progress("failed: " + failures[-1])
            gc.collect()
            continue
        if failures:
            row["notes"] += "; earlier attempts failed: " + " | ".join(failures)
        emit_row(**row)
        return row
    raise RuntimeError("every attempt failed: " + " | ".join(failures))


def _sec_train_small(ctx: _JaxCtx, emit_row) -> None:
    b = ctx.s["train_batch"]
    # xla attention materialises [B, H, T, S] scores: its last resort rematerialises every layer.
    row = _train_attempts(ctx, emit_row, [(b, "cudnn", "none"), (b, "xla", "none"), (b, "xla", "full")])
    ctx.facts["train_attention"] = row["attention"]


def _sec_train_xla(ctx: _JaxCtx, emit_row) -> None:
    if ctx.facts.get("train_attention") == "xla":
        raise SectionSkipped("the training-step row above already fell back to xla attention")
    _train_attempts(ctx, emit_row, [(ctx.s["train_batch"], "xla", "none")])


def _sec_train_large(ctx: _JaxCtx, emit_row) -> None:
    impl = "xla" if ctx.facts.get("train_attention") == "xla" else "cudnn"
    _train_attempts(ctx, emit_row, [(b, impl, remat) for b, remat in ctx.s["train_large"]])


def _attention_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token of causal attention scores and mixing (6 x layers x heads x D x L)."""
    return 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def _sec_hbpo(ctx: _JaxCtx, emit_row) -> None:
    s, cfg, h = ctx.s, ctx.cfg, ctx.s["hbpo"]
    rows, p, n = h["prompts"] * h["rollouts"], h["prompt_len"], h["response_len"]
    shape = section_shape("hbpo_fraction", s)
    sample_gd = ctx.graphdef("xla", "none")
    train_gd = ctx.graphdef("xla" if ctx.facts.get("train_attention") == "xla" else "cudnn", h["remat"])
    params = ctx.params()
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (rows, p)).astype(np.int32)

    # 1. Rollouts: the sampler, every row to the cap (random weights, no EOS).
    pre0, dec0, _ = _timed_generate(sample_gd, params, ids, jax.random.key(100), n)
    pre, dec, out = _timed_generate(sample_gd, params, ids, jax.random.key(101), n)
    pre = 0.0 if np.isnan(pre) else pre
    t_roll = pre + dec
    _progress(f"rollout {t_roll:.2f} s (first call {pre0 + dec0:.2f} s)")
    prompt_len = sampler.bucket_length(p)
    tokens = np.concatenate([ids, np.asarray(out.tokens)], 1).astype(np.int32)
    resp_mask = np.arange(n)[None] < np.asarray(out.lengths)[:, None]
    attn = np.concatenate([np.ones((rows, p), np.int32), resp_mask.astype(np.int32)], 1)
    seq = p + n
    b = decode_bytes(cfg, rows, p, n, prompt_len)
    emit_row(kind="phase", job="HBPO step: rollout", impl="hbpo_jax", shape=shape,
             tokens_per_s=rows * n / t_roll, step_s=t_roll, step_label="phase",
             compile_s=max(pre0 + dec0 - t_roll, 0.0), batch=rows, decode_step_s=dec / max(n - 1, 1), **b,
             notes=f"sampler.generate, {rows} rows, no EOS: every row runs {n} tokens; second of two calls")

    # 2. Old log-probs, micro-batch by micro-batch (the loop's recompute).
    mb = h["micro"]
    t = time.perf_counter()
    jax.block_until_ready(trainer.compute_logprobs(train_gd, params, tokens[:mb], attn[:mb], prompt_len=p))
    t_lp_warm = time.perf_counter() - t
    t = time.perf_counter()
    outs = [trainer.compute_logprobs(train_gd, params, tokens[i:i + mb], attn[i:i + mb], prompt_len=p)
            for i in range(0, rows, mb)]
    old = np.concatenate([np.asarray(x) for x in outs])
    t_lp = time.perf_counter() - t
    _progress(f"old log-probs {t_lp:.2f} s (first micro-batch with compile {t_lp_warm:.2f} s)")
    emit_row(kind="phase", job="HBPO step: old log-probs", impl="hbpo_jax", shape=shape,
             tokens_per_s=rows * seq / t_lp, step_s=t_lp, step_label="phase",
             compile_s=max(t_lp_warm - t_lp * mb / rows, 0.0),
             flops_per_s=2 * cfg.num_params() * rows * seq / t_lp, flops_rule="2N (forward)",
             notes=f"trainer.compute_logprobs in micro-batches of {mb} x {seq} tokens, remat {h['remat']}")

    # 3. Updates: mini-batches of rows / mini_batches sequences, micro-batches of `micro`.
    optimizer = trainer.make_optimizer(_OPTIM, total_updates=1000)
    state = trainer.init_state(ctx.take_params(), optimizer)
    del params
    per = rows // h["mini_batches"]
    adv = np.random.default_rng(8).choice([-1.0, 1.0], rows).astype(np.float32)
    arrays = dict(tokens=tokens, attention_mask=attn, response_mask=resp_mask, old_logp=old, advantages=adv)
    minibatches = []
    for start in range(0, rows, per):
        m = {k: v[start:start + per].reshape((per // mb, mb) + v.shape[1:]) for k, v in arrays.items()}
        m["weight"] = trainer.micro_weights(m["response_mask"], "token-mean")
        minibatches.append(jax.tree.map(jnp.asarray, m))
    kw = dict(optimizer=optimizer, prompt_len=p, temperature=1.0, loss_kwargs=_LOSS_KW)
    t = time.perf_counter()
    state, metrics = trainer.update(train_gd, state, minibatches[0], **kw)
    jax.block_until_ready((state, metrics))
    t_up_warm = time.perf_counter() - t
    t = time.perf_counter()
    for m in minibatches:
        state, metrics = trainer.update(train_gd, state, m, **kw)
    jax.block_until_ready((state, metrics))
    t_up = time.perf_counter() - t
    ctx.set_params(state.params)
    del state
    _progress(f"{len(minibatches)} updates {t_up:.2f} s (first with compile {t_up_warm:.2f} s)")
    emit_row(kind="phase", job="HBPO step: update", impl="hbpo_jax", shape=shape,
             tokens_per_s=rows * seq / t_up, step_s=t_up, step_label="phase",
             compile_s=max(t_up_warm - t_up / len(minibatches), 0.0),
             flops_per_s=6 * cfg.num_params() * rows * seq / t_up, flops_rule="6N",
             notes=f"{len(minibatches)} mini-batches of {per} rows (micro-batches of {mb}), AdamW; remat "
                   f"{h['remat']}; grading is CPU-side and excluded")

    # 4. Projection to the paper's step (one card).
    P = PAPER
    big_rows = P["prompts"] * P["rollouts"]
    calls = -(-big_rows // P["max_batch"])
    eff_bw = (b["weight_bytes"] + b["kv_read"]) / (dec / max(n - 1, 1))
    big = decode_bytes(cfg, P["max_batch"], P["prompt_len"], P["max_response"])
    decode_step = (big["weight_bytes"] + big["kv_read"]) / eff_bw
    prefill = pre * (P["max_batch"] * P["prompt_len"]) / (rows * prompt_len)
    roll = calls * (prefill + P["max_response"] * decode_step)
    big_seq = P["prompt_len"] + P["max_response"]
    attn_scale = ((6 * cfg.num_params() + _attention_flops_per_token(cfg, big_seq))
                  / (6 * cfg.num_params() + _attention_flops_per_token(cfg, seq)))
    token_scale = big_rows * big_seq / (rows * seq) * attn_scale
    lp, up = t_lp * token_scale, t_up * token_scale
    step = roll + lp + up
    emit_row(kind="projection", job="HBPO step, projected (paper shape)", impl="hbpo_jax",
             shape=f"{P['steps']} steps x {P['prompts']}x{P['rollouts']} rollouts, prompt {P['prompt_len']}, "
                   f"<= {P['max_response']} (mean ~{P['mean_response']}) tokens",
             tokens_per_s=big_rows * P["mean_response"] / step, step_s=step, step_label="step",
             total_hours=P["steps"] * step / 3600, rollout_s=roll, logprobs_s=lp, update_s=up,
             notes=(f"rollout {roll:.0f} s ({calls} sampler calls of {P['max_batch']} rows, each "
                    f"{P['max_response']} decode steps: the longest row sets the length; step time = bytes "
                    f"read (weights + whole cache at {big_seq}) / the {_rate(eff_bw, 'B')} effective rate "
                    f"measured above; prefill scaled by tokens) + old log-probs {lp:.0f} s + update {up:.0f} s "
                    f"(measured rates x {big_rows} x {big_seq} padded tokens, attention term {attn_scale:.2f}x); "
                    f"{P['steps']} steps = {P['steps'] * step / 3600:.1f} h on one card; tokens/s = mean "
                    f"response tokens / step; grading (CPU) excluded"))


class _TorchCtx:
    def __init__(self, s: dict):
        import torch
        import transformers

        self.torch, self.transformers, self.s = torch, transformers, s
        self.cfg = bench_model_config(s["model"], s["dtype"], **s.get("model_changes", {}))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s["dtype"]]
        self._model = None

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def model(self):
        if self._model is None:
            torch, transformers = self.torch, self.transformers
            hf = {k: v for k, v in self.cfg.to_hf().items() if k not in ("torch_dtype", "dtype", "architectures")}
            config = transformers.Qwen2Config(**hf, attn_implementation="sdpa")
            torch.manual_seed(0)
            t = time.time()
            previous = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                with torch.device(self.device):
                    self._model = transformers.Qwen2ForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
            self._model.to(device=self.device, dtype=self.dtype)
            self.sync()
            _progress(f"transformers model on {self.device} in {time.time() - t:.1f} s "
                      f"(attention {self._model.config._attn_implementation})")
        return self._model


def _hf_sampler_section(ctx: _TorchCtx, emit_row, batch: int, name: str) -> None:
    torch, s = ctx.torch, ctx.s
    p, n = s["prompt_len"], s["new_tokens"]
    model = ctx.model().eval()
    ids = torch.as_tensor(np.random.default_rng(batch).integers(0, ctx.cfg.vocab_size, (batch, p)),
                          device=ctx.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
              pad_token_id=0, eos_token_id=None)

    def call(tokens):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        ctx.sync()
        return time.perf_counter() - t, out

    warm, _ = call(s["hf_warmup_tokens"])
    times = []
    for _ in range(s["hf_repeats"]):
        dt, out = call(n)
        times.append(dt)
        _progress(f"generate {n} tokens: {dt:.2f} s")
    if out.shape[1] != p + n:
        raise RuntimeError(f"generate returned {out.shape[1] - p} new tokens, expected {n}")
    total = _median(times)
    emit_row(kind="sampler", job="sampler (generate)", impl=f"transformers {ctx.transformers.__version__} (sdpa)",
             shape=section_shape(name, s), tokens_per_s=batch * n / total, step_s=total / n,
             step_label="token (end to end)", compile_s=None, batch=batch, kv_read=None,
             notes=f"do_sample, min_new_tokens={n}, dynamic cache; {s['hf_repeats']} timed call(s) after a "
                   f"{s['hf_warmup_tokens']}-token warm-up ({warm:.1f} s); ms/step = call time / {n}",
             **{k: v for k, v in decode_bytes(ctx.cfg, batch, p, n).items() if k != "kv_read"})
    del out
    if ctx.device == "cuda":
        torch.cuda.empty_cache()


def _hf_train_section(ctx: _TorchCtx, emit_row) -> None:
    torch, s = ctx.torch, ctx.s
    b, seq = s["train_batch"], s["train_seq"]
    model = ctx.model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=_OPTIM.learning_rate, betas=(_OPTIM.b1, _OPTIM.b2),
                            weight_decay=_OPTIM.weight_decay)
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, ctx.cfg.vocab_size, (b, seq)), device=ctx.device)
    times = []
    for r in range(1 + s["hf_train_repeats"]):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _OPTIM.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.sync()
        times.append(time.perf_counter() - t)
        _progress(f"{'warm-up' if r == 0 else 'timed'} step: {times[-1]:.3f} s")
    step = _median(times[1:])
    tokens = b * seq
    emit_row(kind="train", job="training step", impl=f"transformers {ctx.transformers.__version__} (sdpa)",
             shape=section_shape("hf_train", s), tokens_per_s=tokens / step, step_s=step, step_label="update",
             compile_s=None, flops_per_s=6 * ctx.cfg.num_params() * tokens / step, flops_rule="6N", batch=b,
             notes=f"forward with labels (cross-entropy), backward, clip 1.0, torch.optim.AdamW; "
                   f"{s['dtype']} params and moments; median of {s['hf_train_repeats']}; loss {loss.item():.3f}")
    del opt, loss
    model.eval()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()


def _jax_info() -> dict:
    info = dict(jax=jax.__version__, jaxlib=_dist_version("jaxlib"), flax=_dist_version("flax"),
                optax=_dist_version("optax"),
                jax_plugin=next((f"{n} {v}" for n in ("jax-cuda13-plugin", "jax-cuda12-plugin")
                                 if (v := _dist_version(n))), None))
    try:
        dev = jax.devices()[0]
        info.update(jax_device=dev.device_kind, jax_platform=jax.default_backend(),
                    jax_device_count=jax.device_count())
    except Exception as e:  # noqa: BLE001 - the sections will report it too
        info.update(jax_device=f"unavailable ({_reason(e)[:80]})")
    return info


def _dist_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def worker_main(group: str, names: list[str], s: dict, deadline: float, external) -> None:
    """A worker process: runs `names` (all of one group) and reports on stdout."""
    t = time.time()
    if group == "jax":
        _emit("info", **_jax_info())
        ctx = _JaxCtx(s)
        fns = dict(ceilings=lambda row: _sec_ceilings(ctx, row),
                   sampler_large=lambda row: _sampler_section(ctx, row, s["sampler_batches"][0]),
                   sampler_small=lambda row: _sampler_section(ctx, row, s["sampler_batches"][1]),
                   train_small=lambda row: _sec_train_small(ctx, row),
                   train_xla=lambda row: _sec_train_xla(ctx, row),
                   train_large=lambda row: _sec_train_large(ctx, row),
                   hbpo_fraction=lambda row: _sec_hbpo(ctx, row))
    else:
        ctx = _TorchCtx(s)
        torch = ctx.torch
        try:
            name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
        except Exception as e:  # noqa: BLE001
            name = f"unavailable ({_reason(e)[:80]})"
        _emit("info", torch=torch.__version__, transformers=ctx.transformers.__version__, torch_device=name,
              torch_cuda=torch.version.cuda)
        fns = dict(hf_sampler_large=lambda row: _hf_sampler_section(ctx, row, s["sampler_batches"][0],
                                                                    "hf_sampler_large"),
                   hf_sampler_small=lambda row: _hf_sampler_section(ctx, row, s["sampler_batches"][1],
                                                                    "hf_sampler_small"),
                   hf_train=lambda row: _hf_train_section(ctx, row))
    _progress(f"{group} worker ready in {time.time() - t:.1f} s")
    run_sections(names, fns, deadline=deadline, external=[tuple(x) for x in external],
                 est=lambda name: SECTIONS[name].est_s * s["est_scale"], scale_jax=(group == "jax"))


# ----------------------------------------------------------------------------- parent side

class Report:
    """Everything the workers reported, rendered as markdown and json after every change."""

    def __init__(self, s: dict, out_dir: str | None, budget_s: float):
        self.s, self.out_dir, self.budget_s = s, out_dir, budget_s
        self.t0 = time.time()
        self.meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                         mode=s["mode"], model=s["model"], dtype=s["dtype"], python=platform.python_version(),
                         host=platform.node(), budget_s=budget_s)
        self.ceilings: dict = {}
        self.rows: list[dict] = []
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    # -- collection
    def add_row(self, row: dict) -> None:
        self.rows.append(dict(row, status="ok"))

    def set_status(self, name: str, status: str, seconds: float | None = None) -> None:
        self.status[name] = status
        if seconds is not None:
            self.seconds[name] = seconds

    # -- derived numbers
    def _ref_bandwidth(self):
        kind = self.meta.get("jax_device", "") + " " + self.meta.get("torch_device", "")
        return next(((n, bw) for n, bw in BANDWIDTH.items() if n in kind), (None, None))

    def _peak_flops(self):
        kind = self.meta.get("jax_device", "") + " " + self.meta.get("torch_device", "")
        return next((f for n, f in PEAK_FLOPS.items() if n in kind), None)

    def all_rows(self) -> list[dict]:
        """Rows in plan order, with a row per failed or skipped section."""
        out = []
        for name in DISPLAY:
            mine = [r for r in self.rows if r.get("section") == name]
            out.extend(mine)
            st = self.status.get(name)
            if st is not None and st != "ok":
                sec = SECTIONS[name]
                out.append(dict(section=name, kind="status", job=sec.job, impl=sec.impl,
                                shape=section_shape(name, self.s), tokens_per_s=None, status=st))
        return out

    def ratios(self) -> list[dict]:
        def find(section):
            return next((r for r in self.rows if r.get("section") == section and r.get("tokens_per_s")), None)

        out = []
        for label, ours, theirs in (
                (f"sampler, batch {self.s['sampler_batches'][0]}", "sampler_large", "hf_sampler_large"),
                (f"sampler, batch {self.s['sampler_batches'][1]}", "sampler_small", "hf_sampler_small"),
                (f"training step, {self.s['train_batch']} x {self.s['train_seq']}", "train_small", "hf_train")):
            a, b = find(ours), find(theirs)
            out.append(dict(what=label, ours=a and a["tokens_per_s"], transformers=b and b["tokens_per_s"],
                            ratio=(a["tokens_per_s"] / b["tokens_per_s"]) if a and b else None,
                            ours_impl=a and a.get("impl")))
        return out

    def _cells(self, r: dict) -> list[str]:
        if r.get("kind") == "status":
            return [r["job"], r["impl"], r["shape"], r["status"], "", "", "", "", ""]
        bw = self.ceilings.get("copy_bandwidth")
        ref_name, ref_bw = self._ref_bandwidth()
        peak, mm = self._peak_flops(), self.ceilings.get("matmul_flops")
        step = r.get("step_s")
        step_cell = "" if step is None else (f"{step * 1e3:.2f} ms" if step < 1 else f"{step:.2f} s")
        if step is not None and r.get("step_label"):
            step_cell += f" / {r['step_label']}"
        compile_cell = "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        ceiling, frac = "", ""
        if "weight_bytes" in r and step:
            step_time = r.get("decode_step_s") or step
            needed = (r["weight_bytes"] + r["kv_needed"]) / step_time
            read = (r["weight_bytes"] + r["kv_read"]) / step_time if r.get("kv_read") else None
            parts = []
            if bw:
                parts.append(f"copy {_rate(bw, 'B')} measured")
            if ref_bw:
                parts.append(f"{ref_name} {ref_bw / 1e12:.1f} TB/s ref")
            ceiling = "HBM: " + ("; ".join(parts) or "n/a")
            fr = []
            for label, rate in (("needed", needed), ("read", read)):
                if rate is None:
                    continue
                vals = ([f"{rate / bw:.0%}"] if bw else []) + ([f"{rate / ref_bw:.0%} of ref"] if ref_bw else [])
                fr.append(f"{label} {_rate(rate, 'B')}" + (f" = {' / '.join(vals)}" if vals else ""))
            frac = "; ".join(fr)
        elif r.get("flops_per_s"):
            f = r["flops_per_s"]
            ceiling = (f"{peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "no peak (not H100/H200)") + (
                f"; matmul {_rate(mm, 'FLOP')} measured" if mm else "")
            frac = (f"MFU {f / peak:.1%}" if peak else _rate(f, "FLOP")) + (
                f" ({f / mm:.0%} of measured matmul)" if mm else "") + f" [{r.get('flops_rule', '6N')}]"
        elif r.get("kind") == "projection":
            ceiling, frac = "", f"{r['total_hours']:.1f} h for {PAPER['steps']} steps"
        tps = r.get("tokens_per_s")
        return [r.get("job", ""), r.get("impl", ""), r.get("shape", ""), "" if tps is None else f"{tps:,.0f}",
                step_cell, compile_cell, ceiling, frac, r.get("notes", "")]

    def markdown(self) -> str:
        m = self.meta
        dev = m.get("jax_device") or m.get("torch_device") or "?"
        cfg = bench_model_config(m["model"], m["dtype"], **self.s.get("model_changes", {}))
        changes = f" ({self.s['model_changes']})" if self.s.get("model_changes") else ""
        lines = [f"# hbpo-jax benchmark ({m['mode']})", "",
                 f"- date: {m['date']}; host {m['host']}; wall {time.time() - self.t0:.0f} s "
                 f"(budget {self.budget_s:.0f} s)",
                 f"- device: {dev} (jax platform {m.get('jax_platform', '?')}; torch device "
                 f"{m.get('torch_device', '?')})",
                 f"- versions: python {m['python']}, jax {m.get('jax', '?')} (jaxlib {m.get('jaxlib', '?')}), flax "
                 f"{m.get('flax', '?')}, optax {m.get('optax', '?')}, plugin {m.get('jax_plugin')}, torch "
                 f"{m.get('torch', '?')} (cuda "
                 f"{m.get('torch_cuda', '?')}), transformers {m.get('transformers', '?')}",
                 f"- model: {m['model']} shape{changes}, {cfg.num_params():,} parameters, random weights, "
                 f"{m['dtype']} parameters and compute, no EOS",
                 "- MFU = 6 x parameters x tokens/s / peak (989 TFLOP/s dense bf16 on H100/H200); attention "
                 "FLOPs and rematerialisation not counted; old log-probs use 2 x parameters (forward only)"]
        for name, label in (("copy_bandwidth", "copy bandwidth"), ("matmul_flops", "matmul")):
            if name in self.ceilings:
                v = self.ceilings[name]
                val = _rate(v, "B") if name == "copy_bandwidth" else _rate(v, "FLOP")
                lines.append(f"- ceiling, {label}: {val} ({self.ceilings.get(name + '_note', '')})")
        st = self.status.get("ceilings")
        if st and st != "ok":
            lines.append(f"- ceilings: {st}")
        head = ["job", "implementation", "shape", "tokens/s", "ms/step (or step s)", "compile s", "ceiling",
                "fraction of ceiling (or MFU)", "notes"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.all_rows():
            if r.get("section") == "ceilings":
                continue
            try:
                cells = self._cells(r)
            except Exception as e:  # noqa: BLE001 - one odd row must not hide the others
                cells = [r.get("job", r.get("section", "?")), r.get("impl", ""), r.get("shape", ""),
                         str(r.get("tokens_per_s")), "", "", "", "", f"(cannot render: {_reason(e)[:80]})"]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        lines += ["", "| ours / transformers | hbpo_jax tokens/s | transformers tokens/s | ratio |",
                  "|---|---|---|---|"]
        for q in self.ratios():
            fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
            ratio = "n/a" if q["ratio"] is None else f"{q['ratio']:.2f}x"
            lines.append(f"| {q['what']} | {fmt(q['ours'])} | {fmt(q['transformers'])} | {ratio} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return dict(meta=dict(self.meta, wall_s=time.time() - self.t0), settings=self.s, ceilings=self.ceilings,
                    rows=self.all_rows(), ratios=self.ratios(), sections=self.status, section_seconds=self.seconds)

    def safe_markdown(self) -> str:
        """markdown(), or the raw rows if rendering fails: the table must never stop the run."""
        try:
            return self.markdown()
        except Exception as e:  # noqa: BLE001
            return (f"# hbpo-jax benchmark (table rendering failed: {_reason(e)})\n\n```\n"
                    + json.dumps(dict(meta=self.meta, ceilings=self.ceilings, rows=self.rows, sections=self.status),
                                 indent=1, default=str) + "\n```\n")

    def write(self) -> None:
        if not self.out_dir:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        try:
            data = json.dumps(self.to_json(), indent=1, default=str)
        except Exception as e:  # noqa: BLE001
            data = json.dumps(dict(error=_reason(e), meta=self.meta, rows=self.rows, sections=self.status),
                              indent=1, default=str)
        for fname, text in (("bench.md", self.safe_markdown()), ("bench.json", data)):
            tmp = os.path.join(self.out_dir, fname + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out_dir, fname))


def _reader(stream, q: queue.Queue, kind: str, tail: collections.deque | None = None, echo=None) -> None:
    for line in stream:
        line = line.rstrip("\n")
        if tail is not None:
            tail.append(line)
        if echo is not None:
            print(line, file=echo, flush=True)
        else:
            q.put((kind, line))
    q.put((kind + "_eof", None))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and nothing else
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _run_worker(group: str, names: list[str], s: dict, report: Report, deadline: float, hard: float,
                external, log) -> set[str]:
    """Starts one worker for `names`; returns the names that got a final status."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if group == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    else:
        env["JAX_PLATFORMS"] = "cpu"  # the torch worker must not touch the GPU through jax
    cmd = [sys.executable, "-m", "hbpo_jax.benchmarks", "--worker", group, "--sections", ",".join(names),
           "--settings", json.dumps(s), "--deadline", repr(deadline), "--external", json.dumps(list(external))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
                            cwd=root, start_new_session=True)
    q: queue.Queue = queue.Queue()
    tail: collections.deque = collections.deque(maxlen=40)
    threading.Thread(target=_reader, args=(proc.stdout, q, "out"), daemon=True).start()
    threading.Thread(target=_reader, args=(proc.stderr, q, "err", tail, sys.stderr), daemon=True).start()
    finished: set[str] = set()
    current, started_any = None, False
    scale = s["est_scale"]

    def limit_for(name):
        if s.get("section_timeout_s"):
            return float(s["section_timeout_s"])
        e = SECTIONS[name].est_s * scale
        return max(3 * e, e + 90)

    until = min(time.time() + 60 + 4 * s["startup_est"][group], hard)
    eof = False
    while True:
        left = until - time.time()
        if left <= 0:
            _kill(proc)
            at_hard = until >= hard - 1e-6
            why = ("failed: killed at the time budget" if at_hard else
                   f"failed: timeout after {limit_for(current) if current else 0:.0f} s")
            if current is not None:
                report.set_status(current, why)
                finished.add(current)
                log(f"{current}: {why}")
            elif not started_any:
                for name in names:
                    report.set_status(name, "failed: worker did not start in time" if not at_hard else
                                      "skipped: time")
                    finished.add(name)
            report.write()
            break
        try:
            kind, line = q.get(timeout=min(left, 5.0))
        except queue.Empty:
            continue
        if kind == "out_eof":
            eof = True
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(proc)
            time.sleep(0.2)
            errs = [x for x in tail if x.strip()]
            why = f"worker exited with code {proc.returncode}" + (f": {errs[-1][-200:]}" if errs else "")
            if current is not None:
                report.set_status(current, "failed: " + why)
                finished.add(current)
                log(f"{current}: failed: {why}")
            elif not started_any and not finished:
                for name in names:
                    report.set_status(name, "failed: " + why)
                    finished.add(name)
                log(f"{group} worker failed before its first section: {why}")
            report.write()
            break
        if kind != "out":
            continue
        if not line.startswith(_TAG):
            log("  | " + line)
            continue
        try:
            msg = json.loads(line[len(_TAG):])
        except json.JSONDecodeError:
            log("  | " + line)
            continue
        t = msg.pop("type")
        elapsed = time.time() - report.t0
        if t == "info":
            report.meta.update(msg)
        elif t == "ceiling":
            report.ceilings[msg["name"]] = msg["value"]
            report.ceilings[msg["name"] + "_note"] = msg.get("note", "")
            report.write()
        elif t == "start":
            current, started_any = msg["section"], True
            until = min(time.time() + limit_for(current), hard)
            log(f"[bench +{elapsed:5.0f}s] {current}: start (estimate {msg.get('est_s', 0):.0f} s)")
        elif t == "row":
            report.add_row(msg["row"])
            r = msg["row"]
            log(f"[bench +{elapsed:5.0f}s] {r['section']}: {r.get('job')} {r.get('impl')} {r.get('shape')}: "
                f"{r.get('tokens_per_s', 0):,.0f} tokens/s")
            report.write()
        elif t == "end":
            name = msg["section"]
            report.set_status(name, msg["status"], msg.get("seconds"))
            finished.add(name)
            current = None
            until = min(time.time() + 120, hard)
            log(f"[bench +{elapsed:5.0f}s] {name}: {msg['status']}"
                + (f" ({msg['seconds']:.1f} s)" if msg.get("seconds") is not None else "")
                + (f" [{msg['detail']}]" if msg.get("detail") else ""))
            report.write()
    if not eof:
        _kill(proc)
    return finished


def run(smoke: bool = False, out_dir: str | None = "bench_out", budget_s: float | None = None,
        only: list[str] | None = None, overrides: dict | None = None, log=None) -> Report:
    """The whole benchmark (launch/bench.py): workers in turn, the table in out_dir/bench.{md,json}."""
    log = log or (lambda msg: print(msg, flush=True))
    s = bench_settings(smoke)
    s.update(overrides or {})
    budget = float(budget_s if budget_s is not None else s["budget_s"])
    report = Report(s, out_dir, budget)
    deadline = report.t0 + budget
    hard = deadline + s["grace_s"]
    if only:
        unknown = sorted(set(only) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown sections {unknown}; known: {sorted(SECTIONS)}")
    plan = [(g, [n for n in names if not only or n in only]) for g, names in PLAN]
    plan = [(g, names) for g, names in plan if names]
    log(f"[bench] {s['mode']} run, budget {budget:.0f} s (hard stop at {budget + s['grace_s']:.0f} s), "
        f"out {out_dir}; plan: " + " | ".join(f"{g}: {', '.join(n)}" for g, n in plan))
    report.write()
    for gi, (group, names) in enumerate(plan):
        pending = list(names)
        while pending:
            # Time kept for the more important sections of later workers (and their start-up).
            external = []
            for g2, names2 in plan[gi + 1:]:
                left2 = [n for n in names2 if n not in report.status]
                if left2:
                    prios = [SECTIONS[n].priority for n in left2]
                    external += [(SECTIONS[n].priority, SECTIONS[n].est_s * s["est_scale"]) for n in left2]
                    external.append((min(prios), s["startup_est"][g2]))
            if time.time() + s["startup_est"][group] > deadline:
                for name in pending:
                    report.set_status(name, "skipped: time")
                    log(f"[bench] {name}: skipped: time")
                report.write()
                break
            log(f"[bench +{time.time() - report.t0:5.0f}s] starting the {group} worker: {', '.join(pending)}")
            done = _run_worker(group, pending, s, report, deadline, hard, external, log)
            pending = [n for n in pending if n not in done]
            if time.time() >= hard:
                for name in pending:
                    report.set_status(name, "skipped: time")
                pending = []
    for name in [n for _, names in plan for n in names]:
        if name not in report.status:
            report.set_status(name, "skipped: time")
    report.meta["wall_s"] = time.time() - report.t0
    report.write()
    return report


def _worker_cli(argv) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=["jax", "torch"])
    p.add_argument("--sections", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--external", default="[]")
    a = p.parse_args(argv)
    worker_main(a.worker, a.sections.split(","), json.loads(a.settings), a.deadline, json.loads(a.external))


if __name__ == "__main__":
    _worker_cli(sys.argv[1:])

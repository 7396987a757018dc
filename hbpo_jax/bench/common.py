"""What the benchmarks share: the benchmarked model shapes, device ceilings, the bytes a decode
step moves, the timed sampler call, and small formatting helpers.

Decoding is memory bound: every step reads all weights and, with whole-cache attention, the whole
preallocated KV cache [B, P + N, K, D] of every layer. Sampler rows report that byte count per
step (`decode_bytes`: also the bytes a step needs, the KV cache only up to each row's position),
the device's bandwidth and the fraction of it reached.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hbpo_jax.models import ModelConfig
from hbpo_jax.rollout import static as sampler

# The benchmarked shapes: the models of configs/tiny.py and configs/qwen1_5b.py (a test keeps
# them equal), so the benchmark needs neither a config file nor weights.
SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=512),
    "qwen1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                     num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10000.0,
                     tie_word_embeddings=False, max_position_embeddings=131072),
}
# Measured device-to-device copy bandwidth (bytes/s), by substring of jax's device_kind.
BANDWIDTH = {"H200": 4.2e12, "H100": 3.0e12}


def bench_model_config(name: str, dtype: str, **changes) -> ModelConfig:
    """SHAPES[name] with weights and compute in `dtype` and no EOS (every row runs to its cap)."""
    known = set(ModelConfig.__dataclass_fields__)
    fields = {k: v for k, v in SHAPES[name].items() if k in known}
    fields.update(dtype=dtype, param_dtype=dtype, eos_token_ids=())
    fields.update(changes)
    return ModelConfig(**fields)


# ----------------------------------------------------------------------------- device ceilings

def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn(), in seconds (fn must block until done)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(nbytes: int = 1 << 27, repeats: int = 5) -> float:
    """Bytes/s of a jitted elementwise copy (read + write) on the default device."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    return 2 * x.nbytes / best_time(lambda: f(x).block_until_ready(), repeats)


def matmul_flops(n: int, dtype, calls: int = 10, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n jitted matmul: the best of `repeats` runs of `calls` queued calls."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    return 2 * n ** 3 * calls / best_time(lambda: jax.block_until_ready([f(a, b) for _ in range(calls)]), repeats)


def device_bandwidth() -> tuple[float, str]:
    """(bytes/s, where the figure comes from) for jax's first device."""
    kind = jax.devices()[0].device_kind
    for name, bw in BANDWIDTH.items():
        if name in kind:
            return bw, f"{kind} (table)"
    return copy_bandwidth(), f"{kind} (measured copy)"


# ----------------------------------------------------------------------------- the sampler

def rollout_sampler(graphdef, params, new_tokens: int) -> sampler.Sampler:
    """The benchmarks' sampler: T = 1, no EOS, prompts bucketed "pow2" as in training. The same
    process-wide Sampler as `sampler.generate` with these settings (one compilation per shape)."""
    return sampler.get_sampler(graphdef, params, sampler.SamplerSettings(max_new_tokens=new_tokens))


def timed_sample(smp: sampler.Sampler, params, ids: np.ndarray, key: jax.Array, mask: np.ndarray | None = None):
    """One sampler call timed as its two jitted halves. ids, mask: int32 [B, P] (mask default:
    all real tokens). Returns (prefill s, decode-loop s, SamplerOutput)."""
    inputs = smp.prepare(ids, mask, key=key)
    cache = smp.new_cache(*inputs.prompt_ids.shape)
    jax.block_until_ready((inputs, cache))
    t0 = time.perf_counter()
    logits, cache = smp.prefill(params, cache, inputs)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out, cache = smp.decode(params, cache, logits, inputs)
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def decode_bytes(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                 cache_prompt: int | None = None) -> dict:
    """Bytes one decode step moves, averaged over `new_tokens` steps.

    weights: every parameter once, except an untied embedding table (only B rows are gathered);
    kv_needed: keys and values of every layer up to each row's position (prompt + n/2 on average);
    kv_read: the whole preallocated cache [B, cache_prompt + new_tokens] (what whole-cache
    attention reads; cache_prompt = the bucketed prompt width, Sampler.prompt_width; default
    prompt_len).
    """
    w_item = jnp.dtype(cfg.weight_dtype).itemsize
    weights = cfg.num_params() * w_item
    if not cfg.tie_word_embeddings:
        weights -= cfg.vocab_size * cfg.hidden_size * w_item
    slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    return dict(weight_bytes=float(weights), kv_needed=float(slot * batch * (prompt_len + new_tokens / 2)),
                kv_read=float(slot * batch * ((cache_prompt or prompt_len) + new_tokens)))


# ----------------------------------------------------------------------------- reporting

class SectionSkipped(Exception):
    """Raised by a section that has nothing to measure; reported as "skipped: <message>". (Here,
    not in runner: the worker runs runner as __main__, and a second copy of the class would not
    be caught.)"""


def median(xs) -> float:
    return float(statistics.median(xs))


def progress(msg: str) -> None:
    """A progress line on stdout (the parent echoes untagged worker lines to its log)."""
    print(f"    {msg}", flush=True)


def failure_reason(e: BaseException) -> str:
    """One line for a table cell: "<Type>: <message>", "OOM: " first when it ran out of memory."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text:
        text = "OOM: " + text
    return text[:240]


def format_rate(v: float, unit: str) -> str:
    """1.23 TB/s, 45.6 GB/s, ... (v per second in base units)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}/s" if v < 100 * scale else f"{v / scale:.0f} {prefix}{unit}/s"
    return f"{v:.3g} {unit}/s"

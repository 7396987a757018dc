"""GPU benchmarks (issue 8): the quick sampler benchmark, and helpers launch/bench.py shares.

* `run_sampler_benchmark` (launch/bench_sampler.py): sampler throughput against the memory-
  bandwidth ceiling, optionally against transformers' generate, in this process.
* launch/bench.py, the whole benchmark within a time budget, lives in two modules that use the
  helpers at the end of this one: hbpo_jax.bench.harness (the parent: workers in turn, the table)
  and hbpo_jax.bench.sections (the worker processes and the sections they run).

Decoding is memory bound: every step reads all weights and, with whole-cache attention, the whole
preallocated KV cache [B, P + N, K, D] of every layer. The rows report that byte count per step
(`decode_bytes`: also the bytes a step needs, the KV cache only up to each row's position), the
device's bandwidth and the fraction of it reached.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbpo_jax import sampler
from hbpo_jax.models import ModelConfig, create_model

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


def timed_generate(graphdef, params, ids: np.ndarray, key: jax.Array, n: int):
    """One `sampler.generate` call (no EOS, T = 1, prompts bucketed "pow2" as in training), timed
    as its two jitted halves. ids: int32 [B, P]. Returns (prefill s, decode-loop s, SamplerOutput).
    """
    call = sampler._prepare((graphdef, params), ids, None, key=key, max_new_tokens=n, limits=None,
                            eos_ids=(), pad_id=0, temperature=1.0, top_p=1.0, top_k=0, mesh=None,
                            rules=None, prompt_bucket="pow2", cache_dtype=None)
    jax.block_until_ready(call.cache)
    t0 = time.perf_counter()
    logits, cache = call.fns.prefill(call.state, call.cache, call.prompt_ids, call.prompt_mask)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out, cache = call.fns.decode(call.state, cache, logits, call.prompt_lens, call.limits, call.key)
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def bench_sampler(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3,
                  seed: int = 0) -> dict:
    """`timed_generate` on random weights and prompts: one compiling call, then the best of
    `repeats`. The decode step time is the decode loop's over its N - 1 steps (the first token
    comes from the prefill)."""
    graphdef, params = nnx.split(create_model(cfg, seed=seed))
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    timed_generate(graphdef, params, ids, jax.random.key(seed), new_tokens)  # compile
    calls = [timed_generate(graphdef, params, ids, jax.random.key(seed + 1 + r), new_tokens)[:2]
             for r in range(repeats)]
    prefill, decode = min(calls, key=sum)
    moved = decode_bytes(cfg, batch, prompt_len, new_tokens, sampler.bucket_length(prompt_len))
    return dict(impl="hbpo_jax", tokens_per_s=batch * new_tokens / (prefill + decode),
                ms_per_step=1e3 * decode / max(new_tokens - 1, 1), prefill_ms=1e3 * prefill,
                weight_bytes=moved["weight_bytes"], kv_bytes=moved["kv_read"],
                bytes_per_step=moved["weight_bytes"] + moved["kv_read"])


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
                     f"{r['kv_bytes'] / 1e6:.2f} MB; prefill (and first token) {r['prefill_ms']:.1f} ms")
    return "\n".join(lines)


def run_sampler_benchmark(model: str = "tiny", batch: int = 8, prompt_len: int = 64, new_tokens: int = 64,
                          dtype: str = "float32", baseline: bool = False) -> str:
    """The table `launch/bench_sampler.py` prints."""
    cfg = bench_model_config(model, dtype)
    rows = [bench_sampler(cfg, batch, prompt_len, new_tokens)]
    if baseline:
        rows.append(bench_transformers(cfg, batch, prompt_len, new_tokens))
    bw, source = device_bandwidth()
    return format_table(model, batch, prompt_len, new_tokens, rows, bw, source)


# ----------------------------------------------------------------------------- shared with launch/bench.py
# The sections (worker side) and the table (parent side) both use these.

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


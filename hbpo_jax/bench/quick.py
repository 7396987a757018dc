"""The quick sampler benchmark (launch/bench_sampler.py): our sampler's throughput against the
memory-bandwidth ceiling, optionally against transformers' generate, in this process."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from hbpo_jax.bench import hf
from hbpo_jax.bench.common import (
    bench_model_config,
    best_time,
    decode_bytes,
    device_bandwidth,
    rollout_sampler,
    timed_sample,
)
from hbpo_jax.models import ModelConfig, create_model


def bench_sampler(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3,
                  seed: int = 0) -> dict:
    """`timed_sample` on random weights and prompts: one compiling call, then the best of
    `repeats`. The decode step time is the decode loop's over its N - 1 steps (the first token
    comes from the prefill)."""
    graphdef, params = nnx.split(create_model(cfg, seed=seed))
    smp = rollout_sampler(graphdef, params, new_tokens)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    timed_sample(smp, params, ids, jax.random.key(seed))  # compile
    calls = [timed_sample(smp, params, ids, jax.random.key(seed + 1 + r))[:2] for r in range(repeats)]
    prefill, decode = min(calls, key=sum)
    moved = decode_bytes(cfg, batch, prompt_len, new_tokens, smp.prompt_width(prompt_len))
    return dict(impl="hbpo_jax", tokens_per_s=batch * new_tokens / (prefill + decode),
                ms_per_step=1e3 * decode / max(new_tokens - 1, 1), prefill_ms=1e3 * prefill,
                weight_bytes=moved["weight_bytes"], kv_bytes=moved["kv_read"],
                bytes_per_step=moved["weight_bytes"] + moved["kv_read"])


def bench_transformers(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, seed: int = 0) -> dict:
    """transformers' generate (hbpo_jax.bench.hf) on the same shape; torch on cuda when available
    (on a CPU, the better of torch's default thread count and one thread)."""
    import torch

    dev = hf.device()
    m = hf.model(cfg, dev, cfg.dtype, seed=seed).eval()
    ids = hf.random_prompts(cfg.vocab_size, batch, prompt_len, dev, seed)
    run = lambda: hf.generate_seconds(m, ids, new_tokens, dev)  # noqa: E731
    hf.generate_seconds(m, ids, 2, dev)  # warm-up
    t = best_time(run, 1)
    if dev == "cpu" and torch.get_num_threads() > 1:
        # Intra-op threads can thrash on a small, busy CPU: report the better of default and one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t = min(t, best_time(run, 1))
        finally:
            torch.set_num_threads(threads)
    return dict(impl=f"transformers ({dev})", tokens_per_s=batch * new_tokens / t, ms_per_step=1e3 * t / new_tokens)


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

"""The transformers baseline: a Qwen2ForCausalLM of a benchmark shape with random weights, and
its `generate` timed one way for every table (launch/bench_sampler.py and launch/bench.py).

torch and transformers are imported on first use, so the JAX side never loads them.
"""
from __future__ import annotations

import time

import numpy as np

from hbpo_jax.models import ModelConfig

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(dev: str) -> None:
    """Waits for queued GPU work, so a timer reads the real end."""
    if dev == "cuda":
        import torch
        torch.cuda.synchronize()


def model(cfg: ModelConfig, dev: str, dtype: str, seed: int = 0):
    """transformers' Qwen2ForCausalLM with cfg's shape, random weights, SDPA attention, created on
    `dev` in `dtype` (never materialised on the host first: the 1.5B model is 3.5 GB)."""
    import torch
    import transformers

    hf = {k: v for k, v in cfg.to_hf().items() if k not in ("torch_dtype", "dtype", "architectures")}
    config = transformers.Qwen2Config(**hf, attn_implementation="sdpa")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(dev):
            m = transformers.Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return m.to(device=dev, dtype=getattr(torch, dtype))


def random_prompts(vocab: int, batch: int, prompt_len: int, dev: str, seed: int = 0):
    """int64 [B, P] random token ids as a torch tensor on `dev`."""
    import torch
    return torch.as_tensor(np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len)), device=dev)


def generate_seconds(m, ids, new_tokens: int, dev: str):
    """One `generate` call that samples exactly `new_tokens` tokens per row (T = 1, no truncation,
    min_new_tokens = max_new_tokens: no EOS ends a row early), timed to the end of the GPU work.
    ids: [B, P]. Returns (seconds, output ids [B, P + new_tokens])."""
    import torch

    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
              pad_token_id=0, eos_token_id=None)
    t = time.perf_counter()
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(dev)
    return time.perf_counter() - t, out

"""The sampler sections of launch/bench.py: our `generate` at the two benchmark batch sizes,
timed as its two jitted halves, with the bytes a decode step moves."""
from __future__ import annotations

import jax
import numpy as np

from hbpo_jax.bench.common import decode_bytes, median, progress, rollout_sampler, timed_sample
from hbpo_jax.bench.jax_context import JaxContext
from hbpo_jax.bench.settings import section_shape


def sampler(ctx: JaxContext, emit_row, name: str) -> None:
    """name: "sampler_large" or "sampler_small" (settings' sampler_batches[0] or [1]): one
    compiling call, then the median of `sampler_repeats` timed calls, every row to the cap."""
    s, cfg = ctx.s, ctx.cfg
    batch = s["sampler_batches"][0 if name == "sampler_large" else 1]
    p, n = s["prompt_len"], s["new_tokens"]
    graphdef, params = ctx.graphdef("xla", "none"), ctx.params()
    smp = rollout_sampler(graphdef, params, n)
    ids = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, p)).astype(np.int32)
    calls = []
    for r in range(1 + s["sampler_repeats"]):
        pre, dec, out = timed_sample(smp, params, ids, jax.random.key(r))
        calls.append((pre, dec))
        progress(f"{'warm-up (compile)' if r == 0 else 'timed'} call: prefill {pre:.3f} s, decode {dec:.3f} s")
    lengths = np.asarray(out.lengths)
    pre, dec = median([c[0] for c in calls[1:]]), median([c[1] for c in calls[1:]])
    total = pre + dec
    notes = [f"median of {s['sampler_repeats']} timed calls", f"prefill {pre * 1e3:.0f} ms",
             f"decode loop {dec:.2f} s"]
    if int(lengths.min()) != n:
        notes.append(f"WARNING rows stopped early (min length {int(lengths.min())})")
    emit_row(kind="sampler", job="sampler (generate)", impl="hbpo_jax", shape=section_shape(name, s),
             tokens_per_s=batch * n / total, step_s=dec / max(n - 1, 1), step_label="decode step",
             compile_s=max(sum(calls[0]) - total, 0.0), prefill_s=pre, batch=batch,
             notes="; ".join(notes), **decode_bytes(cfg, batch, p, n, smp.prompt_width(p)))

"""The training-step sections of launch/bench.py: one mini-batch update (policy loss, backward,
AdamW) at the benchmark batch, with cuDNN or XLA attention, and at the largest batch that fits.
Rows report MFU = 6 x parameters x tokens/s / peak."""
from __future__ import annotations

import gc
import time

import jax
import numpy as np

from hbpo_jax import objectives, spec
from hbpo_jax.bench.common import SectionSkipped, failure_reason, median, progress
from hbpo_jax.bench.jax_context import JaxContext
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import update as trainer

# configs/qwen1_5b.py's optimizer.
OPTIM = spec.OptimSpec(learning_rate=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.01, b1=0.9,
                       b2=0.999, grad_clip=1.0)


def hbpo_loss() -> spec.LossSpec:
    """HBPO's own loss recipe (objectives.OBJECTIVES["hbpo"]) without a KL term: what spec.resolve gives
    configs/qwen1_5b.py (the benchmark takes no config file, so it reads the recipe directly)."""
    o = objectives.get_objective("hbpo")
    return spec.LossSpec(clip_low=o.clip_low, clip_high=o.clip_high, dual_clip=o.dual_clip, kl_coef=0.0,
                         aggregation=o.aggregation)


def _update_batch(ctx: JaxContext, batch: int, seq: int, prompt: int, seed: int = 0) -> dict:
    """One mini-batch of one micro-batch of random sequences, in the loop's layout (batching)."""
    rng = np.random.default_rng(seed)
    n, vocab = seq - prompt, ctx.cfg.vocab_size
    arrays = dict(tokens=rng.integers(0, vocab, (batch, seq)).astype(np.int32),
                  attention_mask=np.ones((batch, seq), np.int32), response_mask=np.ones((batch, n), bool),
                  old_logp=(-np.log(vocab) + 0.1 * rng.standard_normal((batch, n))).astype(np.float32),
                  advantages=rng.choice([-1.0, 1.0], batch).astype(np.float32), prompt_len=prompt)
    (mb,) = next(batching.minibatches(arrays, batch, batch, hbpo_loss().aggregation))
    return batching.put(mb, ctx.mesh, ctx.rules)


def _train_once(ctx: JaxContext, batch: int, attention_impl: str, remat: str) -> dict:
    s, cfg = ctx.s, ctx.cfg
    seq, prompt = s["train_seq"], s["train_prompt"]
    graphdef = ctx.graphdef(attention_impl, remat)
    optimizer = trainer.make_optimizer(OPTIM, total_updates=1000)
    state = trainer.init_state(ctx.take_params(), optimizer)
    mb = _update_batch(ctx, batch, seq, prompt)
    times = []
    try:
        for r in range(1 + s["train_repeats"]):
            t = time.perf_counter()
            state, metrics = trainer.update(graphdef, state, mb, optimizer=optimizer, prompt_len=prompt,
                                            temperature=1.0, loss_kwargs=hbpo_loss().kwargs())
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
            progress(f"{'warm-up (compile)' if r == 0 else 'timed'} step: {times[-1]:.3f} s")
    except Exception:
        if not any(x.is_deleted() for x in jax.tree.leaves(state.params)):
            ctx.set_params(state.params)  # failed before donating (e.g. at compilation): keep them
        raise
    ctx.set_params(state.params)
    loss_value = float(metrics["loss"])
    del state
    step = median(times[1:])
    tokens = batch * seq
    impl = ctx.impl(attention_impl)
    return dict(kind="train", job="training step", impl=f"hbpo_jax ({impl} attention, remat {remat})",
                shape=f"{batch} x {seq} tokens", tokens_per_s=tokens / step, step_s=step, step_label="update",
                compile_s=max(times[0] - step, 0.0), flops_per_s=6 * cfg.num_params() * tokens / step,
                flops_rule="6N", batch=batch, attention=impl, remat=remat,
                notes=f"policy loss + backward + AdamW (clip 1.0), {s['dtype']} params and moments, one micro-batch, "
                      f"chunked log-probs; median of {s['train_repeats']}; loss {loss_value:.3f}")


def _train_attempts(ctx: JaxContext, emit_row, attempts) -> dict:
    """The first attempt (batch, attention, remat) that runs; failed ones are named in the notes."""
    failures = []
    for batch, attention_impl, remat in attempts:
        progress(f"batch {batch}, {ctx.impl(attention_impl)} attention, remat {remat}")
        try:
            row = _train_once(ctx, batch, attention_impl, remat)
        except Exception as e:  # noqa: BLE001 - OOM or an unsupported kernel: try the next setting
            failures.append(f"{batch}/{ctx.impl(attention_impl)}/{remat}: {failure_reason(e)[:120]}")
            progress("failed: " + failures[-1])
            gc.collect()
            continue
        if failures:
            row["notes"] += "; earlier attempts failed: " + " | ".join(failures)
        emit_row(**row)
        return row
    raise RuntimeError("every attempt failed: " + " | ".join(failures))


def train_small(ctx: JaxContext, emit_row) -> None:
    b = ctx.s["train_batch"]
    # xla attention materialises [B, H, T, S] scores: its last resort rematerialises every layer.
    row = _train_attempts(ctx, emit_row, [(b, "cudnn", "none"), (b, "xla", "none"), (b, "xla", "full")])
    ctx.facts["train_attention"] = row["attention"]


def train_xla(ctx: JaxContext, emit_row) -> None:
    if ctx.facts.get("train_attention") == "xla":
        raise SectionSkipped("the training-step row above already fell back to xla attention")
    _train_attempts(ctx, emit_row, [(ctx.s["train_batch"], "xla", "none")])


def train_large(ctx: JaxContext, emit_row) -> None:
    impl = "xla" if ctx.facts.get("train_attention") == "xla" else "cudnn"
    _train_attempts(ctx, emit_row, [(b, impl, remat) for b, remat in ctx.s["train_large"]])

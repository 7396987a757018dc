"""The HBPO-step section of launch/bench.py: one training step of a fraction of the paper's size,
phase by phase (rollout, old log-probs, updates), projected to the paper's step on one card.

The update batch is built as the training loop builds it (hbpo_jax.train.minibatches: update_arrays,
minibatches, put) with HBPO's loss settings, so this times the program the loop runs. Grading is
CPU-side and excluded.
"""
from __future__ import annotations

import time
import types

import jax
import numpy as np

from hbpo_jax.bench.common import decode_bytes, format_rate, progress, rollout_sampler, timed_sample
from hbpo_jax.bench.jax_context import JaxContext
from hbpo_jax.bench.settings import PAPER, section_shape
from hbpo_jax.bench.train_sections import OPTIM, hbpo_loss
from hbpo_jax.models import ModelConfig
from hbpo_jax.rollout import static as sampler
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import update as trainer


def attention_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token of causal attention scores and mixing (6 x layers x heads x D x L)."""
    return 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def _rollout(ctx: JaxContext, emit_row, rows: int, p: int, n: int):
    """Phase 1: the sampler, every row to the cap (random weights, no EOS); the second of two
    calls is timed. Returns (rollout-like batch for batching.update_arrays, timings)."""
    cfg, shape = ctx.cfg, section_shape("hbpo_fraction", ctx.s)
    params = ctx.params()
    smp = rollout_sampler(ctx.graphdef("xla", "none"), params, n)
    prompts = np.random.default_rng(7).integers(0, cfg.vocab_size, (rows, p)).tolist()
    ids, mask = sampler.pad_prompts(prompts, pad_id=0)  # the loop's bucketed prompts
    pre0, dec0, _ = timed_sample(smp, params, ids, jax.random.key(100), mask)
    pre, dec, out = timed_sample(smp, params, ids, jax.random.key(101), mask)
    t_roll = pre + dec
    progress(f"rollout {t_roll:.2f} s (first call {pre0 + dec0:.2f} s)")
    moved = decode_bytes(cfg, rows, p, n, ids.shape[1])
    emit_row(kind="phase", job="HBPO step: rollout", impl="hbpo_jax", shape=shape,
             tokens_per_s=rows * n / t_roll, step_s=t_roll, step_label="phase",
             compile_s=max(pre0 + dec0 - t_roll, 0.0), batch=rows, decode_step_s=dec / max(n - 1, 1), **moved,
             notes=f"sampler.generate, {rows} rows, no EOS: every row runs {n} tokens; second of two calls")
    counted = np.arange(n)[None] < np.asarray(out.lengths)[:, None]
    batch = types.SimpleNamespace(prompt_ids=ids, prompt_mask=mask, response_ids=np.asarray(out.tokens),
                                  response_mask=counted, sampled_mask=counted, scored_mask=counted,
                                  logprobs=np.asarray(out.logprobs))
    return batch, dict(prefill=pre, decode=dec, rollout=t_roll, moved=moved, prompt_width=ids.shape[1])


def _old_logprobs(ctx: JaxContext, emit_row, graphdef, arrays: dict, micro: int, remat: str) -> float:
    """Phase 2: the old log-probs recomputed micro-batch by micro-batch (the loop's "always"
    mode); fills arrays["old_logp"]. Returns the timed seconds."""
    cfg, shape = ctx.cfg, section_shape("hbpo_fraction", ctx.s)
    tokens, attn, p = arrays["tokens"], arrays["attention_mask"], arrays["prompt_len"]
    rows, seq = tokens.shape
    params = ctx.params()
    logprobs = lambda i: trainer.compute_logprobs(graphdef, params, tokens[i:i + micro], attn[i:i + micro],  # noqa: E731
                                                  prompt_len=p)
    t = time.perf_counter()
    jax.block_until_ready(logprobs(0))
    t_warm = time.perf_counter() - t
    t = time.perf_counter()
    old = np.concatenate([np.asarray(logprobs(i)) for i in range(0, rows, micro)])
    t_lp = time.perf_counter() - t
    arrays["old_logp"] = np.where(arrays["response_mask"], old, 0.0).astype(np.float32)
    progress(f"old log-probs {t_lp:.2f} s (first micro-batch with compile {t_warm:.2f} s)")
    emit_row(kind="phase", job="HBPO step: old log-probs", impl="hbpo_jax", shape=shape,
             tokens_per_s=rows * seq / t_lp, step_s=t_lp, step_label="phase",
             compile_s=max(t_warm - t_lp * micro / rows, 0.0),
             flops_per_s=2 * cfg.num_params() * rows * seq / t_lp, flops_rule="2N (forward)",
             notes=f"trainer.compute_logprobs in micro-batches of {micro} x {seq} tokens, remat {remat}")
    return t_lp


def _updates(ctx: JaxContext, emit_row, graphdef, arrays: dict, h: dict) -> float:
    """Phase 3: one optimizer update per mini-batch (batching.minibatches + put, HBPO's loss
    kwargs), the first one again after its compiling call. Returns the timed seconds."""
    cfg, shape = ctx.cfg, section_shape("hbpo_fraction", ctx.s)
    rows, seq = arrays["tokens"].shape
    per, micro, loss_spec = rows // h["mini_batches"], h["micro"], hbpo_loss()
    minibatches = [batching.put(mb[0], ctx.mesh, ctx.rules)
                   for mb in batching.minibatches(arrays, per, micro, loss_spec.aggregation) if mb is not None]
    optimizer = trainer.make_optimizer(OPTIM, total_updates=1000)
    state = trainer.init_state(ctx.take_params(), optimizer)
    kw = dict(optimizer=optimizer, prompt_len=arrays["prompt_len"], temperature=1.0, loss_kwargs=loss_spec.kwargs())
    t = time.perf_counter()
    state, metrics = trainer.update(graphdef, state, minibatches[0], **kw)
    jax.block_until_ready((state, metrics))
    t_warm = time.perf_counter() - t
    t = time.perf_counter()
    for mb in minibatches:
        state, metrics = trainer.update(graphdef, state, mb, **kw)
    jax.block_until_ready((state, metrics))
    t_up = time.perf_counter() - t
    ctx.set_params(state.params)
    del state
    progress(f"{len(minibatches)} updates {t_up:.2f} s (first with compile {t_warm:.2f} s)")
    emit_row(kind="phase", job="HBPO step: update", impl="hbpo_jax", shape=shape,
             tokens_per_s=rows * seq / t_up, step_s=t_up, step_label="phase",
             compile_s=max(t_warm - t_up / len(minibatches), 0.0),
             flops_per_s=6 * cfg.num_params() * rows * seq / t_up, flops_rule="6N",
             notes=f"{len(minibatches)} mini-batches of {per} rows (micro-batches of {micro}), AdamW; remat "
                   f"{h['remat']}; grading is CPU-side and excluded")
    return t_up


def _projection(ctx: JaxContext, emit_row, rows: int, n: int, seq: int, roll: dict, t_lp: float,
                t_up: float) -> None:
    """Phase 4: the measured rates scaled to the paper's step (PAPER) on one card."""
    cfg, P = ctx.cfg, PAPER
    big_rows = P["prompts"] * P["rollouts"]
    calls = -(-big_rows // P["max_batch"])
    eff_bw = (roll["moved"]["weight_bytes"] + roll["moved"]["kv_read"]) / (roll["decode"] / max(n - 1, 1))
    big = decode_bytes(cfg, P["max_batch"], P["prompt_len"], P["max_response"])
    decode_step = (big["weight_bytes"] + big["kv_read"]) / eff_bw
    prefill = roll["prefill"] * (P["max_batch"] * P["prompt_len"]) / (rows * roll["prompt_width"])
    rollout_s = calls * (prefill + P["max_response"] * decode_step)
    big_seq = P["prompt_len"] + P["max_response"]
    attn_scale = ((6 * cfg.num_params() + attention_flops_per_token(cfg, big_seq))
                  / (6 * cfg.num_params() + attention_flops_per_token(cfg, seq)))
    token_scale = big_rows * big_seq / (rows * seq) * attn_scale
    lp, up = t_lp * token_scale, t_up * token_scale
    step = rollout_s + lp + up
    emit_row(kind="projection", job="HBPO step, projected (paper shape)", impl="hbpo_jax",
             shape=f"{P['steps']} steps x {P['prompts']}x{P['rollouts']} rollouts, prompt {P['prompt_len']}, "
                   f"<= {P['max_response']} (mean ~{P['mean_response']}) tokens",
             tokens_per_s=big_rows * P["mean_response"] / step, step_s=step, step_label="step",
             total_hours=P["steps"] * step / 3600, rollout_s=rollout_s, logprobs_s=lp, update_s=up,
             notes=(f"rollout {rollout_s:.0f} s ({calls} sampler calls of {P['max_batch']} rows, each "
                    f"{P['max_response']} decode steps: the longest row sets the length; step time = bytes "
                    f"read (weights + whole cache at {big_seq}) / the {format_rate(eff_bw, 'B')} effective rate "
                    f"measured above; prefill scaled by tokens) + old log-probs {lp:.0f} s + update {up:.0f} s "
                    f"(measured rates x {big_rows} x {big_seq} padded tokens, attention term {attn_scale:.2f}x); "
                    f"{P['steps']} steps = {P['steps'] * step / 3600:.1f} h on one card; tokens/s = mean "
                    f"response tokens / step; grading (CPU) excluded"))


def hbpo_step(ctx: JaxContext, emit_row) -> None:
    """Rollout, old log-probs and updates of settings' `hbpo` shape, then the projection."""
    h = ctx.s["hbpo"]
    rows, p, n = h["prompts"] * h["rollouts"], h["prompt_len"], h["response_len"]
    train_gd = ctx.graphdef("xla" if ctx.facts.get("train_attention") == "xla" else "cudnn", h["remat"])
    batch, roll = _rollout(ctx, emit_row, rows, p, n)
    advantages = np.random.default_rng(8).choice([-1.0, 1.0], rows).astype(np.float32)
    arrays = batching.update_arrays(batch, advantages)
    t_lp = _old_logprobs(ctx, emit_row, train_gd, arrays, h["micro"], h["remat"])
    t_up = _updates(ctx, emit_row, train_gd, arrays, h)
    _projection(ctx, emit_row, rows, n, arrays["tokens"].shape[1], roll, t_lp, t_up)

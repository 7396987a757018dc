"""The worker side of launch/bench.py: settings, the section table and the sections themselves.

The parent (hbpo_jax.bench.harness) runs each group of sections in its own worker process,
`python -m hbpo_jax.bench.sections --worker jax|torch ...`: JAX sections in one, torch sections in
another, so the two never hold GPU memory at once. A worker reports on its stdout, one JSON message
a line after `TAG`: info (versions, device), ceiling, start, row, end. `run_sections` guards every
section: one that raises is reported "failed: <reason>", one that would overrun the deadline
"skipped: time", and the next one runs.

Sampler rows carry the bytes a decode step moves (benchmarks.decode_bytes). Training rows report
MFU = 6 x parameters x tokens/s / 989e12.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbpo_jax import sampler, trainer
from hbpo_jax.bench.common import (bench_model_config, copy_bandwidth, decode_bytes, failure_reason, format_rate,
                                 timed_generate)
from hbpo_jax.models import ModelConfig, Qwen2, create_model

PAPER = dict(steps=629, prompts=64, rollouts=16, prompt_len=256, mean_response=2400, max_response=4096,
             max_batch=256)  # HBPO.md's training setup, as the projection row uses it
_OPTIM = types.SimpleNamespace(learning_rate=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.01,
                               b1=0.9, b2=0.999, grad_clip=1.0)  # configs/qwen1_5b.py's optim
_LOSS_KW = tuple(sorted(dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.0,
                             aggregation="token-mean").items()))
TAG = "@@BENCH "  # starts each message line a worker prints; JSON follows
_FAULT_ENV = "HBPO_BENCH_FAULT"  # "section:raise|crash|hang", for the tests of the failure paths


def bench_settings(smoke: bool = False) -> dict:
    """What `bench_harness.run` measures. Full: the Qwen2-1.5B shape in bf16 (estimates in seconds on an H100,
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


# ----------------------------------------------------------------------------- running sections

def _emit(kind: str, **payload) -> None:
    print(TAG + json.dumps(dict(payload, type=kind), default=str), flush=True)


def _progress(msg: str) -> None:
    print(f"    {msg}", flush=True)


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
            status = "failed: " + failure_reason(e)
        gc.collect()
        spent += time.time() - t0
        planned += est(name)
        emit("end", section=name, status=status, seconds=time.time() - t0)


# ----------------------------------------------------------------------------- JAX sections

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
    _progress(f"copy bandwidth {format_rate(bw, 'B')} ({s['copy_bytes'] / 2**30:.2f} GiB array, read + write)")
    _emit("ceiling", name="copy_bandwidth", value=bw, note=f"jitted x + 1 over {s['copy_bytes'] / 2**30:.2f} GiB, "
          "read + written bytes, best of 10")
    mm = _matmul_flops(s["matmul_n"], ctx.cfg.compute_dtype)
    _progress(f"matmul {format_rate(mm, 'FLOP')} ({s['matmul_n']}^3 {s['dtype']})")
    _emit("ceiling", name="matmul_flops", value=mm, note=f"{s['matmul_n']}^3 {s['dtype']} matmul, best of 3 x 10 calls")


def _sampler_section(ctx: _JaxCtx, emit_row, batch: int) -> None:
    s, cfg = ctx.s, ctx.cfg
    p, n = s["prompt_len"], s["new_tokens"]
    graphdef, params = ctx.graphdef("xla", "none"), ctx.params()
    ids = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, p)).astype(np.int32)
    calls = []
    for r in range(1 + s["sampler_repeats"]):
        pre, dec, out = timed_generate(graphdef, params, ids, jax.random.key(r), n)
        calls.append((pre, dec))
        _progress(f"{'warm-up (compile)' if r == 0 else 'timed'} call: prefill {pre:.3f} s, decode {dec:.3f} s")
    lengths = np.asarray(out.lengths)
    pre = _median([c[0] for c in calls[1:]])
    dec = _median([c[1] for c in calls[1:]])
    total = pre + dec
    warm = sum(calls[0])
    cache_prompt = sampler.bucket_length(p)
    notes = [f"median of {s['sampler_repeats']} timed calls", f"prefill {pre * 1e3:.0f} ms",
             f"decode loop {dec:.2f} s"]
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
            failures.append(f"{batch}/{ctx.impl(attention_impl)}/{remat}: {failure_reason(e)[:120]}")
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
    pre0, dec0, _ = timed_generate(sample_gd, params, ids, jax.random.key(100), n)
    pre, dec, out = timed_generate(sample_gd, params, ids, jax.random.key(101), n)
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
                    f"read (weights + whole cache at {big_seq}) / the {format_rate(eff_bw, 'B')} effective rate "
                    f"measured above; prefill scaled by tokens) + old log-probs {lp:.0f} s + update {up:.0f} s "
                    f"(measured rates x {big_rows} x {big_seq} padded tokens, attention term {attn_scale:.2f}x); "
                    f"{P['steps']} steps = {P['steps'] * step / 3600:.1f} h on one card; tokens/s = mean "
                    f"response tokens / step; grading (CPU) excluded"))


# ----------------------------------------------------------------------------- torch sections

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


# ----------------------------------------------------------------------------- the worker process

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
        info.update(jax_device=f"unavailable ({failure_reason(e)[:80]})")
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
            name = f"unavailable ({failure_reason(e)[:80]})"
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

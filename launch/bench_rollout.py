"""One HBPO step's sampling and update at HBPO's length mix: the static sampler against the
refilling engine, and the uniform update layout against length-grouped micro-batches.

    python launch/bench_rollout.py            # a small model on the CPU, a few minutes
    python launch/bench_rollout.py --smoke    # the tiny shape (the test suite)

Rows are laid out as a training step lays them out: prompts x budgets x samples, prompt-major,
each with its budget's pre-filled prefix counted in the response (HBPO's code). Each row's
response length is drawn the way a trained HBPO policy spends its budgets: around 0.85 x its
budget (sd 0.15 x budget), and a share of rows (--long_fraction) runs to the cap: natural rows,
or budget rows that ignore their budget (--long_rows=budget; the engine cannot admit those first,
so the step's tail grows). Random weights
never emit EOS, so per-row limits stand in for it: both paths produce exactly these lengths,
and the same tokens (a row's randomness is its own; the run checks it).

Both paths hold --slots rows of KV cache: the static path samples chunks of --slots rows, each
until its longest row ends; the engine keeps --slots decode slots busy. Printed: tokens/s,
decode slot-steps, utilization = generated tokens / slot-steps, and the speed-up's ceiling (the
ratio of slot-steps: what equal per-step costs would give); with --all_in_flight the engine again
with one slot per row (one admit, one decode loop: on a TPU, whose decode step costs about one
weight read whatever its rows, the fewest steps; on a CPU, whose step costs grow with the rows, a
lower utilization); the engine's admits, decode segments, host round trips (the host waiting for
the device) and prompt pages shared between a prompt's rows; the engine's KV pages: the pool, the
most in use at once, and with a pool smaller than slots x the longest row (--kv_tokens) the pages
granted on demand, the rows preempted and the tokens they had drawn (recomputed). The update: one optimizer step per
mini-batch over the same rows, every micro-batch at the step's width vs grouped by length
(batching.minibatches width_step), with the padded share of the response slots each pays for.
"""
import time

import jax
import numpy as np
from flax import nnx

from hbpo_jax import cli
from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.rollout import batch as rollout
from hbpo_jax.rollout import pages, prompting
from hbpo_jax.rollout import static as sampler
from hbpo_jax.spec import OptimSpec
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import update as trainer

flags = cli.flags
flags.DEFINE_bool("smoke", False, "The tiny shape, for the test suite (seconds).")
flags.DEFINE_integer("prompts", 8, "Prompts per step.")
flags.DEFINE_integer("samples", 4, "Rollouts per budget per prompt (HBPO: 4).")
flags.DEFINE_list("budgets", ["32", "64", "128", "160"], "Budgets (the paper's 512 ... 2560 / 16).")
flags.DEFINE_integer("cap", 256, "L_max, the counted-response cap (the paper's 4,096 / 16).")
flags.DEFINE_float("long_fraction", 1 / 16, "Share of rows that run to the cap.")
flags.DEFINE_enum("long_rows", "natural", ["natural", "budget"],
                  "The rows that run to the cap: natural rows (known in advance) or budget rows.")
flags.DEFINE_integer("slots", 32, "Rows of KV cache: the engine's slots, the static path's rows per call.")
flags.DEFINE_bool("all_in_flight", True, "Also run the engine with one slot per row (every row in flight).")
flags.DEFINE_integer("kv_tokens", 0, "The engine's KV page pool in tokens (0: slots x the longest row; smaller: "
                     "pages on demand, with preemption when the pool runs dry).")
flags.DEFINE_integer("prompt_len", 48, "Longest prompt (tokens); prompts are 1/2 to 1 of it.")
flags.DEFINE_integer("prefix_len", 10, "Tokens of each budget's pre-filled prefix.")
flags.DEFINE_integer("hidden", 256, "Model width.")
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("vocab", 2048, "Vocabulary.")
flags.DEFINE_integer("mini_batches", 2, "Optimizer updates per step.")
flags.DEFINE_integer("micro", 16, "Rows per micro-batch.")
flags.DEFINE_integer("width_step", 0, "Grouped update: widths in multiples of this (0: cap / 4).")
flags.DEFINE_integer("seed", 0, "Seed of the rows, their lengths and the model.")

SMOKE = dict(prompts=2, samples=2, budgets=["8", "16"], cap=32, slots=4, prompt_len=12, prefix_len=3,
             hidden=32, layers=1, vocab=128, micro=4)


def _layout(f, rng) -> tuple[prompting.PromptLayout, np.ndarray]:
    """The step's rows (prompt-major) and each row's counted response length int [R]. A share
    (--long_fraction) of the rows runs to the cap: natural rows (no budget, no prefix; the engine
    admits them first) or, with --long_rows=budget, budget rows that ignore their budget (the
    engine cannot know them in advance)."""
    budgets = [int(b) for b in f.budgets]
    prompts = [rng.integers(3, f.vocab, rng.integers(f.prompt_len // 2, f.prompt_len + 1)).tolist()
               for _ in range(f.prompts)]
    prefixes = {b: rng.integers(3, f.vocab, f.prefix_len).tolist() for b in budgets}
    prefixes[0] = []
    rows = [(p, b) for p in range(f.prompts) for b in budgets for _ in range(f.samples)]
    long = rng.random(len(rows)) < f.long_fraction
    if f.long_rows == "natural":
        rows = [(p, 0) if is_long else (p, b) for (p, b), is_long in zip(rows, long)]
    row_budgets = np.array([b for _, b in rows], np.int32)
    lengths = np.rint(rng.normal(0.85 * row_budgets, 0.15 * row_budgets)).astype(int)
    lengths = np.clip(np.where(long, f.cap, lengths), f.prefix_len + 1, f.cap)
    layout = prompting.PromptLayout(
        prompt_tokens=[prompts[p] for p, _ in rows], prefix_tokens=[prefixes[b] for _, b in rows],
        prefix_texts=[""] * len(rows), budgets=row_budgets,
        prompt_index=np.array([p for p, _ in rows], np.int32), group_shape=(f.prompts, len(budgets), f.samples))
    return layout, lengths


def _sample(policy, layout, limits, settings, engine: str, slots: int, kv_tokens: int = 0):
    """(SampledRows, seconds of the second of two identical calls: the first compiles)."""
    kw = dict(engine=engine, max_batch=slots, key=jax.random.key(1))
    if engine == "refill":
        kw["kv_tokens"] = kv_tokens
    rollout.sample_rows(policy, layout, limits, settings, **kw)
    t = time.perf_counter()
    out = rollout.sample_rows(policy, layout, limits, settings, **kw)
    return out, time.perf_counter() - t


def _update_arrays(layout, sampled, lengths, cap: int, rng) -> dict:
    """The update's arrays for these rows (batching.update_arrays' layout): prompt, then prefix +
    generated tokens, with the sampler's log-probs and random advantages."""
    prompt_ids, prompt_mask = sampler.pad_prompts(layout.prompt_tokens)
    pfx = np.array([len(p) for p in layout.prefix_tokens])
    response = np.zeros((len(lengths), cap), np.int32)
    for r, prefix in enumerate(layout.prefix_tokens):
        response[r, :pfx[r]] = prefix
        response[r, pfx[r]:lengths[r]] = sampled.tokens[r, :lengths[r] - pfx[r]]
    counted = np.arange(cap)[None] < lengths[:, None]
    return dict(tokens=np.concatenate([prompt_ids, response], 1),
                attention_mask=np.concatenate([prompt_mask, counted], 1).astype(np.int32),
                response_mask=counted, old_logp=np.where(counted, -3.0, 0.0).astype(np.float32),
                advantages=rng.normal(size=len(lengths)).astype(np.float32), prompt_len=prompt_ids.shape[1])


def _update(graphdef, params, arrays, rows: int, micro: int, width_step: int) -> tuple[float, int]:
    """(seconds of one pass over the mini-batches after a compiling pass, programs compiled)."""
    optimizer = trainer.make_optimizer(OptimSpec(1e-6, "constant", 0, 0.0, 0.9, 0.999, 1.0), total_updates=10)
    kw = dict(optimizer=optimizer, prompt_len=arrays["prompt_len"], temperature=1.0,
              loss_kwargs=(("aggregation", "token-mean"), ("clip_high", 0.28), ("clip_low", 0.2)))
    minibatches = [[jax.device_put(p) for p in mb]
                   for mb in batching.minibatches(arrays, rows, micro, "token-mean", width_step=width_step)]
    shapes = {p["tokens"].shape for mb in minibatches for p in mb}
    times = []
    for _ in range(2):
        state = trainer.init_state(jax.tree.map(lambda x: x.copy(), params), optimizer)
        t = time.perf_counter()
        for mb in minibatches:
            state, metrics = trainer.update_pieces(graphdef, state, mb, **kw)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return times[1], len(shapes)


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if f.smoke:
        for name, value in SMOKE.items():
            setattr(f, name, value)
    rng = np.random.default_rng(f.seed)
    cfg = ModelConfig(vocab_size=f.vocab, hidden_size=f.hidden, intermediate_size=3 * f.hidden, num_layers=f.layers,
                      num_heads=max(f.hidden // 64, 2), num_kv_heads=max(f.hidden // 128, 1),
                      max_position_embeddings=f.prompt_len + f.cap + 8)
    graphdef, params = nnx.split(create_model(cfg, seed=f.seed))
    layout, lengths = _layout(f, rng)
    rows, pfx = len(lengths), np.array([len(p) for p in layout.prefix_tokens])
    limits = (lengths - pfx).astype(np.int32)
    settings = sampler.SamplerSettings(max_new_tokens=f.cap)
    print(f"{jax.devices()[0].platform} ({jax.device_count()} device): Qwen2 {f.layers} layers x {f.hidden}, vocab "
          f"{f.vocab}; {f.prompts} prompts x {len(f.budgets)} budgets x {f.samples} = {rows} rows; budgets "
          f"{','.join(f.budgets)}, cap {f.cap}; {int((lengths == f.cap).sum())} {f.long_rows} rows to the cap; "
          f"{f.slots} rows of KV cache")
    print(f"counted lengths: mean {lengths.mean():.1f}, max {lengths.max()}; mean by budget "
          + ", ".join(f"{b or 'natural'}: {lengths[layout.budgets == b].mean():.0f}"
                      for b in np.unique(layout.budgets)))

    results = {}
    for engine in rollout.ENGINES:
        results[engine] = _sample((graphdef, params), layout, limits, settings, engine, f.slots, f.kv_tokens)
    (static, t_static), (refill, t_refill) = results["static"], results["refill"]
    same = (np.array_equal(static.tokens, refill.tokens) and np.array_equal(static.lengths, refill.lengths)
            and np.array_equal(static.lengths, limits))
    all_in = None
    if f.all_in_flight:  # every row in its own slot: one admit, one decode loop, no refill
        all_in = _sample((graphdef, params), layout, limits, settings, "refill", rows, f.kv_tokens)
        same = same and np.array_equal(all_in[0].tokens, static.tokens)
    tokens = int(limits.sum())
    print(f"\n{'rollout':<8} | {'seconds':>8} | {'tokens/s':>9} | {'slot-steps':>10} | {'utilization':>11}")
    paths = [("static", static, t_static), ("refill", refill, t_refill)] + ([("all rows", *all_in)] if all_in else [])
    for name, out, t in paths:
        print(f"{name:<8} | {t:>8.2f} | {tokens / t:>9.0f} | {out.slot_steps:>10} | {tokens / out.slot_steps:>10.1%}")
    print(f"ceiling of the speed-up (slot-steps static / engine): {static.slot_steps / refill.slot_steps:.2f}x; "
          f"the same tokens on every path: {'yes' if same else 'NO'}")
    es = refill.engine_stats
    print(f"\n{'engine host work':<16} | {'slots':>5} | {'admits':>6} | {'segments':>8} | {'round trips':>11} | "
          f"{'prompt pages shared':>19}")
    for name, st in (("refill", es), ("all rows", all_in and all_in[0].engine_stats)):
        if st is not None:
            print(f"{name:<16} | {st.slots:>5} | {st.admit_calls:>6} | {st.segments:>8} | {st.host_round_trips:>11} | "
                  f"{st.shared_prompt_pages:>19}")
    print(f"\n{'engine KV pages':<15} | {'pool':>5} | {'peak in use':>12} | {'granted':>7} | {'preemptions':>11} | "
          f"{'recomputed tokens':>17}")
    print(f"{'on demand' if es.page_grants else 'whole limits':<15} | {es.pool_pages:>5} | {es.peak_pages:>5} = "
          f"{es.peak_pages / max(es.pool_pages, 1):>4.0%} | {es.page_grants:>7} | {es.preemptions:>11} | "
          f"{es.recomputed:>17}")
    page_tokens = es.kv_bytes // max(es.pool_pages, 1) // pages.kv_bytes_per_token(cfg, cfg.compute_dtype)
    print(f"KV bytes: engine page pool {es.kv_bytes / 2**20:.2f} MiB ({es.pool_pages} pages of "
          f"{page_tokens} tokens), a contiguous {f.slots} x C "
          f"cache {es.dense_kv_bytes / 2**20:.2f} MiB (the engine before pages)")

    arrays = _update_arrays(layout, refill, lengths, f.cap, rng)
    per = rows // f.mini_batches
    width_step = f.width_step or max(f.cap // 4, 1)
    print(f"\n{'update':<28} | {'padded':>6} | {'seconds':>8} | {'programs':>8}")
    update_s = {}
    for name, step in (("uniform width", 0), (f"grouped, widths of {width_step}", width_step)):
        seconds, programs = _update(graphdef, params, arrays, per, f.micro, step)
        pad = batching.padded_fraction(lengths, per, f.micro, arrays["response_mask"].shape[1], step)
        update_s[step] = seconds
        print(f"{name:<28} | {pad:>6.1%} | {seconds:>8.2f} | {programs:>8}")
    print(f"\nstep time split (seconds): static rollout {t_static:.2f} + uniform update {update_s[0]:.2f} = "
          f"{t_static + update_s[0]:.2f}; engine {t_refill:.2f} + grouped update {update_s[width_step]:.2f} = "
          f"{t_refill + update_s[width_step]:.2f}")
    print(f"rollout: engine {tokens / t_refill:.0f} tokens/s, static {tokens / t_static:.0f} tokens/s, "
          f"speed-up {t_static / t_refill:.2f}x, utilization {tokens / refill.slot_steps:.0%}")
    if not same:
        raise SystemExit("the engine and the static sampler drew different tokens or lengths")


if __name__ == "__main__":
    cli.run(main)

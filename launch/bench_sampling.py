"""Token selection alone: python launch/bench_sampling.py [--batch=64] [--vocab=151936] [--repeats=7]

Times, jitted on the default device with float32 logits [batch, vocab], the old token selection
(Gumbel-max `jax.random.categorical` over every entry, top-p by sorting the row, log-probs from a
materialised log_softmax) against `sampling.sample_logits` (two-level inverse CDF, top-p among
candidates with a bisection fallback). Three cases: top_p = 1; top_p = 0.95 on peaked logits
(the nucleus fits among the candidates); top_p = 0.95 on flat logits (it does not: bisection).
Old and new calls alternate; each time is the median of --repeats calls. Prints a table with
XLA's static cost estimate of each program, and the floor any exact sampler that reports full
log-probs pays: a row max and a sum of exp over the logits (log-sum-exp), two reads of them.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from hbpo_jax import cli
from hbpo_jax.rollout import next_token as sampling

cli.flags.DEFINE_integer("batch", 64, "Rows.")
cli.flags.DEFINE_integer("vocab", 151_936, "Vocabulary size (Qwen2.5: 151,936).")
cli.flags.DEFINE_integer("repeats", 7, "Timed calls per program (median).")
cli.flags.DEFINE_float("peaked_scale", 6.0, "Std of the peaked logits (N(0, s^2) per entry).")
cli.flags.DEFINE_float("flat_scale", 3.0, "Std of the flat logits.")
cli.flags.DEFINE_integer("candidates", sampling.TOP_P_CANDIDATES, "Top-p prefilter width of the new sampler.")


# ----------------------------------------------------------------------------- the old selection
# hbpo_jax/sampler.py before issue 15, verbatim but for names.

def old_truncate(x: jax.Array, top_p: float, top_k: int) -> jax.Array:
    """x: float32 [B, V] scaled logits -> tokens outside top-k, then outside the nucleus, at -inf."""
    neg = jnp.asarray(-jnp.inf, x.dtype)
    if top_k and top_k < x.shape[-1]:
        vals = jax.lax.top_k(x, top_k)[0]
        x = jnp.where(x >= vals[:, -1:], x, neg)
    else:
        vals = None
    if top_p < 1.0:
        srt = vals if vals is not None else jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= threshold, x, neg)
    return x


def old_sample_logits(logits, key, temperature=1.0, top_p=1.0, top_k=0):
    """(tokens int32 [B], full tempered log-probs [B]) by Gumbel-max over the truncated logits."""
    scaled = logits.astype(jnp.float32) / temperature
    tokens = jax.random.categorical(key, old_truncate(scaled, top_p, top_k), axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- measuring

def _times_ms(fn, args, repeats: int) -> list[float]:
    return [_time_once(fn, args) for _ in range(repeats)]


def _time_once(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def _cost(fn, args) -> dict:
    """XLA's static estimate of the compiled program (loop bodies once, both cond branches)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(cost.get(k, float("nan"))) for k in ("bytes accessed", "transcendentals")}


def _nucleus_sizes(x: np.ndarray, top_p: float) -> tuple[int, int]:
    """(median, max) over rows of the number of tokens in the top_p nucleus (float64)."""
    srt = -np.sort(-x.astype(np.float64), axis=1)
    w = np.exp(srt - srt[:, :1])
    before = (np.cumsum(w, 1) - w) / w.sum(1, keepdims=True)
    sizes = (before < top_p).sum(1)
    return int(np.median(sizes)), int(sizes.max())


def main(argv) -> None:
    del argv
    f = cli.flags.FLAGS
    b, v = f.batch, f.vocab
    rng = np.random.default_rng(0)
    logits = {name: rng.normal(0.0, scale, size=(b, v)).astype(np.float32)
              for name, scale in (("peaked", f.peaked_scale), ("flat", f.flat_scale))}
    cases = [("top_p=1", 1.0, "peaked"), ("top_p=0.95, nucleus fits", 0.95, "peaked"),
             ("top_p=0.95, nucleus does not fit", 0.95, "flat")]
    key = jax.random.key(0)
    mb = b * v * 4 / 1e6
    print(f"{jax.devices()[0].platform}, logits float32 [{b}, {v:,}] = {mb:.1f} MB, median of {f.repeats}, "
          f"new sampler with {f.candidates} top-p candidates")

    floor_fn = jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1))
    read_fn = jax.jit(lambda x: jnp.sum(x, axis=-1))
    x0 = jnp.asarray(logits["peaked"])
    jax.block_until_ready((floor_fn(x0), read_fn(x0)))
    floor_ms = float(np.median(_times_ms(floor_fn, (x0,), f.repeats)))
    read_ms = float(np.median(_times_ms(read_fn, (x0,), f.repeats)))

    print(f"{'case':<34} | {'nucleus':>11} | {'old ms':>8} | {'new ms':>8} | {'old/new':>7} | "
          f"{'old MB (XLA)':>12} | {'new MB (XLA)':>12} | {'old exp/log':>11} | {'new exp/log':>11}")
    ratios = []
    for name, top_p, which in cases:
        x = jnp.asarray(logits[which])
        old = jax.jit(lambda x, k, p=top_p: old_sample_logits(x, k, 1.0, p))
        new = jax.jit(lambda x, k, p=top_p: sampling.sample_logits(x, k, 1.0, p, candidates=f.candidates))
        jax.block_until_ready((old(x, key), new(x, key)))  # compile
        times = {"old": [], "new": []}
        for i in range(f.repeats):  # alternate, so that a busy machine slows both alike
            k = jax.random.fold_in(key, i)
            times["old"].append(_time_once(old, (x, k)))
            times["new"].append(_time_once(new, (x, k)))
        t_old, t_new = (float(np.median(times[n])) for n in ("old", "new"))
        c_old, c_new = _cost(old, (x, key)), _cost(new, (x, key))
        nucleus = "all" if top_p >= 1 else "%d / %d" % _nucleus_sizes(logits[which], top_p)
        ratios.append(t_old / t_new)
        print(f"{name:<34} | {nucleus:>11} | {t_old:>8.1f} | {t_new:>8.1f} | {t_old / t_new:>6.1f}x | "
              f"{c_old['bytes accessed'] / 1e6:>12.0f} | {c_new['bytes accessed'] / 1e6:>12.0f} | "
              f"{c_old['transcendentals'] / (b * v):>10.1f}V | {c_new['transcendentals'] / (b * v):>10.1f}V")
    print(f"floor: log-sum-exp over the logits {floor_ms:.1f} ms (2 reads of {mb:.1f} MB, 1 exp per entry); "
          f"one plain read (row sums) {read_ms:.1f} ms = {mb / read_ms:.1f} GB/s")
    print("nucleus: median / max tokens per row; exp/log: XLA's transcendentals per logit entry; "
          "MB: XLA's bytes accessed (static: loop bodies once, both branches of a cond)")
    print(f"sampling: new {ratios[0]:.1f}x faster at top_p=1, {ratios[1]:.1f}x at top_p=0.95 (fits), "
          f"{ratios[2]:.1f}x at top_p=0.95 (fallback)")


if __name__ == "__main__":
    cli.run(main)

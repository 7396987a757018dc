"""Token selection: one token per row, drawn exactly from softmax(logits / T) truncated to top-k, then
top-p, without a random draw per vocabulary entry and without sorting the vocabulary.

Shapes: B = rows, V = vocabulary. logits: float32 [B, V]; keys: typed PRNG keys [B] (or one key,
or raw uint32 [B, 2]); tokens: int32 [B]; log-probs: float32 [B]. Settings (temperature, top_p,
top_k, candidates) are static Python numbers.

* Exactness. A row draws by inverse CDF in two levels: one of its ceil(V / BLOCK) blocks of BLOCK
  consecutive entries with probability (the block's kept mass) / (the row's kept mass), then a
  token of that block with probability (its weight) / (the block's mass). The product is the
  token's probability under the truncated, renormalised softmax: the distribution Gumbel-max over
  all V logits samples, not the same token for a key. Weights are exp(x - row max) in float32; an
  entry of weight 0 (truncated, padding, underflow) is never returned (`_inverse_cdf`).
* Truncation. top-k keeps x ≥ the k-th largest value (its ties kept); top-p then keeps the shortest
  prefix of the descending order whose mass reaches top_p x the mass top-k kept (ties with its
  last value kept). Top-p first looks for its nucleus among the TOP_P_CANDIDATES largest logits
  (jax.lax.top_k; on TPU jax.lax.approx_max_k, checked by a count over the vocabulary) and draws
  among them when every row's nucleus lies inside; otherwise the batch (lax.cond) finds each row's
  threshold by bisection over the float32 values (`_bisect_threshold`, at most 32 masked sums) and
  draws over the vocabulary. Both paths keep the same tokens: the path changes the cost only.
* Log-probabilities are the sampled token's under the FULL log_softmax(logits / T), not the
  truncated distribution's; greedy (T = 0) takes the argmax and reports log_softmax(logits).
* Randomness. Every row has its own key. Its i-th generated token draws with fold_in(row key, i)
  (`token_keys`), whose one threefry block gives both uniforms (24-bit, `_uniforms`). From one key
  for a call, row r's key is fold_in(key, r) (`row_keys`); `keys_for_rows` takes either form. So a
  row's token depends on its logits and its key only, not on its place in the batch or its
  neighbours.
* Cost: untruncated, two fused passes over a row's V logits (the max; exp-sums per block), a
  cumulative sum over the blocks and one over a block. launch/bench_sampling.py times it against
  the Gumbel-max / sorted top-p sampler it replaced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- randomness

def _as_keys(key) -> jax.Array:
    """A typed PRNG key array: typed keys as they are, raw uint32 keys ([2] or [B, 2]) wrapped."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def row_keys(key, rows: int) -> jax.Array:
    """The convenience derivation of per-row keys: typed keys [rows], row r gets fold_in(key, r).
    key: one PRNG key (typed, or raw uint32 [2])."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(_as_keys(key), jnp.arange(rows, dtype=jnp.uint32))


def keys_for_rows(key, rows: int) -> jax.Array:
    """Typed keys [rows] from one key (-> row_keys(key, rows)) or from per-row keys (typed [rows] or
    raw uint32 [rows, 2], returned as typed keys). Raises ValueError on another shape."""
    keys = _as_keys(key)
    if keys.ndim == 0:
        return row_keys(keys, rows)
    if keys.shape != (rows,):
        raise ValueError(f"key must be one PRNG key or one per row ([{rows}] typed or [{rows}, 2] uint32), "
                         f"got {keys.shape} keys.")
    return keys


def token_keys(keys: jax.Array, token_index) -> jax.Array:
    """Keys [B] for the token_index-th generated token of each row: fold_in(row key, token_index).
    keys: typed [B]; token_index: int scalar or int [B] (a row's own count of generated tokens, so
    that a row started at another loop step, or resumed, draws the same tokens)."""
    index = jnp.broadcast_to(jnp.asarray(token_index, jnp.uint32), keys.shape)
    return jax.vmap(jax.random.fold_in)(keys, index)


def _uniforms(keys: jax.Array) -> jax.Array:
    """keys: typed [B] -> float32 [B, 2] in [0, 1), 24-bit resolution (exact in float32): one
    threefry block per row gives both words, so the second uniform costs nothing."""
    bits = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


# ----------------------------------------------------------------------------- token selection
# Exact sampling without a draw per vocabulary entry. Gumbel-max over all V logits hashes V random
# words per row per step (and top-p sorted V entries): launch/bench_sampling.py measures both. Here
# a row costs two fused passes over its V logits (max, exp-sum per block) and an inverse CDF in two
# levels: a block of BLOCK entries by its mass, then a token in it.

BLOCK = 128  # vocabulary entries per block of the two-level inverse CDF (151,936 = 1,187 x 128)
TOP_P_CANDIDATES = 256  # top-p looks for its nucleus among this many largest logits first


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """weights: float32 [B, n] ≥ 0; u: float32 [B] in [0, 1). -> (index int32 [B], total [B]).

    The first index whose cumulative weight exceeds u · total, so index i is drawn with
    probability weights[i] / total. Only a positive weight is returned: float rounding in the
    cumulative sum may step over a zero (masked or underflowed) entry, and u · total may round to
    the total, so a miss falls back to the last positive entry. A row without one (total 0) gets
    an arbitrary index: the caller checks total > 0.
    """
    cdf = jnp.cumsum(weights, axis=-1)
    positive = weights > 0
    hit = (cdf > u[:, None] * cdf[:, -1:]) & positive
    last = weights.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    index = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last)
    return index.astype(jnp.int32), cdf[:, -1]


def _blocks(x: jax.Array) -> jax.Array:
    """x: [B, V] -> [B, ceil(V / BLOCK), BLOCK], padded with -inf (weight 0)."""
    b, v = x.shape
    pad = -v % BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return x.reshape(b, -1, BLOCK)


def _kept_weights(x: jax.Array, m: jax.Array, threshold: jax.Array | None) -> jax.Array:
    """exp(x - m) where x ≥ threshold, else 0. x: [B, ...]; m, threshold: [B] (None: keep all)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    w = jnp.exp(x - m.reshape(shape))
    return w if threshold is None else jnp.where(x >= threshold.reshape(shape), w, 0.0)


def _draw(x: jax.Array, m: jax.Array, threshold: jax.Array | None, u: jax.Array):
    """Inverse-CDF draw from softmax(x) restricted to x ≥ threshold.

    x: float32 [B, V] scaled logits; m: [B] their row max; threshold: [B] or None (no
    truncation); u: float32 [B, 2] uniforms. Returns (tokens int32 [B], x at the token [B],
    kept mass sum(exp(x - m) where kept) [B]).

    Level 1 draws a block with probability (its kept mass) / (kept mass), level 2 a token of that
    block with probability (its weight) / (the block's mass); their product is the token's
    probability. Two levels read the V logits once for the block masses (no cumulative sum over V,
    which costs ~17x a reduction on CPU), and the second uniform keeps a light block's tokens at
    full resolution (one uniform over V would quantise every token to 2^-24 of the row's mass).
    """
    xb = _blocks(x)  # [B, nb, BLOCK]
    mass = jnp.sum(_kept_weights(xb, m, threshold), axis=-1)  # [B, nb]
    # The kept mass is the cumulative sum's last entry: a second reduction of `mass` here makes
    # XLA:CPU fuse both into one slow multi-output loop over [B, V] (4x the time of this pass).
    block, kept = _inverse_cdf(mass, u[:, 0])
    xj = jnp.take_along_axis(xb, block[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    wj = _kept_weights(xj, m, threshold)
    inner, block_mass = _inverse_cdf(wj, u[:, 1])
    # A block with mass has a positive entry, unless exp rounds differently here than in the
    # pass above; then the block's largest kept logit (never a truncated token) stands in.
    kept_x = xj if threshold is None else jnp.where(xj >= threshold[:, None], xj, -jnp.inf)
    inner = jnp.where(block_mass > 0, inner, jnp.argmax(kept_x, axis=-1).astype(jnp.int32))
    x_tok = jnp.take_along_axis(xj, inner[:, None], axis=-1)[:, 0]
    return block * BLOCK + inner, x_tok, kept


def _nucleus_threshold(desc: jax.Array, m: jax.Array, target: jax.Array) -> jax.Array:
    """The top-p threshold from values in descending order.

    desc: float32 [B, K] logits, descending; m: [B] row max; target: [B] top_p x the mass the
    nucleus is a share of (both in units of exp(x - m)). Returns [B]: the smallest value of the
    shortest prefix whose mass reaches target (the top-1 always; keeping x ≥ it keeps ties).
    """
    w = jnp.exp(desc - m[:, None])
    before = jnp.cumsum(w, axis=-1) - w
    return jnp.min(jnp.where(before < target[:, None], desc, jnp.inf), axis=-1)


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the same order (x < y iff key(x) < key(y); no NaN)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_order_key(k: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k), jnp.float32)


def _bisect_threshold(x: jax.Array, m: jax.Array, target: jax.Array) -> jax.Array:
    """The exact nucleus threshold without sorting: max{t : mass(x ≥ t) ≥ target}, found by
    bisection over the float32 values in order (at most 32 passes of one masked sum over [B, V];
    a sort of 151,936 entries per row costs several times that on CPU, and TPUs sort slowly). The
    mass steps only at values of x, so the largest such t is one of them, the sorted nucleus's last.
    Its sums are plain reductions, more accurate than a float32 cumulative sum over a sorted row.

    x: float32 [B, V]; m: [B] row max; target: [B] in (0, total]. Returns float32 [B].
    """
    w = jnp.exp(x - m[:, None])  # materialised once: every pass reads it

    def feasible(k):
        return jnp.sum(jnp.where(x >= _from_order_key(k)[:, None], w, 0.0), axis=-1) >= target

    def body(bounds):
        lo, hi = bounds  # feasible(lo), not feasible(hi)
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        ok = feasible(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = _order_key(jnp.min(x, axis=-1))  # mass(x ≥ min) = total ≥ target
    hi = _order_key(m) + 1  # mass(x > max) = 0 < target
    lo, _ = jax.lax.while_loop(lambda b: jnp.any(b[0] + 1 < b[1]), body, (lo, hi))
    return _from_order_key(lo)


def _top_k(x: jax.Array, k: int, approx: bool = False) -> tuple[jax.Array, jax.Array]:
    """(values float32 [B, k] descending, token ids int32 [B, k]) of the k largest (approx: about
    the k largest, jax.lax.approx_max_k) entries of x [B, V]. The barrier keeps XLA:CPU's TopK
    rewrite: when a later slice such as values[:, -1] is folded into the sort it stems from, the
    sort no longer matches the top-k pattern and runs in full (4 s instead of 30 ms at [64, 151,936])."""
    vals, ids = jax.lax.approx_max_k(x, k) if approx else jax.lax.top_k(x, k)
    return jax.lax.optimization_barrier((vals, ids.astype(jnp.int32)))


def _nucleus_candidates(x: jax.Array, m: jax.Array, target: jax.Array, k: int, approx: bool):
    """The nucleus from k candidates (about the k largest logits) instead of a sorted row.

    x: float32 [B, V]; m: [B] row max; target: [B] top_p x the full mass (units of exp(x - m)).
    Returns (values float32 [B, k] descending, their token ids int32 [B, k], threshold [B],
    inside bool [B]). inside: the candidates' prefix reached the target and every token with
    x ≥ threshold is a candidate, so the threshold is the sorted nucleus's (mass above it <
    target ≤ mass from it on, over the whole vocabulary) and the candidates hold the whole
    nucleus. Exact top_k only needs the threshold above the last candidate (the prefix closed
    before it, and no tie lies outside). approx=True takes jax.lax.approx_max_k (TPU's fast path),
    which may miss a large value: the candidates' kept mass must reach the target and the kept
    tokens are counted over the vocabulary (one pass).
    """
    vals, ids = _top_k(x, k, approx)
    threshold = _nucleus_threshold(vals, m, target)
    if approx:
        kept = vals >= threshold[:, None]
        closed = jnp.sum(jnp.where(kept, jnp.exp(vals - m[:, None]), 0.0), axis=-1) >= target
        inside = closed & (jnp.sum(x >= threshold[:, None], axis=-1) == jnp.sum(kept, axis=-1))
    else:
        inside = threshold > vals[:, -1]
    return vals, ids, threshold, inside


def _truncated_draw(x: jax.Array, m: jax.Array, total: jax.Array, u: jax.Array, top_p: float, top_k: int,
                    candidates: int) -> tuple[jax.Array, jax.Array]:
    """A draw from softmax(x) truncated to top-k (ties with the k-th value kept), then to the
    nucleus of the renormalised top-k distribution, without sorting the vocabulary.

    x: float32 [B, V]; m: [B] row max; total: [B] sum(exp(x - m)); u: [B, 2] uniforms.
    Returns (tokens int32 [B], x at the token [B]). When every row's kept set lies among the
    candidates (top_k's k, or top-p's `candidates` largest), the draw reads only those; otherwise
    the batch draws over the whole vocabulary under lax.cond, top-p's threshold then found by
    bisection. Either way the same tokens are possible with the same probabilities.
    """
    v = x.shape[-1]
    if 0 < top_k < v:
        vals, ids = _top_k(x, top_k)
        if top_p >= 1.0:  # the k-th value's ties may lie outside the k: draw over the vocabulary
            tokens, x_tok, _ = _draw(x, m, vals[:, -1], u)
            return tokens, x_tok
        threshold = _nucleus_threshold(vals, m, top_p * jnp.sum(jnp.exp(vals - m[:, None]), axis=-1))
        inside = threshold > vals[:, -1]

        def full():
            return threshold
    else:
        target = top_p * total
        k = min(candidates, v)
        vals, ids, threshold, inside = jax.lax.platform_dependent(
            x, m, target, tpu=lambda *a: _nucleus_candidates(*a, k, approx=True),
            default=lambda *a: _nucleus_candidates(*a, k, approx=False))

        def full():
            return _bisect_threshold(x, m, target)

    def among_candidates():
        pos, x_tok, _ = _draw(vals, m, threshold, u)
        return jnp.take_along_axis(ids, pos[:, None], axis=-1)[:, 0], x_tok

    def over_vocabulary():
        tokens, x_tok, _ = _draw(x, m, full(), u)
        return tokens, x_tok
    return jax.lax.cond(jnp.all(inside), among_candidates, over_vocabulary)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, *, candidates: int = TOP_P_CANDIDATES) -> tuple[jax.Array, jax.Array]:
    """One token per row, drawn exactly from softmax(logits / T) truncated to top-k, then top-p.

    logits: float32 [B, V]; key: one PRNG key (row r draws with fold_in(key, r)) or per-row keys
    (typed [B] or uint32 [B, 2]; keys_for_rows); temperature, top_p, top_k: Python numbers (T = 0 ->
    greedy; top_p = 1 and top_k = 0 disable truncation); candidates: the top-p prefilter's width.
    Returns (tokens int32 [B], logprobs float32 [B] under the full log_softmax(logits / T);
    T = 1 for greedy). A row's token depends only on its logits and its key.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    x = logits / temperature
    u = _uniforms(keys_for_rows(key, x.shape[0]))
    m = jnp.max(x, axis=-1)
    if top_p < 1.0 or 0 < top_k < x.shape[-1]:
        # The full mass: the log-prob's normaliser, and what top-p's share is of.
        total = jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
        tokens, x_tok = _truncated_draw(x, m, total, u, top_p, top_k, candidates)
    else:  # untruncated, the draw's kept mass is the full mass: no second pass
        tokens, x_tok, total = _draw(x, m, None, u)
    return tokens, x_tok - m - jnp.log(total)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """log_softmax(logits / T) at `tokens` (T = 0 -> 1, as the sampler reports greedy tokens).
    logits: float32 [..., V]; tokens: int [...] -> float32 [...]."""
    x = logits / (temperature or 1.0)
    logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


__all__ = ["BLOCK", "TOP_P_CANDIDATES", "keys_for_rows", "row_keys", "sample_logits", "token_keys", "token_logprobs"]

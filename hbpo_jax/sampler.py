"""Batched autoregressive sampling: prefill, then a jitted decode loop over a preallocated KV cache.

Shapes: B = rows, P = (bucketed) prompt length, N = max_new_tokens (static), V = vocabulary.

* Prompts are LEFT-padded to a bucketed length (`bucket_length`) so that a training run compiles
  a handful of shapes, not one per batch. Default "pow2": the next power of two, at least 16,
  so prompts of up to 1,024 tokens give at most 7 shapes.
* The decode loop is a `lax.while_loop` that stops as soon as every row has finished (EOS or its
  own limit), so a batch of short answers does not pay for the static cap N.
* Log-probabilities are those of the sampled token under the FULL temperature-scaled softmax,
  log_softmax(logits / T), not the top-p / top-k truncated and renormalised one: that is the
  policy the loss differentiates (HBPO.md). Greedy decoding (T = 0) reports log_softmax(logits).
* Randomness: step s draws with `fold_in(key, s)`; the same key gives the same tokens, and a row's
  tokens do not depend on the other rows of the batch.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hbpo_jax import sharding as shd
from hbpo_jax.models.qwen2 import KVCache

STOP_NONE = 0  # still running (never returned: every row ends with EOS or LIMIT)
STOP_EOS = 1  # sampled one of the EOS ids (included in the length)
STOP_LIMIT = 2  # reached its own token limit (or the static cap max_new_tokens)

# Trace counter per jitted function name: tests check that repeated calls do not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()


class SamplerOutput(NamedTuple):
    """tokens: int32 [B, N], pad id after the stop. logprobs: float32 [B, N], 0 after the stop.
    lengths: int32 [B], tokens up to and including EOS. stop_reason: int32 [B] (STOP_*).
    num_steps: int32 scalar, tokens positions the loop actually produced (≤ N)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    stop_reason: jax.Array
    num_steps: jax.Array


# ----------------------------------------------------------------------------- prompt padding

def bucket_length(n: int, bucket: str | int | None = "pow2") -> int:
    """The padded prompt length for a longest prompt of n tokens.

    "pow2": next power of two ≥ max(n, 16); an int m: next multiple of m; None or 0: n itself.
    """
    n = max(int(n), 1)
    if bucket in (None, 0):
        return n
    if bucket == "pow2":
        return max(16, 1 << (n - 1).bit_length())
    if isinstance(bucket, int) and bucket > 0:
        return -(-n // bucket) * bucket
    raise ValueError(f"prompt bucket must be 'pow2', a positive int or None, got {bucket!r}.")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: str | int | None = "pow2",
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token-id lists. Returns (ids int32 [B, P], mask int32 [B, P]), 1 on real tokens,
    with P = `length` if given, else bucket_length(longest prompt)."""
    lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    if len(prompts) == 0:
        raise ValueError("pad_prompts needs at least one prompt.")
    if lens.min() == 0:
        raise ValueError("every prompt needs at least one token.")
    width = int(length) if length is not None else bucket_length(int(lens.max()), bucket)
    if lens.max() > width:
        raise ValueError(f"a prompt of {int(lens.max())} tokens does not fit length {width}.")
    flat = np.fromiter((t for p in prompts for t in p), dtype=np.int32, count=int(lens.sum()))
    mask = np.arange(width)[None, :] >= (width - lens)[:, None]
    ids = np.full((len(prompts), width), pad_id, np.int32)
    ids[mask] = flat  # row-major order of True cells matches the concatenated prompts
    return ids, mask.astype(np.int32)


# ----------------------------------------------------------------------------- token selection

def _truncate(x: jax.Array, top_p: float, top_k: int) -> jax.Array:
    """x: float32 [B, V] scaled logits -> same with tokens outside top-k, then outside the
    nucleus of the renormalised top-k distribution, set to -inf. Ties at the threshold are kept."""
    neg = jnp.asarray(-jnp.inf, x.dtype)
    if top_k and top_k < x.shape[-1]:
        vals = jax.lax.top_k(x, top_k)[0]  # [B, k], descending
        x = jnp.where(x >= vals[:, -1:], x, neg)
    else:
        vals = None
    if top_p < 1.0:
        srt = vals if vals is not None else jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the smallest prefix whose mass reaches top_p; top-1 always
        threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= threshold, x, neg)
    return x


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> tuple[jax.Array, jax.Array]:
    """One token per row.

    logits: float32 [B, V]; key: PRNG key; temperature, top_p, top_k: Python numbers
    (T = 0 -> greedy; top_p = 1 and top_k = 0 disable truncation).
    Returns (tokens int32 [B], logprobs float32 [B] under the full log_softmax(logits / T);
    T = 1 for greedy).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits
    else:
        scaled = logits / temperature
        tokens = jax.random.categorical(key, _truncate(scaled, top_p, top_k), axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- jitted core

@dataclasses.dataclass(frozen=True)
class _Static:
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    temperature: float
    top_p: float
    top_k: int
    cache_dtype: Any
    mesh: Mesh | None
    rules: tuple


def _cache_shardings(cfg, st: _Static, batch: int, max_len: int):
    if st.mesh is None:
        return None
    kv_shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    kv = NamedSharding(st.mesh, shd.logical_to_spec(("batch", "cache_seq", "kv_heads", "head_dim"),
                                                    st.rules, st.mesh, kv_shape))
    valid = NamedSharding(st.mesh, shd.logical_to_spec(("batch", "cache_seq"), st.rules, st.mesh,
                                                       (batch, max_len)))
    rep = NamedSharding(st.mesh, jax.sharding.PartitionSpec())
    layers = cfg.num_layers
    return KVCache(keys=(kv,) * layers, values=(kv,) * layers, valid=valid, index=rep)


def _constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


class _Fns(NamedTuple):
    prefill: Any
    decode: Any


_FNS: dict = {}


def _functions(graphdef, st: _Static) -> _Fns:
    """The jitted (prefill, decode) for one model structure and static settings."""
    cached = _FNS.get((graphdef, st))
    if cached is not None:
        return cached
    n_new = st.max_new_tokens
    eos = np.asarray(st.eos_ids if st.eos_ids else (-1,), np.int32)

    def prefill(state, cache, prompt_ids, prompt_mask):
        """-> (last-token logits float32 [B, V], filled cache)."""
        TRACE_COUNTS["prefill"] += 1
        model = nnx.merge(graphdef, state)
        shardings = _cache_shardings(model.cfg, st, *cache.valid.shape)
        hidden, cache = model.forward(prompt_ids, None, prompt_mask, cache, return_hidden=True)
        return model.logits(hidden[:, -1]), _constrain(cache, shardings)

    def decode(state, cache, logits, prompt_lens, limits, key):
        """logits: float32 [B, V] after the prompt; prompt_lens, limits: int32 [B]."""
        TRACE_COUNTS["decode"] += 1
        model = nnx.merge(graphdef, state)
        b = logits.shape[0]
        shardings = _cache_shardings(model.cfg, st, *cache.valid.shape)
        limits = jnp.clip(limits, 0, n_new)

        def pick(step, logits, done, tokens_buf, logp_buf, reason, lengths):
            tok, lp = sample_logits(logits, jax.random.fold_in(key, step), st.temperature, st.top_p,
                                    st.top_k)
            tok = jnp.where(done, st.pad_id, tok)
            lp = jnp.where(done, 0.0, lp)
            tokens_buf = jax.lax.dynamic_update_slice(tokens_buf, tok[:, None], (0, step))
            logp_buf = jax.lax.dynamic_update_slice(logp_buf, lp[:, None], (0, step))
            hit_eos = ~done & jnp.isin(tok, eos)
            hit_limit = ~done & ~hit_eos & (step + 1 >= limits)
            reason = jnp.where(hit_eos, STOP_EOS, jnp.where(hit_limit, STOP_LIMIT, reason))
            lengths = lengths + (~done).astype(jnp.int32)
            return tok, done | hit_eos | hit_limit, tokens_buf, logp_buf, reason, lengths

        done0 = limits <= 0
        reason0 = jnp.where(done0, STOP_LIMIT, STOP_NONE).astype(jnp.int32)
        tokens_buf = jnp.full((b, n_new), st.pad_id, jnp.int32)
        logp_buf = jnp.zeros((b, n_new), jnp.float32)
        tok, done, tokens_buf, logp_buf, reason, lengths = pick(
            0, logits, done0, tokens_buf, logp_buf, reason0, jnp.zeros((b,), jnp.int32))

        def cond(carry):
            step, _, _, done, *_ = carry
            return (step < n_new) & ~jnp.all(done)

        def body(carry):
            step, cache, tok, done, tokens_buf, logp_buf, reason, lengths = carry
            positions = (prompt_lens + step - 1)[:, None]
            hidden, cache = model.forward(tok[:, None], positions, None, cache, return_hidden=True)
            cache = _constrain(cache, shardings)
            logits = model.logits(hidden[:, 0])
            tok, done, tokens_buf, logp_buf, reason, lengths = pick(
                step, logits, done, tokens_buf, logp_buf, reason, lengths)
            return step + 1, cache, tok, done, tokens_buf, logp_buf, reason, lengths

        carry = (jnp.int32(1), cache, tok, done, tokens_buf, logp_buf, reason, lengths)
        steps, cache, _, _, tokens_buf, logp_buf, reason, lengths = jax.lax.while_loop(cond, body, carry)
        return SamplerOutput(tokens_buf, logp_buf, lengths, reason, steps), cache

    fns = _Fns(
        prefill=jax.jit(prefill, donate_argnums=(1,)),
        decode=jax.jit(decode, donate_argnums=(1,)),
    )
    _FNS[(graphdef, st)] = fns
    return fns


# ----------------------------------------------------------------------------- public entry point

def _init_cache(cfg, st: _Static, batch: int, max_len: int) -> KVCache:
    """A zeroed cache [B, S, K, D] per layer, created on device (sharded per the rules)."""
    k = ("init_cache", cfg, st, batch, max_len)
    fn = _FNS.get(k)
    if fn is None:
        def init():
            TRACE_COUNTS["init_cache"] += 1
            return KVCache.init(cfg, batch, max_len, st.cache_dtype)
        fn = _FNS[k] = jax.jit(init, out_shardings=_cache_shardings(cfg, st, batch, max_len))
    return fn()


def _split(model_or_pair):
    if isinstance(model_or_pair, nnx.Module):
        return nnx.split(model_or_pair)
    graphdef, state = model_or_pair
    return graphdef, state


def generate(model_or_pair, prompt_ids, prompt_mask=None, *, key: jax.Array, max_new_tokens: int,
             limits=None, eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, mesh: Mesh | None = None, rules=None,
             prompt_bucket: str | int | None = "pow2", cache_dtype=None) -> SamplerOutput:
    """Samples up to `max_new_tokens` tokens after each left-padded prompt.

    model_or_pair: a Qwen2 NNX model or its (graphdef, state) from `nnx.split`; the state's arrays
      are used as they are (sharded or not: no copy).
    prompt_ids: int [B, P], LEFT-padded (see `pad_prompts`); every row needs ≥ 1 real token.
    prompt_mask: [B, P], 1 on real tokens (default: all ones). P is re-padded on the left to
      bucket_length(P, prompt_bucket) to keep the number of compiled shapes small.
    key: a jax PRNG key. max_new_tokens: static cap N (one compilation per value).
    limits: int [B] per-row cap on new tokens (clipped to [0, N]); default N for every row.
    eos_ids: token ids that end a row (kept, counted in its length). pad_id: fills after the stop.
    temperature (0 -> greedy), top_p (1 -> off), top_k (0 -> off): static Python numbers.
    mesh, rules: shard the batch over the `batch` rule and the cache's kv heads over `kv_heads`
      (default rules: hbpo_jax.sharding.DEFAULT_RULES). Give the mesh the model was created on.
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    Returns SamplerOutput(tokens int32 [B, N], logprobs float32 [B, N], lengths int32 [B],
      stop_reason int32 [B], num_steps int32 []) as device arrays. logprobs are of the full
      log_softmax(logits / T) (greedy: T = 1) at the sampled token, 0 after the stop.
    """
    call = _prepare(model_or_pair, prompt_ids, prompt_mask, key=key, max_new_tokens=max_new_tokens,
                    limits=limits, eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, top_p=top_p,
                    top_k=top_k, mesh=mesh, rules=rules, prompt_bucket=prompt_bucket,
                    cache_dtype=cache_dtype)
    logits, cache = call.fns.prefill(call.state, call.cache, call.prompt_ids, call.prompt_mask)
    out, cache = call.fns.decode(call.state, cache, logits, call.prompt_lens, call.limits, call.key)
    del cache  # donated through both calls; nothing else holds it
    return out


class _Call(NamedTuple):
    fns: _Fns
    state: Any
    cache: KVCache
    prompt_ids: Any
    prompt_mask: Any
    prompt_lens: Any
    limits: Any
    key: Any


def _prepare(model_or_pair, prompt_ids, prompt_mask, *, key, max_new_tokens, limits, eos_ids, pad_id,
             temperature, top_p, top_k, mesh, rules, prompt_bucket, cache_dtype) -> _Call:
    """Checks arguments, pads to the bucket, places the batch on the mesh and makes the cache."""
    graphdef, state = _split(model_or_pair)
    cfg = graphdef_cfg(graphdef, state)
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature ≥ 0, 0 < top_p ≤ 1 and top_k ≥ 0; got temperature="
                         f"{temperature}, top_p={top_p}, top_k={top_k}.")
    xp = jnp if isinstance(prompt_ids, jax.Array) else np
    prompt_ids = xp.asarray(prompt_ids).astype(xp.int32)
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {prompt_ids.shape}.")
    b, p = prompt_ids.shape
    prompt_mask = xp.ones((b, p), xp.int32) if prompt_mask is None else xp.asarray(prompt_mask).astype(xp.int32)
    width = bucket_length(p, prompt_bucket)
    if width != p:
        prompt_ids = xp.pad(prompt_ids, ((0, 0), (width - p, 0)), constant_values=pad_id)
        prompt_mask = xp.pad(prompt_mask, ((0, 0), (width - p, 0)))
    prompt_lens = prompt_mask.sum(axis=1).astype(xp.int32)
    limits = xp.full((b,), max_new_tokens, xp.int32) if limits is None else xp.asarray(limits).astype(xp.int32)
    if limits.shape != (b,):
        raise ValueError(f"limits must be int [B] = [{b}], got shape {limits.shape}.")

    rules = tuple((n, shd._as_axes(a)) for n, a in (rules or shd.DEFAULT_RULES)) if mesh is not None else ()
    st = _Static(int(max_new_tokens), tuple(int(i) for i in eos_ids), int(pad_id), float(temperature),
                 float(top_p), int(top_k), jnp.dtype(cache_dtype or cfg.compute_dtype), mesh, rules)
    if mesh is not None:
        put = lambda x: jax.device_put(x, shd.batch_sharding(mesh, rules, x.ndim, x.shape))  # noqa: E731
        prompt_ids, prompt_mask, prompt_lens, limits = map(put, (prompt_ids, prompt_mask, prompt_lens, limits))
        key = shd.put(key, NamedSharding(mesh, jax.sharding.PartitionSpec()))  # multi-process too
    cache = _init_cache(cfg, st, b, width + int(max_new_tokens))
    return _Call(_functions(graphdef, st), state, cache, prompt_ids, prompt_mask, prompt_lens, limits, key)


def graphdef_cfg(graphdef, state):
    """The ModelConfig of a split model (merging is cheap: it shares the state's arrays)."""
    return nnx.merge(graphdef, state).cfg


__all__ = ["STOP_EOS", "STOP_LIMIT", "STOP_NONE", "SamplerOutput", "bucket_length", "generate",
           "pad_prompts", "sample_logits"]

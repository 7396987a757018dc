"""Batched autoregressive sampling: prefill, then a jitted decode loop over a preallocated KV cache.

Shapes: B = rows, P = (bucketed) prompt length, N = max_new_tokens (static), V = vocabulary.

* Prompts are LEFT-padded to a bucketed length (`bucket_length`) so that a training run compiles
  a handful of shapes, not one per batch. Default "pow2": the next power of two, at least 16,
  so prompts of up to 1,024 tokens give at most 7 shapes.
* The decode loop is a `lax.while_loop` that stops as soon as every row has finished (EOS or its
  own limit), so a batch of short answers does not pay for the static cap N.
* Log-probabilities are those of the sampled token under the FULL temperature-scaled softmax,
  log_softmax(logits / T), not the top-p / top-k truncated and renormalised one: that is the
  policy whose probability ratios the clipped loss takes (arXiv 2507.15844). Greedy decoding
  (T = 0) reports log_softmax(logits).
* `Sampler` owns the jitted prefill and decode loop of one model structure and one set of static
  settings (`SamplerSettings`); `generate` is a function over a per-process cache of Samplers, so
  repeated calls with the same settings compile once.
* Token selection and randomness are `hbpo_jax.rollout.next_token`'s (`sample_logits`): exact draws without
  a draw per vocabulary entry or a vocabulary sort. Every row has its own key, and its i-th
  generated token draws with fold_in(row key, i), i counted per row (a SamplerInputs.token_offset
  shifts it). So a row's tokens depend on its key and its logits only, not on its place in the
  batch, the chunk it was sampled in, its neighbours, or the loop step it started at. Given one
  key for a call, row r's key is fold_in(key, r) (`sampling.row_keys`); the training rollout
  derives them from the step key and each row's index among all of the step's rows, so cutting
  the rows into sampler calls (rollout.max_batch) does not change a token.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hbpo_jax import sharding as shd
from hbpo_jax.models.qwen2 import KVCache
from hbpo_jax.rollout.next_token import keys_for_rows, sample_logits, token_keys

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


# ----------------------------------------------------------------------------- the sampler

@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The static settings one compilation serves (hashable: a Sampler cache key).

    max_new_tokens: the static cap N; eos_ids: token ids that end a row (kept, counted in its
    length); pad_id: fills after the stop; temperature (0 -> greedy), top_p (1 -> off), top_k
    (0 -> off); prompt_bucket: see bucket_length; cache_dtype: KV cache dtype (None: the model's
    compute dtype). Raises ValueError on an impossible value.
    """

    max_new_tokens: int
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_bucket: str | int | None = "pow2"
    cache_dtype: Any = None

    def __post_init__(self):
        # Normalised so that equal settings given as lists / numpy numbers hash alike.
        norm = dict(max_new_tokens=int(self.max_new_tokens), eos_ids=tuple(int(i) for i in self.eos_ids),
                    pad_id=int(self.pad_id), temperature=float(self.temperature), top_p=float(self.top_p),
                    top_k=int(self.top_k),
                    cache_dtype=None if self.cache_dtype is None else jnp.dtype(self.cache_dtype))
        for name, value in norm.items():
            object.__setattr__(self, name, value)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need temperature ≥ 0, 0 < top_p ≤ 1 and top_k ≥ 0; got temperature="
                             f"{self.temperature}, top_p={self.top_p}, top_k={self.top_k}.")
        bucket_length(1, self.prompt_bucket)  # raises on an unknown bucket


class SamplerInputs(NamedTuple):
    """One batch, padded to the prompt bucket and placed on the mesh (Sampler.prepare).
    prompt_ids, prompt_mask: int32 [B, P]; prompt_lens, limits: int32 [B]; key: typed PRNG keys
    [B], one per row; token_offset: int32 [B], the index of each row's first token in its key's
    sequence (0 for a row sampled from its start)."""

    prompt_ids: Any
    prompt_mask: Any
    prompt_lens: Any
    limits: Any
    key: Any
    token_offset: Any


def _constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


class Sampler:
    """Sampling for one model structure (an NNX graphdef) and one SamplerSettings.

    Owns the jitted `prefill` and `decode` (one trace per input shape) and the cache factory; the
    parameters are an argument of every call, so one Sampler serves a policy whose weights change
    every step. With a mesh, the batch is split over the `batch` rule and the cache's kv heads
    over `kv_heads` (rules default to hbpo_jax.sharding.DEFAULT_RULES); give the mesh the
    parameters live on.

        smp = Sampler(graphdef, cfg, SamplerSettings(max_new_tokens=64))
        out = smp(params, prompt_ids, prompt_mask, key=key)          # one call, or in two halves:
        inputs = smp.prepare(prompt_ids, prompt_mask, key=key)
        logits, cache = smp.prefill(params, smp.new_cache(*inputs.prompt_ids.shape), inputs)
        out, cache = smp.decode(params, cache, logits, inputs)
    """

    def __init__(self, graphdef, cfg, settings: SamplerSettings, *, mesh: Mesh | None = None, rules=None):
        self.graphdef, self.cfg, self.settings, self.mesh = graphdef, cfg, settings, mesh
        self.rules = shd.normalize_rules(rules) if mesh is not None else ()
        self.cache_dtype = jnp.dtype(settings.cache_dtype or cfg.compute_dtype)
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        self._cache_fns: dict = {}

    # -- shapes and placement
    def prompt_width(self, prompt_len: int) -> int:
        """P: the width a batch of prompts of up to `prompt_len` tokens is padded to."""
        return bucket_length(prompt_len, self.settings.prompt_bucket)

    def cache_length(self, prompt_width: int) -> int:
        """Slots per row of the preallocated cache: the prompt width P plus N."""
        return int(prompt_width) + self.settings.max_new_tokens

    def cache_shardings(self, batch: int, prompt_width: int) -> KVCache | None:
        """NamedShardings of the cache [L, B, P + N, K, D] (None without a mesh)."""
        return self.kv_shardings(batch, self.cache_length(prompt_width))

    def kv_shardings(self, batch: int, length: int, per_row_index: bool = False) -> KVCache | None:
        """NamedShardings of a KVCache [L, B, length, K, D]: rows over the `batch` rule, kv
        heads over `kv_heads`; its index replicated, or split as the rows (per_row_index, an int
        [B] index). None without a mesh."""
        if self.mesh is None:
            return None
        kv_shape = (self.cfg.num_layers, batch, length, self.cfg.num_kv_heads, self.cfg.head_dim)
        kv = self._sharding(("layers", "batch", "cache_seq", "kv_heads", "head_dim"), kv_shape)
        valid = self._sharding(("batch", "cache_seq"), (batch, length))
        index = self.row_sharding((batch,)) if per_row_index else self.replicated()
        return KVCache(keys=kv, values=kv, valid=valid, index=index)

    def new_cache(self, batch: int, prompt_width: int) -> KVCache:
        """A zeroed cache for `batch` rows of prompts `prompt_width` wide, created on device (sharded
        per the rules): prefill and decode donate it."""
        key = (int(batch), int(prompt_width))
        fn = self._cache_fns.get(key)
        if fn is None:
            length = self.cache_length(prompt_width)

            def init():
                TRACE_COUNTS["init_cache"] += 1
                return KVCache.init(self.cfg, key[0], length, self.cache_dtype)
            fn = self._cache_fns[key] = jax.jit(init, out_shardings=self.cache_shardings(*key))
        return fn()

    def prepare(self, prompt_ids, prompt_mask=None, *, key: jax.Array, limits=None,
                token_offset=None) -> SamplerInputs:
        """Checks a batch, pads it on the left to the prompt bucket and places it on the mesh.

        prompt_ids: int [B, P0], LEFT-padded (see pad_prompts), ≥ 1 real token a row; prompt_mask:
        [B, P0], 1 on real tokens (default all ones); key: one PRNG key (row r gets fold_in(key, r))
        or one per row (typed [B] or uint32 [B, 2]); limits: int [B] per-row caps on new tokens
        (clipped to [0, N] in the loop; default N); token_offset: int [B], default 0 (see
        SamplerInputs). numpy or jax arrays (jax stays on device).
        """
        st = self.settings
        xp = jnp if isinstance(prompt_ids, jax.Array) else np
        prompt_ids = xp.asarray(prompt_ids).astype(xp.int32)
        if prompt_ids.ndim != 2:
            raise ValueError(f"prompt_ids must be [B, P], got shape {prompt_ids.shape}.")
        b, p = prompt_ids.shape
        mask = xp.ones((b, p), xp.int32) if prompt_mask is None else xp.asarray(prompt_mask).astype(xp.int32)
        width = self.prompt_width(p)
        if width != p:
            prompt_ids = xp.pad(prompt_ids, ((0, 0), (width - p, 0)), constant_values=st.pad_id)
            mask = xp.pad(mask, ((0, 0), (width - p, 0)))
        lens = mask.sum(axis=1).astype(xp.int32)
        limits = xp.full((b,), st.max_new_tokens, xp.int32) if limits is None else xp.asarray(limits).astype(xp.int32)
        if limits.shape != (b,):
            raise ValueError(f"limits must be int [B] = [{b}], got shape {limits.shape}.")
        offset = (xp.zeros((b,), xp.int32) if token_offset is None
                  else xp.asarray(token_offset).astype(xp.int32))
        if offset.shape != (b,):
            raise ValueError(f"token_offset must be int [B] = [{b}], got shape {offset.shape}.")
        keys = keys_for_rows(key, b)
        if self.mesh is None:
            return SamplerInputs(prompt_ids, mask, lens, limits, keys, offset)
        rows = [jax.device_put(x, self.row_sharding(x.shape)) for x in (prompt_ids, mask, lens, limits)]
        # shd.put: the keys are process-local (equal on every process), the mesh may not be.
        return SamplerInputs(*rows, shd.put(keys, self.row_sharding(keys.shape)),
                             jax.device_put(offset, self.row_sharding(offset.shape)))

    # -- the jitted halves
    def prefill(self, params, cache: KVCache, inputs: SamplerInputs):
        """The prompt through the model -> (last-token logits float32 [B, V], filled cache).
        `cache` (new_cache(B, P)) is donated."""
        return self._prefill(params, cache, inputs.prompt_ids, inputs.prompt_mask)

    def decode(self, params, cache: KVCache, logits, inputs: SamplerInputs):
        """The decode loop after prefill -> (SamplerOutput, cache). `cache` is donated."""
        return self._decode(params, cache, logits, inputs.prompt_lens, inputs.limits, inputs.key,
                            inputs.token_offset)

    def __call__(self, params, prompt_ids, prompt_mask=None, *, key: jax.Array, limits=None,
                 token_offset=None) -> SamplerOutput:
        """prepare + prefill + decode: SamplerOutput as device arrays (see `generate`)."""
        inputs = self.prepare(prompt_ids, prompt_mask, key=key, limits=limits, token_offset=token_offset)
        cache = self.new_cache(*inputs.prompt_ids.shape)
        logits, cache = self.prefill(params, cache, inputs)
        out, cache = self.decode(params, cache, logits, inputs)
        del cache  # donated through both calls; nothing else holds it
        return out

    # -- ahead of time
    def abstract_inputs(self, batch: int, prompt_width: int) -> tuple[KVCache, SamplerInputs]:
        """ShapeDtypeStructs (with the shardings prepare / new_cache give) of a cache and a batch."""
        cache = jax.eval_shape(lambda: KVCache.init(self.cfg, batch, self.cache_length(prompt_width),
                                                    self.cache_dtype))
        shardings = self.cache_shardings(batch, prompt_width)
        if shardings is not None:
            cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, shardings)
        rows = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.row_sharding(shape))  # noqa: E731
        keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype, sharding=self.row_sharding((batch,)))
        w = int(prompt_width)
        return cache, SamplerInputs(rows((batch, w)), rows((batch, w)), rows((batch,)), rows((batch,)), keys,
                                    rows((batch,)))

    def lower(self, params, batch: int, prompt_len: int):
        """(prefill, decode) lowered for `batch` rows of prompts up to `prompt_len` tokens (padded
        to the bucket), without running anything. params: arrays or ShapeDtypeStructs carrying
        shardings (nothing is allocated). `.compile().memory_analysis()` gives XLA's plan."""
        cache, inputs = self.abstract_inputs(batch, self.prompt_width(prompt_len))
        prefill = self._prefill.lower(params, cache, inputs.prompt_ids, inputs.prompt_mask)
        logits = jax.ShapeDtypeStruct((batch, self.cfg.vocab_size), jnp.float32,
                                      sharding=self.row_sharding((batch, self.cfg.vocab_size)))
        decode = self._decode.lower(params, cache, logits, inputs.prompt_lens, inputs.limits, inputs.key,
                                    inputs.token_offset)
        return prefill, decode

    # -- internals
    def _sharding(self, logical, shape):
        return NamedSharding(self.mesh, shd.logical_to_spec(logical, self.rules, self.mesh, shape))

    def row_sharding(self, shape):
        """The NamedSharding of a batch-major array [B, ...] (None without a mesh)."""
        return None if self.mesh is None else shd.batch_sharding(self.mesh, self.rules, len(shape), shape)

    def replicated(self):
        """The replicated NamedSharding of the mesh (None without one)."""
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def _prefill_fn(self, params, cache, prompt_ids, prompt_mask):
        TRACE_COUNTS["prefill"] += 1
        model = nnx.merge(self.graphdef, params)
        shardings = self.cache_shardings(cache.valid.shape[0], cache.valid.shape[1] - self.settings.max_new_tokens)
        # The cache is new (new_cache): the prompt attends only to itself (splash on TPU).
        hidden, cache = model.forward(prompt_ids, None, prompt_mask, cache, return_hidden=True, empty_cache=True)
        return model.logits(hidden[:, -1]), _constrain(cache, shardings)

    def _decode_fn(self, params, cache, logits, prompt_lens, limits, keys, token_offset):
        """logits: float32 [B, V] after the prompt; prompt_lens, limits, token_offset: int32 [B];
        keys: typed PRNG keys [B]."""
        TRACE_COUNTS["decode"] += 1
        st, n_new = self.settings, self.settings.max_new_tokens
        model = nnx.merge(self.graphdef, params)
        b = logits.shape[0]
        shardings = self.cache_shardings(b, cache.valid.shape[1] - n_new)
        eos = np.asarray(st.eos_ids or (-1,), np.int32)
        limits = jnp.clip(limits, 0, n_new)

        def pick(step, logits, done, tokens_buf, logp_buf, reason, lengths):
            # Loop step s is token s of every row here; token_offset places it in the row's sequence.
            step_keys = token_keys(keys, token_offset + step)
            tok, lp = sample_logits(logits, step_keys, st.temperature, st.top_p, st.top_k)
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


# ----------------------------------------------------------------------------- public entry point

_SAMPLERS: dict = {}


def split_model(model_or_pair) -> tuple[Any, Any]:
    """(graphdef, state) of a Qwen2 NNX model, or the pair itself."""
    if isinstance(model_or_pair, nnx.Module):
        return nnx.split(model_or_pair)
    graphdef, state = model_or_pair
    return graphdef, state


def get_sampler(graphdef, state, settings: SamplerSettings, *, mesh: Mesh | None = None,
                rules=None) -> Sampler:
    """The process's one Sampler for (graphdef, settings, mesh, rules), made on first use (the
    model config is read from `state`, real or abstract): every caller with the same settings
    shares its compiled functions."""
    rules = shd.normalize_rules(rules) if mesh is not None else ()
    key = (graphdef, settings, mesh, rules)
    smp = _SAMPLERS.get(key)
    if smp is None:
        smp = _SAMPLERS[key] = Sampler(graphdef, graphdef_cfg(graphdef, state), settings, mesh=mesh, rules=rules)
    return smp


def generate(model_or_pair, prompt_ids, prompt_mask=None, *, key: jax.Array, max_new_tokens: int,
             limits=None, eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, mesh: Mesh | None = None, rules=None,
             prompt_bucket: str | int | None = "pow2", cache_dtype=None) -> SamplerOutput:
    """Samples up to `max_new_tokens` tokens after each left-padded prompt (get_sampler's Sampler).

    model_or_pair: a Qwen2 NNX model or its (graphdef, state) from `nnx.split`; the state's arrays
      are used as they are (sharded or not: no copy).
    prompt_ids: int [B, P], LEFT-padded (see `pad_prompts`); every row needs ≥ 1 real token.
    prompt_mask: [B, P], 1 on real tokens (default: all ones). P is re-padded on the left to
      bucket_length(P, prompt_bucket) to keep the number of compiled shapes small.
    key: one jax PRNG key (row r samples with fold_in(key, r)) or one per row (typed [B] or uint32
      [B, 2]); a row's tokens depend on its key only (see hbpo_jax.rollout.next_token).
    max_new_tokens: static cap N (one compilation per value).
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
    graphdef, state = split_model(model_or_pair)
    settings = SamplerSettings(max_new_tokens, tuple(eos_ids), pad_id, temperature, top_p, top_k,
                               prompt_bucket, cache_dtype)
    smp = get_sampler(graphdef, state, settings, mesh=mesh, rules=rules)
    return smp(state, prompt_ids, prompt_mask, key=key, limits=limits)


def graphdef_cfg(graphdef, state):
    """The ModelConfig of a split model (merging is cheap: it shares the state's arrays)."""
    return nnx.merge(graphdef, state).cfg


__all__ = ["STOP_EOS", "STOP_LIMIT", "STOP_NONE", "Sampler", "SamplerInputs", "SamplerOutput",
           "SamplerSettings", "bucket_length", "generate", "get_sampler", "graphdef_cfg", "pad_prompts",
           "split_model"]

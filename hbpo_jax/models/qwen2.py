"""Qwen2 decoder in Flax NNX, numerically equal to transformers' Qwen2ForCausalLM.

Every parameter carries `logical_axes` metadata (see hbpo_jax/sharding.py for the rule table that
maps them to mesh axes). Shapes use B = batch, T = query tokens, S = key slots (T without a cache,
the cache length with one), E = hidden, H = heads, K = kv heads, G = H // K, D = head dim,
M = MLP width, V = vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hbpo_jax.models import paged, splash
from hbpo_jax.models.config import ModelConfig

_NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite, so fully-masked (padding) rows stay finite


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


# ----------------------------------------------------------------------------- KV cache

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys and values of every layer.

    keys, values: one [B, S, K, D] array per layer, in the compute dtype.
    valid: bool [B, S], True where a slot holds a real (non-padding) token.
    index: the next slot to write. An int32 scalar: all rows write the same slot, and left
      padding makes that work for prompts of different lengths (the static sampler). Or int32 [B]:
      each row writes its own slot (the refilling engine, whose rows start at different times).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.compute_dtype
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, _ones, (dim,), ("norm",), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., E] -> [..., E] in x's dtype; statistics in float32 as transformers does."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates x [B, T, N, D] by positions [B, T] (transformers' rotate-half layout)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(q, k, v, mask, impl: str = "xla") -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, D]; k, v: [B, S, K, D]; mask: bool [B, T, S] (True = may attend), or
    splash.TokenSegments: causal attention within the T tokens, which sit in k, v's first T slots
    (Qwen2.forward without a cache or with an empty one). Returns [B, T, H, D] in q's dtype.
    Scores and softmax in float32.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    if isinstance(mask, splash.TokenSegments):
        impl = splash.resolve_impl(impl, q)  # "auto": splash (TPU), cudnn (GPU, 16-bit) or xla
        k, v = k[:, :t], v[:, :t]
        if impl == "splash":
            return splash.splash_attention(q, k, v, mask.valid)
        mask = splash.dense_mask(mask.valid)
    elif impl in ("auto", "splash"):
        impl = "xla"  # attention over a filled cache (decode, the engine's admit) stays on XLA
    if impl in ("dot_product", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], implementation="cudnn" if impl == "cudnn" else None)
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, k, d, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
        self.cfg = cfg
        self.q_proj = _param(rngs, _normal, (e, h, d), ("embed", "heads", "head_dim"), dt)
        self.q_bias = _param(rngs, _zeros, (h, d), ("heads", "head_dim"), dt)
        self.k_proj = _param(rngs, _normal, (e, k, d), ("embed", "kv_heads", "head_dim"), dt)
        self.k_bias = _param(rngs, _zeros, (k, d), ("kv_heads", "head_dim"), dt)
        self.v_proj = _param(rngs, _normal, (e, k, d), ("embed", "kv_heads", "head_dim"), dt)
        self.v_bias = _param(rngs, _zeros, (k, d), ("kv_heads", "head_dim"), dt)
        self.o_proj = _param(rngs, _normal, (h, d, e), ("heads", "head_dim", "embed"), dt)

    def __call__(self, x, positions, mask, kv=None, index=None):
        """x: [B, T, E]; positions: int32 [B, T]; mask: bool [B, T, S].

        kv: None (attend within x) or this layer's cached (keys, values) [B, S, K, D] each, into
        which the new keys/values are written from slot `index` (int32 scalar, or [B] per row).
        Returns ([B, T, E], updated (keys, values) or None).
        """
        dt = x.dtype
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("bte,ekd->btkd", x, self.k_proj[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("bte,ekd->btkd", x, self.v_proj[...].astype(dt)) + self.v_bias[...].astype(dt)
        q = rotary_embedding(q, positions, self.cfg.rope_theta)
        k = rotary_embedding(k, positions, self.cfg.rope_theta)
        if isinstance(kv, paged.PagedLayer):  # the refilling engine's slots: write, attend what is filled
            out, kv = kv.attend(q, k, v)
            return jnp.einsum("bthd,hde->bte", out, self.o_proj[...].astype(dt)), kv
        if kv is not None:
            k, v = (_write_slots(c, x.astype(c.dtype), index) for c, x in zip(kv, (k, v)))
            kv = (k, v)
            k, v = k.astype(dt), v.astype(dt)
        out = attention(q, k, v, mask, self.cfg.attention_impl)
        return jnp.einsum("bthd,hde->bte", out, self.o_proj[...].astype(dt)), kv


def _write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """cache [B, S, ...] with new [B, T, ...] written at slots [index, index + T): index is an
    int32 scalar (every row) or int32 [B] (each row its own). The caller keeps index + T ≤ S
    (dynamic_update_slice would move the write back to fit)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache, new, index)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, m, dt = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.gate_proj = _param(rngs, _normal, (e, m), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs, _normal, (e, m), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs, _normal, (m, e), ("mlp", "embed"), dt)

    def __call__(self, x):
        """x: [B, T, E] -> [B, T, E] (SwiGLU)."""
        dt = x.dtype
        gate = x @ self.gate_proj[...].astype(dt)
        up = x @ self.up_proj[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        h, kv = self.attn(self.input_norm(x), positions, mask, kv, index)
        x = x + h
        return x + self.mlp(self.post_attention_norm(x)), kv


def _call_layer(layer, x, positions, mask, kv, index, remat: str = "none"):
    """One decoder layer; with remat, its activations are recomputed in the backward pass.

    The layer is split into pure arrays for jax.checkpoint (not nnx.remat), so this composes with
    any outer jax transform (jit, scan, grad, eval_shape) of a merged model."""
    if remat == "none":
        return layer(x, positions, mask, kv, index)
    graphdef, state = nnx.split(layer)
    policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    @functools.partial(jax.checkpoint, policy=policy)
    def run(state, x, positions, mask, kv, index):
        return nnx.merge(graphdef, state)(x, positions, mask, kv, index)

    return run(state, x, positions, mask, kv, index)


# ----------------------------------------------------------------------------- the model

class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. `model(input_ids)` returns float32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, _normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            cfg.weight_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, _normal, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.weight_dtype)

    def __call__(self, input_ids, positions=None, attention_mask=None):
        """input_ids: int32 [B, T]; positions: int32 [B, T] (default: counted over the mask);
        attention_mask: [B, T], 1 for tokens and 0 for (left) padding. Returns float32 [B, T, V]."""
        logits, _ = self.forward(input_ids, positions, attention_mask)
        return logits

    def forward(self, input_ids, positions=None, attention_mask=None, cache: KVCache | None = None,
                *, return_hidden: bool = False, empty_cache: bool = False):
        """The decoder with an optional KV cache.

        input_ids: int32 [B, T]. attention_mask: [B, T] (1 = token, 0 = padding); default all ones.
        positions: int32 [B, T]; default cumsum(mask) - 1, which is right for left padding.
        cache: None (full causal attention over the T tokens), or a KVCache whose slots
          [index, index + T) receive these tokens (per row when cache.index is [B]); queries
          attend to valid slots up to their own. Or a paged.PagedKVCache (the refilling engine):
          each active slot's tokens are written from its length on, which advances by T (give
          positions: the default counts from 0).
        empty_cache: the caller's promise that `cache` holds nothing yet (KVCache.init: index 0, no
          valid slot), so the tokens attend only among themselves: with attention_impl "auto" or
          "splash", the fused kernel of the no-cache forward (models/splash.py) applies.
        Returns (float32 logits [B, T, V], or final hidden states [B, T, E] in the compute dtype
        when return_hidden, and the updated cache or None).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        token_valid = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(token_valid, axis=1) - 1, 0)
        is_paged = isinstance(cache, paged.PagedKVCache)
        if cache is None or is_paged:  # a paged cache masks by its lengths (models/paged.py)
            slots = jnp.arange(t)
            key_valid = token_valid
            index = None
        else:
            index = cache.index
            slots = jnp.atleast_1d(index)[:, None] + jnp.arange(t)  # [B or 1, T]
            key_valid = _write_slots(cache.valid, token_valid, index)
        if self.cfg.attention_impl in ("auto", "splash") and (cache is None or empty_cache):
            mask = splash.TokenSegments(token_valid)  # within the T tokens: a fused kernel (attention())
        else:
            key_slots = jnp.arange(key_valid.shape[1])
            mask = (key_slots[None, None, :] <= jnp.atleast_2d(slots)[:, :, None]) & key_valid[:, None, :]  # [B, T, S]

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.compute_dtype)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            if is_paged:
                x, kv = _call_layer(layer, x, positions, None, cache.layer(i), None, self.cfg.remat)
                cache = kv.cache
                continue
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = _call_layer(layer, x, positions, mask, kv, index, self.cfg.remat)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        x = self.final_norm(x)
        new_cache = None
        if is_paged:
            new_cache = dataclasses.replace(cache, lengths=cache.lengths + t * cache.active)
        elif cache is not None:
            new_cache = KVCache(tuple(new_keys), tuple(new_values), key_valid, index + t)
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def head_weight(self) -> jax.Array:
        """The output projection as [E, V] (the embedding's transpose when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., E] -> float32 logits [..., V]."""
        w = self.head_weight().astype(hidden.dtype)
        return jnp.einsum("...e,ev->...v", hidden, w, preferred_element_type=jnp.float32)

"""The decoder in Flax NNX (Qwen2, Qwen3 and Llama: one class, the family's switches read from
the config), numerically equal to transformers' Qwen2ForCausalLM, Qwen3ForCausalLM and
LlamaForCausalLM.

Every parameter carries `logical_axes` metadata (see hbpo_jax/sharding.py for the rule table that
maps them to mesh axes). Shapes use L = decoder layers, B = batch, T = query tokens, S = key slots
(T without a cache, the cache length with one), E = hidden, H = heads, K = kv heads, G = H // K,
D = head dim, M = MLP width, V = vocabulary.

The decoder layers are one DecoderLayer whose parameters are stacked on a leading [L] axis
(logical axis "layers", never sharded), run by one jax.lax.scan (ModelConfig.scan_layers): XLA
compiles the layer once, not L times, so a 28-layer model compiles about as fast as a one-layer
one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hbpo_jax import sharding
from hbpo_jax.models import lora, paged, splash
from hbpo_jax.models.config import ModelConfig

_NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite, so fully-masked (padding) rows stay finite

# Activation layouts at the points MaxText's decoder pins them (sharding.constrain: identity
# outside sharding.logical_rules, i.e. everywhere but the update and the log-prob pass).
_HIDDEN = ("batch", "act_seq", "act_embed")
_HEADS = ("batch", "act_seq", "act_heads", None)
_KV_HEADS = ("batch", "act_seq", "act_kv_heads", None)
_MLP = ("batch", "act_seq", "act_mlp")


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

    keys, values: [L, B, S, K, D] each, in the compute dtype (keys[i]: layer i's [B, S, K, D]),
      stacked so the layer scan carries them and writes each step's slots in place.
    valid: bool [B, S], True where a slot holds a real (non-padding) token.
    index: the next slot to write. An int32 scalar: all rows write the same slot, and left
      padding makes that work for prompts of different lengths (the static sampler). Or int32 [B]:
      each row writes its own slot (the refilling engine, whose rows start at different times).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.compute_dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, *, rngs: nnx.Rngs, axes=("norm",)):
        self.eps = eps
        self.scale = _param(rngs, _ones, (dim,), axes, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., N] -> [..., N] in x's dtype (N = dim: E, or D for the q/k norms); statistics in
        float32 as transformers does."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotates x [B, T, N, D] by positions [B, T] (transformers' rotate-half layout) at the
    float32 inverse frequencies inv_freq [D/2] (ModelConfig.rope_inv_freq), or at the default
    frequencies of a theta given as a number."""
    d = x.shape[-1]
    if jnp.ndim(inv_freq) == 0:
        inv_freq = 1.0 / (inv_freq ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
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
            return splash.splash_attention(q, k, v, mask.valid, mask.ids)
        mask = splash.dense_mask(mask.valid, mask.ids)
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
    """Grouped-query attention with the family's switches (ModelConfig): biases on q, k, v
    (qkv_bias) and o (o_bias), and Qwen3's per-head RMSNorm of q and k (qk_norm). A switch that is
    off creates no parameter."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs | None = None):
        e, h, k, d, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
        self.cfg = cfg
        # In this order (each parameter draws one key): a Qwen2 of a given seed keeps its weights.
        for name, n, axis in (("q", h, "heads"), ("k", k, "kv_heads"), ("v", k, "kv_heads")):
            setattr(self, f"{name}_proj", _param(rngs, _normal, (e, n, d), ("embed", axis, "head_dim"), dt))
            if cfg.qkv_bias:
                setattr(self, f"{name}_bias", _param(rngs, _zeros, (n, d), (axis, "head_dim"), dt))
        self.o_proj = _param(rngs, _normal, (h, d, e), ("heads", "head_dim", "embed"), dt)
        if cfg.o_bias:
            self.o_bias = _param(rngs, _zeros, (e,), ("embed",), dt)
        if cfg.qk_norm:  # one [D] scale shared by all heads (transformers' Qwen3 q_norm / k_norm)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dt, rngs=rngs, axes=("head_dim",))
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dt, rngs=rngs, axes=("head_dim",))
        # LoRA adapters (cfg.lora_targets), drawn from their own stream: the base keeps its draws.
        shapes = {"q": ((e,), ("embed",), (h, d), ("heads", "head_dim")),
                  "k": ((e,), ("embed",), (k, d), ("kv_heads", "head_dim")),
                  "v": ((e,), ("embed",), (k, d), ("kv_heads", "head_dim")),
                  "o": ((h, d), ("heads", "head_dim"), (e,), ("embed",))}
        _add_adapters(self, cfg, shapes, lora_rngs)

    def _project(self, x, name: str, spec: str):
        """x [B, T, E] through the {name}_proj weight (and its bias when the family has one)."""
        y = jnp.einsum(spec, x, getattr(self, f"{name}_proj")[...].astype(x.dtype))
        if hasattr(self, f"{name}_lora"):
            y = y + getattr(self, f"{name}_lora")(x)
        if self.cfg.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def _output(self, out):
        """out [B, T, H, D] -> [B, T, E] through o_proj (and its bias)."""
        y = jnp.einsum("bthd,hde->bte", out, self.o_proj[...].astype(out.dtype))
        if hasattr(self, "o_lora"):
            y = y + self.o_lora(out)
        return y + self.o_bias[...].astype(y.dtype) if self.cfg.o_bias else y

    def __call__(self, x, positions, mask, kv=None, index=None):
        """x: [B, T, E]; positions: int32 [B, T]; mask: bool [B, T, S].

        kv: None (attend within x), or (keys, values, layer): the stacked cache [L, B, S, K, D]
        each and this layer's int32 scalar index into it. The new keys/values are written into
        layer `layer` from slot `index` (int32 scalar, or [B] per row), in place, and the queries
        attend over that layer's slots.
        Returns ([B, T, E], the updated (keys, values, layer) or None).
        """
        dt = x.dtype
        q = self._project(x, "q", "bte,ehd->bthd")
        k = self._project(x, "k", "bte,ekd->btkd")
        v = self._project(x, "v", "bte,ekd->btkd")
        if self.cfg.qk_norm:  # per head over D, before the rotation (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self.cfg.rope_inv_freq()  # a float32 [D/2] constant of the trace
        q = sharding.constrain(rotary_embedding(q, positions, inv_freq), _HEADS)
        k = sharding.constrain(rotary_embedding(k, positions, inv_freq), _KV_HEADS)
        v = sharding.constrain(v, _KV_HEADS)
        if isinstance(kv, paged.PagedLayer):  # the refilling engine's slots: write, attend what is filled
            out, kv = kv.attend(q, k, v)
            return self._output(out), kv
        if kv is not None:
            keys, values, layer = kv
            keys, values = (_write_layer_slots(c, x.astype(c.dtype), layer, index) for c, x in ((keys, k), (values, v)))
            kv = (keys, values, layer)
            k, v = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False).astype(dt) for c in (keys, values))
        out = attention(q, k, v, mask, self.cfg.attention_impl)
        return self._output(out), kv


def _write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """cache [B, S, ...] with new [B, T, ...] written at slots [index, index + T): index is an
    int32 scalar (every row) or int32 [B] (each row its own). The caller keeps index + T ≤ S
    (dynamic_update_slice would move the write back to fit)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache, new, index)


def _write_layer_slots(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """The stacked cache [L, B, S, ...] with new [B, T, ...] written into layer `layer` (int32
    scalar) at slots [index, index + T) (int32 scalar, or [B] per row): a dynamic_update_slice
    (a scatter per row) that touches only the T new slots, so inside the layer scan, whose carry
    holds the cache, XLA updates the buffer in place."""
    rest = (0,) * (cache.ndim - 3)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, index) + rest)
    one_row = lambda c, x, i: jax.lax.dynamic_update_slice(c, x[None], (layer, i) + rest)  # noqa: E731  c: [L, S, ...]
    return jax.vmap(one_row, in_axes=(1, 0, 0), out_axes=1)(cache, new, index)


def _add_adapters(module: nnx.Module, cfg: ModelConfig, shapes: dict, rngs: nnx.Rngs | None) -> None:
    """module.<name>_lora = lora.LoRA(...) for each name of cfg.lora_targets among `shapes`
    (name -> (in_shape, in_axes, out_shape, out_axes)); nothing when cfg.lora_rank is 0."""
    for name, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
        if cfg.lora_rank and name in cfg.lora_targets:
            setattr(module, f"{name}_lora", lora.LoRA(in_shape, in_axes, out_shape, out_axes, cfg.lora_rank,
                                                      cfg.lora_scale, rngs=rngs or nnx.Rngs(lora=0)))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs | None = None):
        e, m, dt = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.gate_proj = _param(rngs, _normal, (e, m), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs, _normal, (e, m), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs, _normal, (m, e), ("mlp", "embed"), dt)
        _add_adapters(self, cfg, {"gate": ((e,), ("embed",), (m,), ("mlp",)),
                                  "up": ((e,), ("embed",), (m,), ("mlp",)),
                                  "down": ((m,), ("mlp",), (e,), ("embed",))}, lora_rngs)

    def _proj(self, x, name: str):
        """x [B, T, N] through {name}_proj (and its adapter when there is one)."""
        y = x @ getattr(self, f"{name}_proj")[...].astype(x.dtype)
        return y + getattr(self, f"{name}_lora")(x) if hasattr(self, f"{name}_lora") else y

    def __call__(self, x):
        """x: [B, T, E] -> [B, T, E] (SwiGLU)."""
        gate = sharding.constrain(self._proj(x, "gate"), _MLP)
        up = sharding.constrain(self._proj(x, "up"), _MLP)
        return self._proj(jax.nn.silu(gate) * up, "down")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs | None = None):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs, lora_rngs=lora_rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs, lora_rngs=lora_rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        h, kv = self.attn(self.input_norm(x), positions, mask, kv, index)
        x = x + sharding.constrain(h, _HIDDEN)
        return x + sharding.constrain(self.mlp(self.post_attention_norm(x)), _HIDDEN), kv


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """L equal-shaped layers as one DecoderLayer whose parameters are [L, ...]: each parameter's
    logical axes gain a leading "layers"."""
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]

    def stack(*variables):
        first = variables[0]
        return first.replace(jnp.stack([v.get_value() for v in variables]),
                             logical_axes=("layers",) + tuple(first.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


_CHECKPOINT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# Chips on which remat "auto" recomputes everything: "dots" saves a quarter of the update's flops
# but moves more HBM bytes, and the paper's update with it runs at about 410-550 flops per HBM
# byte (the plans of v5p-32, v5e-16, v6e-8: docs/tpu_plan.md, "The update's bytes"). A chip whose
# peak flops per HBM byte lie above that is memory bound with "dots": v6e (Trillium, 918 TFLOP/s
# on 1.64 TB/s = 560; "full" is compute bound there and faster). v4 (229), v5e (240), v5p (166)
# and H100 (295) take "dots".
FULL_REMAT_CHIPS = ("v6",)


def resolve_remat(remat: str, device_kind: str | None) -> str:
    """remat "auto" for a chip (its device_kind, e.g. "TPU v6 lite"): "full" on FULL_REMAT_CHIPS,
    "dots" on other TPUs and GPUs, "full" elsewhere (a CPU: the least memory). Other policies pass
    through."""
    if remat != "auto":
        return remat
    kind = (device_kind or "").lower()
    if any(chip in kind for chip in FULL_REMAT_CHIPS) or not kind or kind == "cpu":
        return "full"
    return "dots"


def target_device_kind(x: jax.Array) -> str:
    """The device_kind x is computed for: its mesh's (the TPU's when compiling for a topology
    from a CPU host), else the first local device's."""
    mesh = splash.context_mesh(x)
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    return getattr(device, "device_kind", None) or jax.devices()[0].device_kind


def run_layers(layers: DecoderLayer, x, positions, mask, kv=None, index=None, remat: str = "none",
               scan: bool = True):
    """Runs the stacked decoder layers (stack_layers) in order.

    x: [B, T, E]; positions, mask: as DecoderLayer takes them; kv: None, or the stacked
    (keys, values) [L, B, S, K, D] each, carried from layer to layer (so each layer's writes land in
    place) with slot `index`, or a paged.PagedKVCache (carried likewise; mask and index unused).
    remat "full" / "dots": each layer is a jax.checkpoint (every activation recomputed in the
    backward pass / matmul outputs saved; "auto": one of them per chip, resolve_remat), so only
    each layer's input [B, T, E] is kept across layers. scan True: one jax.lax.scan over the
    layers, so XLA compiles the layer once whatever L is; False: a Python loop over the same
    stacked weights (layer i reads row i), compiled L times but without the scan's stacked
    residuals, its zero-filled buffers and their dynamic slices
    (the tiny config's 3 layers: an SFT step 18% faster on a CPU). The layers are split into pure
    arrays (not nnx.scan), so this composes with any outer jax transform (jit, grad, eval_shape) of
    a merged model.
    Returns (x [B, T, E], the updated (keys, values), PagedKVCache or None).
    """
    graphdef, stacked = nnx.split(layers)

    def body(carry, xs):
        x, kv = carry
        params, i = xs
        # FSDP: this layer's weights cast to the compute dtype on their shards, then gathered
        # whole for its matmuls (each at full K, its output written once; sharding.gather_weights).
        layer = nnx.merge(graphdef, sharding.gather_weights(params, x.dtype))
        x = sharding.constrain(x, _HIDDEN)
        if isinstance(kv, paged.PagedKVCache):  # the engine's pages: layer i writes and reads its own
            x, written = layer(x, positions, None, kv.layer(i), None)
            return (x, written.cache), None
        x, kv = layer(x, positions, mask, None if kv is None else (*kv, i), index)
        return (sharding.constrain(x, _HIDDEN), None if kv is None else kv[:2]), None

    remat = resolve_remat(remat, target_device_kind(x))
    if remat != "none":
        # prevent_cse=False: the scan's loop already keeps XLA from merging the recomputation
        # into the forward pass (JAX's advice for checkpoint inside scan); unrolled, each layer is
        # a separate checkpoint whose inputs differ, so nothing merges either.
        body = jax.checkpoint(body, policy=_CHECKPOINT_POLICIES[remat], prevent_cse=False)
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    if not scan:
        carry = (x, kv)
        for i in range(num_layers):
            carry, _ = body(carry, (jax.tree.map(lambda w: w[i], stacked), jnp.int32(i)))
        return carry
    (x, kv), _ = jax.lax.scan(body, (x, kv), (stacked, jnp.arange(num_layers, dtype=jnp.int32)))
    return x, kv


# ----------------------------------------------------------------------------- the model

class Qwen2(nnx.Module):
    """Qwen2ForCausalLM, Qwen3ForCausalLM or LlamaForCausalLM, by cfg.model_type (the name stays
    for the code that imports it; `Decoder` is the same class). `model(input_ids)` returns float32
    logits [B, T, V]. With cfg.lora_rank > 0 the projections of cfg.lora_targets carry LoRA
    adapters (models/lora.py), drawn from lora_rngs' "lora" stream (default: seed 0), so the base
    weights are those of the same seed without adapters."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora_rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        lora_rngs = lora_rngs or nnx.Rngs(lora=0)
        self.embed = _param(rngs, _normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            cfg.weight_dtype)
        # Built one by one (the same random draws as a list of layers), then stacked [L, ...].
        self.layers = stack_layers([DecoderLayer(cfg, rngs=rngs, lora_rngs=lora_rngs) for _ in range(cfg.num_layers)])
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
                *, return_hidden: bool = False, empty_cache: bool = False, segment_ids=None):
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
        segment_ids: int32 [B, T], rows packed end to end (no cache; the packed update): each token
          attends causally within its segment, 0 marking padding; give each row's positions.
        Returns (float32 logits [B, T, V], or final hidden states [B, T, E] in the compute dtype
        when return_hidden, and the updated cache or None).
        """
        b, t = input_ids.shape
        if segment_ids is not None:
            attention_mask = segment_ids > 0
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
        if segment_ids is not None:
            mask = splash.TokenSegments(token_valid, segment_ids)  # packed rows: splash or a dense mask
        elif self.cfg.attention_impl in ("auto", "splash") and (cache is None or empty_cache):
            mask = splash.TokenSegments(token_valid)  # within the T tokens: a fused kernel (attention())
        else:
            key_slots = jnp.arange(key_valid.shape[1])
            mask = (key_slots[None, None, :] <= jnp.atleast_2d(slots)[:, :, None]) & key_valid[:, None, :]  # [B, T, S]

        # The table gathered whole over FSDP for the lookup (its gradient summed into its shards), so the
        # rows come out over the batch axes, not E-sharded like the stored table.
        table = sharding.gather_weight(self.embed[...], ("vocab", "embed"))
        x = sharding.constrain(jnp.take(table, input_ids, axis=0).astype(self.cfg.compute_dtype), _HIDDEN)
        if is_paged:
            x, cache = run_layers(self.layers, x, positions, None, cache, None, self.cfg.remat,
                                  self.cfg.scan_layers)
            new_cache = dataclasses.replace(cache, lengths=cache.lengths + t * cache.active)
        else:
            kv = None if cache is None else (cache.keys, cache.values)
            x, kv = run_layers(self.layers, x, positions, mask, kv, index, self.cfg.remat, self.cfg.scan_layers)
            new_cache = None if cache is None else KVCache(kv[0], kv[1], key_valid, index + t)
        x = sharding.constrain(self.final_norm(x), _HIDDEN)
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


Decoder = Qwen2  # the family-neutral name of the one decoder class

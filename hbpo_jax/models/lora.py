"""LoRA adapters on the decoder's projections: y = x W + (alpha / rank) (x A) B.

Why our own adapter and not qwix or flax's nnx.LoRA module: qwix (what tunix uses) adds LoRA by
intercepting a model's dot_generals at call time, which would keep the adapters out of this
decoder's parameter tree — out of the logical-axis sharding rules, the stacked-layer scan and
the HF export that reads that tree. nnx.LoRA is a 2-D x @ A @ B without the alpha / rank scale,
while our projections are einsums over [E, H, D] / [H, D, E] weights stacked on a layer axis.
What we do take from flax is the variable type, nnx.LoRAParam (a Param subclass): it is how the
adapters are told from the frozen base (`split`), for the gradient, the optimizer and the
checkpoint.

A is drawn small at random, B starts at zero, so a fresh adapter leaves the model exactly as it
was. Adapters are float32 whatever the base's dtype (AdamW's small steps vanish in bfloat16) and
are cast to the compute dtype where they are applied.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ADAPTER = nnx.LoRAParam  # the filter of every adapter leaf


class LoRA(nnx.Module):
    """One adapter: a [*in, r] (logical axes in_axes + one unsharded rank axis), b [r, *out].

    in_shape / out_shape: the projection's input and output dimensions (q: (E,) -> (H, D); o:
    (H, D) -> (E,); gate / up: (E,) -> (M,); down: (M,) -> (E,)); scale: alpha / rank.
    """

    def __init__(self, in_shape, in_axes, out_shape, out_axes, rank: int, scale: float, *, rngs: nnx.Rngs):
        fan_in = math.prod(in_shape)
        a = jax.random.normal(rngs.lora(), (*in_shape, rank), jnp.float32) / math.sqrt(fan_in)
        self.a = ADAPTER(a, logical_axes=(*in_axes, None))
        self.b = ADAPTER(jnp.zeros((rank, *out_shape), jnp.float32), logical_axes=(None, *out_axes))
        self.scale = scale
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, *in] -> [B, T, *out] in x's dtype: scale * (x A) B."""
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        xa = jnp.tensordot(x, a, axes=self.n_in)  # [B, T, r]
        return jnp.tensordot(xa * jnp.asarray(self.scale, x.dtype), b, axes=1)


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of a policy's full nnx.State: the trainable and the frozen leaves."""
    return nnx.split_state(params, ADAPTER, ...)


def join(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The full nnx.State again (no copy: the same arrays)."""
    return nnx.merge_state(base, adapters)


def zeroed(adapters: nnx.State) -> nnx.State:
    """Adapters that add nothing (A = B = 0): with the base, the model without adapters — the
    reference policy at the cost of the (small) adapter arrays."""
    return jax.tree.map(jnp.zeros_like, adapters)


def merged_weight(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale * A B on the host in float32, for export: weight [*in, *out], a [*in, r],
    b [r, *out] (one layer's). Returns float32 of weight's shape (the caller casts)."""
    delta = np.tensordot(np.asarray(a, np.float32), np.asarray(b, np.float32), axes=1)
    return np.asarray(weight, np.float32) + np.float32(scale) * delta

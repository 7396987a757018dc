"""Splash attention: jax's Pallas TPU flash-attention kernel for the decoder's causal self-attention.

Which calls take it (hbpo_jax/models/qwen2.py): with `attention_impl="splash"`, or "auto" on a
TPU, `Qwen2.forward` without a KV cache (training, log-prob passes) and a prefill into an empty
cache (`forward(..., empty_cache=True)`: the sampler's and the engine's prompt prefill), where the
T tokens attend only among themselves: forward hands the layers a TokenSegments instead of the
dense mask. Every other call with a cache (decode, or the engine's admit, which appends to a
filled cache) builds the dense [B, T, S] mask and takes the XLA path. "auto" resolves per
platform at trace time (resolve_impl): splash on TPU, cuDNN on GPU for 16-bit compute (the
training path the GPU benchmarks measured), XLA on CPU; explicit "xla", "cudnn", "dot_product"
behave as before, on every path.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention, called, not copied):
- causal mask: a CausalMask over the padded length, the same for every head;
- padding: segment ids, 1 for tokens and 0 for padding (left padding, or any pattern), so a token
  attends to the tokens at or before it and a padding query to the padding at or before it. No
  query row is ever empty (each sees itself), so padding rows stay finite; their outputs differ
  from the XLA path's (which averages over every slot there) and do not matter: no token attends to
  them and losses mask them out;
- GQA: the multi-head form with H query heads over K kv heads (the kernel maps head h to kv head
  h // (H / K), forward and backward);
- scale: the kernel does not scale the scores, so q is multiplied by D**-0.5 in float32 first;
- length: T is padded at the end to a multiple of the block (at most 512) with padding-segment
  rows, which causality hides from every real query, and cut off again;
- head_dim: 128, and 64 (SmolLM2, Llama 3.2 1B; half a lane tile, which the kernel pads
  internally) both compile for a TPU, forward and backward (tests/test_model_families.py);
- on a platform other than TPU the kernel runs in Pallas interpret mode (slow; for tests);
- precision: the kernel's matmuls take jax's default matmul precision; with
  jax_default_matmul_precision="highest" (the tests' setting) Mosaic rejects float32 contractions
  of bfloat16 tiles ("Bad lhs type"), so compile for TPU at the default precision.

The mesh: under jit, an array's type carries the abstract mesh of the arrays it was computed from
(jax's sharding-in-types, also with Auto axes), so the kernel finds the mesh from q itself and no
caller has to pass it; a `jax.set_mesh` context, when set, takes precedence. With a mesh of more
than one device the kernel runs under `jax.shard_map`: the batch over the `batch` rule's axes and
heads over the `heads` rule's of hbpo_jax.sharding.DEFAULT_RULES (data+fsdp and tensor), axes that
do not divide a dimension dropped as the rule table does for parameters. Kv heads that the
tensor axis does not divide (Qwen2-1.5B: 2 kv heads) stay whole on every shard, and each shard
picks the ones its query heads read. A config with a different rule table still computes the same
values; shard_map then reshards at its edges.

Numerics (tests/models/test_splash.py, interpret mode on the CPU against the XLA path, a tiny Qwen2 with
GQA, left padding, a fully padded row, 11 tokens): float32 logits within 2.4e-7 of the XLA path's,
gradients within 1e-5 of each array's largest entry (the bound tested); bfloat16 logits within
0.0045 of the bfloat16 XLA path's (tested at 0.01), while either bfloat16 path is up to 0.0078
from float32. The kernel keeps probabilities in float32 for the value product where the XLA path
rounds them to bfloat16, and rounds the scaled q once more.

Cost: XLA's cost_analysis does not see inside the kernel (a custom call), so a compiled program's
flops leave out the attention the kernel does: 4 T^2 D H per sequence and layer for the full
square, of which the causal kernel computes the blocks on and below the diagonal (55% at 10
blocks), once in the forward and about 2.5 times that in the fused backward.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hbpo_jax import sharding as shd

SEGMENT_PAD, SEGMENT_TOKEN = 0, 1
LANE = 128  # the kernel's blocks are multiples of the TPU lane width
MAX_BLOCK = 512  # block_q = block_kv; 512 is where the kernel's tile sweeps usually level off
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenSegments:
    """The splash path's mask, in place of the dense one: valid bool [B, T], True for tokens and
    False for padding; attention is causal over the T positions within each of the two segments.
    ids: None, or int32 [B, T] for rows packed end to end (the packed update): each token attends
    causally within its own id, 0 marking padding (valid = ids > 0)."""

    valid: jax.Array
    ids: jax.Array | None = None


def dense_mask(valid: jax.Array, ids: jax.Array | None = None) -> jax.Array:
    """The XLA/cuDNN form of TokenSegments: bool [B, T, T], query i may attend key j when j <= i
    and j is a token (padding queries attend nothing there), of the same segment when ids is given."""
    t = valid.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    return mask if ids is None else mask & (ids[:, :, None] == ids[:, None, :])


# ----------------------------------------------------------------------------- where it runs

def context_mesh(x: jax.Array):
    """The abstract mesh x is computed on: the `jax.set_mesh` context's, else the mesh in x's
    type (under jit), else None (a single device, or outside jit)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    return mesh


def target_platform(x: jax.Array) -> str:
    """The platform x is computed for ("tpu", "gpu", "cpu"): its mesh's device platform, which is
    the TPU when compiling for a TPU topology from a CPU host; else jax's default backend."""
    mesh = context_mesh(x)
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in GPU_PLATFORMS else platform


def resolve_impl(impl: str, x: jax.Array) -> str:
    """attention_impl "auto" for x's platform: splash on TPU; cudnn on GPU for 16-bit compute
    (cuDNN's fused attention takes no float32); xla otherwise. Other names pass through."""
    if impl != "auto":
        return impl
    platform = target_platform(x)
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and x.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


# ----------------------------------------------------------------------------- the kernel

def block_size(t: int) -> int:
    """The query/key block for T tokens: the largest of 512, 256, 128 that divides T rounded up
    to 128 (so padding stays under one lane tile)."""
    padded = -(-t // LANE) * LANE
    return next(b for b in (MAX_BLOCK, 256, LANE) if padded % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, block: int, interpret: bool):
    """The splash kernel for [heads, length, D] queries, causal, every block `block` (forward and
    the fused backward). Built from numpy masks once per shape; its block tables are concrete
    arrays, so the cached kernel serves any trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          use_fused_bwd_kernel=True)
    mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * heads)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _local_attention(q, k, v, segments, *, groups: int, head_axes, interpret: bool):
    """One shard: q [b, L, h, D]; k, v [b, L, k, D] with either the matching kv heads (h = k *
    groups) or all kv heads (the head axes shard q only); segments int32 [b, L]. -> [b, L, h, D]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    h = q.shape[2]
    if h != k.shape[2] * groups:  # kv heads whole here, query heads sharded: take the ones read
        first = jax.lax.axis_index(head_axes) * h  # this shard's first global query head
        if h % groups == 0 or groups % h == 0:
            n = max(h // groups, 1)
            k, v = (jax.lax.dynamic_slice_in_dim(a, first // groups, n, axis=2) for a in (k, v))
        else:  # groups straddle shards: one kv head per query head
            idx = (first + jnp.arange(h)) // groups
            k, v = (jnp.take(a, idx, axis=2) for a in (k, v))
    kernel = _kernel(h, q.shape[1], block_size(q.shape[1]), interpret)
    heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [b, L, n, D] <-> [b, n, L, D]
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
        heads_major(q), heads_major(k), heads_major(v), segments)
    return heads_major(out)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                     ids: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query self-attention with padding.

    q: [B, T, H, D]; k, v: [B, T, K, D] (H a multiple of K), all in the compute dtype; valid: bool
    [B, T] (True = token); ids: None, or int32 [B, T] segment ids of packed rows (0 = padding),
    the kernel's segment ids as they are. Returns [B, T, H, D] in q's dtype; padding rows hold finite values that
    no token reads.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    platform = target_platform(q)
    q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    length = -(-t // block_size(t)) * block_size(t)
    segments = (jnp.where(valid, SEGMENT_TOKEN, SEGMENT_PAD) if ids is None else ids).astype(jnp.int32)
    if length != t:
        q, k, v = (jnp.pad(a, ((0, 0), (0, length - t), (0, 0), (0, 0))) for a in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, length - t)), constant_values=SEGMENT_PAD)

    mesh = context_mesh(q)
    manual = [a for a, kind in zip(mesh.axis_names, mesh.axis_types)
              if kind == jax.sharding.AxisType.Manual] if mesh is not None else []
    run = functools.partial(_local_attention, groups=h // kv_heads, interpret=platform != "tpu")
    if mesh is None or math.prod(mesh.shape.values()) == 1 or manual:
        # One device, or already inside a shard_map (the caller's shapes are local).
        out = run(q, k, v, segments, head_axes=None)
    else:
        rules = shd.DEFAULT_RULES
        q_spec = shd.logical_to_spec(("batch", None, "heads", None), rules, mesh, q.shape)
        k_spec = shd.logical_to_spec(("batch", None, "kv_heads", None), rules, mesh, k.shape)
        if k_spec[2] is not None and k_spec[2] != q_spec[2]:
            k_spec = P(k_spec[0], None, None, None)  # kv heads follow the query heads or stay whole
        head_axes = q_spec[2]
        out = jax.shard_map(
            functools.partial(run, head_axes=head_axes), mesh=mesh,
            in_specs=(q_spec, k_spec, k_spec, P(q_spec[0], None)), out_specs=q_spec,
            check_vma=False)(q, k, v, segments)
    return out[:, :t]

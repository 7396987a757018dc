"""A paged KV cache for decode slots: KV memory that follows live tokens, attention that reads
only what is filled.

Layout (the Pallas TPU paged-attention kernel's, one array for all layers):

  keys, values: [K, L, P, page_size, D] in the cache dtype — P pages per layer shared by every
                slot. Layer-major inside each kv head, so that [K, L * P, page_size, D] is the
                same bytes (a free reshape, per device too): the kernel gets every layer's pool
                and reads layer l's page p as page l * P + p, without a copy of one layer's pool
  table:        int32 [S, pages_per_slot], the pages of each slot's tokens in order (global ids)
  lengths:      int32 [S], tokens filled per slot (= the position the next token is written to)
  active:       bool [S], slots that write and attend in this forward (a slot that is not
                active writes nothing — its pages may already belong to another row — and its
                attention output is garbage but finite)

Token t of slot s lives at page table[s, t // page_size], offset t % page_size. L = layers,
K = kv heads, D = head dim, S = slots, H = query heads, T = query tokens per slot.

With a mesh, the pages are split over the same mesh axes as the slots (`batch` rule): slot s
only holds pages of its own shard (the host's allocator, hbpo_jax.rollout.pages, hands them out per shard),
so each device keeps the KV of its own slots, and the write and the attention run under
shard_map with the table translated to local page ids. The kv-head axis is split over the
`kv_heads` rule.

Attention (`PagedLayer.attend`):
  "xla": a blocked fallback for CPU/GPU — a while loop over blocks of `block_pages` pages up to
         the longest filled slot of the batch, online softmax in float32 (the dense path's
         numerics up to float rounding), so a step reads the filled KV (rounded up to a block
         per slot), not the preallocated maximum.
  "kernel": jax's Pallas TPU paged-attention kernel (jax.experimental.pallas.ops.tpu.
         paged_attention), decode only (T = 1). It loads K and V as bfloat16 (so with a
         bfloat16 cache it is exact; with a float32 cache it rounds them); head_dim must be a
         multiple of 128 (at D = 64, e.g. SmolLM2 or Llama 3.2 1B, it fails to lower for a TPU:
         PagedKVCache.init refuses it, and the engine takes "xla" there). Numerics checked on CPU
         in TPU interpret mode (tests/models/test_paged.py). On a chip of two TensorCores (v4,
         v5p) the kernel splits the slots over both (megacore_mode "batch"; `megacore_mode`):
         without it one core idles through decode attention.
         jax's ragged_paged_attention kernel (combined [P, page, 2K, D] layout, mixed prefill
         and decode) does not run in jax 0.10.2's TPU interpreter (its ref reshape is
         unsupported there), so it cannot be checked here and is not used.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

IMPLS = ("xla", "kernel")
_NEG_INF = float(jnp.finfo(jnp.float32).min)


def pages_for(tokens: int, page_size: int) -> int:
    """Pages holding `tokens` tokens."""
    return -(-int(tokens) // int(page_size))


# ----------------------------------------------------------------------------- the device cache

@dataclasses.dataclass(frozen=True)
class PagedPlacement:
    """Where the pages live: the mesh, the mesh axes of the slots (and pages) and of the kv heads.
    Hashable (a static field of the cache)."""

    mesh: Mesh
    batch_axes: tuple[str, ...]
    kv_axes: tuple[str, ...]

    @classmethod
    def of_specs(cls, mesh: Mesh, batch: P, kv: P) -> "PagedPlacement":
        """The placement whose slots (and pages) are split as the first dimension of `batch` and
        whose kv heads as the first dimension of `kv` (PartitionSpecs)."""
        def axes(spec):
            a = spec[0] if len(spec) else None
            return () if a is None else (a,) if isinstance(a, str) else tuple(a)
        return cls(mesh, axes(batch), axes(kv))

    @property
    def shards(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.batch_axes], dtype=np.int64))

    def spec(self, *dims) -> P:
        """A PartitionSpec from dims of "batch" / "kv" / None."""
        pick = {"batch": self.batch_axes, "kv": self.kv_axes}
        out = []
        for d in dims:
            axes = pick.get(d, ())
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """The paged cache of S decode slots (see the module docstring for the layout).

    keys, values: [K, L, P, page_size, D]; table: int32 [S, pages_per_slot]; lengths: int32 [S];
    active: bool [S]. impl ("xla" | "kernel"), block_pages (pages per attention block) and
    placement (None without a mesh) are static.
    """

    keys: jax.Array
    values: jax.Array
    table: jax.Array
    lengths: jax.Array
    active: jax.Array
    impl: str = dataclasses.field(default="xla", metadata=dict(static=True))
    block_pages: int = dataclasses.field(default=8, metadata=dict(static=True))
    placement: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def init(cls, cfg, slots: int, pages_per_slot: int, pages: int, page_size: int, dtype=None, *,
             impl: str = "xla", block_pages: int = 8, placement: PagedPlacement | None = None) -> "PagedKVCache":
        """Zeroed pages, every slot empty (length 0, inactive, table pointing at page 0)."""
        if impl not in IMPLS:
            raise ValueError(f"paged attention impl must be one of {IMPLS}, got {impl!r}.")
        if impl == "kernel" and cfg.head_dim % 128:
            # jax 0.10.2's kernel does not lower for D = 64 (Mosaic wants its [.., D] blocks in
            # whole 128-lane tiles); the engine's default picks "xla" for such models on TPU.
            raise ValueError(f"the paged-attention kernel needs a head_dim that is a multiple of 128, "
                             f"got {cfg.head_dim}; use the 'xla' paged attention for this model.")
        dtype = dtype or cfg.compute_dtype
        shape = (cfg.num_kv_heads, cfg.num_layers, int(pages), int(page_size), cfg.head_dim)
        # The table is padded to whole attention blocks (the kernel needs pages_per_slot to be a
        # multiple of its block; the fallback slices whole blocks).
        block_pages = max(1, min(int(block_pages), int(pages_per_slot)))
        width = pages_for(pages_per_slot, block_pages) * block_pages
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   table=jnp.zeros((slots, width), jnp.int32), lengths=jnp.zeros((slots,), jnp.int32),
                   active=jnp.zeros((slots,), bool), impl=impl, block_pages=block_pages, placement=placement)

    @property
    def page_size(self) -> int:
        return self.keys.shape[3]

    @property
    def num_pages(self) -> int:
        return self.keys.shape[2]

    def layer(self, i) -> "PagedLayer":
        """Layer i's view (i a Python int or a traced int32: works under a scan over layers)."""
        return PagedLayer(self, jnp.asarray(i, jnp.int32))

    def shardings(self):
        """NamedShardings of the fields (None without a mesh)."""
        pl = self.placement
        if pl is None:
            return None
        from jax.sharding import NamedSharding
        pool = NamedSharding(pl.mesh, pl.spec("kv", None, "batch", None, None))
        rows = lambda *d: NamedSharding(pl.mesh, pl.spec("batch", *d))  # noqa: E731
        return dataclasses.replace(self, keys=pool, values=pool, table=rows(None), lengths=rows(), active=rows())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedLayer:
    """One layer's view of a PagedKVCache: what qwen2.Attention gets as `kv` (it calls attend)."""

    cache: PagedKVCache
    index: jax.Array  # int32 [], the layer

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, "PagedLayer"]:
        """Writes the new keys and values of every active slot at positions [length, length + T)
        and attends each query over its slot's filled tokens (causally: query t sees positions
        ≤ length + t).

        q: [S, T, H, D]; k, v: [S, T, K, D] (rotated). Returns ([S, T, H, D] in q's dtype, the
        view of the updated cache; lengths are advanced by the forward, not here)."""
        c = self.cache
        fn = functools.partial(_write_and_attend, impl=c.impl, block_pages=c.block_pages)
        args = (q, k, v, c.keys, c.values, c.table, c.lengths, c.active, self.index)
        if c.placement is None:
            out, keys, values = fn(*args, page_offset=0)
        else:
            pl = c.placement
            pool = pl.spec("kv", None, "batch", None, None)
            rows = pl.spec("batch", None, "kv", None)
            per_shard = c.num_pages // pl.shards

            def local(*a):
                shard = jax.lax.axis_index(pl.batch_axes) if pl.batch_axes else 0
                return fn(*a, page_offset=shard * per_shard)
            out, keys, values = jax.shard_map(
                local, mesh=pl.mesh,
                in_specs=(rows, rows, rows, pool, pool, pl.spec("batch", None), pl.spec("batch"), pl.spec("batch"),
                          P()),
                out_specs=(rows, pool, pool), check_vma=False)(*args)
        return out, PagedLayer(dataclasses.replace(c, keys=keys, values=values), self.index)


def _write_and_attend(q, k, v, keys, values, table, lengths, active, layer, *, page_offset, impl, block_pages):
    """The body of PagedLayer.attend on one shard: table holds global page ids, page_offset is
    this shard's first page."""
    s, t = k.shape[:2]
    ps = keys.shape[3]
    local = table - page_offset
    pos = lengths[:, None] + jnp.arange(t)  # [S, T]
    col = jnp.minimum(pos // ps, table.shape[1] - 1)
    page = jnp.take_along_axis(local, col, axis=1)
    page = jnp.where(active[:, None], page, keys.shape[2])  # past the pool: dropped
    # Every index but D's is a scatter index (the window is one [D] row): with a [K, D] window
    # XLA's TPU layout assignment moves K next to D, and then copies the whole pool into the
    # kernel's row-major layout twice per layer and step.
    head = jnp.arange(keys.shape[0])[:, None, None]
    at = (head, layer, page[None], (pos % ps)[None])  # [K, S, T] each
    keys = keys.at[at].set(k.transpose(2, 0, 1, 3).astype(keys.dtype), mode="drop")
    values = values.at[at].set(v.transpose(2, 0, 1, 3).astype(values.dtype), mode="drop")
    # An inactive slot attends over one token (the kernel needs a length ≥ 1; nothing reads it).
    kv_lens = jnp.where(active, lengths + t, 1)
    if impl == "kernel":
        kh, nl, np_, _, d = keys.shape
        flat = lambda x: x.reshape(kh, nl * np_, ps, d)  # noqa: E731  (the same bytes: no copy)
        out = kernel_attention(q, flat(keys), flat(values), local + layer * np_, kv_lens, block_pages)
    else:
        out = blocked_attention(q, keys, values, local, kv_lens, pos, block_pages, layer=layer)
    return out, keys, values


# ----------------------------------------------------------------------------- attention

def blocked_attention(q, k_pages, v_pages, table, kv_lens, q_pos, block_pages: int, layer=None) -> jax.Array:
    """Attention over pages, reading blocks of `block_pages` pages up to the longest kv_lens.

    q: [S, T, H, D]; k_pages, v_pages: [K, P, page_size, D], or [K, L, P, page_size, D] with
    `layer` (int32 []) picking one: the block gather reads that layer's pages in place; table:
    int32 [S, W] (W a multiple of block_pages, local page ids); kv_lens: int32 [S] (tokens to read
    per slot); q_pos: int32 [S, T] (query t attends to positions ≤ q_pos[s, t] and < kv_lens[s]).
    Returns [S, T, H, D] in q's dtype; scores, softmax and accumulation in float32.
    """
    s, t, h, d = q.shape
    kh, ps = k_pages.shape[0], k_pages.shape[-2]
    g = h // kh
    width = block_pages * ps
    qg = q.reshape(s, t, kh, g, d).astype(jnp.float32) * (d ** -0.5)
    n_blocks = (jnp.max(kv_lens) + width - 1) // width

    def body(j, carry):
        m, l, acc = carry  # [S, K, G, T], [S, K, G, T], [S, K, G, T, D]
        pages = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=1)  # [S, bp]
        gather = (lambda x: x[:, pages]) if layer is None else (lambda x: x[:, layer, pages])  # noqa: E731
        kb = gather(k_pages).reshape(kh, s, width, d).astype(jnp.float32)  # [K, S, bp*ps, D]
        vb = gather(v_pages).reshape(kh, s, width, d).astype(jnp.float32)
        scores = jnp.einsum("stkgd,kscd->skgtc", qg, kb)
        key_pos = j * width + jnp.arange(width)
        ok = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])
        scores = jnp.where(ok[:, None, None], scores, _NEG_INF)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("skgtc,kscd->skgtd", p, vb)
        return m_new, l, acc

    init = (jnp.full((s, kh, g, t), _NEG_INF, jnp.float32), jnp.zeros((s, kh, g, t), jnp.float32),
            jnp.zeros((s, kh, g, t, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [S, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(s, t, h, d).astype(q.dtype)


def megacore_mode(slots: int, kv_heads: int, device_kind: str | None = None) -> str | None:
    """The paged-attention kernel's megacore_mode for a chip: None on a chip of one TensorCore
    (v5e, v6e, CPU), else how its two cores (v4, v5p) split the work: "batch" (the slots; each
    core reads its own slots' pages, balanced when slots are many) when the slots divide by 2,
    else "kv_head" when the kv heads do, else None (one core idles). device_kind: default the
    first device's."""
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    if "tpu" not in kind or "lite" in kind or not any(v in kind for v in ("v4", "v5")):
        return None
    return "batch" if slots % 2 == 0 else "kv_head" if kv_heads % 2 == 0 else None


def kernel_attention(q, k_pages, v_pages, table, kv_lens, block_pages: int, megacore: str | None = "auto"
                     ) -> jax.Array:
    """jax's Pallas TPU paged-attention kernel for one query token per slot.

    q: [S, 1, H, D]; k_pages, v_pages: [K, P, page_size, D]; table: int32 [S, W] (W a multiple of
    block_pages); kv_lens: int32 [S] ≥ 1; megacore: the kernel's megacore_mode ("batch",
    "kv_head", None), "auto": `megacore_mode` of this chip. The kernel does not scale the
    scores, so q is scaled here in float32. Returns [S, 1, H, D] in q's dtype."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    s, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"the paged-attention kernel takes one query token per slot, got {t}.")
    if megacore == "auto":
        megacore = megacore_mode(s, k_pages.shape[0])
    qs = q[:, 0].astype(jnp.float32) * (d ** -0.5)
    out = paged_attention(qs, k_pages, v_pages, kv_lens, table, pages_per_compute_block=block_pages,
                          megacore_mode=megacore)
    return out[:, None].astype(q.dtype)


def dense_attention_reference(q, k_pages, v_pages, table, kv_lens, q_pos) -> jax.Array:
    """The same attention with every slot's pages gathered into a dense [S, W * page_size] cache
    and one softmax (the tests' reference). Shapes as blocked_attention; float32 result."""
    s, t, h, d = q.shape
    kh, _, ps, _ = k_pages.shape
    k = k_pages[:, table].reshape(kh, s, -1, d).transpose(1, 2, 0, 3)  # [S, C, K, D]
    v = v_pages[:, table].reshape(kh, s, -1, d).transpose(1, 2, 0, 3)
    key_pos = jnp.arange(k.shape[1])
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])
    qg = q.reshape(s, t, kh, h // kh, d).astype(jnp.float32)
    scores = jnp.einsum("stkgd,sckd->skgtc", qg, k.astype(jnp.float32)) * d ** -0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, _NEG_INF), axis=-1)
    out = jnp.einsum("skgtc,sckd->stkgd", probs, v.astype(jnp.float32))
    return out.reshape(s, t, h, d)


__all__ = ["IMPLS", "PagedKVCache", "PagedLayer", "PagedPlacement", "blocked_attention",
           "dense_attention_reference", "kernel_attention", "megacore_mode", "pages_for"]

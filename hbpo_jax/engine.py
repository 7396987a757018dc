"""The refilling rollout engine: a fixed number of decode slots, fed from a queue of rows.

The static sampler (hbpo_jax.sampler) decodes a chunk of rows until its longest row ends. HBPO's
rows differ in length on purpose (a prompt's 512-budget rows end long before its 2,560-budget
ones), so most of a chunk's slots idle for most of its steps. Here a row that ends frees its slot
for the next row in the queue:

  prompts  ->  prefill each DISTINCT prompt once (right-padded) into a prompt store [G, Pw]
  admit    ->  a row takes a free slot and the KV pages for its whole limit (models/paged.py: a
               page pool sized by `kv_tokens`; a row waits while too few pages are free); its
               prompt's KV is copied from the store, then one short forward over [last prompt
               token, pre-filled prefix] scores the prefix tokens (their log-probs: no recompute
               pass later) and draws the row's first token; the KV goes into the row's pages
  decode   ->  a jitted loop steps every slot; it returns to the host when `need` rows have ended
               (so their slots can be refilled) or when no slot is running
  retire   ->  an ended row's tokens are written to its place in the output, on device; its
               pages go back to the pool (host)

Shapes: S = slots, A = rows admitted per call, R = rows, G = distinct prompts, Pw = prompt width
(bucketed), F = start width (1 + the longest prefix, a multiple of 8), N = max_new_tokens,
C = Pw + F + N the most tokens a decode slot can hold, V = vocabulary. A row's cache holds its
prompt at positions [0, plen), its prefix after it, then its generated tokens, in pages of
`page_size` tokens (PagedKVCache: the pool [K, L, pages, page_size, D], a page table per slot, a
length per slot); decode attention reads each slot's filled pages only (models/paged.py).

Randomness is the static sampler's (hbpo_jax.sampling): a row's i-th generated token draws with
fold_in(row key, token_offset + i). A row's tokens therefore do not depend on its slot, on when it
was admitted, or on its neighbours: with the same keys, this engine and the static sampler draw
the same tokens (up to float rounding of the logits, which differs between the two layouts).

Rows are admitted longest-expected first (`order`, e.g. by budget), so the rows that end last are
the short ones and the drain at the end is short. `EngineStats` counts the slot-steps the loop
paid for and the tokens it produced: utilization = tokens / slot-steps.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbpo_jax import pages
from hbpo_jax import sharding as shd
from hbpo_jax.models import paged
from hbpo_jax.models.qwen2 import KVCache
from hbpo_jax.sampler import STOP_EOS, STOP_LIMIT, Sampler, SamplerSettings, bucket_length, graphdef_cfg
from hbpo_jax.sampling import keys_for_rows, sample_logits, token_keys

TRACE_COUNTS: collections.Counter = collections.Counter()


class EngineOutput(NamedTuple):
    """numpy, rows in their input order. tokens: int32 [R, N] generated tokens, pad after the
    stop; logprobs: float32 [R, N], 0 after the stop; lengths, stop_reason: int32 [R];
    prefix_logprobs: float32 [R, F - 1], the pre-filled prefix tokens' log-probs under the full
    log_softmax(logits / T) (0 past a row's prefix)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray
    prefix_logprobs: np.ndarray


@dataclasses.dataclass
class EngineStats:
    """What one run cost. slot_steps: decode slot-steps paid (S per loop step) plus A per admit
    call (each admit draws up to A first tokens); tokens: generated tokens; decode_steps, segments,
    admit_calls, prompt_prefills (distinct prompts prefilled), rows; kv_bytes: the page pool's
    bytes (keys and values, all layers), dense_kv_bytes: what a contiguous S x C cache would take;
    peak_pages of pool_pages handed out at once."""

    slots: int = 0
    rows: int = 0
    tokens: int = 0
    slot_steps: int = 0
    decode_steps: int = 0
    segments: int = 0
    admit_calls: int = 0
    prompt_prefills: int = 0
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    pool_pages: int = 0
    peak_pages: int = 0

    @property
    def utilization(self) -> float:
        return self.tokens / max(self.slot_steps, 1)


class SlotState(NamedTuple):
    """The decode slots (all [S] unless noted). tok: the next input token; gen: tokens generated;
    done: the slot is not running (ended or empty); reason: STOP_*; limit, offset: the row's own;
    keys: uint32 [S, 2], the row's raw PRNG key; row: its index in the output, R when empty;
    tokens, logprobs: [S, N] the row's output so far; prefix_logp: [S, F - 1]."""

    tok: Any
    gen: Any
    done: Any
    reason: Any
    limit: Any
    offset: Any
    keys: Any
    row: Any
    tokens: Any
    logprobs: Any
    prefix_logp: Any


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """log_softmax(logits / T) at `tokens` (T = 0 -> 1, as the sampler reports greedy tokens).
    logits: float32 [..., V]; tokens: int [...] -> float32 [...]."""
    x = logits / (temperature or 1.0)
    logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


class AdmitBatch(NamedTuple):
    """A rows entering slots (all [A]; padding entries have slot = S, dropped by the scatter).
    slot, row (R for padding), prompt (index into the store), plen (its tokens), start: int32
    [A, F] = [last prompt token, prefix..., pad], start_len (1 + prefix length), limit, offset;
    keys: uint32 [A, 2] raw PRNG keys; pages: int32 [A, W] the row's page table (padding rows:
    the pool size, so their writes drop)."""

    slot: Any
    row: Any
    prompt: Any
    plen: Any
    start: Any
    start_len: Any
    limit: Any
    offset: Any
    keys: Any
    pages: Any


class RefillEngine:
    """Rollouts through S refilling decode slots (see the module docstring).

    graphdef, cfg: the model structure and its ModelConfig; settings: the static sampler's settings
    (max_new_tokens N, eos, pad, temperature, top-p/k, prompt bucket, cache dtype); slots: S, the
    rows decoding at once (the KV cache is S x C); admit: A, rows per refill call (default
    max(1, S // 16): an ended row's slot waits for about A / 2 more to end before it is refilled,
    so about A / (2 S) of the slot-steps idle; the first fill admits all S slots in one call).
    With a mesh the slots are split over the `batch` rule (S must divide by its size) and the
    cache's kv heads over `kv_heads`, as in the static sampler; the page pool is split like the
    slots (each device holds its slots' pages).

    page_size: tokens per KV page; kv_tokens: the pool's size in tokens, all devices together
    (0: S x C, so no row ever waits for pages; smaller: KV memory follows live tokens, and a row
    is admitted only when the pages for its whole limit are free — see docs/rollout.md);
    attention: "xla" (the blocked fallback) or "kernel" (the Pallas TPU paged-attention kernel;
    default on TPU when head_dim is a multiple of 128); block_pages: pages per attention block.

        eng = RefillEngine(graphdef, cfg, SamplerSettings(max_new_tokens=256, eos_ids=(2,)), slots=64)
        out, stats = eng.run(params, prompts, row_prompt, prefixes, limits, key=key)
    """

    def __init__(self, graphdef, cfg, settings: SamplerSettings, *, slots: int, admit: int = 0,
                 mesh=None, rules=None, page_size: int = 16, kv_tokens: int = 0, attention: str | None = None,
                 block_pages: int = 8):
        if slots < 1 or admit < 0:
            raise ValueError(f"need slots ≥ 1 and admit ≥ 0, got slots={slots}, admit={admit}.")
        if page_size < 1 or kv_tokens < 0 or block_pages < 1:
            raise ValueError(f"need page_size ≥ 1, kv_tokens ≥ 0 and block_pages ≥ 1, got page_size={page_size}, "
                             f"kv_tokens={kv_tokens}, block_pages={block_pages}.")
        if attention is None:  # the kernel where the slots live on TPUs (a topology's devices included)
            platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
            attention = "kernel" if platform == "tpu" and cfg.head_dim % 128 == 0 else "xla"
        if attention not in paged.IMPLS:
            raise ValueError(f"attention must be one of {paged.IMPLS}, got {attention!r}.")
        self.page_size, self.kv_tokens, self.attention = int(page_size), int(kv_tokens), attention
        self.block_pages = int(block_pages)
        self.graphdef, self.cfg, self.settings = graphdef, cfg, settings
        self.slots = int(slots)
        self.admit_width = min(int(admit) or self.default_admit(self.slots), self.slots)
        # The static sampler of these settings lends its placement rules (cache and row shardings).
        self._layout = Sampler(graphdef, cfg, settings, mesh=mesh, rules=rules)
        self._placement = self._page_placement()
        self._prefill = jax.jit(self._prefill_fn)
        self._empty = jax.jit(self._empty_fn, static_argnums=(0, 1, 2, 3))
        self._admit = jax.jit(self._admit_fn, donate_argnums=(1, 2))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
        self._retire = jax.jit(self._retire_fn, donate_argnums=(0, 1))

    @staticmethod
    def default_admit(slots: int) -> int:
        """A, rows per admit call when not given: max(1, S // 16)."""
        return max(1, int(slots) // 16)

    @staticmethod
    def start_width(prefix_len: int) -> int:
        """F: the admit forward's width for prefixes of up to `prefix_len` tokens (the last prompt
        token, the prefix, padding to a multiple of 8)."""
        return -(-(1 + int(prefix_len)) // 8) * 8

    # ------------------------------------------------------------------ host side
    def run(self, params, prompts: Sequence[Sequence[int]], row_prompt, prefixes: Sequence[Sequence[int]],
            limits, *, key, token_offset=None, order=None) -> tuple[EngineOutput, EngineStats]:
        """Samples every row.

        prompts: G token lists (≥ 1 token each), each prefilled once; row_prompt: int [R], each
        row's prompt; prefixes: R token lists pre-filled after the prompt (may be empty); limits:
        int [R], new tokens per row (clipped to [0, N]; a row with 0 is not admitted); key: one
        PRNG key (row r samples with fold_in(key, r)) or per-row keys (typed [R] or uint32 [R, 2]);
        token_offset: int [R] (default 0, see hbpo_jax.sampler.SamplerInputs); order: row indices
        in admission order (default: descending limit; give the longest expected rows first).
        """
        st, n = self.settings, self.settings.max_new_tokens
        row_prompt = np.asarray(row_prompt, np.int32)
        rows = len(row_prompt)
        if rows == 0 or len(prefixes) != rows or np.shape(limits) != (rows,):
            raise ValueError(f"need ≥ 1 row, and one prefix and one limit per row ({rows} rows).")
        if not prompts or min(map(len, prompts)) < 1 or row_prompt.min() < 0 or row_prompt.max() >= len(prompts):
            raise ValueError("every prompt needs a token, and every row_prompt must index `prompts`.")
        limits = np.clip(np.asarray(limits, np.int64), 0, n).astype(np.int32)
        offset = np.zeros(rows, np.int32) if token_offset is None else np.asarray(token_offset, np.int32)
        keys = np.asarray(jax.random.key_data(keys_for_rows(key, rows)), np.uint32)  # [R, 2], host
        p_width = bucket_length(max(map(len, prompts)), st.prompt_bucket)
        f_width = self.start_width(max(map(len, prefixes)))
        if order is None:
            order = np.lexsort((np.arange(rows), -limits))
        queue = collections.deque(int(r) for r in order if limits[r] > 0)
        stats = EngineStats(slots=self.slots, rows=rows, prompt_prefills=len(prompts))

        num_pages = self.pool_pages(p_width, f_width)
        pool = pages.PagePool(num_pages, self._shards)
        # A row's pages hold its whole limit: the prompt but its last token, then the start
        # sequence, then limit - 1 fed-back tokens (the last token is never written).
        need_pages = [paged.pages_for(max(len(prompts[row_prompt[r]]) + len(prefixes[r]) + int(limits[r]) - 1, 1),
                                      self.page_size) for r in range(rows)]
        if queue and max(need_pages[r] for r in queue) > pool.per_shard:
            raise ValueError(f"kv_tokens (rollout.kv_tokens) = {num_pages * self.page_size} tokens hold "
                             f"{pool.per_shard} pages of {self.page_size} per device, but a row needs "
                             f"{max(need_pages[r] for r in queue)}.")
        stats.pool_pages = num_pages
        stats.kv_bytes, stats.dense_kv_bytes = self.kv_bytes(num_pages), self.kv_bytes_dense(p_width, f_width)

        store = self._prefill(params, *map(self._host_value, self._right_padded(prompts, p_width)))
        cache, state, out = self._empty(p_width, f_width, rows, num_pages)
        free = list(range(self.slots))
        held: dict[int, list[int]] = {}  # slot -> its pages
        while True:
            while free and queue:
                # The first fill admits every slot in one call; refills admit A rows at a time.
                width = self.slots if len(free) == self.slots else self.admit_width
                take, slot_ids = [], []
                while queue and len(take) < width:
                    slot = self._slot_with_pages(pool, [f for f in free if f not in slot_ids], need_pages[queue[0]])
                    if slot is None:
                        break  # the next row waits for pages (rows keep their order)
                    r = queue.popleft()
                    take.append(r)
                    slot_ids.append(slot)
                    held[slot] = pool.alloc(self._shard_of(slot), need_pages[r])
                if not take:
                    break
                stats.peak_pages = max(stats.peak_pages, pool.num_used)
                batch = self._admit_batch(take, slot_ids, width, rows, prompts, row_prompt, prefixes,
                                          limits, offset, keys, f_width, [held[s] for s in slot_ids], num_pages,
                                          cache.table.shape[1])
                free = [f for f in free if f not in slot_ids]
                cache, state = self._admit(params, cache, state, store, AdmitBatch(*map(self._host_value, batch)))
                stats.admit_calls += 1
                stats.slot_steps += width
            if len(free) == self.slots:
                break
            need = min(self.admit_width, len(queue)) if queue else self.slots + 1
            cache, state, steps = self._decode(params, cache, state, self._host_value(np.int32(need)))
            state, out, info = self._retire(state, out, steps)
            info = shd.to_host(info)  # one transfer per segment: [steps, ended slots...]
            stats.segments += 1
            stats.decode_steps += int(info[0])
            ended = np.flatnonzero(info[1:]).tolist()
            for slot in ended:
                pool.free(held.pop(slot))
            free = sorted(set(free) | set(ended))
        if pool.num_used or held:
            raise AssertionError(f"{pool.num_used} KV pages still held after the run (an engine bug).")
        stats.slot_steps += stats.decode_steps * self.slots
        tokens, logp, lengths, reason, prefix_logp = (shd.to_host(x)[:rows] for x in out)
        reason = np.where(limits == 0, STOP_LIMIT, reason).astype(np.int32)
        stats.tokens = int(lengths.sum())
        return EngineOutput(tokens, logp, lengths.astype(np.int32), reason, prefix_logp), stats

    # ------------------------------------------------------------------ pages
    def _page_placement(self):
        """PagedPlacement of the pool: pages over the mesh axes of the slots, kv heads over the
        `kv_heads` rule (None without a mesh)."""
        lay = self._layout
        if lay.mesh is None:
            return None
        def axes(spec):
            a = spec[0] if len(spec) else None
            return () if a is None else (a,) if isinstance(a, str) else tuple(a)
        batch = axes(lay.row_sharding((self.slots,)).spec)
        kv = axes(shd.logical_to_spec(("kv_heads",), lay.rules, lay.mesh, (self.cfg.num_kv_heads,)))
        return paged.PagedPlacement(lay.mesh, batch, kv)

    @property
    def _shards(self) -> int:
        return 1 if self._placement is None else self._placement.shards

    def _shard_of(self, slot: int) -> int:
        return slot // (self.slots // self._shards)

    def _slot_with_pages(self, pool: pages.PagePool, free: list[int], need: int):
        """A free slot whose device has `need` free pages (the device with most free pages
        first), or None."""
        best = None
        for slot in free:
            left = pool.num_free(self._shard_of(slot))
            if left >= need and (best is None or left > best[0]):
                best = (left, slot)
        return None if best is None else best[1]

    def max_len(self, p_width: int, f_width: int) -> int:
        """C: the most tokens a slot holds (prompt width, start width, N)."""
        return p_width + f_width + self.settings.max_new_tokens

    def pool_pages(self, p_width: int, f_width: int) -> int:
        """Pages in the pool: kv_tokens (default S x C) in pages, a multiple of the devices the
        slots are split over."""
        per_slot = paged.pages_for(self.max_len(p_width, f_width), self.page_size)
        pages = paged.pages_for(self.kv_tokens, self.page_size) if self.kv_tokens else self.slots * per_slot
        return paged.pages_for(pages, self._shards) * self._shards

    def _kv_bytes_per_token(self) -> int:
        c = self.cfg
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(self._layout.cache_dtype).itemsize

    def kv_bytes(self, pages: int) -> int:
        """Bytes of a pool of `pages` pages (keys and values, every layer)."""
        return pages * self.page_size * self._kv_bytes_per_token()

    def kv_bytes_dense(self, p_width: int, f_width: int) -> int:
        """Bytes of a contiguous S x C cache (what the engine held before pages)."""
        return self.slots * self.max_len(p_width, f_width) * self._kv_bytes_per_token()

    def _host_value(self, x):
        """A host array (equal on every process) as a replicated input of the mesh's programs."""
        return x if self._layout.mesh is None else shd.put(x, self._layout.replicated())

    def _right_padded(self, prompts, width: int):
        """The distinct prompts right-padded for the store: (ids, mask) int32 [G', width], G'
        rounded up to a multiple of 8 (fewer compiled shapes)."""
        g = bucket_length(len(prompts), 8)
        ids = np.full((g, width), self.settings.pad_id, np.int32)
        mask = np.zeros((g, width), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], mask[i, :len(p)] = p, 1
        mask[len(prompts):, 0] = 1  # padding prompts: one token, never read
        return ids, mask

    def _admit_batch(self, take, slot_ids, width, rows, prompts, row_prompt, prefixes, limits, offset, keys,
                     f_width, pages, num_pages, table_width) -> AdmitBatch:
        """The rows `take` entering slots `slot_ids`, padded to `width` (padding goes to slot S,
        which the scatter drops)."""
        def pad(x, fill):
            x = np.asarray(x)
            return np.concatenate([x, np.full((width - len(take),) + x.shape[1:], fill, x.dtype)])

        k = len(take)
        start = np.full((k, f_width), self.settings.pad_id, np.int32)
        start_len = np.zeros(k, np.int32)
        for i, r in enumerate(take):
            seq = [prompts[row_prompt[r]][-1], *prefixes[r]]
            start[i, :len(seq)], start_len[i] = seq, len(seq)
        plen = np.array([len(prompts[row_prompt[r]]) for r in take], np.int32)
        # Unused table entries point at the row's first page: every entry a page of its device.
        table = np.array([p + [p[0]] * (table_width - len(p)) for p in pages], np.int32)
        return AdmitBatch(slot=pad(np.asarray(slot_ids, np.int32), self.slots),
                          row=pad(np.asarray(take, np.int32), rows), prompt=pad(row_prompt[take], 0),
                          plen=pad(plen, 1), start=pad(start, self.settings.pad_id), start_len=pad(start_len, 1),
                          limit=pad(limits[take], 1), offset=pad(offset[take], 0), keys=pad(keys[take], 0),
                          pages=pad(table, num_pages))

    # ------------------------------------------------------------------ jitted
    def _new_cache(self, p_width: int, f_width: int, pages: int) -> paged.PagedKVCache:
        """Empty slots on a pool of `pages` pages (every table entry a page of its slot's device)."""
        per_slot = paged.pages_for(self.max_len(p_width, f_width), self.page_size)
        cache = paged.PagedKVCache.init(self.cfg, self.slots, per_slot, pages, self.page_size,
                                        self._layout.cache_dtype, impl=self.attention, block_pages=self.block_pages,
                                        placement=self._placement)
        first = (jnp.arange(self.slots) // (self.slots // self._shards)) * (pages // self._shards)
        return dataclasses.replace(cache, table=jnp.broadcast_to(first[:, None], cache.table.shape).astype(jnp.int32))

    def _state_shardings(self, rows: int):
        """(SlotState, output buffers) shardings: the slots split as the rows of the cache, the
        output [R + 1, ...] replicated (every process reads all of it)."""
        if self._layout.mesh is None:
            return None, None
        rows_of = lambda ndim: self._layout.row_sharding((self.slots,) + (1,) * (ndim - 1))  # noqa: E731
        state = SlotState(*(rows_of(n) for n in (1, 1, 1, 1, 1, 1, 2, 1, 2, 2, 2)))
        return state, (self._layout.replicated(),) * 5

    def lower(self, params, prompts: int, prompt_len: int, prefix_len: int, rows: int):
        """(store prefill, admit, decode segment) lowered for `prompts` distinct prompts of up to
        `prompt_len` tokens (bucketed), prefixes of up to `prefix_len` tokens and `rows` rows,
        without running anything. params: arrays or ShapeDtypeStructs carrying shardings.
        `.compile().memory_analysis()` / `.cost_analysis()` give XLA's plan (the TPU plan)."""
        p_width = bucket_length(prompt_len, self.settings.prompt_bucket)
        f_width = self.start_width(prefix_len)
        g, a = bucket_length(prompts, 8), self.admit_width

        def spec(tree, shardings):
            if shardings is None:
                return tree
            return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
        rep = self._layout.replicated()
        host = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
        prefill = self._prefill.lower(params, host((g, p_width)), host((g, p_width)))
        store = spec(jax.eval_shape(lambda: KVCache.init(self.cfg, g, p_width, self._layout.cache_dtype)),
                     self._layout.kv_shardings(g, p_width))
        cache, state, _ = jax.eval_shape(lambda: self._empty_fn(p_width, f_width, rows,
                                                                 self.pool_pages(p_width, f_width)))
        cache = spec(cache, cache.shardings())
        state = spec(state, self._state_shardings(rows)[0])
        batch = AdmitBatch(*(host((a,)) for _ in range(4)), host((a, f_width)), *(host((a,)) for _ in range(3)),
                           host((a, 2), jnp.uint32), host((a, cache.table.shape[1])))
        admit = self._admit.lower(params, cache, state, store, batch)
        decode = self._decode.lower(params, cache, state, host(()))
        return prefill, admit, decode

    def _prefill_fn(self, params, ids, mask):
        """ids, mask: int32 [G, Pw] right-padded -> the store: a KVCache [G, Pw]."""
        TRACE_COUNTS["prefill"] += 1
        model = nnx.merge(self.graphdef, params)
        cache = KVCache.init(self.cfg, ids.shape[0], ids.shape[1], self._layout.cache_dtype)
        _, cache = model.forward(ids, None, mask, cache, return_hidden=True, empty_cache=True)  # splash on TPU
        return _constrain(cache, self._layout.kv_shardings(*ids.shape))

    def _empty_fn(self, p_width: int, f_width: int, rows: int, pages: int):
        """Empty slots (a PagedKVCache of `pages` pages, SlotState) and the output buffers (row
        `rows` a sink)."""
        TRACE_COUNTS["empty"] += 1
        s, n = self.slots, self.settings.max_new_tokens
        cache = self._new_cache(p_width, f_width, pages)
        zeros = jnp.zeros((s,), jnp.int32)
        state = SlotState(tok=zeros, gen=zeros, done=jnp.ones((s,), bool), reason=zeros, limit=zeros,
                          offset=zeros, keys=jnp.zeros((s, 2), jnp.uint32), row=jnp.full((s,), rows, jnp.int32),
                          tokens=jnp.full((s, n), self.settings.pad_id, jnp.int32),
                          logprobs=jnp.zeros((s, n), jnp.float32), prefix_logp=jnp.zeros((s, f_width - 1), jnp.float32))
        out = (jnp.full((rows + 1, n), self.settings.pad_id, jnp.int32), jnp.zeros((rows + 1, n), jnp.float32),
               jnp.zeros((rows + 1,), jnp.int32), jnp.zeros((rows + 1,), jnp.int32),
               jnp.zeros((rows + 1, f_width - 1), jnp.float32))
        state_sh, out_sh = self._state_shardings(rows)
        cache = _constrain(cache, cache.shardings())
        return cache, _constrain(state, state_sh), _constrain(out, out_sh)

    def _admit_fn(self, params, cache: paged.PagedKVCache, state: SlotState, store: KVCache, b: AdmitBatch):
        """Copies each new row's prompt KV from the store into a contiguous [A, Pw + F] cache, runs
        [last prompt token, prefix] through the model (prefix log-probs; the first token's
        logits), draws the first token, writes the rows' KV into their pages and puts the rows
        into their slots."""
        TRACE_COUNTS["admit"] += 1
        st, n = self.settings, self.settings.max_new_tokens
        model = nnx.merge(self.graphdef, params)
        a, f = b.start.shape
        p_width = store.max_len
        length = p_width + f  # the start sequence ends before plen - 1 + F ≤ Pw + F

        def from_store(kv):  # [L, G, Pw, K, D] -> the new rows' [L, A, C, K, D]
            return jnp.pad(kv[:, b.prompt], ((0, 0), (0, 0), (0, length - p_width), (0, 0), (0, 0)))
        index = b.plen - 1  # the start sequence re-writes the last prompt token's slot
        rows_cache = KVCache(keys=from_store(store.keys), values=from_store(store.values),
                             valid=jnp.arange(length)[None, :] < index[:, None], index=index)
        steps = jnp.arange(f)
        start_mask = (steps < b.start_len[:, None]).astype(jnp.int32)
        hidden, rows_cache = model.forward(b.start, index[:, None] + steps, start_mask, rows_cache, return_hidden=True)
        logits = model.logits(hidden)  # [A, F, V]
        prefix_logp = token_logprobs(logits[:, :-1], b.start[:, 1:], st.temperature)
        prefix_logp = jnp.where(steps[None, :-1] < b.start_len[:, None] - 1, prefix_logp, 0.0)
        first = jnp.take_along_axis(logits, (b.start_len - 1)[:, None, None], axis=1)[:, 0]
        keys = jax.random.wrap_key_data(b.keys)
        tok, lp = sample_logits(first, token_keys(keys, b.offset), st.temperature, st.top_p, st.top_k)
        hit_eos = jnp.isin(tok, np.asarray(st.eos_ids or (-1,), np.int32))
        reason = jnp.where(hit_eos, STOP_EOS, jnp.where(b.limit <= 1, STOP_LIMIT, 0))

        # The rows' filled positions [0, plen - 1 + start_len) into their pages (one scatter for
        # every layer; padding rows and positions past the fill point past the pool: dropped).
        filled = index + b.start_len
        pos = jnp.arange(length)
        page = jnp.take_along_axis(b.pages, jnp.broadcast_to(pos // cache.page_size, (a, length)), axis=1)
        page = jnp.where(pos[None, :] < filled[:, None], page, cache.num_pages)

        def to_pages(pool, layers):  # pool [K, L, P, ps, D]; layers [L, A, W, K, D]
            new = layers.transpose(3, 0, 1, 2, 4).astype(pool.dtype)  # [K, L, A, W, D]
            return pool.at[:, :, page, pos % cache.page_size].set(new, mode="drop")
        put = lambda dst, src: dst.at[b.slot].set(src.astype(dst.dtype), mode="drop")  # noqa: E731
        cache = dataclasses.replace(cache, keys=to_pages(cache.keys, rows_cache.keys),
                                    values=to_pages(cache.values, rows_cache.values),
                                    table=put(cache.table, b.pages), lengths=put(cache.lengths, filled))
        new = SlotState(tok=tok, gen=jnp.ones((a,), jnp.int32), done=reason > 0, reason=reason, limit=b.limit,
                        offset=b.offset, keys=b.keys, row=b.row,
                        tokens=jnp.full((a, n), st.pad_id, jnp.int32).at[:, 0].set(tok),
                        logprobs=jnp.zeros((a, n), jnp.float32).at[:, 0].set(lp), prefix_logp=prefix_logp)
        state = SlotState(*map(put, state, new))
        return _constrain(cache, cache.shardings()), _constrain(state, self._state_shardings(0)[0])

    def _decode_fn(self, params, cache: paged.PagedKVCache, state: SlotState, need):
        """Steps every running slot until `need` rows have ended in this call, none runs, or N
        steps. Returns (cache, state, steps taken)."""
        TRACE_COUNTS["decode"] += 1
        st, n = self.settings, self.settings.max_new_tokens
        model = nnx.merge(self.graphdef, params)
        s = self.slots
        shardings = cache.shardings()
        eos = np.asarray(st.eos_ids or (-1,), np.int32)
        ended_before = jnp.sum(state.done)

        def cond(carry):
            step, _, state = carry
            return (step < n) & ~jnp.all(state.done) & (jnp.sum(state.done) - ended_before < need)

        def body(carry):
            step, cache, state = carry
            running = ~state.done
            cache = dataclasses.replace(cache, active=running)  # ended slots write nothing
            hidden, cache = model.forward(state.tok[:, None], cache.lengths[:, None], None, cache, return_hidden=True)
            cache = _constrain(cache, shardings)
            keys = jax.random.wrap_key_data(state.keys)
            tok, lp = sample_logits(model.logits(hidden[:, 0]), token_keys(keys, state.offset + state.gen),
                                    st.temperature, st.top_p, st.top_k)
            col = jnp.where(running, state.gen, n)  # column n: dropped
            hit_eos = running & jnp.isin(tok, eos)
            gen = state.gen + running
            hit_limit = running & ~hit_eos & (gen >= state.limit)
            state = state._replace(
                tok=jnp.where(running, tok, state.tok), gen=gen, done=state.done | hit_eos | hit_limit,
                reason=jnp.where(hit_eos, STOP_EOS, jnp.where(hit_limit, STOP_LIMIT, state.reason)),
                tokens=state.tokens.at[jnp.arange(s), col].set(tok, mode="drop"),
                logprobs=state.logprobs.at[jnp.arange(s), col].set(lp, mode="drop"))
            return step + 1, cache, state

        steps, cache, state = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state))
        return cache, _constrain(state, self._state_shardings(0)[0]), steps

    def _retire_fn(self, state: SlotState, out, steps):
        """Writes every ended row's output to its place (out: tokens [R + 1, N], logprobs, lengths,
        stop_reason, prefix_logprobs; row R is a sink) and marks its slot empty. Returns (state,
        out, info int32 [1 + S]: the decode steps taken, then 1 for each slot freed here)."""
        TRACE_COUNTS["retire"] += 1
        sink = out[0].shape[0] - 1
        ended = state.done & (state.row < sink)
        target = jnp.where(state.done, state.row, sink)
        values = (state.tokens, state.logprobs, state.gen, state.reason, state.prefix_logp)
        out = tuple(o.at[target].set(v) for o, v in zip(out, values))
        info = jnp.concatenate([steps[None], ended.astype(jnp.int32)])
        return state._replace(row=jnp.where(state.done, sink, state.row)), out, info


_ENGINES: dict = {}


def get_engine(graphdef, state, settings: SamplerSettings, *, slots: int, admit: int = 0, mesh=None,
               rules=None, kv_tokens: int = 0, page_size: int = 16) -> RefillEngine:
    """The process's one RefillEngine per (graphdef, settings, slots, admit, mesh, rules,
    kv_tokens, page_size), made on first use (the model config read from `state`): callers share
    its compiled functions."""
    rules = shd.normalize_rules(rules) if mesh is not None else ()
    key = (graphdef, settings, int(slots), int(admit), mesh, rules, int(kv_tokens), int(page_size))
    if key not in _ENGINES:
        _ENGINES[key] = RefillEngine(graphdef, graphdef_cfg(graphdef, state), settings, slots=slots, admit=admit,
                                     mesh=mesh, rules=rules, kv_tokens=kv_tokens, page_size=page_size)
    return _ENGINES[key]


def _constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


__all__ = ["EngineOutput", "EngineStats", "RefillEngine", "get_engine", "token_logprobs"]

"""The refilling rollout engine: a fixed number of decode slots, fed from a queue of rows.

The static sampler (hbpo_jax.rollout.static) decodes a chunk of rows until its longest row ends. HBPO's
rows differ in length on purpose (a prompt's 512-budget rows end long before its 2,560-budget
ones), so most of a chunk's slots idle for most of its steps. Here a row that ends frees its slot
for the next row in the queue:

  prompts  ->  each DISTINCT prompt gets a home shard (slots.StoreLayout; a prompt in parts when
               the prompts do not divide over the shards, each part its own home) and is
               prefilled there (right-padded) into that shard's part of a prompt store [G, Pw]
  admit    ->  a row takes a free slot and KV pages of its prompt's home shard (each shard has
               its own queue; a row waits while too few pages are free): its whole limit when
               the pool holds every slot's whole limit, else pages on demand
               (hbpo_jax.rollout.pages); its prompt's KV is copied from the store on the same
               chip (the gather and the page writes run per shard), then one short forward
               over [last prompt token, pre-filled prefix] scores the prefix tokens (their
               log-probs: no recompute pass later), draws the row's first token and writes the
               KV into the row's pages
  decode   ->  a jitted loop steps every slot; it returns to the host when `need` rows have ended
               (so their slots can be refilled), when no slot is running, or before a running
               slot would write past its pages (its length reached its capacity `SlotState.cap`)
  retire   ->  an ended row's tokens are written to its place in the output, on device; its
               pages go back to the pool (host)
  grow     ->  pages on demand: the host's PageBook tops running rows up and preempts when a
               device runs dry (the row goes back to the queue's front, its tokens are drawn
               again: the same tokens); one small program puts the new page table on device

Shapes: S = slots, A = rows admitted per call, R = rows, G = distinct prompts, Pw = prompt width
(bucketed), F = start width (1 + the longest prefix, a multiple of 8), N = max_new_tokens,
C = Pw + F + N the most tokens a decode slot can hold, V = vocabulary. A row's cache holds its
prompt at positions [0, plen), its prefix after it, then its generated tokens, in pages of
`page_size` tokens (models/paged.py: the pool [K, L, pages, page_size, D], a page table per slot,
a length per slot); decode attention reads each slot's filled pages only.

Randomness is the static sampler's (hbpo_jax.rollout.next_token): a row's i-th generated token draws with
fold_in(row key, token_offset + i). A row's tokens therefore do not depend on its slot, on when it
was admitted (or re-admitted), or on its neighbours: with the same keys, this engine and the static
sampler draw the same tokens (up to float rounding of the logits, which differs between layouts).

Rows are admitted longest-expected first (`order`, e.g. by budget), so the rows that end last are
the short ones and the drain is short. `EngineStats` counts the slot-steps paid for and the tokens
kept (a preempted row's are paid for, not kept): utilization = tokens / slot-steps. The choices
and their measurements: docs/rollout.md.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbpo_jax import sharding as shd
from hbpo_jax.models import paged
from hbpo_jax.models.qwen2 import KVCache
from hbpo_jax.rollout import pages
from hbpo_jax.rollout.next_token import sample_logits, token_keys, token_logprobs
from hbpo_jax.rollout.slots import (
    AdmitBatch,
    EngineOutput,
    EngineStats,
    Rows,
    SlotState,
    StoreLayout,
    admit_batch,
    right_padded,
)
from hbpo_jax.rollout.static import STOP_EOS, STOP_LIMIT, Sampler, SamplerSettings, bucket_length, graphdef_cfg

TRACE_COUNTS: collections.Counter = collections.Counter()
ENDED, HUNGRY = 1, 2  # a slot's code after a decode segment: its row ended / its pages are full


class RefillEngine:
    """Rollouts through S refilling decode slots (see the module docstring).

    graphdef, cfg: the model structure and its ModelConfig; settings: the static sampler's settings
    (max_new_tokens N, eos, pad, temperature, top-p/k, prompt bucket, cache dtype); slots: S, the
    rows decoding at once; admit: A, rows per refill call (default max(1, S // 16): an ended row's
    slot waits for about A / 2 more to end before it is refilled, so about A / (2 S) of the
    slot-steps idle; the first fill admits all S slots in one call).
    With a mesh the slots are split over the `batch` rule (S must divide by its size) and the
    cache's kv heads over `kv_heads`, as in the static sampler; the page pool is split like the
    slots (each device holds its slots' pages).

    page_size: tokens per KV page; kv_tokens: the pool's size in tokens, all devices together
    (0: S x C). A pool that holds every slot's whole limit gives each row its whole limit at
    admission (nothing waits or is preempted); a smaller one, or any `grow` > 0, gives pages on
    demand: `grow` tokens ahead of a row's length (0: N / 16, at least a page), with preemption.
    attention: "xla" (the blocked fallback) or "kernel" (the Pallas TPU paged-attention kernel;
    default on TPU when head_dim is a multiple of 128); block_pages: pages per attention block.

        eng = RefillEngine(graphdef, cfg, SamplerSettings(max_new_tokens=256, eos_ids=(2,)), slots=64)
        out, stats = eng.run(params, prompts, row_prompt, prefixes, limits, key=key)
    """

    def __init__(self, graphdef, cfg, settings: SamplerSettings, *, slots: int, admit: int = 0,
                 mesh=None, rules=None, page_size: int = 16, kv_tokens: int = 0, grow: int = 0,
                 attention: str | None = None, block_pages: int = 8):
        if slots < 1 or admit < 0:
            raise ValueError(f"need slots ≥ 1 and admit ≥ 0, got slots={slots}, admit={admit}.")
        if page_size < 1 or kv_tokens < 0 or grow < 0 or block_pages < 1:
            raise ValueError(f"need page_size ≥ 1, kv_tokens ≥ 0, grow ≥ 0 and block_pages ≥ 1, got page_size="
                             f"{page_size}, kv_tokens={kv_tokens}, grow={grow}, block_pages={block_pages}.")
        if attention is None:  # the kernel where the slots live on TPUs (a topology's devices included)
            platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
            attention = "kernel" if platform == "tpu" and cfg.head_dim % 128 == 0 else "xla"
        if attention not in paged.IMPLS:
            raise ValueError(f"attention must be one of {paged.IMPLS}, got {attention!r}.")
        self.page_size, self.kv_tokens, self.grow, self.attention = int(page_size), int(kv_tokens), int(grow), attention
        self.graphdef, self.cfg, self.settings = graphdef, cfg, settings
        self.slots, self.block_pages = int(slots), int(block_pages)
        # The static sampler of these settings lends its placement rules (cache and row shardings).
        self._layout = Sampler(graphdef, cfg, settings, mesh=mesh, rules=rules)
        self._placement = self._page_placement()
        self._shards = 1 if self._placement is None else self._placement.shards
        # An admit call takes a block of A / shards rows per shard (a multiple of the shards).
        width = min(int(admit) or self.default_admit(self.slots), self.slots)
        self.admit_width = -(-width // self._shards) * self._shards
        self._prefill = jax.jit(self._prefill_fn)
        self._empty = jax.jit(self._empty_fn, static_argnums=(0, 1, 2, 3))
        self._admit = jax.jit(self._admit_fn, donate_argnums=(1, 2))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
        self._retire = jax.jit(self._retire_fn, donate_argnums=(0, 1), static_argnums=(4,))
        self._grow = jax.jit(self._grow_fn, donate_argnums=(0, 1))

    @property
    def shards(self) -> int:
        """The devices the slots (and the pool's pages, and the prompt store) are split over."""
        return self._shards

    @staticmethod
    def default_admit(slots: int) -> int:
        """A, rows per admit call when not given: max(1, S // 16)."""
        return max(1, int(slots) // 16)

    @staticmethod
    def start_width(prefix_len: int) -> int:
        """F: the admit forward's width for prefixes of up to `prefix_len` tokens (the last prompt
        token, the prefix, padding to a multiple of 8)."""
        return -(-(1 + int(prefix_len)) // 8) * 8

    def max_len(self, p_width: int, f_width: int) -> int:
        """C: the most tokens a slot holds (prompt width, start width, N)."""
        return p_width + f_width + self.settings.max_new_tokens

    def pool_pages(self, p_width: int, f_width: int) -> int:
        """Pages in the pool: kv_tokens (default S x C) in pages, a multiple of the slots' devices."""
        return pages.pool_pages(self.kv_tokens, self.slots, self.max_len(p_width, f_width), self.page_size,
                                self._shards)

    # ------------------------------------------------------------------ host side
    def run(self, params, prompts: Sequence[Sequence[int]], row_prompt, prefixes: Sequence[Sequence[int]],
            limits, *, key, token_offset=None, order=None, on_retire=None,
            retire_every: int = 0) -> tuple[EngineOutput, EngineStats]:
        """Samples every row.

        prompts: G token lists (≥ 1 token each), each prefilled once; row_prompt: int [R], each
        row's prompt; prefixes: R token lists pre-filled after the prompt (may be empty); limits:
        int [R], new tokens per row (clipped to [0, N]; a row with 0 is not admitted); key: one
        PRNG key (row r samples with fold_in(key, r)) or per-row keys (typed [R] or uint32 [R, 2]);
        token_offset: int [R] (default 0, see hbpo_jax.rollout.static.SamplerInputs); order: row indices
        in admission order (default: descending limit; give the longest expected rows first).
        on_retire: called on the host as rows end, while decoding goes on (e.g. to grade them):
        on_retire(rows int [k], tokens int32 [k, N], lengths int32 [k], stop_reason int32 [k]),
        each row once, rows with limit 0 never (they are not admitted); retire_every: with
        on_retire, the decode loop also returns to the host once this many rows have ended since
        its last return (0: R / 16), so finished rows reach the callback while the rest decode.
        """
        st, ps = self.settings, self.page_size
        host_rows = Rows.make(prompts, row_prompt, prefixes, limits, key, token_offset, st.max_new_tokens,
                              self.start_width)
        rows, limits, f_width = len(host_rows.limits), host_rows.limits, host_rows.f_width
        p_width = bucket_length(max(map(len, prompts)), st.prompt_bucket)
        if order is None:
            order = np.lexsort((np.arange(rows), -limits))
        store = StoreLayout.make(host_rows, self._shards)
        home = store.home  # each row's shard: where its prompt's KV is
        queues = [collections.deque() for _ in range(self._shards)]
        for r in order:
            if limits[r] > 0:
                queues[home[r]].append(int(r))
        num_pages = self.pool_pages(p_width, f_width)
        per_shard = num_pages // self._shards
        # A row fills its prompt but the last token, then the start sequence (that token and the
        # prefix), then writes limit - 1 fed-back tokens (its last token is never written).
        filled = host_rows.filled()
        need = [paged.pages_for(max(filled[r] + int(limits[r]) - 1, 1), ps) for r in range(rows)]
        most = max((need[r] for q in queues for r in q), default=1)
        if most > per_shard:
            raise ValueError(f"kv_tokens (rollout.kv_tokens) = {num_pages * ps} tokens hold {per_shard} pages of "
                             f"{ps} per device, but a row needs {most}.")
        room = pages.room(self.grow, self.settings.max_new_tokens, ps, per_shard, self.slots // self._shards, most)
        first = need if room is None else [min(need[r], paged.pages_for(filled[r] + room, ps)) for r in range(rows)]
        # A prompt's pages filled by its tokens [0, plen - 1) are shared by its rows (pages.py).
        shared = [min((len(prompts[host_rows.row_prompt[r]]) - 1) // ps, first[r] - 1) for r in range(rows)]
        per_token = pages.kv_bytes_per_token(self.cfg, self._layout.cache_dtype)
        stats = EngineStats(slots=self.slots, rows=rows, prompt_prefills=len(prompts), pool_pages=num_pages,
                            kv_bytes=num_pages * ps * per_token,
                            dense_kv_bytes=self.slots * self.max_len(p_width, f_width) * per_token)

        store_kv = self._prefill(params, *map(self._host_value, right_padded(prompts, p_width, st.pad_id, store)))
        cache, state, out = self._empty(p_width, f_width, rows, num_pages)
        book = pages.PageBook(num_pages, self.slots, self._shards, ps, cache.table.shape[1])
        free, preempted = list(range(self.slots)), []
        every = max(1, int(retire_every) or rows // 16) if on_retire is not None else 0
        while True:
            while not preempted:  # no admission right after a preemption
                # The first fill admits every slot in one call; refills admit A rows at a time, in
                # a block of A / shards per shard, each taking rows of its own queue into its slots.
                width = self.slots if len(free) == self.slots else self.admit_width
                blocks = [self._take(queues[d], [f for f in free if book.shard_of(f) == d], width // self._shards,
                                     book, host_rows, first, need, shared) for d in range(self._shards)]
                if not any(take for take, _ in blocks):
                    break  # no free slot, no queued row or too few free pages where rows wait
                parts = [admit_batch(host_rows, take, slot_ids, width // self._shards, book, st.pad_id, store.row)
                         for take, slot_ids in blocks]
                batch = AdmitBatch(*(np.concatenate(field) for field in zip(*parts)))
                free = [f for f in free if f not in {s for _, slot_ids in blocks for s in slot_ids}]
                cache, state = self._admit(params, cache, state, store_kv, AdmitBatch(*map(self._host_value, batch)))
                stats.admit_calls += 1
                stats.slot_steps += width
            if len(free) == self.slots:
                break
            queued = sum(map(len, queues))
            ends = min(self.admit_width, queued) if queued else self.slots + 1
            if every:  # a consumer waits for finished rows: return to it every `every` ends
                ends = min(ends, every)
            cache, state, steps = self._decode(params, cache, state, self._host_value(np.int32(ends)))
            state, out, info = self._retire(state, out, steps, cache.lengths, bool(every))
            # One transfer per segment: [steps, codes, gen, lengths, reasons (each [S]), tokens [S, N] if
            # a consumer takes the finished rows].
            info = shd.to_host(info)
            code, gen, lengths, reason = info[1:1 + 4 * self.slots].reshape(4, self.slots)
            stats.segments += 1
            stats.host_round_trips += 1
            stats.decode_steps += int(info[0])
            ended = np.flatnonzero(code == ENDED).tolist()
            done_rows = [book.release(slot) for slot in ended]
            if every and ended:
                toks = info[1 + 4 * self.slots:].reshape(self.slots, -1)[ended]
                on_retire(np.asarray(done_rows), toks, gen[ended].astype(np.int32), reason[ended].astype(np.int32))
            preempted = []
            if room is not None:
                preempted, granted = book.grow(lengths, np.flatnonzero(code == HUNGRY), room)
                for d, queue in enumerate(queues):  # the oldest preempted ends up first
                    queue.extendleft(r for _, r in preempted if home[r] == d)
                stats.preemptions += len(preempted)
                stats.recomputed += int(sum(gen[slot] for slot, _ in preempted))
                stats.page_grants += granted
                if preempted or granted:
                    drop = np.isin(np.arange(self.slots), [slot for slot, _ in preempted])
                    host = map(self._host_value, (book.table(), book.capacity(), drop, np.int32(rows)))
                    cache, state = self._grow(cache, state, *host)
                    stats.grow_calls += 1
            free = sorted(set(free) | set(ended) | {slot for slot, _ in preempted})
        if book.used:
            raise AssertionError(f"{book.used} KV pages still held after the run (an engine bug).")
        stats.peak_pages, stats.shared_prompt_pages = book.peak, book.shared
        stats.slot_steps += stats.decode_steps * self.slots
        tokens, logp, lengths, reason, prefix_logp = (shd.to_host(x)[:rows] for x in out)
        stats.host_round_trips += 1  # the outputs (one read after the loop)
        reason = np.where(limits == 0, STOP_LIMIT, reason).astype(np.int32)
        stats.tokens = int(lengths.sum())
        return EngineOutput(tokens, logp, lengths.astype(np.int32), reason, prefix_logp), stats

    @staticmethod
    def _take(queue, free, width: int, book, host_rows, first, need, shared) -> tuple[list[int], list[int]]:
        """Up to `width` rows from the front of one shard's queue into its free slots, each with
        its first pages booked (rows keep their order: the first that finds no pages waits, and
        the rest behind it). Returns (rows, slots)."""
        take, slot_ids = [], []
        while queue and len(take) < width:
            r = queue[0]
            slot = book.pick_slot([f for f in free if f not in slot_ids], first[r], host_rows.row_prompt[r], shared[r])
            if slot is None:
                break
            take.append(queue.popleft())
            slot_ids.append(slot)
            book.admit(slot, r, first[r], need[r], host_rows.row_prompt[r], shared[r])
        return take, slot_ids

    def _page_placement(self):
        """The pool's PagedPlacement: pages split as the slots, kv heads by `kv_heads` (None: no mesh)."""
        lay = self._layout
        if lay.mesh is None:
            return None
        kv = shd.logical_to_spec(("kv_heads",), lay.rules, lay.mesh, (self.cfg.num_kv_heads,))
        return paged.PagedPlacement.of_specs(lay.mesh, lay.row_sharding((self.slots,)).spec, kv)

    def _host_value(self, x):
        """A host array (equal on every process) as a replicated input of the mesh's programs."""
        return x if self._layout.mesh is None else shd.put(x, self._layout.replicated())

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
        state = SlotState(*(rows_of(n) for n in (1, 1, 1, 1, 1, 1, 2, 1, 2, 2, 2, 1)))
        return state, (self._layout.replicated(),) * 5

    def lower(self, params, prompts: int, prompt_len: int, prefix_len: int, rows: int):
        """(store prefill, admit, decode segment) lowered for `prompts` distinct prompts of up to
        `prompt_len` tokens (bucketed), prefixes of up to `prefix_len` tokens and `rows` rows,
        without running anything. params: arrays or ShapeDtypeStructs carrying shardings.
        `.compile().memory_analysis()` / `.cost_analysis()` give XLA's plan (the TPU plan)."""
        p_width = bucket_length(prompt_len, self.settings.prompt_bucket)
        f_width = self.start_width(prefix_len)
        g, a = StoreLayout.size_for(prompts, self._shards), self.admit_width

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
                           host((a, 2), jnp.uint32), host((a, cache.table.shape[1])), host((a,)), host((a,)))
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
                          logprobs=jnp.zeros((s, n), jnp.float32), prefix_logp=jnp.zeros((s, f_width - 1), jnp.float32),
                          cap=zeros)
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

        index = b.plen - 1  # the start sequence re-writes the last prompt token's slot
        kv_spec = self._spec(None, "batch", None, "kv", None)

        def from_store(shard, keys, values, prompt):  # the store's [L, G, Pw, K, D] -> rows' [L, A, C, K, D]
            local = jnp.clip(prompt - shard * keys.shape[1], 0, keys.shape[1] - 1)  # a row's prompt is on its shard
            take = lambda kv: jnp.pad(kv[:, local], ((0, 0), (0, 0), (0, length - p_width), (0, 0), (0, 0)))  # noqa: E731
            return take(keys), take(values)
        prompt_k, prompt_v = self._per_shard(from_store, (kv_spec, kv_spec, self._spec("batch")), (kv_spec, kv_spec))(
            store.keys, store.values, b.prompt)
        rows_cache = KVCache(keys=prompt_k, values=prompt_v, valid=jnp.arange(length)[None, :] < index[:, None],
                             index=index)
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
        # Positions below b.shared are in a prompt's pages another row wrote: not written again.
        filled = index + b.start_len

        def to_pages(shard, pool_k, pool_v, new_k, new_v, table, shared, filled):  # pools [K, L, P, ps, D]
            per, pos = pool_k.shape[2], jnp.arange(length)
            page = jnp.take_along_axis(table, jnp.broadcast_to(pos // cache.page_size, (table.shape[0], length)), 1)
            keep = (pos[None, :] < filled[:, None]) & (pos[None, :] >= shared[:, None])
            at = (jnp.where(keep, page - shard * per, per), pos % cache.page_size)  # a row's pages are its shard's
            write = lambda pool, new: pool.at[:, :, at[0], at[1]].set(  # noqa: E731  new [L, A, W, K, D]
                new.transpose(3, 0, 1, 2, 4).astype(pool.dtype), mode="drop")
            return write(pool_k, new_k), write(pool_v, new_v)
        pool_spec, rows_spec = self._spec("kv", None, "batch", None, None), self._spec("batch")
        pool_k, pool_v = self._per_shard(
            to_pages, (pool_spec, pool_spec, kv_spec, kv_spec, self._spec("batch", None), rows_spec, rows_spec),
            (pool_spec, pool_spec))(cache.keys, cache.values, rows_cache.keys, rows_cache.values, b.pages, b.shared,
                                    filled)
        new = SlotState(tok=tok, gen=jnp.ones((a,), jnp.int32), done=reason > 0, reason=reason, limit=b.limit,
                        offset=b.offset, keys=b.keys, row=b.row,
                        tokens=jnp.full((a, n), st.pad_id, jnp.int32).at[:, 0].set(tok),
                        logprobs=jnp.zeros((a, n), jnp.float32).at[:, 0].set(lp), prefix_logp=prefix_logp, cap=b.cap)
        dst, src = (*state, cache.table, cache.lengths), (*new, b.pages, filled)

        def into_slots(shard, slot, dst, src):  # each row's slot is on its shard: a local scatter
            local = slot - shard * (self.slots // self._shards)  # padding (slot S): past the shard, dropped
            return tuple(d.at[local].set(x.astype(d.dtype), mode="drop") for d, x in zip(dst, src))
        specs = tuple(self._spec("batch", *(None,) * (x.ndim - 1)) for x in dst)
        placed = self._per_shard(into_slots, (rows_spec, specs, specs), specs)(b.slot, dst, src)
        state = SlotState(*placed[:-2])
        cache = dataclasses.replace(cache, keys=pool_k, values=pool_v, table=placed[-2], lengths=placed[-1])
        return _constrain(cache, cache.shardings()), _constrain(state, self._state_shardings(0)[0])

    def _spec(self, *dims):
        """A PartitionSpec over the slots' ("batch") and kv heads' ("kv") mesh axes (None: no mesh)."""
        return None if self._placement is None else self._placement.spec(*dims)

    def _per_shard(self, fn, in_specs, out_specs):
        """fn(shard, *arrays) run on each shard's blocks of the arrays (a shard_map over the slots'
        axes; `shard` is the shard's index), or once on the whole arrays with shard 0 without a
        mesh. The admit's arrays are laid out so that each shard's block holds its own rows."""
        pl = self._placement
        if pl is None:
            return functools.partial(fn, 0)

        def body(*arrays):
            return fn(jax.lax.axis_index(pl.batch_axes) if pl.batch_axes else 0, *arrays)
        return jax.shard_map(body, mesh=pl.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def _decode_fn(self, params, cache: paged.PagedKVCache, state: SlotState, need):
        """Steps every running slot until `need` rows have ended in this call, none runs, a running
        slot's pages are full (its length, where its next token goes, reached its cap), or N steps.
        Returns (cache, state, steps taken)."""
        TRACE_COUNTS["decode"] += 1
        st, n = self.settings, self.settings.max_new_tokens
        model = nnx.merge(self.graphdef, params)
        s = self.slots
        shardings = cache.shardings()
        eos = np.asarray(st.eos_ids or (-1,), np.int32)
        ended_before = jnp.sum(state.done)

        def cond(carry):
            step, cache, state = carry
            full = jnp.any(~state.done & (cache.lengths >= state.cap))
            return (step < n) & ~jnp.all(state.done) & (jnp.sum(state.done) - ended_before < need) & ~full

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

    def _retire_fn(self, state: SlotState, out, steps, lengths, with_tokens: bool = False):
        """Writes every ended row's output to its place (out: tokens [R + 1, N], logprobs, lengths,
        stop_reason, prefix_logprobs; row R is a sink) and marks its slot empty. lengths: int32 [S],
        the cache's. Returns (state, out, info int32 [1 + 4 S (+ S N with_tokens)]: the decode
        steps taken, each slot's code (ENDED: freed here, HUNGRY: running with full pages, else
        0), its gen, its length, its stop reason (and its tokens [S, N], flattened))."""
        TRACE_COUNTS["retire"] += 1
        sink = out[0].shape[0] - 1
        ended = state.done & (state.row < sink)
        target = jnp.where(state.done, state.row, sink)
        values = (state.tokens, state.logprobs, state.gen, state.reason, state.prefix_logp)
        out = tuple(o.at[target].set(v) for o, v in zip(out, values))
        code = jnp.where(ended, ENDED, jnp.where(~state.done & (lengths >= state.cap), HUNGRY, 0))
        parts = [steps[None], code.astype(jnp.int32), state.gen, lengths, state.reason]
        info = jnp.concatenate(parts + ([state.tokens.reshape(-1)] if with_tokens else []))
        return state._replace(row=jnp.where(state.done, sink, state.row)), out, info

    def _grow_fn(self, cache: paged.PagedKVCache, state: SlotState, table, cap, drop, sink):
        """The book's page table int32 [S, W] and capacities int32 [S] into the slots; the slots in
        drop (bool [S], preempted) stop and leave their row without output (row -> sink, int32 [])."""
        TRACE_COUNTS["grow"] += 1
        cache = dataclasses.replace(cache, table=table)
        state = state._replace(cap=cap, done=state.done | drop, row=jnp.where(drop, sink, state.row))
        return _constrain(cache, cache.shardings()), _constrain(state, self._state_shardings(0)[0])


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


__all__ = ["EngineOutput", "EngineStats", "RefillEngine", "Rows", "StoreLayout", "get_engine", "token_logprobs"]

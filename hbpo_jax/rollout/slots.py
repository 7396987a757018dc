"""What the refilling engine (hbpo_jax.rollout.refill) passes around: its decode slots' state, a batch of
rows entering slots and how the host packs one, and what a run returns (its output, its stats).

Shapes as in hbpo_jax.rollout.refill: S = slots, A = rows admitted per call, R = rows, N = max_new_tokens,
F = start width, W = page-table entries per slot.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from hbpo_jax.rollout.next_token import keys_for_rows
from hbpo_jax.rollout.pages import PageBook


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
    call (each admit draws up to A first tokens); tokens: generated tokens kept; decode_steps,
    segments, admit_calls, prompt_prefills (distinct prompts prefilled), rows; kv_bytes: the page
    pool's bytes (keys and values, all layers), dense_kv_bytes: what a contiguous S x C cache would
    take; peak_pages of pool_pages held at once. Pages on demand: page_grants (pages granted to
    running rows), grow_calls (page-table updates), preemptions (rows stopped and requeued),
    recomputed (tokens they had drawn, discarded: paid for in slot_steps, not in tokens).
    host_round_trips: the times the host waited for the device (one per decode segment, one for
    the outputs); shared_prompt_pages: page references that pointed at a prompt's pages already
    written for another row (pages not allocated, KV not copied)."""

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
    page_grants: int = 0
    grow_calls: int = 0
    preemptions: int = 0
    recomputed: int = 0
    host_round_trips: int = 0
    shared_prompt_pages: int = 0

    @property
    def utilization(self) -> float:
        return self.tokens / max(self.slot_steps, 1)


class SlotState(NamedTuple):
    """The decode slots (all [S] unless noted). tok: the next input token; gen: tokens generated;
    done: the slot is not running (ended or empty); reason: STOP_*; limit, offset: the row's own;
    keys: uint32 [S, 2], the row's raw PRNG key; row: its index in the output, R when empty;
    tokens, logprobs: [S, N] the row's output so far; prefix_logp: [S, F - 1]; cap: int32 [S],
    the tokens the slot's pages hold (a running slot steps only while its length is below)."""

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
    cap: Any


class AdmitBatch(NamedTuple):
    """A rows entering slots (all [A]; padding entries have slot = S, dropped by the scatter).
    slot, row (R for padding), prompt (index into the store), plen (its tokens), start: int32
    [A, F] = [last prompt token, prefix..., pad], start_len (1 + prefix length), limit, offset;
    keys: uint32 [A, 2] raw PRNG keys; pages: int32 [A, W] the row's page table (padding rows:
    the pool size, so their writes drop); cap: int32 [A], the tokens its pages hold; shared:
    int32 [A], its first tokens whose pages another row of its prompt wrote (not written again)."""

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
    cap: Any
    shared: Any


class Rows(NamedTuple):
    """One run's rows on the host. prompts: G token lists; row_prompt: int32 [R]; prefixes: R
    token lists; limits, offset: int32 [R]; keys: uint32 [R, 2]; f_width: F."""

    prompts: Sequence[Sequence[int]]
    row_prompt: np.ndarray
    prefixes: Sequence[Sequence[int]]
    limits: np.ndarray
    offset: np.ndarray
    keys: np.ndarray
    f_width: int

    @classmethod
    def make(cls, prompts, row_prompt, prefixes, limits, key, token_offset, max_new: int, start_width) -> "Rows":
        """A run's rows, checked (see RefillEngine.run for the arguments): limits clipped to [0,
        max_new], keys from `key` (hbpo_jax.rollout.next_token.keys_for_rows), offsets 0 when None, F =
        start_width(the longest prefix)."""
        row_prompt = np.asarray(row_prompt, np.int32)
        rows = len(row_prompt)
        if rows == 0 or len(prefixes) != rows or np.shape(limits) != (rows,):
            raise ValueError(f"need ≥ 1 row, and one prefix and one limit per row ({rows} rows).")
        if not prompts or min(map(len, prompts)) < 1 or row_prompt.min() < 0 or row_prompt.max() >= len(prompts):
            raise ValueError("every prompt needs a token, and every row_prompt must index `prompts`.")
        limits = np.clip(np.asarray(limits, np.int64), 0, max_new).astype(np.int32)
        offset = np.zeros(rows, np.int32) if token_offset is None else np.asarray(token_offset, np.int32)
        keys = np.asarray(jax.random.key_data(keys_for_rows(key, rows)), np.uint32)
        return cls(prompts, row_prompt, prefixes, limits, offset, keys, start_width(max(map(len, prefixes))))

    def filled(self) -> np.ndarray:
        """int [R]: the KV tokens a row fills at admission (its prompt, then its prefix)."""
        return np.array([len(self.prompts[p]) + len(x) for p, x in zip(self.row_prompt, self.prefixes)])


def admit_batch(rows: Rows, take, slot_ids, width: int, book: PageBook, pad_id: int,
                store_row: np.ndarray) -> AdmitBatch:
    """The rows `take` entering slots `slot_ids` with the book's pages, as numpy, padded to
    `width` entries (padding goes to slot S, which the scatter drops, with pages past the pool).
    store_row: int [R], each row's prompt's row in the prompt store (StoreLayout.row)."""
    def pad(x, fill):
        x = np.asarray(x)
        return np.concatenate([x, np.full((width - len(take),) + x.shape[1:], fill, x.dtype)])

    start = np.full((len(take), rows.f_width), pad_id, np.int32)
    start_len = np.zeros(len(take), np.int32)
    for i, r in enumerate(take):
        seq = [rows.prompts[rows.row_prompt[r]][-1], *rows.prefixes[r]]
        start[i, :len(seq)], start_len[i] = seq, len(seq)
    plen = np.array([len(rows.prompts[rows.row_prompt[r]]) for r in take], np.int32)
    table = np.array([book.table_row(s) for s in slot_ids], np.int32).reshape(len(slot_ids), book.width)
    prompt = np.asarray(store_row)[np.asarray(take, np.int64)]
    return AdmitBatch(slot=pad(np.asarray(slot_ids, np.int32), book.slots),
                      row=pad(np.asarray(take, np.int32), len(rows.limits)), prompt=pad(prompt, 0),
                      plen=pad(plen, 1), start=pad(start, pad_id), start_len=pad(start_len, 1),
                      limit=pad(rows.limits[take], 1), offset=pad(rows.offset[take], 0), keys=pad(rows.keys[take], 0),
                      pages=pad(table, book.pool.pages), cap=pad(book.capacity()[slot_ids], 0),
                      shared=pad(np.array([book.shared_tokens(s) for s in slot_ids], np.int32), 0))


class StoreLayout(NamedTuple):
    """Where each row decodes and where its prompt's KV sits in the prompt store.

    home: int32 [R], the shard whose slots take the row; row: int32 [R], its prompt's row of the
    store [size, Pw]; prompt: int32 [size], the prompt each store row holds (-1: padding); size:
    the store's rows, a multiple of 8 and of the shards, shard d holding rows [d size / shards,
    (d + 1) size / shards) (the store is split over the slots' axes)."""

    home: np.ndarray
    row: np.ndarray
    prompt: np.ndarray
    size: int

    @staticmethod
    def parts(prompts: int, shards: int) -> int:
        """k, the parts each prompt is split into: the fewest that make G k divide by the shards."""
        return int(shards) // int(np.gcd(int(prompts), int(shards)))

    @classmethod
    def size_for(cls, prompts: int, shards: int) -> int:
        """The store's rows for G prompts over `shards` shards (`assign`): room for the G k parts,
        rounded up to a multiple of 8 (fewer compiled shapes) and of the shards."""
        step = int(np.lcm(8, int(shards)))
        return -(-max(int(prompts), 1) * cls.parts(prompts, shards) // step) * step

    @classmethod
    def make(cls, rows: Rows, shards: int) -> "StoreLayout":
        """The layout of a run's rows (RefillEngine.run): see `assign`."""
        return cls.assign(rows.row_prompt, rows.filled(), rows.limits, len(rows.prompts), shards)

    @classmethod
    def assign(cls, row_prompt, filled, limits, prompts: int, shards: int) -> "StoreLayout":
        """Each row decodes on the shard that holds its prompt's KV: the shard prefills the prompt
        into its part of the store, the row's admit reads it there and writes the row's pages
        there, so admission moves no KV between chips. row_prompt, filled, limits: int [R].

        A prompt is one unit of work, or, when the G prompts do not divide over the shards, k
        parts (k = shards / gcd(G, shards), its rows dealt round-robin by limit), each part
        prefilled on its own shard: G k parts divide evenly, so no shard gets more rows than its
        slots while another idles (4 prompts of 16 rows on 8 shards: 8 parts of 8 rows). Parts go
        to shards heaviest first (their rows' filled + limit tokens), each to the least loaded
        shard holding fewer than G k / shards parts."""
        g, shards = int(prompts), int(shards)
        row_prompt, limits = np.asarray(row_prompt, np.int64), np.asarray(limits)
        k = cls.parts(g, shards)
        work = np.where(limits > 0, np.asarray(filled) + limits, 0)
        part = np.zeros(len(row_prompt), np.int64)  # each row's part of its prompt
        for p in range(g):
            mine = np.flatnonzero(row_prompt == p)
            part[mine[np.lexsort((mine, -limits[mine]))]] = np.arange(len(mine)) % k
        unit = row_prompt * k + part  # the (prompt, part) a row belongs to
        load_of = np.bincount(unit, weights=work, minlength=g * k)
        per = g * k // shards
        width = cls.size_for(g, shards) // shards
        load, count = np.zeros(shards), np.zeros(shards, np.int64)
        store_row = np.zeros(g * k, np.int64)
        prompt = np.full(width * shards, -1, np.int64)
        for u in np.lexsort((np.arange(g * k), -load_of)):
            d = min((d for d in range(shards) if count[d] < per), key=lambda d: (load[d], d))
            store_row[u] = d * width + count[d]
            prompt[store_row[u]] = u // k
            load[d] += load_of[u]
            count[d] += 1
        return cls((store_row[unit] // width).astype(np.int32), store_row[unit].astype(np.int32),
                   prompt.astype(np.int32), width * shards)


def right_padded(prompts, width: int, pad_id: int, layout: StoreLayout) -> tuple[np.ndarray, np.ndarray]:
    """The distinct prompts right-padded into the prompt store's rows: (ids, mask) int32
    [layout.size, width], store row i holding prompt layout.prompt[i] (a prompt in parts: one row
    per part)."""
    ids = np.full((layout.size, width), pad_id, np.int32)
    mask = np.zeros((layout.size, width), np.int32)
    mask[:, 0] = 1  # padding rows: one token, never read
    for row, p in enumerate(layout.prompt):
        if p >= 0:
            ids[row, :len(prompts[p])], mask[row, :len(prompts[p])] = prompts[p], 1
    return ids, mask


__all__ = ["AdmitBatch", "EngineOutput", "EngineStats", "Rows", "SlotState", "StoreLayout", "admit_batch",
           "right_padded"]

"""The host's book of the refilling engine's KV pages: who holds which page, and who gets the next.

The device side (models/paged.py) is a pool of P pages shared by S decode slots, a page table per
slot and a filled length per slot. This module is the host side of that pool:

  PagePool   free pages per device shard (shard d owns pages [d P/D, (d + 1) P/D)); a slot only
             takes pages of its own shard, so each device keeps the KV of its own slots
  PageBook   the pages each slot holds, in token order, its row's whole need, and the order the
             rows were admitted in; the page table and the per-slot capacity the device gets;
             the grant policy (`grow`): running rows are topped up to `room` tokens ahead of their
             length, and a row that is out of pages preempts the latest-admitted row of its shard
  pool_pages, kv_bytes_per_token: the pool's size in pages and its bytes
  room       the regime: whole limits at admission when the pool holds every slot's largest need
             (the default pool always does), else pages on demand, `room` tokens ahead

Shared prompt pages: a prompt's rows fill the same KV for its tokens [0, plen - 1) (the last prompt
token is re-written by each row's start forward). The pages those tokens fill completely are
written once per shard, by the first row of the prompt admitted there, and every later row of the
prompt on that shard points its table at them (a reference count per page; the page is free when
its last row releases it). The partly filled page, and every page after, is the row's own: the
row's first write (its start sequence) lands in it, so the copy on write is made at admission.
The engine offers a row only its prompt's home shard's slots (slots.StoreLayout), so a prompt's
rows share one copy and decode on one device; `pick_slot` prefers a shard holding the prompt's
pages for callers that offer several.

Pages on demand: a row is admitted with the pages for what it has filled (prompt + prefix) plus
`room` tokens, not its whole limit; the engine's decode loop returns to the host before a running
row would write past its pages (its capacity), and the host grants more. When a shard has no free
page, its latest-admitted running row is preempted (vLLM's choice): its pages go back, its row goes
back to the front of the queue, and its tokens are recomputed later (a row's randomness is its own
key and token index, so it draws the same tokens again). The oldest running row of a shard is never
the victim unless it is alone there, and a row alone fits (the engine checks that one row's whole
need fits a shard), so every shard's oldest row always progresses.
"""
from __future__ import annotations

import numpy as np

from hbpo_jax.models.paged import pages_for


class PagePool:
    """A host-side free list of pages, per shard. Shard d owns pages [d * per_shard, (d + 1) *
    per_shard); a slot takes pages from its own shard only.

        pool = PagePool(pages=64, shards=2)
        got = pool.alloc(shard=1, n=5)   # 5 page ids of shard 1, or None when too few are free
        pool.free(got)
    """

    def __init__(self, pages: int, shards: int = 1):
        if pages < 1 or shards < 1 or pages % shards:
            raise ValueError(f"need pages ≥ 1 divisible by shards ≥ 1, got pages={pages}, shards={shards}.")
        self.pages, self.shards, self.per_shard = int(pages), int(shards), int(pages) // int(shards)
        # Popped from the end: low page ids first (easier to read in tests and dumps).
        self._free = [list(range((d + 1) * self.per_shard - 1, d * self.per_shard - 1, -1)) for d in range(shards)]
        self._used: set[int] = set()

    def num_free(self, shard: int) -> int:
        return len(self._free[shard])

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, shard: int, n: int) -> list[int] | None:
        """n page ids from `shard` (None, and nothing taken, when fewer are free)."""
        if n > len(self._free[shard]):
            return None
        got = [self._free[shard].pop() for _ in range(n)]
        self._used.update(got)
        return got

    def free(self, pages) -> None:
        """Returns pages; a page that is not handed out is an error (a double free)."""
        for p in pages:
            p = int(p)
            if p not in self._used:
                raise ValueError(f"page {p} is freed but was not handed out.")
            self._used.remove(p)
            self._free[p // self.per_shard].append(p)


def pool_pages(kv_tokens: int, slots: int, slot_tokens: int, page_size: int, shards: int = 1) -> int:
    """Pages in the pool: kv_tokens in pages (0: slots x slot_tokens, every slot's most), rounded up
    to a multiple of the shards."""
    pages = pages_for(kv_tokens, page_size) if kv_tokens else int(slots) * pages_for(slot_tokens, page_size)
    return pages_for(pages, shards) * int(shards)


def kv_bytes_per_token(cfg, dtype) -> int:
    """Bytes of one token's keys and values over every layer, in the cache dtype."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def room(grow: int, max_new: int, page_size: int, per_shard: int, slots_per_shard: int, most: int) -> int | None:
    """The grant policy: tokens of pages a running row is kept ahead of its length (whole pages;
    `grow`, or max_new / 16 when 0, at least a page), or None (each row takes its whole limit at
    admission) when no `grow` is asked for and a shard's pages hold `slots_per_shard` rows of the
    largest need (`most` pages): pages on demand would then only add host round trips."""
    if not grow and per_shard >= slots_per_shard * most:
        return None
    return pages_for(grow or max(max_new // 16, 1), page_size) * page_size


class PageBook:
    """The pages of S slots over one pool (see the module docstring).

    pages: the pool's size; slots: S, split evenly over `shards` (slot s on shard s // (S / shards));
    page_size: tokens per page; width: the page table's entries per slot (≥ any row's need).

        book = PageBook(pages=48, slots=4, shards=2, page_size=16, width=8)
        slot = book.pick_slot(free_slots, n=3)         # a free slot whose shard has 3 free pages
        book.admit(slot, row=7, n=3, need=6)           # 3 pages now, 6 for the row's whole limit
        preempted, granted = book.grow(lengths, hungry=[slot], room=16)
        book.release(slot)                             # retired or preempted: its pages go back
    """

    def __init__(self, pages: int, slots: int, shards: int = 1, page_size: int = 16, width: int = 1):
        if slots < 1 or slots % shards:
            raise ValueError(f"need slots ≥ 1 divisible by shards, got slots={slots}, shards={shards}.")
        self.pool = PagePool(pages, shards)
        self.slots, self.page_size, self.width = int(slots), int(page_size), int(width)
        self._pages: dict[int, list[int]] = {}  # slot -> its pages, in token order
        self._need: dict[int, int] = {}  # slot -> pages of its row's whole limit
        self._row: dict[int, int] = {}  # slot -> its row
        self._order: dict[int, int] = {}  # slot -> admission number (the latest is the victim)
        self._admitted = 0
        self._own: dict[int, int] = {}  # slot -> its leading pages that are a prompt's shared pages
        self._refs: dict[int, int] = {}  # shared page -> rows holding it
        self._prompt: dict[tuple[int, int], list[int]] = {}  # (shard, prompt) -> its shared pages
        self._slot_prompt: dict[int, tuple[int, int]] = {}  # slot -> its (shard, prompt) when shared
        self.peak = 0  # the most pages held at once
        self.granted = 0  # pages granted to running rows (after their admission)
        self.shared = 0  # page references served by a prompt's pages already written

    # ------------------------------------------------------------------ reading
    def shard_of(self, slot: int) -> int:
        return int(slot) // (self.slots // self.pool.shards)

    @property
    def used(self) -> int:
        return self.pool.num_used

    def held(self, slot: int) -> list[int]:
        """The slot's pages in token order ([] when empty)."""
        return list(self._pages.get(slot, ()))

    def row_of(self, slot: int) -> int | None:
        return self._row.get(slot)

    def running(self) -> list[int]:
        """The slots holding pages, oldest admission first."""
        return sorted(self._pages, key=self._order.__getitem__)

    def table_row(self, slot: int) -> np.ndarray:
        """int32 [width]: the slot's pages, then its first page (or its shard's first page when
        empty) in the unused entries, so that every entry is a page of the slot's device."""
        pages = self._pages.get(slot) or [self.shard_of(slot) * self.pool.per_shard]
        return np.array(pages + [pages[0]] * (self.width - len(pages)), np.int32)

    def table(self) -> np.ndarray:
        """int32 [S, width]: every slot's table_row."""
        return np.stack([self.table_row(s) for s in range(self.slots)])

    def capacity(self) -> np.ndarray:
        """int32 [S]: tokens each slot's pages hold (0 when empty)."""
        return np.array([len(self._pages.get(s, ())) * self.page_size for s in range(self.slots)], np.int32)

    def shared_pages(self, shard: int, prompt: int) -> list[int]:
        """The prompt's pages written on `shard` ([] when none)."""
        return list(self._prompt.get((shard, prompt), ()))

    def shared_tokens(self, slot: int) -> int:
        """Tokens at the start of the slot's row already in a prompt's pages written by another row
        (the admit skips writing them; 0 for the row that writes them)."""
        return self._own.get(slot, 0) * self.page_size

    def pick_slot(self, free_slots, n: int, prompt: int | None = None, shared: int = 0) -> int | None:
        """A slot of `free_slots` whose shard can give the row its n pages, or None. With a prompt
        whose first `shared` pages can be shared: a shard already holding them first (they are not
        taken again), then the shard with most free pages."""
        best = None
        for slot in free_slots:
            shard = self.shard_of(slot)
            pinned = prompt is not None and shared > 0 and (shard, prompt) in self._prompt
            left = self.pool.num_free(shard)
            if left >= n - (shared if pinned else 0) and (best is None or (pinned, left) > best[0]):
                best = ((pinned, left), slot)
        return None if best is None else best[1]

    # ------------------------------------------------------------------ changes
    def admit(self, slot: int, row: int, n: int, need: int, prompt: int | None = None, shared: int = 0) -> list[int]:
        """The empty slot takes n pages of its shard for `row`, whose whole limit needs `need`
        pages; its first `shared` (< n) are its prompt's (`prompt`) shared pages: taken from the
        shard's copy when one is written (shared_tokens(slot) > 0 then), else allocated here and
        registered as that copy. Raises when the slot is held, n > need, or the shard has too few
        free pages."""
        shared = int(shared) if prompt is not None else 0
        if slot in self._pages or not 1 <= n <= need or need > self.width or not 0 <= shared < n:
            raise ValueError(f"slot {slot}: cannot admit row {row} with {n} of {need} pages, {shared} shared "
                             f"(width {self.width}).")
        key = (self.shard_of(slot), int(prompt) if prompt is not None else -1)
        if key in self._prompt and len(self._prompt[key]) != shared:
            shared = 0  # another count of shared pages for the prompt (not the engine's case): none
        reuse = self._prompt.get(key, []) if shared else []
        got = self.pool.alloc(key[0], n - len(reuse))
        if got is None:
            raise ValueError(f"slot {slot}: {n - len(reuse)} pages are not free on shard {key[0]}.")
        if shared:
            if len(reuse) < shared:  # the first row of the prompt on this shard writes its pages
                reuse, got = got[:shared], got[shared:]
                self._prompt[key] = list(reuse)
                self._refs.update((p, 0) for p in reuse)
            else:
                self._own[slot] = shared
                self.shared += shared
            for p in reuse:
                self._refs[p] += 1
            self._slot_prompt[slot] = key
            got = list(reuse) + got
        self._pages[slot], self._need[slot], self._row[slot] = got, int(need), int(row)
        self._order[slot], self._admitted = self._admitted, self._admitted + 1
        self.peak = max(self.peak, self.used)
        return list(got)

    def release(self, slot: int) -> int:
        """The slot's pages go back to the pool (its row retired or preempted); a shared page only
        when its last row lets go. Returns its row."""
        held = self._pages.pop(slot)
        key = self._slot_prompt.pop(slot, None)
        self._own.pop(slot, None)
        if key is not None:
            shared = self._prompt[key]
            for p in shared:
                self._refs[p] -= 1
            if not self._refs[shared[0]]:
                self.pool.free(shared)
                for p in self._prompt.pop(key):
                    del self._refs[p]
            held = held[len(shared):]
        self.pool.free(held)
        del self._need[slot], self._order[slot]
        return self._row.pop(slot)

    def grant(self, slot: int, n: int) -> bool:
        """n more pages for a held slot, from its shard (False, nothing taken, when too few are
        free). Never past the row's need."""
        n = min(int(n), self._need[slot] - len(self._pages[slot]))
        got = self.pool.alloc(self.shard_of(slot), n) if n > 0 else None
        if got is None:
            return n <= 0
        self._pages[slot].extend(got)
        self.granted += n
        self.peak = max(self.peak, self.used)
        return True

    def victim(self, shard: int) -> int | None:
        """The latest-admitted held slot of `shard`, or None when fewer than two slots hold pages
        there (the last row of a shard is never preempted)."""
        held = [s for s in self._pages if self.shard_of(s) == shard]
        return max(held, key=self._order.__getitem__) if len(held) > 1 else None

    def grow(self, lengths, hungry, room: int) -> tuple[list[tuple[int, int]], int]:
        """Grants pages to running slots after a decode segment.

        lengths: int [S], each slot's filled tokens; hungry: the slots whose pages are full (they
        cannot take another step), served oldest first: each gets one more page, and while its
        shard has none free, the shard's latest-admitted row is preempted (released; the hungry
        slot itself when it is the latest). Then every held slot is topped up, oldest first, to
        `room` tokens past its length (never past its need), from free pages only.
        Returns (the preempted (slot, row) in the order they were preempted, pages granted)."""
        preempted, before = [], self.granted
        for slot in sorted(hungry, key=lambda s: self._order.get(s, -1)):
            while slot in self._pages and not self.grant(slot, 1):
                victim = self.victim(self.shard_of(slot))
                if victim is None:
                    raise AssertionError(f"slot {slot} alone on its shard has no free page (a book bug).")
                preempted.append((victim, self.release(victim)))
        for slot in self.running():
            want = pages_for(int(lengths[slot]) + int(room), self.page_size) - len(self._pages[slot])
            self.grant(slot, min(want, self.pool.num_free(self.shard_of(slot))))
        return preempted, self.granted - before


__all__ = ["PageBook", "PagePool", "kv_bytes_per_token", "pool_pages", "room"]

"""The host's page book (hbpo_jax/pages.py): the pool's free lists, each slot's pages, grants and
preemption, checked on the host alone (the engine's runs are in rollout/test_refill.py / models/test_paged.py)."""
import numpy as np
import pytest

from hbpo_jax.models.paged import pages_for
from hbpo_jax.rollout import pages


def test_pool_never_hands_out_a_page_twice():
    pool = pages.PagePool(24, shards=2)
    rng = np.random.default_rng(0)
    held, seen_now = [], set()
    for _ in range(200):
        if held and rng.random() < 0.45:
            got = held.pop(rng.integers(len(held)))
            pool.free(got)
            seen_now -= set(got)
        else:
            shard = int(rng.integers(2))
            got = pool.alloc(shard, int(rng.integers(1, 5)))
            if got is None:
                continue
            assert not seen_now & set(got), "a page handed out twice"
            assert all(p // 12 == shard for p in got), "a page from another shard"
            seen_now |= set(got)
            held.append(got)
        assert pool.num_used == len(seen_now)
    for got in held:
        pool.free(got)
    assert pool.num_used == 0 and pool.num_free(0) == pool.num_free(1) == 12
    assert pool.alloc(0, 13) is None and pool.num_free(0) == 12  # too many: nothing taken
    with pytest.raises(ValueError, match="freed but was not handed out"):
        pool.free([3])


def test_book_admits_grants_and_releases():
    # 2 shards of 6 pages, 4 slots (slots 0-1 on shard 0, 2-3 on shard 1), pages of 4 tokens.
    book = pages.PageBook(12, slots=4, shards=2, page_size=4, width=5)
    assert book.pick_slot([0, 1, 2, 3], 7) is None and book.pick_slot([1, 3], 6) == 1  # ties: the first
    assert book.admit(2, row=9, n=2, need=4) == [6, 7]
    assert book.pick_slot([0, 3], 5) == 0  # shard 0 has more free pages
    np.testing.assert_array_equal(book.table_row(2), [6, 7, 6, 6, 6])  # unused entries: its first page
    np.testing.assert_array_equal(book.table_row(3), [6] * 5)  # empty: its shard's first page
    np.testing.assert_array_equal(book.capacity(), [0, 0, 8, 0])
    assert book.grant(2, 5) and book.held(2) == [6, 7, 8, 9]  # never past the row's need (4 pages)
    assert book.admit(3, row=4, n=2, need=3) == [10, 11]  # shard 1 is full now
    assert not book.grant(3, 1) and book.held(3) == [10, 11] and book.granted == 2  # nothing taken
    with pytest.raises(ValueError, match="cannot admit"):
        book.admit(3, row=5, n=1, need=1)  # slot 3 is held
    book.admit(0, row=5, n=5, need=5)
    with pytest.raises(ValueError, match="not free"):
        book.admit(1, row=6, n=2, need=2)  # shard 0 has one page left
    assert book.row_of(1) is None and book.running() == [2, 3, 0] and book.used == book.peak == 11
    np.testing.assert_array_equal(book.table()[:, 0], [0, 0, 6, 10])
    assert [book.release(s) for s in (2, 3, 0)] == [9, 4, 5]
    assert book.used == 0 and book.pool.num_free(0) == book.pool.num_free(1) == 6 and book.peak == 11


def test_grow_preempts_the_latest_admitted_row_of_the_shard():
    book = pages.PageBook(16, slots=6, shards=2, page_size=4, width=8)  # slots 0-2 on shard 0, 3-5 on 1
    for slot, row in ((1, 10), (0, 11), (2, 12), (3, 13)):  # admitted in this order, 2 of 8 pages each
        book.admit(slot, row, n=2, need=8)
    # Shard 0: 2 pages free. Slots 1 and 0 are full: one page each. The top-up (room 4: a page's
    # worth ahead of each length) finds shard 0 empty, and gives slot 3 (5 + 4 tokens) a third.
    preempted, granted = book.grow(np.array([8, 8, 5, 5, 0, 0]), hungry=[0, 1], room=4)
    assert preempted == [] and granted == 3 and book.pool.num_free(0) == 0
    assert [len(book.held(s)) for s in range(4)] == [3, 3, 2, 3]
    # Slot 1 is full again and shard 0 has no free page: its latest-admitted row (slot 2) goes.
    preempted, _ = book.grow(np.array([12, 12, 6, 6, 0, 0]), hungry=[1], room=4)
    assert preempted == [(2, 12)] and book.held(2) == [] and [len(book.held(s)) for s in (0, 1)] == [4, 4]
    # Both full, none free: the oldest (slot 1) is served first and preempts the latest (slot 0).
    preempted, _ = book.grow(np.array([16, 16, 0, 6, 0, 0]), hungry=[0, 1], room=4)
    assert preempted == [(0, 11)] and len(book.held(1)) == 5 and book.running() == [1, 3]
    # Alone on its shard a row is never the victim: its whole need fits the shard.
    assert book.victim(0) is None and book.victim(1) is None
    preempted, _ = book.grow(np.array([0, 20, 0, 6, 0, 0]), hungry=[1], room=12)
    assert preempted == [] and len(book.held(1)) == 8 and book.pool.num_free(0) == 0
    assert book.held(3) == [8, 9, 10, 11, 12]  # topped up to 6 + 12 tokens, from shard 1 only
    for slot in book.running():
        book.release(slot)
    assert book.used == 0


def test_random_grants_and_preemptions_leak_no_page():
    """A random schedule of admissions, decode steps, grants, preemptions and retirements: every
    page is held by one slot of its own shard, within its row's need, and all come back."""
    rng = np.random.default_rng(1)
    slots, shards, ps, per_shard = 8, 2, 4, 10
    book = pages.PageBook(shards * per_shard, slots=slots, shards=shards, page_size=ps, width=per_shard)
    lengths = np.zeros(slots, np.int64)
    ends = np.zeros(slots, np.int64)  # a slot's row ends when its length reaches this
    preemptions = 0
    for step in range(400):
        for slot in range(slots):  # admit into free slots while pages last
            need = int(rng.integers(1, per_shard + 1))
            fill = int(rng.integers(1, need * ps + 1))
            first = min(need, pages_for(fill + ps, ps))
            if slot not in book.running() and book.pool.num_free(book.shard_of(slot)) >= first and rng.random() < 0.5:
                book.admit(slot, row=step * slots + slot, n=first, need=need)
                lengths[slot], ends[slot] = fill, need * ps
        running = book.running()
        cap = book.capacity()
        hungry = [s for s in running if lengths[s] >= cap[s]]
        for s in running:
            if s not in hungry:
                lengths[s] += 1
            if lengths[s] >= ends[s]:
                book.release(s)
        hungry = [s for s in hungry if s in book.running()]
        preempted, _ = book.grow(lengths, hungry, room=ps)
        preemptions += len(preempted)
        held = {s: book.held(s) for s in book.running()}
        flat = [p for ps_ in held.values() for p in ps_]
        assert len(flat) == len(set(flat)) == book.used, "a page held twice, or lost"
        for s, got in held.items():
            assert all(p // per_shard == book.shard_of(s) for p in got), "a page from another shard"
            assert len(got) <= pages_for(ends[s], ps), "more pages than the row's need"
        for s in hungry:
            assert s not in held or book.capacity()[s] > lengths[s], "a hungry slot left without a page"
    for s in book.running():
        book.release(s)
    assert book.used == 0 and preemptions > 0


def test_room_is_whole_limits_only_when_the_pool_holds_them():
    assert pages.room(0, 256, 16, per_shard=84, slots_per_shard=4, most=21) is None  # 4 x 21 pages fit
    assert pages.room(0, 256, 16, per_shard=83, slots_per_shard=4, most=21) == 16  # N / 16 = 16 tokens
    assert pages.room(20, 256, 16, per_shard=84, slots_per_shard=4, most=21) == 32  # asked for: whole pages
    assert pages.room(0, 8, 16, per_shard=1, slots_per_shard=4, most=1) == 16  # at least a page
    assert pages.pool_pages(0, slots=8, slot_tokens=64, page_size=8, shards=4) == 64
    assert pages.pool_pages(100, slots=8, slot_tokens=64, page_size=8, shards=4) == 16  # 13 pages -> 4 x 4
    with pytest.raises(ValueError, match="divisible by shards"):
        pages.PageBook(10, slots=3, shards=2)


def test_a_prompts_pages_are_shared_counted_and_released():
    """Rows of one prompt on one shard point at one copy of its full pages (reference counted);
    each holds its own partly filled page and what follows (the copy on write, at admission)."""
    book = pages.PageBook(pages=40, slots=4, shards=2, page_size=4, width=10)
    a = book.pick_slot([0, 1, 2, 3], n=5, prompt=7, shared=3)
    first = book.admit(a, row=0, n=5, need=6, prompt=7, shared=3)
    assert book.used == 5 and book.shared_tokens(a) == 0  # the first row writes the prompt's pages
    b = book.pick_slot([s for s in range(4) if s != a], n=5, prompt=7, shared=3)
    assert book.shard_of(b) == book.shard_of(a)  # pinned to the shard holding the prompt's pages
    second = book.admit(b, row=1, n=5, need=6, prompt=7, shared=3)
    assert second[:3] == first[:3] and not set(second[3:]) & set(first)  # shared, then its own
    assert book.used == 7 and book.shared_tokens(b) == 12 and book.shared == 3
    c = book.pick_slot([s for s in range(4) if book.shard_of(s) != book.shard_of(a)], n=5, prompt=7, shared=3)
    third = book.admit(c, row=2, n=5, need=6, prompt=7, shared=3)  # another shard: its own copy, written
    assert book.shared_tokens(c) == 0 and not set(third) & set(first) and book.used == 12
    assert book.grant(b, 1) and len(book.held(b)) == 6
    book.release(a)  # the prompt's pages stay: row 1 still reads them
    assert book.used == 12 + 1 - 2 and set(first[:3]) <= set(book.held(b))
    book.release(b)
    assert book.used == 5 and book.shared_pages(book.shard_of(a), 7) == []
    again = book.admit(a, row=0, n=5, need=6, prompt=7, shared=3)  # re-admitted: written again
    assert book.shared_tokens(a) == 0 and len(again) == 5
    book.release(a)
    book.release(c)
    assert book.used == 0
    with pytest.raises(ValueError, match="shared"):
        book.admit(a, row=0, n=3, need=6, prompt=7, shared=3)


def test_shared_pages_under_random_preemption_leak_no_page():
    rng = np.random.default_rng(1)
    book = pages.PageBook(pages=48, slots=6, shards=2, page_size=4, width=12)
    for _ in range(300):
        free = [s for s in range(6) if not book.held(s)]
        if free and rng.random() < 0.5:
            prompt, shared = int(rng.integers(0, 3)), int(rng.integers(0, 3))
            n = int(rng.integers(shared + 1, shared + 4))
            slot = book.pick_slot(free, n, prompt, shared)
            if slot is not None:
                book.admit(slot, row=0, n=n, need=12, prompt=prompt, shared=shared if shared else 0)
        held = [s for s in range(6) if book.held(s)]
        if held and rng.random() < 0.4:
            book.release(int(rng.choice(held)))
        elif held:
            lengths = np.array([len(book.held(s)) * 4 for s in range(6)])
            book.grow(lengths, [int(rng.choice(held))], room=4)
        distinct = {p for s in range(6) for p in book.held(s)}
        assert book.used == len(distinct)
    for s in range(6):
        if book.held(s):
            book.release(s)
    assert book.used == 0

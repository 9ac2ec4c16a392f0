from __future__ import annotations

import pytest

from spillover.engine.batch import BlockCopy, SlotCopy
from spillover.engine.kv_cache import BlockManager
from spillover.engine.params import SamplingParams
from spillover.engine.request import Request
from spillover.engine.state_cache import PromptStateCache, StateSlotPool


def finished(
    bm: BlockManager, pool: StateSlotPool, rid: str, prompt: list[int], output: list[int]
) -> Request:
    """A request that computed prompt + output[:-1] (the last sampled token never runs)."""
    r = Request(rid, prompt, SamplingParams())
    r.output_token_ids = list(output)
    r.state_slot = pool.allocate()
    assert bm.allocate(r, r.num_tokens)  # one more block than needed when num_tokens % bs == 1
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_slot_pool() -> None:
    pool = StateSlotPool(3)
    slots = [pool.allocate() for _ in range(3)]
    assert slots == [0, 1, 2] and pool.allocate() is None and pool.num_free == 0
    pool.free(1)
    assert pool.allocate() == 1
    pool.free(2)
    with pytest.raises(AssertionError):
        pool.free(2)


def test_store_lookup_restore() -> None:
    bm, pool = BlockManager(16, 4, enable_prefix_caching=False), StateSlotPool(4)
    cache = PromptStateCache(pool, bm, max_entries=4)
    r = finished(bm, pool, "a", [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11])  # 11 tokens, 10 computed
    slot = r.state_slot
    assert slot is not None and len(r.block_table) == 3
    assert cache.store(r)
    assert r.block_table == [] and r.state_slot is None
    assert bm.num_free_blocks == 16 - 3 and pool.num_free == 3  # all 3 blocks cover 10 tokens

    nxt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert cache.lookup(nxt, len(nxt) - 1) is not None
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 99, 11], 10) is None  # diverges inside
    assert cache.lookup(nxt[:10], 9) is None  # must leave a token to compute
    key, ck = cache.lookup(nxt, 12) or (None, None)
    assert key is not None and ck is not None and len(ck.tokens) == 10

    new = Request("b", nxt, SamplingParams())
    restored = cache.restore(new, key)
    assert restored is not None and restored.num_tokens == 10 and new.state_slot is not None
    assert restored.slot_copy == SlotCopy(src=slot, dst=new.state_slot)
    assert new.block_table[:2] == ck.blocks[:2]
    assert restored.block_copy == BlockCopy(src=ck.blocks[2], dst=new.block_table[2])
    assert new.num_computed_tokens == 10 and len(cache) == 1

    bm.free(new)
    pool.free(new.state_slot)  # type: ignore[arg-type]
    cache.clear()
    assert bm.num_free_blocks == 16 and pool.num_free == 4


def test_longest_prefix_wins_and_lru_eviction_under_budget() -> None:
    bm, pool = BlockManager(32, 4, enable_prefix_caching=False), StateSlotPool(8)
    cache = PromptStateCache(pool, bm, max_entries=2)
    short = finished(bm, pool, "s", [1, 2, 3], [4, 5])  # covers [1, 2, 3, 4]
    long = finished(bm, pool, "l", [1, 2, 3, 4, 5, 6], [7, 8])  # covers [1..7]
    assert cache.store(short) and cache.store(long)
    _, ck = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9], 8) or (0, None)
    assert ck is not None and len(ck.tokens) == 7
    _, ck = cache.lookup([1, 2, 3, 4, 5, 6, 0], 6) or (0, None)
    assert ck is not None and len(ck.tokens) == 4
    # Touch `short` so that `long` becomes least recently used, then overflow the budget.
    key_short, _ = cache.lookup([1, 2, 3, 4, 9], 4) or (0, None)
    new = Request("n", [1, 2, 3, 4, 9], SamplingParams())
    assert cache.restore(new, key_short) is not None
    third = finished(bm, pool, "t", [20, 21], [22, 23])
    assert cache.store(third)
    assert len(cache) == 2 and cache.stats.evicted == 1
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8], 7) is not None
    _, ck = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8], 7) or (0, None)
    assert ck is not None and len(ck.tokens) == 4  # the long one is gone
    cache.clear()
    bm.free(new)
    pool.free(new.state_slot)  # type: ignore[arg-type]
    assert bm.num_free_blocks == 32 and pool.num_free == 8


def test_store_refuses_when_disabled_and_restore_needs_a_slot() -> None:
    bm, pool = BlockManager(8, 4, enable_prefix_caching=False), StateSlotPool(1)
    off = PromptStateCache(pool, bm, max_entries=0)
    r = finished(bm, pool, "a", [1, 2, 3], [4, 5])
    assert not off.store(r) and r.state_slot == 0 and r.block_table
    on = PromptStateCache(pool, bm, max_entries=1)
    assert on.store(r)
    key, _ = on.lookup([1, 2, 3, 4, 5], 4) or (0, None)
    # The only slot is the checkpoint's own: a restore cannot get a destination slot.
    assert on.restore(Request("b", [1, 2, 3, 4, 5], SamplingParams()), key) is None
    assert on.evict_lru() and not on.evict_lru()
    assert pool.num_free == 1 and bm.num_free_blocks == 8

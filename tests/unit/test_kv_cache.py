from __future__ import annotations

from spillover.engine.batch import BlockCopy
from spillover.engine.kv_cache import BlockManager, extend_block_hashes
from spillover.engine.params import SamplingParams
from spillover.engine.request import Request


def req(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams())


def computed(bm: BlockManager, r: Request, n: int) -> None:
    """Allocates and 'computes' n more tokens of r, publishing its full blocks."""
    assert bm.allocate(r, n)
    r.num_computed_tokens += n
    bm.commit_full_blocks(r)


def test_allocate_is_all_or_nothing_and_free_restores() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = req("a", [1] * 10)
    assert bm.allocate(a, 10) and len(a.block_table) == 3 and bm.num_free_blocks == 1
    b = req("b", [2] * 8)
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate(b, 8) and b.block_table == [] and bm.num_free_blocks == 1
    a.num_computed_tokens = 10
    assert bm.append_slot(a) and len(a.block_table) == 3  # 11th token still fits block 3
    a.num_computed_tokens = 12
    assert bm.append_slot(a) and len(a.block_table) == 4 and bm.num_free_blocks == 0
    assert not bm.append_slot(b)
    bm.free(a)
    assert bm.num_free_blocks == 4 and a.block_table == []
    assert all(bm.ref_count(i) == 0 for i in range(4))


def test_prefix_match_shares_blocks_and_counts_refs() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = req("a", list(range(1, 14)))  # 3 full blocks + 1 token
    computed(bm, a, 13)
    assert bm.num_cached_blocks == 3
    b = req("b", list(range(1, 9)) + [99] * 6)
    hit = bm.match_prefix(b, b.num_tokens - 1)
    assert hit == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 8, hit)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == hit
    assert [bm.ref_count(x) for x in hit] == [2, 2]
    bm.free(a)
    assert [bm.ref_count(x) for x in hit] == [1, 1]
    # Free cached blocks stay findable; a request that wants them takes them out of the free queue.
    bm.free(b)
    free_before = bm.num_free_blocks
    c = req("c", list(range(1, 14)))
    hit = bm.match_prefix(c, 12)
    assert len(hit) == 3 and bm.allocate(c, 1, hit)
    assert bm.num_free_blocks == free_before - 4


def test_same_block_tokens_under_a_different_prefix_do_not_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = req("a", [1, 2, 3, 4, 5, 5, 5, 5, 9])
    computed(bm, a, 9)
    b = req("b", [7, 7, 7, 7, 5, 5, 5, 5, 9])  # block 1 identical, block 0 not
    assert bm.match_prefix(b, 8) == []
    c = req("c", [5, 5, 5, 5, 9])  # a's block 1 content, but at position 0
    assert bm.match_prefix(c, 4) == []


def test_hit_limit_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(1, 9)))
    computed(bm, a, 8)
    again = req("b", list(range(1, 9)))
    assert len(bm.match_prefix(again, again.num_tokens - 1)) == 1


def test_lru_evicts_unpublished_then_oldest_and_tail_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    computed(bm, a, 5)  # blocks 0, 1 published; block 2 holds one token, unpublished
    b = req("b", [7, 8])
    computed(bm, b, 2)  # block 3 published
    assert a.block_table == [0, 1, 2] and b.block_table == [3]
    bm.free(a)
    bm.free(b)
    # Eviction order: a's unpublished block, the never-used 4 and 5, then published blocks LRU
    # with a's tail (block 1) before its head (block 0), then b's block.
    x = req("x", [0] * 8)
    assert bm.allocate(x, 8)
    assert x.block_table == [2, 4, 5, 1]
    assert bm.match_prefix(req("q", [1, 2, 3, 4, 0]), 4) == [0]
    assert bm.match_prefix(req("r", [7, 8, 0]), 2) == [3]


def test_adopt_shares_full_blocks_and_copies_the_partial_one() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = req("p", list(range(1, 11)))
    computed(bm, parent, 10)
    child = req("c", list(range(1, 11)))
    assert bm.can_adopt(10)
    copy = bm.adopt(child, parent.block_table, 10, parent.num_committed_blocks)
    assert child.block_table[:2] == parent.block_table[:2]
    assert copy == BlockCopy(src=parent.block_table[2], dst=child.block_table[2])
    assert child.block_table[2] != parent.block_table[2] and child.num_computed_tokens == 10
    assert [bm.ref_count(b) for b in parent.block_table] == [2, 2, 1]
    aligned = req("d", list(range(1, 9)))
    assert bm.adopt(aligned, parent.block_table, 8) is None
    for r in (parent, child, aligned):
        bm.free(r)
    assert bm.num_free_blocks == 8


def test_block_hashes_grow_lazily_and_survive_appends() -> None:
    r = req("a", list(range(10)))
    h = list(extend_block_hashes(r, 4, 10))
    assert len(h) == 2
    r.output_token_ids += [10, 11]
    assert extend_block_hashes(r, 4, 12)[:2] == h and len(r.block_hashes) == 3
    other = req("b", list(range(12)))
    assert extend_block_hashes(other, 4, 12) == r.block_hashes

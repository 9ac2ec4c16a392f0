"""BlockManager: paged KV cache bookkeeping (block ids, ref counts, prefix cache). No tensors.

Blocks hold `block_size` tokens of every full-attention layer. A request's `block_table` lists its
blocks in token order; flat slot = block_id * block_size + offset.

Automatic prefix caching (attention-only models): once a block is full *and computed* it is
published under a chained hash (hash of the previous block's hash and this block's token ids), so
the hash names the whole prefix, not just the block. A later request whose prompt starts with the
same blocks takes them (ref count + 1) instead of recomputing. A published block whose ref count
drops to 0 stays findable in the free queue until it is reused for something else, LRU first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spillover.engine.batch import BlockCopy
from spillover.engine.request import Request

_ROOT_HASH = 0  # parent hash of the first block


def chain_hash(parent_hash: int, tokens: Sequence[int]) -> int:
    """128-bit hash naming a block *and everything before it*. Python's hash() would be faster,
    but its collisions can be crafted, and a crafted collision would serve one user's KV to
    another's prompt; blake2b is cheap next to the forward pass that fills the block."""
    data = parent_hash.to_bytes(16, "little") + array("q", tokens).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


def extend_block_hashes(req: Request, block_size: int, num_tokens: int) -> list[int]:
    """Grows req.block_hashes to cover the full blocks among the first `num_tokens` tokens."""
    hashes = req.block_hashes
    n_full = num_tokens // block_size
    if len(hashes) < n_full:
        tokens = req.token_ids_slice(len(hashes) * block_size, n_full * block_size)
        parent = hashes[-1] if hashes else _ROOT_HASH
        for i in range(0, len(tokens), block_size):
            parent = chain_hash(parent, tokens[i : i + block_size])
            hashes.append(parent)
    return hashes


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need num_blocks >= 1 and block_size >= 1, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # (parent hash, token ids) of each published block: a hit is confirmed against them.
        self._keys: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # chained hash -> block id
        # Blocks with ref count 0, eviction order first. Never-published blocks go to the front
        # (nothing lost by reusing them), published ones to the back (LRU).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = PrefixCacheStats()

    # --- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, req: Request, max_tokens: int) -> list[int]:
        """Cached blocks holding a prefix of req's tokens, at most `max_tokens` tokens worth.

        No side effects: pass the result to `allocate`, which takes them. The caller keeps
        `max_tokens` below what it wants computed, since the last token must run to give logits.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hashes = extend_block_hashes(req, bs, max_tokens)
        hit: list[int] = []
        for i, h in enumerate(hashes[: max_tokens // bs]):
            block = self._cached.get(h)
            if block is None or self._keys[block] != self._key(req, hashes, i):
                break
            hit.append(block)
        return hit

    def can_allocate(self, req: Request, num_new_tokens: int, cached: Sequence[int] = ()) -> bool:
        return self._blocks_short(req, num_new_tokens, cached) <= 0

    def _blocks_short(self, req: Request, num_new_tokens: int, cached: Sequence[int]) -> int:
        covered = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        new = self.blocks_for(covered) - len(req.block_table) - len(cached)
        # Taking a cached block that nobody references removes it from the free queue too.
        revived = sum(1 for b in cached if self._ref[b] == 0)
        return max(new, 0) + revived - len(self._free)

    # --- mutations -------------------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Makes req.block_table cover `num_computed_tokens + num_new_tokens` tokens, first
        appending the prefix-cache hit `cached` (which advances num_computed_tokens).

        All or nothing: returns False and changes nothing when free blocks are short.
        """
        if self._blocks_short(req, num_new_tokens, cached) > 0:
            return False
        if cached:
            fresh = not req.block_table and req.num_computed_tokens == 0
            assert fresh, "prefix hits only on a fresh table"
            self.share(cached)
            req.block_table.extend(cached)
            req.num_computed_tokens = len(cached) * self.block_size
            req.num_committed_blocks = len(cached)
        need = self.blocks_for(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        for _ in range(need):
            req.block_table.append(self._pop_free())
        return True

    def append_slot(self, req: Request) -> bool:
        """Room for one more token (a decode step)."""
        return self.allocate(req, 1)

    def commit_full_blocks(self, req: Request) -> None:
        """Publishes req's blocks that are full and computed. Call after num_computed_tokens
        advances, i.e. once the step that wrote the KV has run."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(req.num_computed_tokens // bs, len(req.block_table))
        if req.num_committed_blocks >= n_full:
            return
        hashes = extend_block_hashes(req, bs, n_full * bs)
        for i in range(req.num_committed_blocks, n_full):
            block, h = req.block_table[i], hashes[i]
            # Same content computed twice (two requests raced on one prompt): keep the older copy
            # published; this one stays private and is reused first when freed.
            if self._hash[block] is None and h not in self._cached:
                self._hash[block] = h
                self._keys[block] = self._key(req, hashes, i)
                self._cached[h] = block
        req.num_committed_blocks = n_full

    def share(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            assert self._ref[b] > 0, f"block {b} released more often than taken"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def free(self, req: Request) -> None:
        """Drops req's references. Tail first, so that a prompt's last blocks (the least likely
        to be shared) are evicted before its first ones."""
        self.release(reversed(req.block_table))
        req.block_table = []
        req.num_committed_blocks = 0

    def can_adopt(self, num_tokens: int) -> bool:
        return num_tokens % self.block_size == 0 or bool(self._free)

    def adopt(
        self, req: Request, blocks: Sequence[int], num_tokens: int, num_published: int = 0
    ) -> BlockCopy | None:
        """Starts `req` (with an empty table) from the first `num_tokens` tokens held in `blocks`
        (a fork parent's table, a prompt checkpoint's): full blocks are shared, the partly filled
        last one is copied into a fresh block, since both owners would write their own next
        tokens into it. `num_published`: how many leading blocks are already in the prefix cache.

        Returns the copy to perform (None when the last block is full). Check `can_adopt` first.
        """
        assert not req.block_table, "adopt needs a request without blocks"
        bs = self.block_size
        n_full = num_tokens // bs
        req.block_table = list(blocks[:n_full])
        self.share(req.block_table)
        req.num_computed_tokens = num_tokens
        req.num_committed_blocks = min(num_published, n_full)
        if num_tokens % bs == 0:
            return None
        dst = self._pop_free()
        req.block_table.append(dst)
        return BlockCopy(src=blocks[n_full], dst=dst)

    def reset_prefix_cache(self) -> None:
        """Forgets every published block (e.g. after weights change)."""
        for b in self._cached.values():
            self._hash[b] = None
            self._keys[b] = None
        self._cached.clear()

    def _key(self, req: Request, hashes: list[int], i: int) -> tuple[int, tuple[int, ...]]:
        bs = self.block_size
        return (hashes[i - 1] if i else _ROOT_HASH,
                tuple(req.token_ids_slice(i * bs, (i + 1) * bs)))

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:
            # Evicting a published block: its content is about to be overwritten.
            if self._cached.get(h) == block:
                del self._cached[h]
            self._hash[block] = None
            self._keys[block] = None
        self._ref[block] = 1
        return block

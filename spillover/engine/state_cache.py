"""Linear-attention state slots and hybrid prompt reuse (bookkeeping only, no tensors).

A Gated DeltaNet layer keeps a fixed-size state per sequence (conv window + fp32 recurrent
matrix) in one of a fixed pool of slots. Unlike KV blocks, a state cannot be cut back to an
earlier position: it summarises *all* tokens seen. So hybrid models cannot share prompts by block
hash; instead, when a request finishes, its slot (the state after every computed token) and its
KV blocks become a checkpoint keyed by those tokens. A new prompt that extends a checkpoint's
tokens (the next turn of a chat) starts from a copy of it and computes only the new tokens.

This module decides; the runner executes: `restore` returns a SlotCopy (and a BlockCopy for the
partly filled last KV block) that the scheduler puts into the next StepPlan. Dropping a checkpoint
needs no tensor work: its slot and blocks simply become free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from spillover.engine.batch import BlockCopy, SlotCopy
from spillover.engine.kv_cache import BlockManager
from spillover.engine.request import Request


class StateSlotPool:
    """Fixed pool of state slot ids, shared by running requests and prompt checkpoints."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        # Reversed so that slots are handed out 0, 1, 2, ... (easier to read in logs and tests).
        self._free = list(range(num_slots - 1, -1, -1))
        self._used = [False] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._used[slot] = True
        return slot

    def free(self, slot: int) -> None:
        assert self._used[slot], f"state slot {slot} freed twice"
        self._used[slot] = False
        self._free.append(slot)


@dataclass
class Checkpoint:
    tokens: tuple[int, ...]  # the tokens whose state the slot holds (prompt + computed output)
    slot: int  # state slot holding the state after `tokens`
    blocks: list[int]  # KV blocks of `tokens` (full-attention layers), one reference held


@dataclass
class RestoredPrompt:
    num_tokens: int  # tokens the request no longer computes
    slot_copy: SlotCopy
    block_copy: BlockCopy | None


@dataclass
class PromptCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which restored from a checkpoint
    stored: int = 0
    evicted: int = 0


class PromptStateCache:
    """LRU of prompt checkpoints, at most `max_entries` of them (each holds one state slot)."""

    def __init__(self, slots: StateSlotPool, blocks: BlockManager, max_entries: int) -> None:
        self.slots = slots
        self.blocks = blocks
        self.max_entries = max_entries
        # key: id of the entry, in LRU order (least recently used first)
        self._entries: OrderedDict[int, Checkpoint] = OrderedDict()
        self._next_key = 0
        self.stats = PromptCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def lookup(self, tokens: Sequence[int], max_tokens: int) -> tuple[int, Checkpoint] | None:
        """The checkpoint covering the longest prefix of `tokens` of at most `max_tokens` tokens.

        A linear scan: the budget is a few dozen entries and the comparison stops at the first
        differing token, so this costs less than hashing the prompt.
        """
        best: tuple[int, Checkpoint] | None = None
        for key, ck in self._entries.items():
            n = len(ck.tokens)
            if n <= max_tokens and (best is None or n > len(best[1].tokens)):
                if tuple(tokens[:n]) == ck.tokens:
                    best = (key, ck)
        return best

    def restore(self, req: Request, key: int) -> RestoredPrompt | None:
        """Starts `req` (fresh: no blocks, no slot) from checkpoint `key`. None (nothing changed)
        when no state slot or block is free."""
        ck = self._entries[key]
        n = len(ck.tokens)
        if not self.blocks.can_adopt(n):
            return None
        slot = self.slots.allocate()
        if slot is None:
            return None
        self._entries.move_to_end(key)
        block_copy = self.blocks.adopt(req, ck.blocks, n)
        req.state_slot = slot
        return RestoredPrompt(num_tokens=n, slot_copy=SlotCopy(src=ck.slot, dst=slot),
                              block_copy=block_copy)

    def store(self, req: Request) -> bool:
        """Turns a finished request's slot and blocks into a checkpoint of its computed tokens.

        Takes ownership (req is left with neither) and returns True; returns False and leaves req
        alone when caching is off or there is nothing to keep, so the caller frees it.
        """
        n = req.num_computed_tokens
        if not self.enabled or req.state_slot is None or n == 0:
            return False
        tokens = tuple(req.token_ids_slice(0, n))
        for key, ck in list(self._entries.items()):
            if ck.tokens == tokens:
                self._drop(key)  # the newer copy is as good and more recently used
        keep = self.blocks.blocks_for(n)
        self.blocks.release(reversed(req.block_table[keep:]))
        self._entries[self._next_key] = Checkpoint(
            tokens=tokens, slot=req.state_slot, blocks=req.block_table[:keep]
        )
        self._next_key += 1
        req.block_table = []
        req.num_committed_blocks = 0
        req.state_slot = None
        self.stats.stored += 1
        while len(self._entries) > self.max_entries:
            self.evict_lru()
        return True

    def evict_lru(self) -> bool:
        """Drops the least recently used checkpoint; False when there is none."""
        if not self._entries:
            return False
        self._drop(next(iter(self._entries)))
        self.stats.evicted += 1
        return True

    def clear(self) -> None:
        while self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        ck = self._entries.pop(key)
        self.slots.free(ck.slot)
        self.blocks.release(reversed(ck.blocks))

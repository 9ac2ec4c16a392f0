"""Incremental detokenization and stop-string matching for one completion.

The engine only knows token ids; stop strings are text. `IncrementalText` turns a growing list of
output ids into text with a caller-supplied `decode(ids) -> str`, finds stop strings even when they
straddle token boundaries, and hands out streaming deltas that never leak part of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

# Tokens of context decoded before the new ones: byte-level and sentencepiece tokenizers render a
# token differently at the start of a string (leading space, partial UTF-8), so each step decodes a
# short window that starts before the new tokens and keeps only the difference.
_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    """Text of one completion, grown one token at a time.

    `prompt_tail` (the last few prompt ids) is decoding context only; it is never part of `text`.
    """

    def __init__(self, decode: Decode, stop: Sequence[str] = (),
                 prompt_tail: Sequence[int] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = list(prompt_tail[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._ids)  # ids before this are already in `text`
        self.text = ""
        self._emitted = 0  # chars of `text` already handed out by take_delta()
        self.stopped_on: str | None = None

    def append(self, token_id: int, check_stop: bool = True) -> str | None:
        """Adds one token; returns the stop string if one now occurs (then `text`
        ends before it)."""
        if self.stopped_on is not None:
            return self.stopped_on
        self._ids.append(token_id)
        old_len = len(self.text)
        self.text += self._decode_new()
        if not (check_stop and self._stop) or len(self.text) == old_len:
            return None
        # A stop string may start in text emitted by earlier tokens, but not earlier than this.
        start = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        self._emitted = min(self._emitted, len(self.text))
        self.stopped_on = best[1]
        return best[1]

    def take_delta(self, finished: bool) -> str:
        """New text since the last call. While running, holds back a tail that could still turn
        out to be the start of a stop string (it would have to be retracted otherwise)."""
        end = len(self.text)
        if not finished and self._max_stop_len > 1:
            end = max(self._emitted, end - (self._max_stop_len - 1))
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        # An incomplete multi-byte character decodes to U+FFFD; wait for the rest of its bytes.
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return ""
        new = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new

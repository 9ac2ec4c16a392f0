from __future__ import annotations

from collections.abc import Sequence

from spillover.engine.stop import IncrementalText


def byte_decode(ids: Sequence[int]) -> str:
    """Byte-level tokenizer: token id = one byte; split characters decode to U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceLike:
    """'▁' marks a word start; the decoder drops the space of the first piece of a string."""

    pieces = ["<s>", "▁Hello", "▁world", "!", "▁wo", "rld", "▁END", "ing"]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def feed(text: IncrementalText, ids: Sequence[int], check: bool = True) -> tuple[str, str | None]:
    streamed, stop = "", None
    for t in ids:
        stop = text.append(t, check_stop=check)
        streamed += text.take_delta(finished=stop is not None)
        if stop is not None:
            break
    return streamed, stop


def test_multibyte_characters_split_across_tokens() -> None:
    ids = list("héllo €".encode())
    text = IncrementalText(byte_decode)
    deltas = []
    for t in ids:
        text.append(t)
        deltas.append(text.take_delta(finished=False))
    assert "".join(deltas) == "héllo €" and text.text == "héllo €"
    assert all("\ufffd" not in d for d in deltas)


def test_leading_space_uses_prompt_context() -> None:
    sp = SentencePieceLike()
    text = IncrementalText(sp.decode, prompt_tail=[0, 1])
    streamed, _ = feed(text, [2, 3, 4, 5])
    assert streamed == " world! world"
    bare = IncrementalText(sp.decode)  # no context: the first space is legitimately dropped
    assert feed(bare, [2, 3])[0] == "world!"


def test_stop_string_across_token_boundaries_is_excluded() -> None:
    ids = list(b"abc<|e") + list(b"nd|>tail")
    text = IncrementalText(byte_decode, stop=["<|end|>"])
    streamed, stop = feed(text, ids)
    assert stop == "<|end|>" and text.text == "abc" and streamed == "abc"
    assert text.stopped_on == "<|end|>"


def test_earliest_stop_string_wins_and_multi_token_pieces() -> None:
    sp = SentencePieceLike()
    text = IncrementalText(sp.decode, stop=["END", "world"], prompt_tail=[0])
    streamed, stop = feed(text, [1, 4, 5, 6])  # " Hello wo" + "rld": 'world' spans two tokens
    assert stop == "world" and text.text == " Hello " and streamed == " Hello "


def test_held_back_text_is_released_when_no_stop_comes() -> None:
    text = IncrementalText(byte_decode, stop=["STOP"])
    streamed = ""
    for t in b"xxST":
        text.append(t)
        streamed += text.take_delta(finished=False)
    assert streamed == "x"  # "xST" could still become "xSTOP"
    for t in b"ay":
        text.append(t)
        streamed += text.take_delta(finished=False)
    assert streamed == "xxS"
    streamed += text.take_delta(finished=True)
    assert streamed == "xxSTay"


def test_stop_check_can_be_deferred() -> None:
    text = IncrementalText(byte_decode, stop=["ab"])
    assert feed(text, b"ab", check=False) == ("a", None)  # min_tokens not reached; "b" held back
    assert text.append(ord("c")) is None  # 'ab' lies before the search window now
    assert text.append(ord("a")) is None and text.append(ord("b")) == "ab"
    assert text.text == "abc"

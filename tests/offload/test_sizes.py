from __future__ import annotations

import pytest

from spillover.hw.sizes import parse_size

GiB = 1 << 30


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("32GiB", 32 * GiB),
        ("60GB", 60 * 10**9),
        ("250MB", 250 * 10**6),
        ("1.5TiB", 3 * (1 << 39)),
        ("123456", 123456),
        ("0", 0),
        ("4KiB", 4096),
        ("4kb", 4000),
        ("2TB", 2 * 10**12),
        ("512MiB", 512 << 20),
        ("32gib", 32 * GiB),  # units are case-insensitive
        ("32 GiB", 32 * GiB),  # optional space
        ("  60 gb ", 60 * 10**9),
        ("1.5KB", 1500),
        ("0.1GB", 10**8),  # exact decimal arithmetic: no 99999999 from float rounding
        ("100B", 100),
        (".5MiB", 1 << 19),
    ],
)
def test_absolute_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want
    assert parse_size(text, total=7) == want  # a total changes nothing for absolute sizes


@pytest.mark.parametrize(
    ("text", "total", "want"),
    [
        ("0.9", 1000, 900),
        ("0.5", 32 * GiB, 16 * GiB),
        ("1.0", 12345, 12345),
        ("0.333", 1000, 333),
        ("90%", 1000, 900),
        ("12.5 %", 800, 100),
        ("0.9", 10, 9),
    ],
)
def test_fractions_of_total(text: str, total: int, want: int) -> None:
    assert parse_size(text, total=total) == want


def test_fraction_rounds_down() -> None:
    assert parse_size("0.5", total=3) == 1


@pytest.mark.parametrize(
    ("text", "total", "match"),
    [
        ("0.9", None, "no total"),
        ("90%", None, "no total"),
        ("1.5", 100, r"\(0, 1\]"),
        ("0.0", 100, r"\(0, 1\]"),
        ("150%", 100, r"\(0, 1\]"),
        ("", None, "cannot read"),
        ("   ", None, "cannot read"),
        ("abc", None, "cannot read"),
        ("GiB", None, "cannot read"),
        ("1e9", None, "cannot read"),
        ("1,5GB", None, "cannot read"),
        ("32 GiB extra", None, "cannot read"),
        ("-1GB", None, "negative"),
        ("32G", None, "ambiguous unit 'G'"),
        ("2t", None, "ambiguous unit 'T'"),
        ("32XB", None, "unknown unit 'XB'"),
        ("32 bytes", None, "unknown unit"),
    ],
)
def test_bad_sizes_say_why(text: str, total: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_size(text, total=total)


def test_error_names_the_input() -> None:
    with pytest.raises(ValueError, match="'32 XB'"):
        parse_size("32 XB")

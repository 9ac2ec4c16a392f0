"""Memory sizes the user types: `--gpu-memory 32GiB`, `--cpu-memory 60GB`, `250MB`, `123456`, or a
fraction of the total like vLLM's `--gpu-memory-utilization` (`0.9`, `90%`)."""

from __future__ import annotations

import re
from fractions import Fraction

# Decimal units are powers of 1000 and binary ones of 1024, as the labels on disks and DIMMs use
# them. A bare K/M/G/T is refused: tools disagree on what it means, and a budget off by 7 % is how
# an out-of-memory error happens mid-request.
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z%]*)", re.IGNORECASE)
_NAMES = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
_EXAMPLES = "e.g. 32GiB, 60GB, 250MB, 123456 (bytes) or 0.9 (a fraction of the total)"


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes from `text`. A bare integer is bytes; a bare number with a decimal point (or a
    percentage) is that fraction of `total`, in (0, 1]. Fractional results round down."""
    if text.strip().startswith("-"):
        raise ValueError(f"{text!r}: a size cannot be negative")
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"cannot read {text!r} as a size: {_EXAMPLES}")
    num, unit = Fraction(m["num"]), m["unit"].lower()
    if unit in ("", "%") and ("." in m["num"] or unit == "%"):
        frac = num / 100 if unit == "%" else num
        if total is None:
            raise ValueError(f"{text!r} is a fraction of the total, but no total is known here")
        if not 0 < frac <= 1:
            raise ValueError(f"{text!r}: a fraction of the total must be in (0, 1] (or 0-100 %)")
        return int(frac * total)
    if unit in ("k", "m", "g", "t"):
        u = unit.upper()
        raise ValueError(f"{text!r}: ambiguous unit {u!r}: write {u}B (powers of 1000) or {u}iB "
                         "(powers of 1024)")
    scale = UNITS.get(unit or "b")
    if scale is None:
        raise ValueError(f"{text!r}: unknown unit {m['unit']!r}; use one of {', '.join(_NAMES)}")
    return int(num * scale)

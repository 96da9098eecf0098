"""Sizes and addresses as people write them: ``"64M"``, ``"2M+4K"``, ``"0x1000"``, ``"50%-1M"``, ``"rest"``.

Scenario files must survive ``--memory`` and ``--vcpus`` overrides, so sizes may be relative: a
percentage of what they are measured against (rounded down to whole 4 KiB pages), or ``rest``
(what is left after the offset).  Terms are added or subtracted; a result must be page aligned
where it is used as a size or address, and never negative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

PAGE = 4096
# No size or address may reach 2**64: nothing in a 64-bit guest can be that large, and an unbounded
# integer would otherwise flow on into layouts and allocations.
LIMIT = 1 << 64
MAX_TEXT = 200  # characters: a size is a short expression
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TERM = re.compile(r"^(?:(0x[0-9a-f]+)|(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?)$", re.IGNORECASE)


class SizeError(ValueError):
    pass


@dataclass(frozen=True)
class SizeExpr:
    """A sum of absolute bytes, a percentage of a whole, and optionally ``rest``."""

    text: str
    absolute: int = 0
    percent: float = 0.0
    rest: bool = False

    @property
    def relative(self) -> bool:
        return self.rest or self.percent != 0.0

    def evaluate(self, whole: int | None = None, offset: int = 0) -> int:
        """The value in bytes; ``whole`` is what ``%`` and ``rest`` refer to."""
        if self.relative and whole is None:
            raise SizeError(f"{self.text!r} is relative, but there is nothing here for it to be relative to")
        value = self.absolute
        if self.percent:
            assert whole is not None
            value += int(whole * self.percent / 100) // PAGE * PAGE  # whole pages, rounded down
        if self.rest:
            assert whole is not None
            value += whole - offset
        if value < 0:
            raise SizeError(f"{self.text!r} comes out negative ({value})")
        return value


def parse_size(value: object) -> SizeExpr:
    """Parse an int or a string like ``"2M+4K"``, ``"50%-1M"``, ``"rest"``, ``"0xC0000000"``."""
    if isinstance(value, bool):
        raise SizeError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"a size cannot be negative ({value})")
        if value >= LIMIT:
            raise SizeError(f"{value:#x} is too large: sizes and addresses are below 2**64")
        return SizeExpr(str(value), absolute=value)
    if not isinstance(value, str) or not value.strip():
        raise SizeError(f"expected a size like \"64M\", \"2M+4K\" or \"50%\", got {value!r}")
    if len(value) > MAX_TEXT:
        raise SizeError(f"{value[:20]!r}...: a size is at most {MAX_TEXT} characters")
    absolute, percent, rest = 0, 0.0, False
    text = value.strip()
    if text[0] in "+-":
        raise SizeError(f"{value!r}: a size starts with a number")
    for sign_text, raw in re.findall(r"([+-]?)([^+-]+)", text):
        sign = -1 if sign_text == "-" else 1
        term = raw.strip()
        if term.lower() == "rest":
            if rest or sign < 0:
                raise SizeError(f"{value!r}: 'rest' may appear once, added")
            rest = True
            continue
        m = _TERM.match(term)
        if not m:
            raise SizeError(f"{value!r}: cannot read {term!r} as a size (use e.g. 4K, 2M, 1G, 0x1000, 50%)")
        if m.group(1):
            term_bytes = int(m.group(1), 16)
        else:
            number, unit = m.group(2), (m.group(3) or "").upper()
            if unit == "%":
                pct = Fraction(number)
                if pct > 100:
                    raise SizeError(f"{value!r}: {term!r} is more than 100%")
                percent += sign * float(pct)
                continue
            unit = unit.rstrip("B").rstrip("I")
            if unit not in UNITS:
                raise SizeError(f"{value!r}: unknown unit in {term!r}")
            scaled = Fraction(number) * UNITS[unit]  # exact: no float overflow or rounding
            if scaled.denominator != 1:
                raise SizeError(f"{value!r}: {term!r} is not a whole number of bytes")
            term_bytes = int(scaled)
        if term_bytes >= LIMIT:
            raise SizeError(f"{value!r}: {term!r} is too large: sizes and addresses are below 2**64")
        absolute += sign * term_bytes
    if not (percent or rest) and absolute < 0:
        raise SizeError(f"{value!r} is negative")
    if absolute >= LIMIT:
        raise SizeError(f"{value!r} is too large: sizes and addresses are below 2**64")
    if abs(percent) > 100:
        raise SizeError(f"{value!r}: the percentages add up to more than 100%")
    return SizeExpr(value, absolute, percent, rest)


def fmt_size(n: int) -> str:
    """``67108864`` -> ``"64M"``; exact where possible."""
    for unit in ("T", "G", "M", "K"):
        if n and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)

"""Where a TOML value was written: a line number for every table, array-of-tables entry and key.

``tomllib`` gives values without positions.  Scenario errors must name the line, so this reads the
same text line by line and records, for each key path (``("phase", 1, "step", 0, "range")``, with
0-based array indices), the line it was defined on.  It understands what scenario files use --
``[table]``, ``[[array]]``, nested ``[[a.b]]``, ``key = value`` with bare, quoted or dotted keys --
and skips the continuation lines of multi-line values.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_NAME = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_NAME}(?:\s*\.\s*{_NAME})*)\s*=")


def _split_key(key: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


class Locator:
    """Line numbers (1-based) of the paths defined in one TOML text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        counts: dict[Path, int] = {}
        current: Path = ()
        depth = 0  # open brackets/braces of a multi-line value
        in_string: str | None = None
        for lineno, line in enumerate(text.splitlines(), 1):
            if in_string is not None:
                if in_string in line:
                    in_string = None
                continue
            if depth > 0:
                depth += _bracket_balance(line)
                continue
            m = _HEADER.match(line)
            if m and not _KEY.match(line):
                names = _split_key(m.group(2))
                path: list[str | int] = []
                # Resolve array indices of enclosing arrays-of-tables, then this header.
                for i, name in enumerate(names):
                    path.append(name)
                    prefix = tuple(path)
                    is_last = i == len(names) - 1
                    if is_last and m.group(1) == "[[":
                        n = counts.get(prefix, 0)
                        counts[prefix] = n + 1
                        path.append(n)
                    elif prefix in counts:
                        path.append(counts[prefix] - 1)
                current = tuple(path)
                self.lines.setdefault(current, lineno)
                continue
            k = _KEY.match(line)
            if k:
                full = current + tuple(_split_key(k.group(1)))
                self.lines.setdefault(full, lineno)
                rest = line[k.end():]
                for quote in ('"""', "'''"):
                    if rest.count(quote) == 1:
                        in_string = quote
                depth = max(0, _bracket_balance(rest))

    def line(self, path: Path) -> int | None:
        """The line defining ``path``, or of its nearest enclosing table."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None


def _bracket_balance(s: str) -> int:
    depth = 0
    quote: str | None = None
    for ch in s:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def field_name(path: Path) -> str:
    """``("phase", 1, "step", 0, "range")`` -> ``"phase[2].step[1].range"`` (1-based for people)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part + 1}]"
        else:
            out += ("." if out else "") + part
    return out

"""``guestmem bench`` as a table a person reads: one row per figure, with its unit, the spread over
repeats where the bench repeated it, and the goal where the issue set one.

The bench's JSON is nested by section (scaling over guest sizes, model vs kernel, conversion
throughput, ...); this flattens it without knowing each section's layout: a number is a figure,
a ``{median, min, max}`` object is a figure with its spread, and a sibling ``goal*``/``meets_goal``
key is that section's goal.  Names say the unit (``_s`` seconds, ``_bytes``, ``_gib_per_s``,
``ratio``), so values are shown scaled (µs/ms/s, KiB/MiB/GiB).
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

_SPREAD = {"median", "min", "max"}


def _label(item: dict[str, Any]) -> str:
    """A list element's name: the fields that say which case it is (flavour, mode, size, ...)."""
    keys = ("program", "flavour", "mode", "direction", "ranges", "guest_bytes", "bytes", "name", "size")
    parts = []
    for k in keys:
        v = item.get(k)
        if isinstance(v, str | int) and not isinstance(v, bool):
            parts.append("".join(fmt_value(k, v)) if k.endswith("bytes") or k == "size" else str(v))
    return " ".join(parts)


def fmt_value(name: str, v: float) -> tuple[str, str]:
    """``(value, unit)`` for figure ``name`` = ``v``, scaled for reading."""
    if "gib_per_s" in name:
        return f"{v:.3g}", "GiB/s"
    if name.endswith("_s") or name.endswith("_seconds"):
        for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if abs(v) >= scale or unit == "ns":
                return f"{v / scale:.3g}", unit
    if name.endswith("_us"):
        return f"{v:.3g}", "µs"
    if name.endswith("_ns"):
        return f"{v:.4g}", "ns"
    if name.endswith("_ms"):
        return f"{v:.3g}", "ms"
    if name.endswith("bytes") or name == "size":
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(v) >= scale:
                return f"{v / scale:.4g}", unit
        return str(v), "B"
    if "ratio" in name or "over" in name:
        return f"{v:.3g}", "×"
    if isinstance(v, float):
        return f"{v:.4g}", ""
    return str(v), ""


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """``(figure, value, unit, spread, goal)`` for every number in a bench result."""
    out: list[tuple[str, str, str, str, str]] = []

    def goal_of(d: dict[str, Any]) -> str:
        goals = [f"{k}={d[k]}" for k in d if k.startswith("goal")]
        if "meets_goal" in d:
            goals.append("met" if d["meets_goal"] else "NOT met")
        return ", ".join(goals)

    def walk(x: Any, path: str, goal: str) -> None:
        if isinstance(x, dict):
            if set(x) >= _SPREAD and all(isinstance(x[k], int | float) for k in _SPREAD):
                name = path.rsplit(".", 1)[-1]
                value, unit = fmt_value(name, x["median"])
                lo, _ = fmt_value(name, x["min"])
                hi, _ = fmt_value(name, x["max"])
                out.append((path, value, unit, f"{lo}..{hi}", goal))
                return
            here = goal_of(x) or goal
            for k, v in x.items():
                if k.startswith("goal") or k == "meets_goal":
                    continue
                walk(v, f"{path}.{k}" if path else k, here)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                label = _label(v) if isinstance(v, dict) else ""
                walk(v, f"{path}[{label or i}]", goal)
        elif isinstance(x, bool) or x is None or isinstance(x, str):
            return
        elif isinstance(x, int | float):
            name = path.rsplit(".", 1)[-1]
            value, unit = fmt_value(name, x)
            out.append((path, value, unit, "", goal))

    walk({k: v for k, v in result.items() if k != "machine"}, "", "")
    return out


def make_table(result: dict[str, Any]) -> Table:
    machine = result.get("machine", {})
    title = "guestmem bench" + (f" — {machine.get('cpus')} CPUs, Linux {machine.get('kernel')}, "
                                f"Python {machine.get('python')}" if machine else "")
    table = Table(title=title, show_edge=False)
    columns = (("figure", "left"), ("value", "right"), ("unit", "left"),
               ("spread (min..max)", "right"), ("goal", "left"))
    for col, just in columns:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows(result):
        table.add_row(*(escape(cell) for cell in r))  # labels like "[vm KVM_...]" are not markup
    return table

"""The end-of-run summary a person reads: one table with the outcome, where the time and the exits
went, what was converted and discarded, and what memory it cost against the stated bound."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from guestmem.scenarios.run import ScenarioReport
from guestmem.scenarios.sizes import fmt_size

PAGE = 4096


def _pages(n: int | None) -> str:
    return "-" if n is None else f"{fmt_size(n * PAGE)}"


class _Rows:
    """Collects (what, value) rows; the terminal table and the HTML report draw the same rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Text]] = []

    def add_row(self, what: str, value: str | Text) -> None:
        self.rows.append((what, value if isinstance(value, Text) else Text(value)))


def summary_table(r: ScenarioReport) -> Table:
    """The summary as a rich table (what ``guestmem run`` prints)."""
    t = Table(title=f"guestmem run {r.scenario}", show_header=False, title_justify="left", show_edge=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for what, value in summary_rows(r):
        t.add_row(what, value)
    return t


def summary_rows(r: ScenarioReport) -> list[tuple[str, Text]]:
    """The summary's rows, (what, value with its styles): one source for every way it is shown."""
    m: dict[str, Any] = r.machine
    conv: dict[str, int] = m.get("conversion", {})
    acct: dict[str, Any] = m.get("accounting", {})
    t = _Rows()
    result = Text("OK", style="bold green") if r.ok else Text("FAILED", style="bold red")
    t.add_row("result", result)
    if r.error:
        t.add_row("error", Text(r.error, style="red"))
    t.add_row("backend / flavour",
              f"{r.backend} / {r.flavour} ({m.get('vm_type')}), {m.get('backing')} backing")
    t.add_row("guest", f"{r.vcpus} vCPU(s), {fmt_size(r.memory)} in {len(m.get('regions', []))} region(s)")
    image = r.extra.get("guest")
    if image:  # a [guest] image ran: what it reported about itself
        t.add_row("guest image", f"{image['image']} ({fmt_size(image['image_bytes'])}): detected "
                  f"{image['flavour'] or '?'}, {image['checks']} checks passed, {image['rounds']} device "
                  f"round trip(s), phases {', '.join(str(p) for p in image['phases']) or 'none'}")
        lines = [ln for ln in image["console"].splitlines() if ln.strip()]
        if lines:
            t.add_row("guest console", " | ".join(lines))
    t.add_row("wall time", f"{r.wall_s:.3f} s")
    by = ", ".join(f"{k} {v}" for k, v in sorted(r.exits_by_reason.items(), key=lambda kv: -kv[1]))
    t.add_row("exits", f"{r.exits}" + (f"  ({by})" if by else ""))
    t.add_row("conversions", f"{r.conversions} changed state: {_pages(conv.get('pages_to_private', 0))} to "
              f"private, {_pages(conv.get('pages_to_shared', 0))} to shared; {conv.get('requests', 0)} "
              f"requests, {conv.get('refused', 0) + conv.get('errors', 0)} refused")
    if conv.get("memory_faults"):
        t.add_row("memory faults", str(conv["memory_faults"]))
    c = conv.get
    discards = (f"shared side {c('shared_discards', 0)}x (skipped {c('shared_discards_skipped', 0)}"
                f", deferred {c('shared_discards_deferred', 0)}), private side "
                f"{conv.get('private_punches', 0)}x, balloon {_pages(conv.get('balloon_bytes', 0) // PAGE)}")
    t.add_row("discards", discards)
    if conv.get("prefaulted_bytes") or conv.get("prefault_unsupported"):
        unsupported = conv.get("prefault_unsupported", 0)
        t.add_row("pre-faulted", f"{fmt_size(conv.get('prefaulted_bytes', 0))}"
                  + (f" (unsupported {unsupported}x)" if unsupported else ""))
    if conv.get("hole_bytes_ignored"):
        t.add_row("MMIO holes", f"{fmt_size(conv['hole_bytes_ignored'])} of to-shared requests ignored")
    now = acct.get("now", {})
    t.add_row("resident now", f"private {_pages(now.get('private'))}, shared {_pages(now.get('shared'))}, "
              f"double-backed {_pages(now.get('double'))} ({now.get('source', '?')})")
    bound = Text(f"peak {_pages(r.frames_peak)} ({r.frames_peak_source}) vs guest + slack "
                 f"{_pages(acct.get('limit_pages'))}: ")
    bound.append("held" if r.bound_ok else "BROKEN", style="green" if r.bound_ok else "bold red")
    if acct.get("first_violation"):
        bound.append(f" -- {acct['first_violation']}")
    t.add_row("memory bound", bound)
    iommu = m.get("iommu")
    if iommu:
        t.add_row("IOMMU", f"{iommu['mode']}: {iommu['map_calls']} maps, {iommu['unmap_calls']} unmaps, peak "
                  f"{_pages(iommu['peak_mapped_pages'])} mapped, {iommu['dma_faults']} DMA faults")
    for note in r.notes:
        t.add_row("note", Text(note, style="yellow"))
    for w in m.get("warnings", []):
        t.add_row("warning", Text(w, style="yellow"))
    return t.rows

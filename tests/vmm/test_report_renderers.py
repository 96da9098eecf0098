"""The renderers: the PNG decodes and shows the map's colours, the SVG has one element per cell,
the trace is trace-event JSON Perfetto can load, and the terminal map has its legend."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import pytest
from PIL import Image
from rich.console import Console

from guestmem.report.images import render_png, render_svg
from guestmem.report.maps import KIND_COLOURS, render_terminal
from guestmem.report.tracefile import trace_events, trace_json
from guestmem.scenarios import load
from guestmem.scenarios.run import ScenarioReport, run_scenario
from guestmem.vmm.snapshot import MapSnapshot

PHASES = {"X", "i", "C", "M"}


@pytest.fixture(scope="module")
def storm() -> ScenarioReport:
    report = run_scenario(load("conversion-storm"), snapshots=True)
    assert report.ok, report.error
    return report


@pytest.fixture(scope="module")
def snp_boot() -> ScenarioReport:
    report = run_scenario(load("boot"), flavour="snp", memory=24 << 20)
    assert report.ok, report.error
    return report


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_png_decodes_and_shows_each_kind(storm: ScenarioReport) -> None:
    snap = storm.after
    assert isinstance(snap, MapSnapshot)
    kinds = snap.kinds()
    assert {"private", "shared", "unallocated"} <= set(kinds), "the storm leaves a varied map"
    img = Image.open(io.BytesIO(render_png(snap)))
    img.load()
    assert img.format == "PNG" and img.width >= 64 * 12 and img.height > 100
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16) or []}
    for kind in kinds:
        assert _rgb(KIND_COLOURS[kind]) in colours, kind


def test_svg_has_a_cell_per_region_cell(storm: ScenarioReport) -> None:
    snap = storm.after
    assert snap is not None
    root = ET.fromstring(render_svg(snap))
    ns = "{http://www.w3.org/2000/svg}"
    cells = [r for r in root.iter(f"{ns}rect") if "cell" in (r.get("class") or "").split()]
    assert len(cells) == len(snap.cells)
    assert sorted({r.get("class", "").split()[1] for r in cells}) == sorted(snap.kinds())
    tips = [t.text or "" for t in root.iter(f"{ns}title")]
    assert len(tips) == len(snap.cells) and all("gpa 0x" in t for t in tips)


def test_trace_is_trace_event_json(snp_boot: ScenarioReport) -> None:
    doc = json.loads(trace_json(snp_boot.trace, process="test"))
    assert doc == trace_events(snp_boot.trace, process="test")
    events = doc["traceEvents"]
    assert isinstance(events, list) and len(events) > 10
    for ev in events:
        assert isinstance(ev["name"], str) and ev["ph"] in PHASES
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int) and ev["tid"] >= 0
        assert isinstance(ev["ts"], int | float) and ev["ts"] >= 0
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
        if ev["ph"] == "C":
            assert all(isinstance(v, int | float) for v in ev["args"].values())
    cats = {ev.get("cat") for ev in events}
    assert {"conversion", "fault", "exit", "invalidation", "guest"} <= cats
    threads = {ev["args"]["name"]: ev["tid"] for ev in events if ev["name"] == "thread_name"}
    assert {"vmm", "vCPU 0", "vCPU 1"} <= set(threads)
    faults = [ev for ev in events if ev.get("cat") == "fault"]
    assert {ev["tid"] for ev in faults} <= {threads["vCPU 0"], threads["vCPU 1"]}


def test_terminal_map(storm: ScenarioReport) -> None:
    assert storm.before is not None and storm.after is not None
    console = Console(record=True, width=120, color_system=None)
    console.print(render_terminal(storm.before))
    console.print(render_terminal(storm.after))
    text = console.export_text()
    assert "conversion-storm: before" in text and "conversion-storm: after" in text
    assert "ram0" in text and "ram1" in text and "double-backed" in text and "mapped 4K" in text

"""The renderers: the trace is trace-event JSON Perfetto can load, and the terminal map has its
legend (the figures and the HTML report are tested in tests/report/)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from guestmem.report.maps import render_terminal
from guestmem.report.tracefile import trace_events, trace_json
from guestmem.scenarios import load
from guestmem.scenarios.run import ScenarioReport, run_scenario

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

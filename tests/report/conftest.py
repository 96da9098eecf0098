"""Fixtures for the picture tests: one real run with snapshots per phase (the hand-made map is in
picture_fixtures.py)."""

from __future__ import annotations

import pytest

from guestmem.scenarios import load
from guestmem.scenarios.run import ScenarioReport, run_scenario


@pytest.fixture(scope="session")
def balloon_run() -> ScenarioReport:
    """balloon in 8 MiB: three phases, conversions both ways, discards; a couple of seconds."""
    report = run_scenario(load("balloon"), memory=8 << 20, snapshots=True)
    assert report.ok, report.error
    assert len(report.phase_maps) == 3
    return report

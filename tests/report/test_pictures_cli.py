"""``guestmem map`` figures, ``guestmem report`` and ``run --html`` as a user meets them: files at
the size and in the format asked for, with the user's umask; a map without colour that tells the
kinds apart; bad input as one line and exit 2, before any run, with no file written."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from guestmem.cli import main
from guestmem.report import commands
from guestmem.report.palette import KIND_GLYPHS_MONO, KIND_LABELS
from guestmem.scenarios.run import ScenarioReport


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_map_figures_and_mono_terminal(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       umask022: None) -> None:
    png, pdf = tmp_path / "m.png", tmp_path / "slide"
    assert main(["map", "balloon", "--memory", "8M", "--phases", "--png", str(png), "-o", str(pdf),
                 "--format", "pdf", "--size", "6x4", "--dpi", "50"]) == 0
    out = capsys.readouterr().out
    assert Image.open(io.BytesIO(png.read_bytes())).size == (300, 200)
    assert pdf.read_bytes().startswith(b"%PDF-")
    assert stat.S_IMODE(png.stat().st_mode) == 0o644 and stat.S_IMODE(pdf.stat().st_mode) == 0o644
    # Not a terminal: one letter per kind, in the map and in the legend.
    for kind, label in KIND_LABELS.items():
        assert f"{KIND_GLYPHS_MONO[kind]} {label}" in out
    assert "after phase 3: reuse" in out and "PPPP" in out and "█" not in out
    assert "PNG written to" in out and "PDF written to" in out


def test_report_and_run_html(capsys: pytest.CaptureFixture[str], tmp_path: Path, umask022: None,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    html = tmp_path / "run.html"
    assert main(["report", "selftest-conversions", "-o", str(html)]) == 0
    page = html.read_text(encoding="utf-8")
    assert page.count('class="map-frame"') == 7, "before and six phases"
    assert 'id="summary-table"' in page and stat.S_IMODE(html.stat().st_mode) == 0o644
    assert "HTML report written to" in capsys.readouterr().out
    # run --html: the same page (built above); here only that run takes the snapshots and writes it.
    seen: list[ScenarioReport] = []

    def fake_build(report: ScenarioReport) -> str:
        seen.append(report)
        return f"<!DOCTYPE html><p>{report.scenario}: {len(report.phase_maps)} phases</p>"

    monkeypatch.setattr(commands, "build_html", fake_build)
    other = tmp_path / "b.html"
    assert main(["run", "balloon", "--memory", "8M", "--html", str(other), "--json"]) == 0
    assert '"html":' in capsys.readouterr().out
    assert other.read_text() == "<!DOCTYPE html><p>balloon: 3 phases</p>" and len(seen) == 1


@pytest.mark.parametrize("argv", [
    ["map", "balloon", "--size", "big"],
    ["map", "balloon", "--size", "nanx3"],
    ["map", "balloon", "--dpi", "0"],
    ["map", "balloon", "--format", "gif", "-o", "{tmp}/x"],
    ["map", "balloon", "-o", "{tmp}/x.jpg"],
    ["map", "balloon", "--size", "100x100", "--dpi", "1200", "--png", "{tmp}/x.png"],
    ["map", "balloon", "--svg", "{tmp}/same", "--pdf", "{tmp}/same"],
    ["report", "balloon"],
    ["report", "balloon", "-o", "{tmp}"],
    ["report", "balloon", "-o", "{tmp}/missing/r.html"],
    ["run", "balloon", "--html", "{tmp}/r.html", "--trace", "{tmp}/r.html"],
    ["compare", "--svg", "{tmp}/c", "--pdf", "{tmp}/c"],
    ["compare", "--dpi", "abc"],
])
def test_bad_input_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = set(tmp_path.iterdir())
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("guestmem") and "error" in err[0], err
    assert set(tmp_path.iterdir()) == before, "nothing is written for bad input"

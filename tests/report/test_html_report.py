"""The HTML report: one file with everything inline (nothing fetched from anywhere), the map at
every moment with a slider, the charts and the summary table -- checked in the source and, where
Debian's ``chromium`` is installed, in what a real headless browser renders after the page's script
ran."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from guestmem.report.figures import run_panels
from guestmem.report.htmlreport import build_html
from guestmem.report.palette import KIND_COLOURS, KIND_LABELS
from guestmem.report.summary import summary_rows
from guestmem.scenarios.run import ScenarioReport

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


class _Tags(HTMLParser):
    """Every start tag with its attributes, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


@pytest.fixture(scope="module")
def page(balloon_run: ScenarioReport) -> str:
    return build_html(balloon_run)


def test_nothing_is_fetched(page: str) -> None:
    for tag, attrs in _tags(page):
        assert tag not in ("link", "iframe", "img", "object", "embed"), f"<{tag}> may fetch"
        for name, value in attrs.items():
            if name in ("src", "href", "xlink:href", "action", "poster") and value:
                assert value.startswith(("#", "data:")), f"<{tag} {name}={value!r}> points outside the page"
    assert not re.search(r"url\((?!#)|@import|https?://(?!www\.w3\.org/)", page), "CSS or text fetches"


def test_structure(page: str, balloon_run: ScenarioReport) -> None:
    tags = _tags(page)
    panels = run_panels(balloon_run, before=True, phases=True)
    frames = [a for t, a in tags if t == "figure" and a.get("class") == "map-frame"]
    assert [a["data-label"] for a in frames] == [label for label, _ in panels]
    slider = next(a for t, a in tags if t == "input" and a.get("id") == "phase")
    assert slider["type"] == "range" and slider["max"] == str(len(panels) - 1)
    assert page.count("<svg") >= len(panels) + 2, "a map per moment, the timeline and the exits chart"
    rows = [a for t, a in tags if t == "tr"]
    assert len(rows) == len(summary_rows(balloon_run))
    for label in KIND_LABELS.values():
        assert f"<b>{label}</b>" in page, f"the legend explains {label}"
    assert "<script>" in page and "guestmem run balloon" in page


def _browser() -> str | None:
    return next((path for b in BROWSERS if (path := shutil.which(b))), None)


def _near(colours: set[tuple[int, int, int]], hex_colour: str, tol: int = 6) -> bool:
    want = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return any(all(abs(a - b) <= tol for a, b in zip(c, want, strict=True)) for c in colours)


def test_renders_in_a_real_browser(page: str, balloon_run: ScenarioReport, tmp_path: Path) -> None:
    """Load the page in headless chromium at ``#phase=0`` (the script would show the last moment
    otherwise), take the DOM after the script ran and a screenshot, and check both."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium package (apt-get install chromium) "
                    "to check the HTML report as rendered")
    html = tmp_path / "run.html"
    html.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    last = len(run_panels(balloon_run, before=True, phases=True)) - 1
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--window-size=1000,1100",
               f"--screenshot={shot}", "--dump-dom", f"{html.as_uri()}#phase=0"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path,
                              env=os.environ | {"HOME": profile})
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert re.search(r'<html[^>]*class="[^"]*\bjs\b', dom), "the script ran"
    assert re.search(r'<body[^>]*data-phase="0"', dom) and 'data-ready="yes"' in dom
    tags = _tags(dom)
    frames = [a for t, a in tags if t == "figure" and a.get("class") == "map-frame"]
    assert len(frames) == last + 1, "every moment's map is in the rendered page"
    shown = [a["data-index"] for a in frames if "hidden" not in a]
    assert shown == ["0"], "the slider shows exactly the moment the address asked for"
    assert f"1 / {last + 1}: before</output>" in dom, "the slider's label"
    for ident in ("summary-table", "timeline-chart", "exits-chart", "map-legend"):
        assert f'id="{ident}"' in dom, ident
    assert dom.count("<svg") >= last + 3 and "resident MiB" in dom and "vCPU 1" in dom
    img = Image.open(shot).convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 22) or []}
    for kind in ("private", "shared", "double", "unallocated"):  # the map, the legend, the timeline
        assert _near(colours, KIND_COLOURS[kind]), f"{kind} is drawn in its colour"

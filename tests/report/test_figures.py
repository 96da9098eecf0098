"""The figures: the map shows every kind in the palette's colours, at the size and DPI asked for,
with a GPA axis, region names, a legend naming every kind (double-backed included) and a title
naming scenario, flavour and backend; PNG, SVG and PDF come from one drawing; the compare chart
has a bar per design in every panel."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import pytest
from picture_fixtures import every_kind_snapshot
from PIL import Image

from guestmem.report.figures import (
    FigureOptions,
    compare_figure,
    figure_bytes,
    map_figure,
    map_subtitle,
    run_panels,
    run_title,
)
from guestmem.report.palette import KIND_COLOURS, KIND_LABELS, LEVEL_STYLES
from guestmem.scenarios.run import ScenarioReport

SVG = "{http://www.w3.org/2000/svg}"


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _texts(svg: bytes) -> str:
    """All text of an SVG drawn with text kept as text."""
    root = ET.fromstring(svg)
    return "\n".join("".join(t.itertext()) for t in root.iter(f"{SVG}text"))


@pytest.fixture(scope="module")
def synthetic_svg() -> bytes:
    snap = every_kind_snapshot()
    fig = map_figure([("before", every_kind_snapshot(title="b")), ("after", snap)],
                     title="demo — snp on model", subtitle=map_subtitle([snap], 180 << 20))
    return figure_bytes(fig, "svg", text_as_text=True)


def test_png_has_every_kind_colour_at_the_asked_size() -> None:
    fig = map_figure([("after", every_kind_snapshot())], title="t",
                     options=FigureOptions(size=(8, 4.5), dpi=60))
    img = Image.open(io.BytesIO(figure_bytes(fig, "png")))
    assert img.format == "PNG" and img.size == (480, 270)
    colours = {c[:3] for _, c in img.convert("RGBA").getcolors(maxcolors=1 << 20) or []}
    for kind, colour in KIND_COLOURS.items():
        assert _rgb(colour) in colours, f"{kind} ({colour}) is not drawn"


def test_svg_has_axis_regions_legend_and_title(synthetic_svg: bytes) -> None:
    text = _texts(synthetic_svg)
    assert "demo — snp on model" in text and "one cell = 2M" in text
    for label in KIND_LABELS.values():
        assert label in text, f"legend lacks {label!r}"
    for _, label in LEVEL_STYLES:
        assert label in text, f"legend lacks {label!r}"
    assert re.search(r"low\s+0x0–0x2800000", text), "region header with name and range"
    assert re.search(r"high\s+0x100000000–", text), "region header with name and range"
    assert "0x100000000" in text and "0x100200000" not in text, "GPA labels are row starts"
    assert "0x108000000" in text, "the second row of high (64 cells of 2M = 128M in) is labelled"
    assert "+0" in text and "+128M" in text, "the x axis is the offset within a row"
    assert "before" in text and "after" in text and "GPA" in text


def test_formats_and_reproducible_bytes() -> None:
    fig = map_figure([("after", every_kind_snapshot())], title="t", options=FigureOptions(dpi=40))
    svg = figure_bytes(fig, "svg")
    assert ET.fromstring(svg).tag == f"{SVG}svg"
    assert figure_bytes(fig, "svg") == svg, "no dates or random ids: the same input gives the same file"
    pdf = figure_bytes(fig, "pdf")
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    with pytest.raises(ValueError, match="unknown figure format"):
        figure_bytes(fig, "gif")


def test_levels_unknown_leaves_them_out_of_the_legend() -> None:
    snap = every_kind_snapshot(levels=False)
    fig = map_figure([("after", snap)], title="t", subtitle=map_subtitle([snap], 1 << 30))
    text = _texts(figure_bytes(fig, "svg", text_as_text=True))
    assert "double-backed" in text and "mapped 4K only" not in text
    assert "mapping levels not visible on this backend" in text


def test_run_panels_and_title(balloon_run: ScenarioReport) -> None:
    assert run_title(balloon_run) == "balloon — sw-protected on the model backend"
    assert [lab for lab, _ in run_panels(balloon_run)] == ["after the run"]
    assert [lab for lab, _ in run_panels(balloon_run, before=True)] == ["before", "after"]
    labels = [lab for lab, _ in run_panels(balloon_run, phases=True)]
    assert labels[:4] == ["before", "after phase 1: accept", "after phase 2: punch storm",
                          "after phase 3: reuse"]
    assert len(labels) in (4, 5), "after is left out only when it repeats the last phase"


def test_compare_chart_has_a_bar_per_design_in_each_panel() -> None:
    keys = ("peak_frames", "final_frames", "double_frames_peak", "double_frames_final", "invalidations",
            "conversions", "zaps", "hugepage_mappings", "directmap_splits", "directmap_restores",
            "stale_pages")
    rows = [{"label": f"design {i}", "wall_s": 0.5 + i} | {k: 10 * i + j for j, k in enumerate(keys)}
            for i in range(3)]
    fig = compare_figure(rows, title="compare all", options=FigureOptions(size=(10, 6), dpi=50))
    assert tuple(fig.get_size_inches() * fig.dpi) == (500, 300)
    text = _texts(figure_bytes(fig, "svg", text_as_text=True))
    assert text.count("design 2") == 3, "designs named once per row of panels (the y axis is shared)"
    assert "direct-map restores" in text and "1.50" in text

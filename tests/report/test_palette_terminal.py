"""One palette everywhere, and a terminal map that can be read without colour: every kind has its
own glyph, a 16-colour terminal gets named colours of the same hue, ``NO_COLOR`` is honoured."""

from __future__ import annotations

import pytest
from picture_fixtures import every_kind_snapshot
from rich.console import Console

from guestmem.report import figures, htmlreport, maps
from guestmem.report.maps import render_terminal, terminal_colours
from guestmem.report.palette import KIND_COLOURS, KIND_COLOURS_16, KIND_GLYPHS_MONO, KIND_LABELS, KINDS


def test_every_kind_has_a_colour_a_label_and_its_own_glyph() -> None:
    for table in (KIND_COLOURS, KIND_LABELS, KIND_GLYPHS_MONO, KIND_COLOURS_16):
        assert set(table) == set(KINDS)
    assert len(set(KIND_GLYPHS_MONO.values())) == len(KINDS)
    assert len(set(KIND_COLOURS.values())) == len(KINDS)
    assert maps.KIND_COLOURS is figures.KIND_COLOURS is htmlreport.KIND_COLOURS is KIND_COLOURS


def test_which_colours_a_console_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert terminal_colours(Console(color_system=None)) is None
    assert terminal_colours(Console(force_terminal=True, color_system="standard")) is KIND_COLOURS_16
    assert terminal_colours(Console(force_terminal=True, color_system="truecolor")) is KIND_COLOURS
    monkeypatch.setenv("NO_COLOR", "1")
    assert terminal_colours(Console(force_terminal=True, color_system="truecolor")) is None


def test_mono_map_tells_kinds_apart() -> None:
    snap = every_kind_snapshot()
    console = Console(record=True, width=120, color_system=None)
    console.print(render_terminal(snap, None))
    text = console.export_text()
    first_row = next(line for line in text.splitlines() if line.strip().startswith("0x0 "))
    assert set(first_row.split()[1]) == set(KIND_GLYPHS_MONO.values()), "each kind drawn with its glyph"
    for kind, label in KIND_LABELS.items():
        assert f"{KIND_GLYPHS_MONO[kind]} {label}" in text
    assert "mapping levels: shown with colour" in text


def test_colour_map_uses_the_palette() -> None:
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor")
    console.print(render_terminal(every_kind_snapshot()))
    page = console.export_html(inline_styles=True, clear=False)
    for colour in KIND_COLOURS.values():
        assert colour in page
    assert "mapped 4K" in console.export_text()

"""One palette for every picture guestmem draws: the terminal map, the PNG/SVG/PDF figures and the
HTML report.

Why one module: a reader who learns "green is shared" from the terminal must find green-for-shared
on the slide and in the report, and the legend must explain the same set of kinds everywhere.  The
colours are the Okabe-Ito set (distinguishable with the common colour-vision deficiencies and in
grey-scale print, because their lightness differs), and every kind also has a distinct glyph for
output without colour (a pipe, a log file, ``NO_COLOR``), where colour alone would make every kind
look the same.
"""

from __future__ import annotations

# Kinds of a map cell, in legend order (the keys of ``Cell.kind``).
KINDS = ("private", "shared", "mixed", "double", "unallocated")

KIND_COLOURS: dict[str, str] = {
    "private": "#7e57c2",      # purple: only private pages resident
    "shared": "#009e73",       # bluish green: only shared pages resident
    "mixed": "#e69f00",        # orange: some of each, none twice
    "double": "#d55e00",       # vermilion: a page held twice -- the waste a discard prevents
    "unallocated": "#d0d4d9",  # light grey: nothing resident
}
# The same kinds on a 16-colour terminal, where the nearest match to a hex colour can be a different
# hue (green came out cyan): the named ANSI colour of the same hue instead.
KIND_COLOURS_16: dict[str, str] = {
    "private": "magenta",
    "shared": "green",
    "mixed": "yellow",
    "double": "red",
    "unallocated": "bright_black",
}
KIND_LABELS: dict[str, str] = {
    "private": "private",
    "shared": "shared",
    "mixed": "private + shared",
    "double": "double-backed",
    "unallocated": "unallocated",
}
# What each kind means, for legends with room for a sentence (the HTML report, the docs).
KIND_MEANINGS: dict[str, str] = {
    "private": "only private (guest_memfd) pages are resident",
    "shared": "only shared pages are resident",
    "mixed": "some pages of each kind, none twice",
    "double": "at least one page has both a private and a shared copy: a missed discard",
    "unallocated": "nothing resident",
}
# Without colour each kind needs its own glyph, or the legend cannot be read.
KIND_GLYPHS_MONO: dict[str, str] = {
    "private": "P",
    "shared": "s",
    "mixed": "m",
    "double": "D",
    "unallocated": "·",
}

# Mapping levels (``Cell.level``): the terminal's glyph (with colour) and the label.
LEVEL_GLYPHS: dict[str | None, str] = {"1G": "█", "2M": "█", "4K": "▒", "-": "░", None: "█"}
LEVEL_LABELS: dict[str, str] = {"2M": "mapped 2M/1G", "4K": "mapped 4K", "-": "resident, not mapped"}
# How figures draw a level inside a cell of its kind's colour (see figures.py).
LEVEL_STYLES: tuple[tuple[str, str], ...] = (
    ("solid", "mapped 2M"), ("border", "mapped 1G"), ("hatched", "mapped 4K only"),
    ("outline", "resident, not mapped"))

# Series over time use the colour of the kind they count.
SERIES_COLOURS: dict[str, str] = {
    "private": KIND_COLOURS["private"],
    "shared": KIND_COLOURS["shared"],
    "double": KIND_COLOURS["double"],
}

# Colours for things that are not kinds -- a design in ``guestmem compare``, an exit reason --
# chosen apart from the kind colours, so that green, purple and vermilion keep one meaning.
SEQUENCE: tuple[str, ...] = ("#0072b2", "#56b4e9", "#cc79a7", "#8c6d31", "#5b6470", "#f0e442", "#000000",
                             "#b3b3b3")
EXIT_COLOURS: dict[str, str] = {
    "hypercall": "#0072b2",
    "memoryfault": "#56b4e9",
    "mmio": "#a6a6a6",
    "sync": "#cc79a7",
    "halt": "#000000",
}

INK = "#222222"
MUTED = "#666666"
BACKGROUND = "#ffffff"


def pale(hex_colour: str, amount: float = 0.6) -> str:
    """``hex_colour`` mixed with white (``amount`` 0 = unchanged, 1 = white)."""
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return "#{:02x}{:02x}{:02x}".format(*(round(v + (255 - v) * amount) for v in (r, g, b)))


def cell_style(kind: str, level: str | None) -> str:
    """How a cell's mapping level is drawn: "solid", "border" (1G), "hatched" (4K) or "outline"
    (resident, not mapped).  Unallocated cells and cells whose level is unknown are solid."""
    if kind == "unallocated" or level in (None, "2M"):
        return "solid"
    return {"1G": "border", "4K": "hatched", "-": "outline"}[level]

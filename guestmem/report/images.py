"""The guest physical map as PNG (Pillow) and SVG (plain text), from the same geometry.

Both show one square per cell in the kind's colour; the mapping level is drawn inside it: solid
for 2 MiB/1 GiB mappings (1 GiB with a dark border), a pale inner square for 4 KiB mappings, an
outline only for memory that is resident but not mapped by the guest.  The SVG carries a tooltip
per cell with its numbers.
"""

from __future__ import annotations

import io
from html import escape

from guestmem.report.maps import COLUMNS, KIND_COLOURS, KIND_LABELS, describe_cell, region_rows
from guestmem.scenarios.sizes import fmt_size
from guestmem.vmm.snapshot import Cell, MapSnapshot

CELL = 12
GAP = 2
MARGIN = 16
TITLE_H = 28
HEADER_H = 18
LEGEND_H = 72
BACKGROUND = "#ffffff"
LEVEL_KEY = (("solid", "mapped 2M"), ("border", "mapped 1G"), ("pale", "mapped 4K"),
             ("outline", "resident, not mapped"))
INK = "#222222"


def _geometry(snap: MapSnapshot) -> tuple[int, int, list[tuple[str, int, list[tuple[int, int, Cell]]]]]:
    """Image size and, per region, its header y and the cells with their x, y."""
    width = MARGIN * 2 + COLUMNS * (CELL + GAP)
    y = MARGIN + TITLE_H
    blocks = []
    for reg in region_rows(snap):
        header_y = y
        y += HEADER_H
        placed = []
        for row in reg.rows:
            for i, c in enumerate(row):
                placed.append((MARGIN + i * (CELL + GAP), y, c))
            y += CELL + GAP
        blocks.append((f"{reg.name}  {reg.gpa:#x}  {fmt_size(reg.size)}", header_y, placed))
        y += GAP * 3
    height = y + LEGEND_H + MARGIN
    return width, height, blocks


def _inner(c: Cell) -> str:
    """How the level is drawn: "solid", "border" (1G), "pale" (4K) or "outline" (not mapped)."""
    if c.kind == "unallocated" or c.level in (None, "2M"):
        return "solid"
    return {"1G": "border", "4K": "pale", "-": "outline"}[c.level]


def _pale(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return "#{:02x}{:02x}{:02x}".format(*(v + (255 - v) * 3 // 5 for v in (r, g, b)))


def _footer(snap: MapSnapshot) -> str:
    t = snap.totals()
    lv = "" if snap.levels_known else "; mapping levels not visible on this backend"
    return (f"one cell = {fmt_size(snap.cell_size)}; resident private "
            f"{fmt_size(t['private_resident'] * 4096)}, shared {fmt_size(t['shared_resident'] * 4096)}, "
            f"double-backed {fmt_size(t['double'] * 4096)}{lv}")


def render_png(snap: MapSnapshot) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    width, height, blocks = _geometry(snap)
    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((MARGIN, MARGIN), snap.title or "guest physical memory", fill=INK, font=font)
    for header, hy, placed in blocks:
        d.text((MARGIN, hy + 2), header, fill=INK, font=font)
        for x, y, c in placed:
            colour = KIND_COLOURS[c.kind]
            box = (x, y, x + CELL - 1, y + CELL - 1)
            style = _inner(c)
            if style == "outline":
                d.rectangle(box, outline=colour, width=2)
                continue
            d.rectangle(box, fill=colour)
            if style == "pale":
                d.rectangle((x + 3, y + 3, x + CELL - 4, y + CELL - 4), fill=_pale(colour))
            elif style == "border":
                d.rectangle(box, outline=INK, width=1)
    ly = height - LEGEND_H - MARGIN + 8
    x = MARGIN
    for kind, colour in KIND_COLOURS.items():
        d.rectangle((x, ly, x + CELL - 1, ly + CELL - 1), fill=colour)
        label = KIND_LABELS[kind]
        d.text((x + CELL + 4, ly), label, fill=INK, font=font)
        x += CELL + 14 + int(d.textlength(label, font=font))
    if snap.levels_known:
        x = MARGIN
        sample = KIND_COLOURS["private"]
        for style, label in LEVEL_KEY:
            box = (x, ly + 20, x + CELL - 1, ly + 20 + CELL - 1)
            if style == "outline":
                d.rectangle(box, outline=sample, width=2)
            else:
                d.rectangle(box, fill=sample)
                if style == "pale":
                    d.rectangle((x + 3, ly + 23, x + CELL - 4, ly + 20 + CELL - 4), fill=_pale(sample))
                elif style == "border":
                    d.rectangle(box, outline=INK, width=1)
            d.text((x + CELL + 4, ly + 20), label, fill=INK, font=font)
            x += CELL + 14 + int(d.textlength(label, font=font))
    d.text((MARGIN, ly + 42), _footer(snap), fill=INK, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_svg(snap: MapSnapshot) -> str:
    width, height, blocks = _geometry(snap)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="{BACKGROUND}"/>',
           f'<text x="{MARGIN}" y="{MARGIN + 11}" fill="{INK}" font-size="13">'
           f'{escape(snap.title or "guest physical memory")}</text>']
    for header, hy, placed in blocks:
        out.append(f'<text x="{MARGIN}" y="{hy + 13}" fill="{INK}">{escape(header)}</text>')
        for x, y, c in placed:
            colour = KIND_COLOURS[c.kind]
            style = _inner(c)
            tip = f"<title>{escape(describe_cell(c))}</title>"
            cls = f'class="cell {c.kind}" data-level="{c.level or "unknown"}"'
            if style == "outline":
                out.append(f'<rect {cls} x="{x + 1}" y="{y + 1}" width="{CELL - 2}" height="{CELL - 2}" '
                           f'fill="none" stroke="{colour}" stroke-width="2">{tip}</rect>')
                continue
            stroke = f' stroke="{INK}" stroke-width="1"' if style == "border" else ""
            out.append(f'<rect {cls} x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{colour}"{stroke}>'
                       f"{tip}</rect>")
            if style == "pale":
                out.append(f'<rect x="{x + 3}" y="{y + 3}" width="{CELL - 6}" height="{CELL - 6}" '
                           f'fill="{_pale(colour)}" pointer-events="none"/>')
    ly = height - LEGEND_H - MARGIN + 8
    x = MARGIN
    for kind, colour in KIND_COLOURS.items():
        label = KIND_LABELS[kind]
        out.append(f'<rect x="{x}" y="{ly}" width="{CELL}" height="{CELL}" fill="{colour}"/>')
        out.append(f'<text x="{x + CELL + 4}" y="{ly + 10}" fill="{INK}">{escape(label)}</text>')
        x += CELL + 14 + 7 * len(label)
    if snap.levels_known:
        x = MARGIN
        sample = KIND_COLOURS["private"]
        for style, label in LEVEL_KEY:
            if style == "outline":
                out.append(f'<rect x="{x + 1}" y="{ly + 21}" width="{CELL - 2}" height="{CELL - 2}" '
                           f'fill="none" stroke="{sample}" stroke-width="2"/>')
            else:
                stroke = f' stroke="{INK}" stroke-width="1"' if style == "border" else ""
                out.append(f'<rect x="{x}" y="{ly + 20}" width="{CELL}" height="{CELL}" '
                           f'fill="{sample}"{stroke}/>')
                if style == "pale":
                    out.append(f'<rect x="{x + 3}" y="{ly + 23}" width="{CELL - 6}" height="{CELL - 6}" '
                               f'fill="{_pale(sample)}"/>')
            out.append(f'<text x="{x + CELL + 4}" y="{ly + 30}" fill="{INK}">{escape(label)}</text>')
            x += CELL + 14 + 7 * len(label)
    out.append(f'<text x="{MARGIN}" y="{ly + 52}" fill="{INK}">{escape(_footer(snap))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

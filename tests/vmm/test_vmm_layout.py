"""The guest physical layout: region lookup, request splitting across regions and holes, the
RAM-offset view scenarios use, and refusing layouts that cannot exist."""

from __future__ import annotations

import pytest

from guestmem.vmm.layout import Layout, LayoutError, Piece, RegionSpec

M = 1 << 20
G = 1 << 30


def pc_layout() -> Layout:
    return Layout([RegionSpec("high", 4 * G, 64 * M), RegionSpec("low", 0, 16 * M)])


def test_regions_sorted_and_found() -> None:
    lay = pc_layout()
    assert [r.name for r in lay] == ["low", "high"]
    assert lay.region_at(0) == 0 and lay.region_at(16 * M - 1) == 0
    assert lay.region_at(16 * M) is None and lay.region_at(3 * G) is None
    assert lay.region_at(4 * G) == 1 and lay.region_at(4 * G + 64 * M) is None
    assert lay.ram_bytes == 80 * M


def test_split_across_hole_and_regions() -> None:
    lay = pc_layout()
    pieces = lay.split(8 * M, 4 * G - 8 * M + 2 * M)
    assert pieces == [Piece(8 * M, 8 * M, 0), Piece(16 * M, 4 * G - 16 * M, None), Piece(4 * G, 2 * M, 1)]
    assert sum(p.size for p in pieces) == 4 * G - 6 * M


def test_split_between_touching_regions() -> None:
    lay = Layout([RegionSpec("a", 4 * G, 2 * M), RegionSpec("b", 4 * G + 2 * M, 2 * M)])
    assert lay.split(4 * G + M, 2 * M) == [Piece(4 * G + M, M, 0), Piece(4 * G + 2 * M, M, 1)]
    # The RAM-offset view merges regions that touch into one GPA piece.
    assert lay.ram_to_gpa(M, 2 * M) == [(4 * G + M, 2 * M)]


def test_ram_offsets_skip_holes() -> None:
    lay = pc_layout()
    assert lay.ram_to_gpa(12 * M, 8 * M) == [(12 * M, 4 * M), (4 * G, 4 * M)]
    with pytest.raises(ValueError):
        lay.ram_to_gpa(70 * M, 20 * M)


@pytest.mark.parametrize("regions, match", [
    ([], "at least one"),
    ([RegionSpec("a", 0, 3 * M + 1)], "aligned"),
    ([RegionSpec("a", 0, 4 * M), RegionSpec("b", 2 * M, 4 * M)], "overlap"),
    ([RegionSpec("a", 0, 4 * M), RegionSpec("a", 8 * M, 4 * M)], "twice"),
])
def test_impossible_layouts(regions: list[RegionSpec], match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        Layout(regions)

"""``guestmem compare``: the same guest under every design sees the same thing, the numbers that tell
the designs apart come out as the seeds say they should, and the command's output and errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from guestmem.compare import cmd_compare, main, register, run_compare, transition_lines
from guestmem.model.designs.harness import DESIGNS, REPLY_DESIGN
from guestmem.model.designs.workloads import PHASES, run

RAM = 18 << 20  # the smallest guest every workload fits in
REQUIRED = ("design", "peak_frames", "final_frames", "invalidations", "conversions", "zaps",
            "hugepage_mappings", "directmap_splits", "directmap_restores", "wall_s")
KEYS = ["memfile_notifier", "inaccessible_memfd", "restrictedmem", "guest_memfd", "in_place"]


@pytest.mark.parametrize("flavour", ["snp", "sw"])
@pytest.mark.parametrize("workload", list(PHASES))
def test_the_guest_sees_the_same_under_every_design(workload: str, flavour: str) -> None:
    seen = set()
    for design in (*DESIGNS, REPLY_DESIGN):
        result = run(design, workload, ram=RAM, flavour=flavour, check_steps=True)
        assert result.trace[-2] == ("halt",), (design.key, result.trace[-3:])
        assert not any(t[0] == "guestassert" for t in result.trace)
        assert result.metrics["device_errors"] == 0
        seen.add((result.digest, tuple(result.trace)))
    assert len(seen) == 1


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, Any]]:
    return {r["design"]: r for r in run_compare("all", ram=RAM, reply=True)}


def test_one_object_per_design_with_the_required_keys() -> None:
    out = run_compare("boot", ram=RAM, flavour="sw")
    assert [r["design"] for r in out] == KEYS
    for r in out:
        assert all(k in r for k in REQUIRED)
        assert json.loads(json.dumps(r)) == r


def test_double_allocation(rows: dict[str, dict[str, Any]]) -> None:
    # In place there is one copy; the others copy the launch image and keep a staging copy meanwhile.
    assert rows["in_place"]["double_frames_peak"] == 0
    for key in KEYS[:4]:
        assert rows[key]["double_frames_peak"] >= 512
    # The device's late writes land behind private pages, except where F_SEAL_AUTO_ALLOCATE (v7) or
    # the single copy (in place) refuses them.
    rounds = 8
    for key in ("memfile_notifier", "in_place"):
        assert rows[key]["double_frames_final"] == 0 and rows[key]["stray_writes_refused"] == rounds
    for key in ("inaccessible_memfd", "restrictedmem", "guest_memfd"):
        extra = rows[key]["final_frames"] - rows["in_place"]["final_frames"]
        assert extra == rows[key]["double_frames_final"] > 0  # every extra frame is a second copy
        assert rows[key]["stray_write_frames"] >= extra


def test_invalidation_granularity(rows: dict[str, dict[str, Any]]) -> None:
    v7, v9, folio = (rows[k]["invalidations"]
                     for k in ("memfile_notifier", "restrictedmem", "restrictedmem_folio"))
    assert v7 > 3 * v9  # per folio (per page once split) against per fallocate
    assert folio == v7
    assert rows["inaccessible_memfd"]["invalidations"] == v9 == rows["guest_memfd"]["invalidations"]


def test_only_v8_frees_pages_while_they_are_mapped(rows: dict[str, dict[str, Any]]) -> None:
    assert rows["inaccessible_memfd"]["stale_pages"] >= 512
    assert all(r["stale_pages"] == 0 for k, r in rows.items() if k != "inaccessible_memfd")


def test_direct_map_restores_need_the_folio_order(rows: dict[str, dict[str, Any]]) -> None:
    for key in ("memfile_notifier", "inaccessible_memfd", "restrictedmem"):
        assert rows[key]["directmap_restores"] == 0
    for key in ("restrictedmem_folio", "guest_memfd", "in_place"):
        assert rows[key]["directmap_restores"] > 0
    assert all(r["directmap_splits"] > 0 for r in rows.values())


def test_in_place_keeps_more_hugepages(rows: dict[str, dict[str, Any]]) -> None:
    assert rows["in_place"]["hugepage_mappings"] > rows["guest_memfd"]["hugepage_mappings"]
    assert len({r["conversions"] for r in rows.values()}) == 1  # the same guest requests everywhere


def test_transition_lines_name_the_measured_change(rows: dict[str, dict[str, Any]]) -> None:
    ordered = [rows[k] for k in ("inaccessible_memfd", "restrictedmem")]
    (pair, text), = transition_lines(ordered)
    assert pair == "v8 inaccessible -> v9 restricted"
    assert text.startswith("invalidate before the pages are freed. stale ")


def test_cli_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "compare.png"
    assert main(["boot", "--ram", "18", "--flavour", "sw", "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["design"] for r in out] == KEYS
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 600


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot", "--ram", "18", "--flavour", "sw"]) == 0
    err = capsys.readouterr()
    text = err.out + err.err
    for label in ("v7 memfile", "v8 inaccessible", "v9 restricted", "v14 guest_memfd", "in-place",
                  "What each row is", "Why upstream moved on"):
        assert label in text


BAD_ARGS = [["nope"], ["--ram", "7"], ["--ram", "x"], ["--ram", "17"], ["--rounds", "0"],
            ["--flavour", "tdx"], ["--png", "/nonexistent/dir/out.png"]]


@pytest.mark.parametrize("argv", BAD_ARGS)
def test_bad_input_is_one_line_and_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_register_adds_the_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="guestmem")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["compare", "balloon", "--reply", "--ram", "20"])
    assert args.func is cmd_compare and args.workload == "balloon" and args.reply and args.ram == 20
    assert parser.parse_args(["compare"]).workload == "all"


def test_run_compare_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        run_compare("nope")
    with pytest.raises(ValueError):
        run_compare("boot", flavour="tdx")
    with pytest.raises(ValueError):
        run_compare("boot", ram=17 << 20)

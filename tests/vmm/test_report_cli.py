"""``guestmem run`` / ``guestmem map`` as a user meets them: exit codes (0 pass, 1 fail, 2 bad
input, 3 the backend cannot), one error line naming file/line/field, JSON on stdout, and output
files that are complete or absent."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from guestmem.cli import _Parser
from guestmem.report.commands import register


def guestmem(argv: list[str]) -> int:
    """The commands as ``guestmem`` builds them: values are checked as argparse reads them, and a
    parse error is one line and exit 2 (as in :mod:`guestmem.cli`)."""
    parser = _Parser(prog="guestmem")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    register(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    console = Console(stderr=bool(getattr(args, "json", False)), width=120, color_system=None)
    return int(args.func(args, console))


FAILING = """\
[scenario]
name = "fails"
description = "the guest reads back something else"
memory = "4M"

[[phase]]
[[phase.step]]
op = "write"
range = "ram"
pattern = 0x11

[[phase.step]]
op = "verify"
range = "ram"
pattern = 0x12
"""


def test_run_json_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    argv = ["run", "bounce-io", "--json", "--vcpus", "1", "--memory", "8M", "--trace", str(trace)]
    assert guestmem(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("scenario", "backend", "ok", "exits", "conversions", "frames_peak", "wall_s"):
        assert key in out, key
    assert out["scenario"] == "bounce-io" and out["backend"] == "model" and out["ok"] is True
    assert out["vcpus"] == 1 and out["memory"] == 8 << 20 and out["conversions"] > 0
    doc = json.loads(trace.read_text())
    assert len(doc["traceEvents"]) == out["trace_events"] + 1 + 2 * 2  # + process and 2 threads' metadata


def test_run_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert guestmem(["run", "boot", "--memory", "32M"]) == 0
    text = capsys.readouterr().out
    assert "guestmem run boot" in text and "OK" in text and "memory bound" in text and "held" in text


def test_map_writes_images(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png, svg = tmp_path / "m.png", tmp_path / "m.svg"
    assert guestmem(["map", "selftest-conversions", "--png", str(png), "--svg", str(svg), "--before"]) == 0
    text = capsys.readouterr().out
    assert "selftest-conversions: before" in text and "selftest-conversions: after" in text
    assert Image.open(io.BytesIO(png.read_bytes())).format == "PNG"
    assert ET.fromstring(svg.read_bytes()).tag == "{http://www.w3.org/2000/svg}svg"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary files left"


def test_map_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert guestmem(["map", "balloon", "--json", "--memory", "8M"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["map"]["cell_size"] == 2 << 20 and len(out["map"]["cells"]) == 4


def test_a_failing_scenario_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "fails.toml"
    path.write_text(FAILING)
    assert guestmem(["run", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "expected 0x12, found 0x11" in out["error"]


@pytest.mark.parametrize("argv, words", [
    (["run", "boot", "--memory", "3K"], "--memory: 3K is impossible"),
    (["run", "boot", "--memory", "lots"], "--memory: 'lots'"),
    (["run", "boot", "--flavour", "sev"], "unknown flavour 'sev'"),
    (["run", "boot", "--flavour", "default"], "--flavour: scenario 'boot' is written for"),
    (["run", "boot", "--backend", "qemu"], "--backend: unknown backend 'qemu'"),
    (["run", "no-such-scenario"], "unknown scenario 'no-such-scenario'"),
    (["run", "boot", "--vcpus", "999"], "--vcpus: must be 1..256"),
])
def test_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                         words: str) -> None:
    assert guestmem(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("guestmem run: error: ") and words in err


def test_malformed_file_names_file_line_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(FAILING.replace("pattern = 0x12", "pattern = 0x112"))
    trace, png = tmp_path / "t.json", tmp_path / "m.png"
    assert guestmem(["run", str(path), "--trace", str(trace)]) == 2
    assert guestmem(["map", str(path), "--png", str(png)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (f"guestmem run: error: {path}:15: phase[1].step[2].pattern: a pattern must be a byte "
                        "(0..255), got 274")
    assert lines[1].startswith("guestmem map: error: ")
    assert not trace.exists() and not png.exists(), "nothing is written for bad input"


def test_unwritable_output_is_refused_before_the_run(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    assert guestmem(["run", "boot", "--trace", str(tmp_path / "missing" / "t.json")]) == 2
    assert guestmem(["map", "boot", "--png", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "is a directory" in err


def test_a_backend_that_cannot_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    """selftest-conversions needs a software-protected VM; without one (this host's kernel, or no
    kernel backend at all) the error names what is missing."""
    code = guestmem(["run", "selftest-conversions", "--backend", "kernel"])
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("this host's kernel runs software-protected VMs")
    assert code == 3 and err.count("\n") == 1
    assert "selftest-conversions cannot run on the kernel backend" in err
    assert "KVM_X86_SW_PROTECTED_VM" in err or "kernel backend" in err


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    names = ("balloon", "boot", "bounce-io", "c-guest-snp", "c-guest-tdx", "conversion-storm",
             "inplace-hugepage", "selftest-conversions", "snp-lazy-4g")
    assert guestmem(["run", "--list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in names)
    assert guestmem(["run", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == list(names) and all(e["description"] for e in listed)


def test_showcase() -> None:
    from guestmem.report.commands import run_showcase

    console = Console(record=True, width=120, color_system=None)
    result = run_showcase(console)
    text = console.export_text()
    assert result["ok"] is True, result
    assert result["model"]["scenario"] == "boot" and result["model"]["ok"]
    kernel = result["kernel"]
    assert "skipped" in kernel or (kernel["backend"] == "kernel" and kernel["ok"])
    assert "boot: before" in text and "boot: after" in text and "guestmem run --list" in text

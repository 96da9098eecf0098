"""The command line a Python user expects: --version, python -m guestmem, --device after the
subcommand too, one vocabulary (--flavour names, --memory SIZE) across subcommands, and --json
that prints JSON on stdout even when the command fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import guestmem
from guestmem.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"guestmem {guestmem.__version__}"


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "guestmem", "--version"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == f"guestmem {guestmem.__version__}"


def test_device_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "boot", "--device", "/nonexistent"]) == 2
    assert "/nonexistent" in capsys.readouterr().err


def test_compare_takes_memory_and_flavour_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "boot", "--memory", "18M", "--flavour", "sw-protected", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 5  # v7, v8, v9, guest_memfd, in-place
    assert main(["compare", "boot", "--memory", "17M"]) == 2
    assert main(["compare", "boot", "--flavour", "tdx"]) == 2


def test_demo_memory_must_be_whole_4m(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--memory", "5M"]) == 2
    assert "multiple of 4M" in capsys.readouterr().err


def test_json_on_failure_is_still_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "inplace-hugepage", "--json", "--model", "attributes=vm"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["exit_status"] == 2 and "attributes" in out["error"]

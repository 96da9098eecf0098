"""Every hostile ``guestmem`` command line in :mod:`hostile_corpus` exits 2 with one stderr line.

Cases that cannot hang or allocate run in-process through ``guestmem.cli.main``.  The ones that
could (FIFOs, ``/dev/zero``, TOML nested 100 000 deep, a 64 MiB file, ``--memory 1T``,
``--timeout inf``, a benchmark writing into a missing directory) run in forked children of one
helper process, each under ``alarm`` and a 3 GiB address-space cap, so a regression shows up as a
failed case (``hang`` / ``memory``), not as a stuck or swapping test run.  The memory guard's
run-time half (the resident bound crossed during a run) is tested at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hostile_corpus as hc
import pytest

from guestmem.cli import main

ROOT = Path(__file__).resolve().parents[2]
CASE_TIMEOUT_S = 20
AS_LIMIT = 3 << 30
INPROC = [c for c in hc.cases() if not c.subprocess]
FORKED = [c for c in hc.cases() if c.subprocess]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    p = hc.make_fixtures(tmp_path_factory.mktemp("hostile"))
    yield p
    Path(p["readonly_dir"]).chmod(0o755)
    if "unreadable" in p:
        Path(p["unreadable"]).chmod(0o644)


@pytest.mark.parametrize("case", INPROC, ids=[c.id for c in INPROC])
def test_in_process(case: hc.Case, paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(hc.expand(case.argv, paths))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("guestmem"), err


@pytest.fixture(scope="module")
def forked(paths: dict[str, str]) -> dict[str, dict[str, object]]:
    """All the risky cases, each in its own forked child of one helper process."""
    argvs = [hc.expand(c.argv, paths) for c in FORKED]
    cmd = [sys.executable, str(Path(hc.__file__)), "--batch", str(CASE_TIMEOUT_S), str(AS_LIMIT)]
    proc = subprocess.run(cmd, input=json.dumps(argvs).encode(), capture_output=True, cwd=ROOT,
                          timeout=CASE_TIMEOUT_S * len(argvs) + 60, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = json.loads(proc.stdout)
    return {c.id: r for c, r in zip(FORKED, results, strict=True)}


@pytest.mark.parametrize("case", FORKED, ids=[c.id for c in FORKED])
def test_forked(case: hc.Case, forked: dict[str, dict[str, object]]) -> None:
    r = forked[case.id]
    err = r["err_lines"]
    assert r["rc"] is not None, f"hung: killed after {CASE_TIMEOUT_S} s"
    assert r["rc"] == 2, err
    assert isinstance(err, list) and len(err) == 1, err
    assert int(r["max_rss_kib"]) < 3 << 20  # type: ignore[call-overload]


def test_memory_guard_names_the_override(capsys: pytest.CaptureFixture[str]) -> None:
    """Refused up front because the estimate passes the bound given; the line says how to allow it."""
    assert main(["run", "boot", "--memory", "1G", "--max-resident", "256M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-resident SIZE" in err[0] and "256 MiB" in err[0]


def test_resident_bound_stops_a_run_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The run-time half: the up-front estimate is made to pass (as if it were wrong), the bound is
    already crossed, so the run stops at the first check: exit 1, one line, no trace file written."""
    import guestmem.cliargs as cliargs
    from guestmem.vmm.accounting import process_resident_bytes

    monkeypatch.setattr(cliargs, "check_fits", lambda *a, **k: None)
    limit = max(16 << 20, process_resident_bytes() // 2)
    trace = tmp_path / "t.json"
    rc = main(["run", "balloon", "--memory", "8M", "--max-resident", str(limit), "--trace", str(trace)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert len(err) == 1 and "resident" in err[0] and "--max-resident" in err[0], err
    assert list(tmp_path.iterdir()) == [], "nothing written, not even a temporary file"


def test_within_the_bound_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """A generous bound changes nothing: the run passes."""
    assert main(["run", "balloon", "--memory", "8M", "--max-resident", "64G", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

"""The README's example runs as written on the model, and type-checks with ``mypy --strict``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    match = re.search(r"## What you can do with it\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "the README lost its example"
    return match.group(1)


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ExitHypercall(nr=KVM_HC_MAP_GPA_RANGE, gpa=0x100000000, npages=16, attrs=ENCRYPTED" in out
    assert "ExitHalt" in out


def test_readme_example_type_checks(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    src = tmp_path / "readme_example.py"
    src.write_text(_example())
    repo = str(README.parent)
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                          "--no-incremental", str(src)], capture_output=True, text=True, timeout=600,
                         env={"MYPYPATH": repo, "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


EXAMPLE = README.parent / "docs" / "examples" / "snp_bounce_buffer.py"


def test_snp_bounce_buffer_example_runs_and_type_checks(tmp_path: Path) -> None:
    """docs/examples/snp_bounce_buffer.py: an SNP-like bounce-buffer program written against the
    public API only — it runs, and mypy --strict accepts it."""
    env = {"PYTHONPATH": str(README.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300,
                         env=env, check=True)
    assert "conversion refused while pinned" in out.stdout and "done after" in out.stdout
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                          "--no-incremental", str(EXAMPLE)], capture_output=True, text=True, timeout=600,
                         env={"MYPYPATH": str(README.parent), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr

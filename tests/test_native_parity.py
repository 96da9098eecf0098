"""The compiled accelerators change nothing but time: the same workloads, run once with them and
once with ``GUESTMEM_PURE=1`` (the Python reference paths), end in identical complete state.

Each run is a subprocess of ``tests/native_parity_run.py`` (the switch is read at import time),
which prints the whole-system snapshot, every statistics counter and every exit as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guestmem import native

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "native_parity_run.py"


def _run(pure: bool) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GUESTMEM_PURE", None)
    if pure:
        env["GUESTMEM_PURE"] = "1"
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _differences(a: Any, b: Any, path: str, out: list[str]) -> None:
    if a == b or len(out) >= 10:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _differences(a.get(k), b.get(k), f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _differences(x, y, f"{path}[{i}]", out)
    else:
        out.append(f"{path}: compiled {str(a)[:200]!r} vs python {str(b)[:200]!r}")


def test_compiled_and_python_paths_end_in_the_same_state() -> None:
    compiled = _run(pure=False)
    impl = compiled["implementations"]
    if not any(v == "c-extension" for v in impl.values()):
        pytest.skip(f"no compiled accelerator is built here ({impl}): nothing to compare")
    python = _run(pure=True)
    assert all(v.startswith("python") for v in python["implementations"].values())
    assert sorted(compiled["runs"]) == sorted(python["runs"])
    diffs: list[str] = []
    _differences(compiled["runs"], python["runs"], "", diffs)
    assert not diffs, "\n".join(diffs)


def test_the_switch_is_read_and_reported() -> None:
    """GUESTMEM_PURE=1 really turns every accelerator off (so the comparison above means something)."""
    code = "import guestmem.ranges, guestmem.native as n; print(n.PURE, n.implementations())"
    env = dict(os.environ, GUESTMEM_PURE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True") and "c-extension" not in out.stdout
    assert native.PURE is (os.environ.get("GUESTMEM_PURE", "") not in ("", "0"))

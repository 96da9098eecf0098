"""Output files get the mode a plain ``open()`` would give them: 0666 less the umask for a new file,
the old mode for a replaced one (``mkstemp`` alone leaves 0600, unreadable to the colleague the
report was made for)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestmem.report.atomic import current_umask, write_bytes, write_text


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_new_file_follows_the_umask(tmp_path: Path, umask: None) -> None:
    assert current_umask() == 0o022
    assert _mode(write_text(tmp_path / "a.html", "x")) == 0o644
    os.umask(0o077)
    assert _mode(write_bytes(tmp_path / "b.png", b"x")) == 0o600
    os.umask(0o002)
    assert _mode(write_bytes(tmp_path / "c.svg", b"x")) == 0o664


def test_replaced_file_keeps_its_mode(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "r.pdf"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"

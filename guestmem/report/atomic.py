"""Write output files all at once or not at all.

A report file that exists must be complete: a half-written PNG or trace is worse than none (a
viewer shows garbage, a script parses half a JSON).  Data goes to a temporary file in the same
directory, is flushed to disk, and is renamed over the target in one step; on any failure the
temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class OutputError(OSError):
    """An output path that cannot be written (checked before a run starts, where possible)."""


def check_writable(path: str | Path) -> Path:
    """Fail early (before a long run) if ``path`` cannot be created.  An existing target must be a
    regular file: the atomic rename would otherwise replace a device node (``/dev/full``), FIFO or
    socket with a plain file -- as root, silently breaking the host."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"{p}: is a directory")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"{p}: {exc.strerror}") from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{p}: exists and is not a regular file; name a new or regular file")
    if not parent.is_dir():
        raise OutputError(f"{p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{p}: directory {parent} is not writable")
    return p


def write_bytes(path: str | Path, data: bytes) -> Path:
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))

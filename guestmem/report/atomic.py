"""Write output files all at once or not at all.

A report file that exists must be complete: a half-written PNG or trace is worse than none (a
viewer shows garbage, a script parses half a JSON).  Data goes to a temporary file in the same
directory, is flushed to disk, and is renamed over the target in one step; on any failure the
temporary file is removed and the target is untouched.

The temporary file is created private (``mkstemp`` makes it 0600) and given, before the rename, the
mode any other tool would have given it: an existing target keeps its own mode, a new file gets
0666 less the user's umask -- a report meant to be shared must not come out unreadable to others.
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


def current_umask() -> int:
    """The process's umask.  Read from ``/proc/self/status`` where the kernel shows it (Linux 4.7+),
    because the only other way, setting it and setting it back, races with threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(p: Path) -> int:
    """The permission bits the written file should end with (see the module docstring)."""
    try:
        st = os.stat(p)
    except OSError:
        return 0o666 & ~current_umask()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~current_umask()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with the mode a plain ``open()`` would give it."""
    p = check_writable(path)
    mode = _target_mode(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
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
    """:func:`write_bytes` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"))

"""The two libc calls the frame pool needs that :mod:`os` does not expose: ``fallocate(2)`` with a mode.

Punching a hole (``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``) in the pool's memfd is what gives
freed frames back to the host, so resident memory really drops.  The same wrapper lets the tests ask
the running kernel what tmpfs answers for a given ``fallocate`` call, the ground truth for
:mod:`guestmem.model.mm.shmem`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from guestmem import uapi as u

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(fd, mode, offset, length)``; raises :class:`OSError` with the kernel's errno."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the backing pages of ``[offset, offset + length)``; the range then reads as zeros."""
    fallocate(fd, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, offset, length)

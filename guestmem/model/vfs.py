"""The VFS checks that run before any filesystem's own ``fallocate`` (fs/open.c ``vfs_fallocate``).

Shared by every file the model implements, so the first failing check decides the errno exactly
as on the real kernel: bad offset/length (EINVAL), unknown or contradictory modes (EOPNOTSUPP), a
range past the filesystem's maximum file size or wrapping through zero (EFBIG).
"""

from __future__ import annotations

import errno

from guestmem import uapi as u
from guestmem.errors import KvmError

MAX_LFS_FILESIZE = (1 << 63) - 1

FALLOC_FL_MODE_MASK = (
    u.FALLOC_FL_PUNCH_HOLE
    | u.FALLOC_FL_COLLAPSE_RANGE
    | u.FALLOC_FL_ZERO_RANGE
    | u.FALLOC_FL_INSERT_RANGE
    | u.FALLOC_FL_UNSHARE_RANGE
    | u.FALLOC_FL_WRITE_ZEROES
)


def vfs_fallocate_checks(mode: int, offset: int, length: int, maxbytes: int = MAX_LFS_FILESIZE) -> None:
    """Raise the errno ``vfs_fallocate`` returns before calling the filesystem, or return."""
    op = "fallocate"
    if offset < 0 or length <= 0:
        raise KvmError(errno.EINVAL, op, "offset < 0 or length <= 0")
    if mode & ~(FALLOC_FL_MODE_MASK | u.FALLOC_FL_KEEP_SIZE):
        raise KvmError(errno.EOPNOTSUPP, op, f"unknown mode bits {mode:#x}")
    kind = mode & FALLOC_FL_MODE_MASK
    if kind in (0, u.FALLOC_FL_UNSHARE_RANGE, u.FALLOC_FL_ZERO_RANGE):
        pass
    elif kind == u.FALLOC_FL_PUNCH_HOLE:
        if not mode & u.FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, op, "PUNCH_HOLE requires KEEP_SIZE")
    elif kind in (u.FALLOC_FL_COLLAPSE_RANGE, u.FALLOC_FL_INSERT_RANGE, u.FALLOC_FL_WRITE_ZEROES):
        if mode & u.FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, op, "mode incompatible with KEEP_SIZE")
    else:
        raise KvmError(errno.EOPNOTSUPP, op, f"modes are exclusive ({mode:#x})")
    end = offset + length
    if end > maxbytes or end >= 1 << 63:
        raise KvmError(errno.EFBIG, op, "offset + length beyond the maximum file size")

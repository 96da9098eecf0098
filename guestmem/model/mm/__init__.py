"""The model's host memory management (floor 3): frames, page caches, shmem files, notifiers.

Everything below KVM in the model's data path lives here: ``FramePool`` (physical frames over one
sparse memfd, so resident memory is real and measurable), ``PageCache`` (a file's index -> frame map,
held as ranges), ``ShmemFile`` (a tmpfs-like file with tmpfs's own rules, the store behind anonymous
memory, memfds and guest_memfd) and the notifier contract through which a file tells its users that
pages are going away.  Nothing here imports from ``guestmem.model.kvm``.
"""

from guestmem.model.mm.frames import DEFAULT_CAPACITY_BYTES, DEFAULT_CHUNK_BYTES, FramePool
from guestmem.model.mm.notifier import FolioNotifier, RangeNotifier, RecordingNotifier
from guestmem.model.mm.pagecache import MAX_INDEX, PageCache, zip_segments
from guestmem.model.mm.shmem import (
    F_SEAL_EXEC,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    MAX_LFS_FILESIZE,
    ShmemFile,
)
from guestmem.model.mm.stats import CacheStats, FileStats, FrameStats

__all__ = [
    "DEFAULT_CAPACITY_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "F_SEAL_EXEC",
    "F_SEAL_FUTURE_WRITE",
    "F_SEAL_GROW",
    "F_SEAL_SEAL",
    "F_SEAL_SHRINK",
    "F_SEAL_WRITE",
    "MAX_INDEX",
    "MAX_LFS_FILESIZE",
    "CacheStats",
    "FileStats",
    "FolioNotifier",
    "FramePool",
    "FrameStats",
    "PageCache",
    "RangeNotifier",
    "RecordingNotifier",
    "ShmemFile",
    "zip_segments",
]

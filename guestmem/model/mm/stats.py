"""Counters of the host-memory layer: what was allocated, freed, zeroed, split, and invalidated.

They exist so that higher layers, tests and ``guestmem bench`` can check accounting invariants
("frames are conserved", "a page is zeroed at most once", "folio-granular invalidation issues one
call per folio") without reaching into allocator internals.  Each owner keeps one mutable instance
and hands out copies (:meth:`snapshot`), so a reader never sees a counter move under it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Self


@dataclass
class _Counters:
    def snapshot(self) -> Self:
        return dataclasses.replace(self)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class FrameStats(_Counters):
    """:class:`~guestmem.model.mm.frames.FramePool` accounting, in frames (4 KiB pages)."""

    allocated: int = 0  # frames currently allocated
    peak_allocated: int = 0  # high-water mark of ``allocated``
    alloc_calls: int = 0  # successful alloc()/alloc_range() calls
    allocated_total: int = 0  # frames handed out over the pool's life
    free_calls: int = 0
    freed_total: int = 0  # frames given back over the pool's life
    punched_bytes: int = 0  # bytes returned to the host (free and zero both punch)
    alloc_failures: int = 0  # ENOMEM answers


@dataclass
class CacheStats(_Counters):
    """:class:`~guestmem.model.mm.pagecache.PageCache` accounting, in pages unless named ``*_calls``."""

    populated: int = 0  # pages added
    removed: int = 0  # pages removed (freed)
    removed_pinned: int = 0  # of those, pages that still had extra references
    zeroed: int = 0  # pages zeroed on their way to uptodate (at most once per page per life)
    splits: int = 0  # large folios split
    merges: int = 0  # large folios reassembled (in place or by migration)
    migrations: int = 0  # folios moved to new frames (contents copied)


@dataclass
class FileStats(_Counters):
    """:class:`~guestmem.model.mm.shmem.ShmemFile` accounting: notifier calls are counted per call."""

    invalidate_begin: int = 0  # notifier.invalidate_begin calls (one per notifier per event)
    invalidate_end: int = 0
    invalidate_folio: int = 0  # notifier.invalidate_folio calls (one per notifier per folio)
    fallocate_calls: int = 0  # successful fallocate() calls
    punched_pages: int = 0  # pages removed by punch hole / truncate

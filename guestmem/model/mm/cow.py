"""MAP_PRIVATE of a file: copy-on-write pages over the file's own.

A private file mapping reads the file's pages until it writes one; the first write copies that
page into memory private to the mapping (an anonymous page), and from then on the mapping sees
its copy while the file and every shared mapping keep theirs.  ``madvise(MADV_DONTNEED)`` drops
the copies (the mapping sees the file again).  A fork gives the child its own copies of the
copied pages (fork's write-protect-and-copy-later is observably a copy).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from guestmem.model.process import MappableFile

if TYPE_CHECKING:
    from guestmem.model.anon import ShmemBacking


class CowFile:
    """What a private mapping of ``base`` faults through: ``overlay`` holds the copied pages, by
    the same page index as the file."""

    def __init__(self, base: MappableFile, overlay: ShmemBacking) -> None:
        self.base = base
        self.overlay = overlay
        # Set by the mapping: run a change of what pages [s, e) map to inside MMU-notifier
        # invalidations (a secondary MMU may map the file's page read-only until the copy).
        self.notify: Callable[[int, int, Callable[[], None]], None] = lambda s, e, act: act()

    def host_fault(self, start: int, end: int, write: bool) -> list[tuple[int, int, int]]:
        cache = self.overlay.cache
        first = next(cache.lookup_range(start, end))
        s, e, pfn, _ = first
        if pfn is not None:  # already copied: the mapping's own pages
            return [(a, b, p) for a, b, p, _ in cache.lookup_range(s, e) if p is not None]
        base_runs = self.base.host_fault(s, e, False)  # SIGBUS where the file would give it
        if not write:
            return base_runs
        stop = base_runs[-1][1] if base_runs else s
        if stop <= s:
            return base_runs
        def copy() -> None:
            cache.populate(s, stop, 0)
            for a, b, src in base_runs:
                for c, d, dst, _ in cache.lookup_range(a, b):
                    if dst is not None:
                        self.overlay.pool.copy(dst, src + (c - a), d - c)
            cache.mark_uptodate(s, stop)

        self.notify(s, stop, copy)
        return [(a, b, p) for a, b, p, _ in cache.lookup_range(s, stop) if p is not None]

    def lookup_range(self, start: int, end: int) -> list[tuple[int, int, int | None, int]]:
        """What the mapping sees for [start, end): its copies, else the file's pages."""
        out: list[tuple[int, int, int | None, int]] = []
        for s, e, pfn, o in self.overlay.cache.lookup_range(start, end):
            if pfn is not None:
                out.append((s, e, pfn, o))
            else:
                out.extend(self.base.page_cache.lookup_range(s, e))  # type: ignore[attr-defined]
        return out

    def copied(self) -> int:
        """How many pages the mapping has copied (its private pages)."""
        return self.overlay.cache.nr_pages

    def drop_copies(self, start: int, end: int) -> None:
        self.notify(start, end, lambda: self.overlay.cache.remove(start, end))

    def pin_pages(self, start: int, end: int) -> Callable[[], None]:
        """Pin what the mapping sees: its copies where it has them, else the file's pages."""
        unpins: list[Callable[[], None]] = []
        for s, e, pfn, _ in self.overlay.cache.lookup_range(start, end):
            unpins.append(self.overlay.cache.pin(s, e) if pfn is not None else self.base.pin_pages(s, e))

        def unpin() -> None:
            for u in unpins:
                u()

        return unpin

    def discard_pages(self, start: int, end: int) -> None:
        self.drop_copies(start, end)

    def access_lock(self) -> AbstractContextManager[object]:
        return self.base.access_lock()

    def frame_view(self, pfn: int, npages: int) -> np.ndarray:
        return self.overlay.pool.view(pfn, npages)

    def get_file(self) -> None:
        self.base.get_file()

    def put_file(self) -> None:
        self.base.put_file()

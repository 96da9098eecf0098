"""The notifier contract: how a backing file tells its users (KVM) that pages are about to go.

This is the only way control flows back up the floors (docs/design.md): the backing store never calls
KVM; KVM registers a notifier on the file.  Two delivery modes, chosen per file
(``ShmemFile(invalidate_granularity=...)``):

* ``"range"`` (seed 001's memfile_notifier, seed 000's restrictedmem_notifier, upstream
  guest_memfd): ``invalidate_begin(start, end)`` before the pages of index range ``[start, end)``
  are removed and ``invalidate_end(start, end)`` after, always paired, over the whole range
  (holes included).
* ``"folio"`` (the reply to seed 000: pass the folio and its order, one invalidation per folio):
  ``invalidate_folio(index, order)`` once per present folio, before any of them is removed.  A large
  folio only partly inside the range is split first, so each delivered folio goes away whole; a
  receiver may, e.g., restore a 2 MiB direct map only when ``order >= 9``.

Calls are made with the file's lock held (the kernel's ``filemap_invalidate_lock``), so a receiver
may take locks below it (``mmu_lock``) but must not call back into the file.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class RangeNotifier(Protocol):
    def invalidate_begin(self, start: int, end: int) -> None: ...

    def invalidate_end(self, start: int, end: int) -> None: ...


@runtime_checkable
class FolioNotifier(Protocol):
    def invalidate_folio(self, index: int, order: int) -> None: ...


class RecordingNotifier:
    """Records every call as a tuple (``("begin", s, e)``, ``("end", s, e)``, ``("folio", i, o)``).

    For tests and traces; it accepts both delivery modes.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def invalidate_begin(self, start: int, end: int) -> None:
        self.calls.append(("begin", start, end))

    def invalidate_end(self, start: int, end: int) -> None:
        self.calls.append(("end", start, end))

    def invalidate_folio(self, index: int, order: int) -> None:
        self.calls.append(("folio", index, order))

    def clear(self) -> None:
        self.calls.clear()

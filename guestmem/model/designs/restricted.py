"""v9 (seed 000): the ``memfd_restricted(flags)`` syscall and ``restrictedmem_notifier``.

v9 moved the shim of v8 behind a syscall of its own (``flags`` must be 0 for now: EINVAL
otherwise) and replaced the after-the-fact notifier with a pair:
``invalidate_start(start, end)`` before the memfd's ``fallocate`` and ``invalidate_end(start, end)``
after it — for an allocation too, as posted — so KVM zaps and blocks faults *before* a page is
freed and lets them resume after.  KVM gets pages with ``restrictedmem_get_page(file, offset) ->
(page, order)``.  Everything else is the shim (:mod:`guestmem.model.designs.shim`).

The reply to the patch (Michael Roth) proposes passing the folio and its order instead, one
invalidation per folio, so that SEV-SNP can restore a 2 MiB direct mapping when a whole 2 MiB
folio goes.  ``memfd_restricted(..., invalidation="folio")`` is that proposal: a hole punch
delivers ``invalidate_folio(index, order)`` once per folio before it is freed (a large folio the
hole only partly covers is split first, so every folio delivered goes away whole); an allocation
still gets the start/end pair, so that the two variants differ in exactly the reply's change.
(The reply's third idea, a lazy hugetlb punch, needs hugetlbfs and is not modelled.)

As with v8, the posted code hands byte offsets to a notifier that takes page indices; the model
passes page indices, as the next revision did.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Literal, Protocol

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.shim import ShimFile

if TYPE_CHECKING:
    from guestmem.model.kvm.system import ModelKvm

PS = u.PAGE_SIZE
Invalidation = Literal["range", "folio"]


class RestrictedmemNotifier(Protocol):
    """``struct restrictedmem_notifier_ops`` (v9), plus the reply's per-folio op."""

    def invalidate_start(self, start: int, end: int) -> None: ...

    def invalidate_end(self, start: int, end: int) -> None: ...

    def invalidate_folio(self, index: int, order: int) -> None: ...


class RestrictedFile(ShimFile):
    """The "[memfd:restrictedmem]" pseudo file (``RESTRICTEDMEM_MAGIC``)."""

    kind = "restrictedmem"
    magic = hu.RESTRICTEDMEM_MAGIC

    def __init__(self, system: ModelKvm, folio_order: int = 0, invalidation: Invalidation = "range") -> None:
        if invalidation not in ("range", "folio"):
            raise ValueError(f"invalidation must be 'range' or 'folio', not {invalidation!r}")
        super().__init__(system, "memfd:restrictedmem", folio_order, invalidation)
        self.invalidation: Invalidation = invalidation
        if invalidation == "folio":
            self.shmem.add_notifier(self)  # the memfd tells the shim about each folio it frees

    def _notify(self, start: int, end: int, begin: bool) -> None:
        with self.lock:
            for n in list(self.notifiers):
                if begin:
                    n.invalidate_start(start, end)
                    self.notifier_calls += 1
                else:
                    n.invalidate_end(start, end)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        start, end = offset // PS, -(-(offset + length) // PS)
        if self.invalidation == "folio" and mode & u.FALLOC_FL_PUNCH_HOLE:
            self.shmem.fallocate(mode, offset, length)  # per-folio calls come from the memfd
            return
        self._notify(start, end, True)
        try:
            self.shmem.fallocate(mode, offset, length)
        finally:
            self._notify(start, end, False)

    # --- FolioNotifier: the memfd frees a folio (the reply's variant only) -----------------------
    def invalidate_folio(self, index: int, order: int) -> None:
        with self.lock:
            for n in list(self.notifiers):
                n.invalidate_folio(index, order)
                self.notifier_calls += 1


def memfd_restricted(system: ModelKvm, flags: int = 0, *, folio_order: int = 0,
                     invalidation: Invalidation = "range") -> RestrictedFile:
    """``memfd_restricted(2)`` (syscall 451 on x86-64 in the posting): a new restricted fd."""
    if flags:
        raise KvmError(errno.EINVAL, "memfd_restricted", f"flags must be 0 (got {flags:#x})")
    f = RestrictedFile(system, folio_order, invalidation)
    f.install()
    return f


def file_is_restrictedmem(file: object) -> bool:
    return isinstance(file, RestrictedFile)


def restrictedmem_register_notifier(file: RestrictedFile, notifier: RestrictedmemNotifier) -> None:
    file.register_notifier(notifier)


def restrictedmem_unregister_notifier(file: RestrictedFile, notifier: RestrictedmemNotifier) -> None:
    file.unregister_notifier(notifier)


def restrictedmem_get_page(file: RestrictedFile, offset: int) -> tuple[int, int]:
    """``(pfn, order)`` of the page at page index ``offset``; the caller ``put_page``s it."""
    return file.get_page(offset)


def restrictedmem_put_page(file: RestrictedFile, pfn: int) -> None:
    file.put_page(pfn)

"""v8 (seed 002): ``memfd_create(MFD_INACCESSIBLE)``, a shim over tmpfs, ``inaccessible_notifier``.

``memfd_create`` with ``MFD_INACCESSIBLE`` makes an ordinary memfd and then wraps it
(``memfd_mkinaccessible``) in a pseudo file of the "[inaccessible]" filesystem; the fd the caller
gets is the wrapper.  Its rules, checked in the syscall's order: no sealing with it
(``MFD_ALLOW_SEALING`` -> EINVAL), no hugetlb (EINVAL); the rest are the shim's
(:mod:`guestmem.model.designs.shim`).

The notifier is ``inaccessible_notifier_ops.invalidate(start, end)``, called once per
``fallocate`` — for an allocation too — and **after** the memfd's fallocate returned, i.e. after a
punched page was already freed.  Until KVM's handler runs, its SPTEs still map frames the page
cache no longer holds; the model counts those pages (``stale_pages``) at the moment the notifier
arrives.  That window is what v9's ``invalidate_start``/``invalidate_end`` closed.

KVM gets pages with ``inaccessible_get_pfn(file, offset) -> (pfn, order)`` (the page referenced
and marked up to date) and drops them with ``inaccessible_put_pfn``.  The posted patch passes the
byte offsets of the fallocate to a notifier that takes page indices; the model passes page indices,
as the fix in the next revision did.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Protocol

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.memfile import MFD_NAME_MAX_LEN
from guestmem.model.designs.shim import ShimFile

if TYPE_CHECKING:
    from guestmem.model.kvm.system import ModelKvm

PS = u.PAGE_SIZE


class InaccessibleNotifier(Protocol):
    """``struct inaccessible_notifier_ops``: one op, called after the fact."""

    def invalidate(self, start: int, end: int) -> None: ...


class InaccessibleFile(ShimFile):
    """The "[memfd:inaccessible]" pseudo file (``INACCESSIBLE_MAGIC``)."""

    kind = "inaccessible_memfd"
    magic = hu.INACCESSIBLE_MAGIC

    def __init__(self, system: ModelKvm, name: str, folio_order: int = 0) -> None:
        super().__init__(system, f"memfd:{name}", folio_order, "range")

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        start, end = offset // PS, -(-(offset + length) // PS)
        try:
            self.shmem.fallocate(mode, offset, length)
        finally:
            # inaccessible_notifier_invalidate runs whatever the memfd answered.
            with self.lock:
                for n in list(self.notifiers):
                    n.invalidate(start, end)
                    self.notifier_calls += 1


def memfd_create(system: ModelKvm, name: str, flags: int, *, folio_order: int = 0) -> InaccessibleFile:
    """``memfd_create(2)`` of a v8 kernel, for ``MFD_INACCESSIBLE`` (other memfds are the host's)."""
    op = "memfd_create"
    if flags & ~hu.MFD_ALL_FLAGS:
        raise KvmError(errno.EINVAL, op, f"unknown flags {flags:#x}")
    if not flags & hu.MFD_INACCESSIBLE:
        raise KvmError(errno.EINVAL, op, "the v8 front-end makes MFD_INACCESSIBLE memfds only "
                       "(use kvm.memfd_create for an ordinary one)")
    if flags & hu.MFD_ALLOW_SEALING:
        raise KvmError(errno.EINVAL, op, "sealing is disallowed with MFD_INACCESSIBLE")
    if flags & hu.MFD_HUGETLB:
        raise KvmError(errno.EINVAL, op, "MFD_INACCESSIBLE does not support hugetlb")
    if len(name.encode()) > MFD_NAME_MAX_LEN:
        raise KvmError(errno.EINVAL, op, "name too long")
    f = InaccessibleFile(system, name, folio_order)
    f.install()
    return f


def inaccessible_register_notifier(file: InaccessibleFile, notifier: InaccessibleNotifier) -> None:
    file.register_notifier(notifier)


def inaccessible_unregister_notifier(file: InaccessibleFile, notifier: InaccessibleNotifier) -> None:
    file.unregister_notifier(notifier)


def inaccessible_get_pfn(file: InaccessibleFile, offset: int) -> tuple[int, int]:
    """``(pfn, order)`` of the page at page index ``offset``, allocated if missing, referenced."""
    return file.get_page(offset)


def inaccessible_put_pfn(file: InaccessibleFile, pfn: int) -> None:
    file.put_page(pfn)

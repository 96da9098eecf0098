"""The host's 2 MiB direct map under SEV-SNP, with the restore rule of seed 000's reply.

Why this exists: the SNP-like flavour's :class:`~guestmem.model.kvm.arch.snp.Rmp` records which
frames a guest owns, and assigning a frame to a guest forces the 2 MiB direct mapping around it to
be split.  Seed 000's reply (Michael Roth) points out that the mapping can only be put back as
2 MiB when KVM is told that a *whole* 2 MiB folio went away: "whether or not to restore as 2MB
requires the order to be 2MB or larger, and for GPA range being invalidated to cover the entire
2MB".  A notifier that passes only an index range (v7's memfile_notifier, v8's
inaccessible_notifier, v9's restrictedmem_notifier) never gives KVM that order, so the region stays
split; an invalidation that carries the folio and its order (the reply's proposal, and guest_memfd's
``free_folio`` -> ``kvm_arch_gmem_invalidate``, one call per folio) does.

:class:`DirectMapRmp` is an ``Rmp`` with that rule: ``assign`` splits an intact region; ``reclaim``
gives frames back and restores a region only inside :func:`released_folio` with an order of at
least 9 that covers the whole aligned block.  Install it as ``kvm.rmp`` before the SNP VM is
created (the flavour picks up whatever RMP the system holds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from guestmem.model.kvm.arch.snp import REGION, Rmp
from guestmem.ranges import RangeMap

HUGE_ORDER = REGION  # 9: a 2 MiB folio


class DirectMapRmp(Rmp):
    """RMP ownership plus per-region direct-map state (``split``), restored only per whole folio."""

    def __init__(self) -> None:
        super().__init__()
        self.split: RangeMap[bool] = RangeMap(False)  # region index -> direct map split
        self._order: int | None = None  # order of the folio being released, when KVM knows it

    def assign(self, pfn: int, n: int) -> None:
        r0, r1 = pfn >> REGION, ((pfn + n - 1) >> REGION) + 1
        for s, e, was_split in list(self.split.segments(r0, r1)):
            if not was_split:
                self.directmap_splits += e - s
                self.split.set(s, e, True)
        self.assigned.set(pfn, pfn + n, True)

    def reclaim(self, pfn: int, n: int) -> None:
        if not self.assigned.any_match(pfn, pfn + n, bool):
            return
        self.assigned.set(pfn, pfn + n, False)
        if self._order is None or self._order < HUGE_ORDER:
            return  # KVM does not know a whole 2 MiB folio went: the region stays split
        size = 1 << REGION
        block = (pfn + size - 1) & ~(size - 1)
        while block + size <= pfn + n:
            r = block >> REGION
            if self.split.get(r) and not self.assigned.any_match(block, block + size, bool):
                self.split.set(r, r + 1, False)
                self.directmap_restores += 1
            block += size

    @contextmanager
    def folio(self, order: int | None) -> Iterator[None]:
        """Reclaims inside this block release whole folios of ``order`` (None = order unknown)."""
        prev, self._order = self._order, order
        try:
            yield
        finally:
            self._order = prev

    def split_regions(self) -> int:
        """Regions whose direct map is split now."""
        return self.split.count(0, 1 << 52, bool)


def released_folio(system: Any, order: int | None) -> Any:
    """Context for a release of whole folios of ``order`` on ``system`` (a no-op without SNP)."""
    rmp = getattr(system, "rmp", None)
    if isinstance(rmp, DirectMapRmp):
        return rmp.folio(order)
    return nullcontext()


def follow_gmem_folios(inode: Any) -> None:
    """Tell the RMP the order of each folio a guest_memfd gives back.

    guest_memfd calls ``kvm_arch_gmem_invalidate`` from ``free_folio`` (and, in the in-place
    series, on conversion to shared) once per folio, so KVM knows each folio's size; the model
    calls the hook per run of equal-order folios, whose order this wrapper looks up before the
    pages go.
    """
    original = inode.arch_invalidate
    if original is None:
        return

    def arch_invalidate(pfn: int, npages: int) -> None:
        with released_folio(inode.system, _order_of(inode.cache, pfn)):
            original(pfn, npages)

    inode.arch_invalidate = arch_invalidate


def _order_of(cache: Any, pfn: int) -> int | None:
    for s, e, base, order in cache.lookup_range(0, max(cache.end_index(), 1)):
        if base is not None and base <= pfn < base + (e - s):
            return int(order)
    return None

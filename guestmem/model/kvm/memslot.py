"""Memslots: the guest-physical layout of a VM, and their binding to guest_memfd.

A memslot maps gfns ``[base_gfn, base_gfn + npages)`` either to host userspace memory (through
``userspace_addr``) or, with ``KVM_MEM_GUEST_MEMFD``, also to a range of a guest_memfd starting at
page ``gmem_pgoff``.  A gfn->slot lookup is a RangeMap per address space, so finding the slots
that cover a range costs what the number of slots costs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.kvm.guest_memfd import GmemFile

# KVM-internal memslot flag (include/linux/kvm_host.h): the slot is served from guest_memfd for
# shared faults too, because the guest_memfd supports mmap.
KVM_MEMSLOT_GMEM_ONLY = 1 << 17

HUGEPAGE_LEVELS = {2: 9, 3: 18}  # level -> order (2 = 2 MiB, 3 = 1 GiB)


@dataclass(eq=False)
class Memslot:
    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    _gmem: object = None  # see gmem_file
    gmem_pgoff: int = 0
    # Per hugepage level: RangeMap over hugepage index (gfn >> order) -> True when MIXED
    # (attributes not uniform across it).  Upstream keeps this in lpage_info.disallow_lpage bit 31.
    lpage_mixed: dict[int, RangeMap[bool]] = field(default_factory=dict)
    # KVM_MEM_LOG_DIRTY_PAGES: page (gfn - base_gfn) -> dirty since the last KVM_GET_DIRTY_LOG;
    # None when the slot does not log (guestmem.model.kvm.dirty_log).
    dirty_bitmap: RangeMap[bool] | None = None

    @property
    def gmem_file(self) -> GmemFile | None:
        """The bound guest_memfd file.  Like upstream's ``slot->gmem.file`` this does not keep the
        file alive: a file that goes (closed, or its handle collected) unbinds itself first."""
        g = self._gmem
        return g() if isinstance(g, weakref.ref) else g  # type: ignore[return-value]

    @gmem_file.setter
    def gmem_file(self, f: GmemFile | None) -> None:
        self._gmem = weakref.ref(f) if getattr(f, "weak_binding", False) else f

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def has_gmem(self) -> bool:
        return bool(self.flags & u.KVM_MEM_GUEST_MEMFD)

    @property
    def gmem_only(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_GMEM_ONLY)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & u.KVM_MEM_READONLY)

    @property
    def user_flags(self) -> int:
        return self.flags & 0xFFFF

    def gfn_to_index(self, gfn: int) -> int:
        return gfn - self.base_gfn + self.gmem_pgoff

    def index_to_gfn(self, index: int) -> int:
        return index - self.gmem_pgoff + self.base_gfn

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << u.PAGE_SHIFT)

    def contains_hugepage(self, gfn: int, order: int) -> bool:
        """True if the naturally aligned 2^order block holding ``gfn`` lies wholly in the slot."""
        start = gfn >> order << order
        return start >= self.base_gfn and start + (1 << order) <= self.end_gfn

    def lpage_allowed(self, gfn: int, order: int) -> bool:
        """Whether a hugepage of ``order`` may map ``gfn``: inside the slot, the slot's host and
        guest addresses congruent at that size, and not MIXED."""
        if not self.contains_hugepage(gfn, order):
            return False
        mask = (1 << order) - 1
        # kvm_alloc_memslot_metadata: disallow if base_gfn and userspace pfn disagree in the low bits.
        if (self.base_gfn ^ (self.userspace_addr >> u.PAGE_SHIFT)) & mask:
            return False
        mixed = self.lpage_mixed.get(order)
        return not (mixed is not None and mixed.get(gfn >> order))

    def __repr__(self) -> str:
        return (f"Memslot(as={self.as_id}, id={self.id}, gfn={self.base_gfn:#x}+{self.npages:#x}, "
                f"flags={self.flags:#x}, hva={self.userspace_addr:#x}, gmem_pgoff={self.gmem_pgoff:#x})")


class Memslots:
    """The memslots of one address space: by id, and by gfn through a RangeMap."""

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        self.by_gfn: RangeMap[int | None] = RangeMap(None)

    def get(self, slot_id: int) -> Memslot | None:
        return self.by_id.get(slot_id)

    def lookup(self, gfn: int) -> Memslot | None:
        sid = self.by_gfn.get(gfn)
        return None if sid is None else self.by_id[sid]

    def overlaps(self, slot_id: int, start: int, end: int) -> bool:
        return any(v is not None and v != slot_id for _, _, v in self.by_gfn.segments(start, end))

    def in_range(self, start: int, end: int) -> Iterator[tuple[int, int, Memslot | None]]:
        """Pieces of ``[start, end)``: ``(s, e, slot_or_None)``."""
        for s, e, sid in self.by_gfn.segments(start, end):
            yield s, e, None if sid is None else self.by_id[sid]

    def insert(self, slot: Memslot) -> None:
        self.by_id[slot.id] = slot
        self.by_gfn.set(slot.base_gfn, slot.end_gfn, slot.id)

    def remove(self, slot: Memslot) -> None:
        del self.by_id[slot.id]
        self.by_gfn.set(slot.base_gfn, slot.end_gfn, None)

    def __iter__(self) -> Iterator[Memslot]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def total_pages(self) -> int:
        return sum(s.npages for s in self.by_id.values())

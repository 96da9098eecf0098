"""How a VMM drives each of the five designs: the userspace half of every design, side by side.

The designs differ in what a VMM has to do for the same guest request, and that is where most of
their costs come from, so each recipe below is the one its era's VMM (QEMU's private-memory
backends) followed:

* **v7** ``memfile_notifier``: two memfds — the shared one mapped at ``userspace_addr`` and sealed
  with ``F_SEAL_AUTO_ALLOCATE``, the private one ``MFD_INACCESSIBLE`` — in one ``KVM_MEM_PRIVATE``
  memslot; conversions are ``KVM_MEMORY_ENCRYPT_{UN,}REG_REGION`` plus punching the side that is
  no longer used, and, because the seal forbids allocation on access, an explicit ``fallocate``
  of the shared side before it is used.
* **v8** ``inaccessible_memfd`` / **v9** ``restrictedmem``: the private side is the shim file; the
  shared side an ordinary memfd mapping (discarded with ``MADV_REMOVE``).
* **guest_memfd** (v14, Linux 6.8+): KVM creates the private file; conversions are
  ``KVM_SET_MEMORY_ATTRIBUTES``, the other side is discarded as above.
* **in_place** (seed 004): one guest_memfd, mmap-able, ``INIT_SHARED``; a conversion is
  ``KVM_SET_MEMORY_ATTRIBUTES2`` on the file and there is no other side to discard.

Every recipe calls :attr:`Design.on_step` after each VMM action, so a workload can sample state
(e.g. pages backed twice) at the moments a copy exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from guestmem import uapi as u
from guestmem.errors import GuestAccessFault
from guestmem.model import open_model
from guestmem.model.designs import uapi as hu
from guestmem.model.designs.directmap import follow_gmem_folios
from guestmem.model.designs.inaccessible import memfd_create as memfd_create_v8
from guestmem.model.designs.kvm import HistoricalKvm, attach
from guestmem.model.designs.memfile import memfd_create as memfd_create_v7
from guestmem.model.designs.restricted import Invalidation, memfd_restricted
from guestmem.model.mm.pagecache import PageCache

if TYPE_CHECKING:
    from guestmem.api import Mapping
    from guestmem.model.designs.files import BackedFile
    from guestmem.model.kvm.guest_memfd import GmemFile
    from guestmem.model.kvm.system import ModelKvm
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
HUGE = u.HPAGE_2M
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
SLOT = 1


def present(cache: PageCache, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The present pieces ``(s, e)`` of index range [start, end)."""
    for s, e, pfn, _ in cache.lookup_range(start, end):
        if pfn is not None:
            yield s, e


def overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Pages in both of two sorted, disjoint interval lists."""
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class Design(ABC):
    """One design, set up for guest RAM [gpa, gpa + size) in memslot 1 of ``vm``."""

    key: ClassVar[str]  # the ``design`` key of ``guestmem compare --json``
    label: ClassVar[str]  # the row label
    model_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, kvm: ModelKvm, vm: ModelVm, gpa: int, size: int) -> None:
        if gpa % HUGE or size % HUGE:
            raise ValueError("guest RAM must be 2 MiB aligned")
        self.kvm, self.vm, self.gpa, self.size = kvm, vm, gpa, size
        self.npages = size // PS
        self.host: Mapping | None = None  # the VMM's view of shared memory
        self.on_step: Callable[[], None] = lambda: None

    @classmethod
    def open_kvm(cls, **options: Any) -> ModelKvm:
        """A fresh model host for this design: 2 MiB folios for private memory, 4 KiB for shared;
        ``options`` (the user's ``--model`` switches) override those defaults, and the switches the
        design itself needs (e.g. in-place conversion's ``attributes="gmem"``) override both."""
        opts = {"gmem_folio_order": 9, "anon_folio_order": 0, **options, **cls.model_options}
        return open_model(**opts)

    # --- the recipe ---------------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Create the files, map the shared side, add the memslot."""

    @abstractmethod
    def convert(self, off: int, size: int, private: bool) -> None:
        """The VMM's answer to a conversion request (hypercall or memory-fault exit)."""

    @abstractmethod
    def discard(self, off: int, size: int) -> None:
        """Give guest RAM back to the host (a balloon): free whatever backs it."""

    @abstractmethod
    def stage_image(self, off: int, data: bytes) -> None:
        """Before launch: make ``data`` the guest's private, measured memory at ``off``."""

    @abstractmethod
    def private_cache(self) -> PageCache:
        """The page cache that holds private memory."""

    def backed_twice(self) -> int:
        """Pages of guest RAM for which both a shared and a private copy are allocated now."""
        return 0

    # --- device access through the VMM's mapping -----------------------------------------------------
    def host_write(self, off: int, data: bytes) -> bool:
        """A device stores ``data`` at ``off``; False when the host access faults (SIGBUS)."""
        assert self.host is not None
        try:
            self.host.write(off, data)
        except GuestAccessFault:
            return False
        return True

    def host_read(self, off: int, n: int) -> bytes | None:
        assert self.host is not None
        try:
            return self.host.read(off, n)
        except GuestAccessFault:
            return None

    def close(self) -> None:
        if self.host is not None:
            self.host.close()


class SeparateDesign(Design):
    """The four designs with two backings: private memory in a file, shared at ``userspace_addr``."""

    shared_cache: PageCache

    @abstractmethod
    def set_attributes(self, off: int, size: int, private: bool) -> None:
        """Tell KVM the range is private/shared (the version's ioctl)."""

    @abstractmethod
    def punch_private(self, off: int, size: int) -> None:
        """Free the private copy."""

    def discard_shared(self, off: int, size: int) -> None:
        """Free the shared copy (``MADV_REMOVE`` through the mapping)."""
        assert self.host is not None
        self.host.discard(off, size)

    def prepare_shared(self, off: int, size: int) -> None:
        """Make the shared side usable before it is touched (v7 must allocate it explicitly)."""

    def convert(self, off: int, size: int, private: bool) -> None:
        self.set_attributes(off, size, private)
        self.on_step()
        if private:
            self.discard_shared(off, size)
        else:
            self.punch_private(off, size)
            self.prepare_shared(off, size)
        self.on_step()

    def discard(self, off: int, size: int) -> None:
        self.punch_private(off, size)
        self.discard_shared(off, size)
        self.on_step()

    def stage_image(self, off: int, data: bytes) -> None:
        # The image is loaded into shared memory, declared private and copied in by the launch
        # (SNP_LAUNCH_UPDATE / TDX_INIT_MEM_REGION read it from userspace_addr); the staging copy
        # is dropped afterwards.
        self.prepare_shared(off, len(data))
        self.host_write(off, data)
        self.set_attributes(off, len(data), True)
        staged = self.host_read(off, len(data))
        assert staged == data, "the staging copy must read back"
        self.vm.launch_update(self.gpa + off, len(data), staged)
        self.on_step()
        self.discard_shared(off, len(data))
        self.on_step()

    def backed_twice(self) -> int:
        n = self.npages
        return overlap(list(present(self.private_cache(), 0, n)), list(present(self.shared_cache, 0, n)))

    def map_memfd_shared(self) -> None:
        """Shared memory: an ordinary memfd mapped at a 2 MiB-aligned ``userspace_addr``."""
        shared = self.kvm.memfd_create(self.size)
        self.shared_cache = shared.cache
        self.host = self.kvm.process.mmap(shared, self.size, 0, align=HUGE)
        shared.close()  # the mapping keeps the file


class HistoricalDesign(SeparateDesign):
    """v7, v8, v9: a userspace-made private file in a ``KVM_MEM_PRIVATE`` memslot, REG_REGION."""

    front: HistoricalKvm
    private: BackedFile
    kvm_design: ClassVar[str]  # whose KVM ioctls this design uses

    def set_attributes(self, off: int, size: int, private: bool) -> None:
        if private:
            self.front.memory_encrypt_reg_region(self.gpa + off, size)
        else:
            self.front.memory_encrypt_unreg_region(self.gpa + off, size)

    def punch_private(self, off: int, size: int) -> None:
        self.private.fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, off, size)

    def private_cache(self) -> PageCache:
        return self.private.cache

    def add_memslot(self) -> None:
        assert self.host is not None
        self.front = attach(self.vm, self.kvm_design)
        self.front.set_user_memory_region(SLOT, hu.KVM_MEM_PRIVATE, self.gpa, self.size, self.host.addr,
                                          self.private.fd, 0)

    def close(self) -> None:
        super().close()
        self.private.close()


class MemfileNotifierDesign(HistoricalDesign):
    key = kvm_design = hu.DESIGN_V7
    label = "v7 memfile"
    seal_auto_allocate = True

    def setup(self) -> None:
        self.private = memfd_create_v7(self.kvm, "guest-private", hu.MFD_INACCESSIBLE, folio_order=9)
        self.private.truncate(self.size)
        self.shared = memfd_create_v7(self.kvm, "guest-shared", hu.MFD_ALLOW_SEALING, folio_order=0)
        self.shared.truncate(self.size)
        if self.seal_auto_allocate:
            self.shared.add_seals(hu.F_SEAL_AUTO_ALLOCATE)
        self.shared_cache = self.shared.cache
        self.host = self.shared.mmap(self.size, 0, align=HUGE)
        self.add_memslot()

    def discard_shared(self, off: int, size: int) -> None:
        self.shared.punch_hole(off, size)

    def prepare_shared(self, off: int, size: int) -> None:
        self.shared.allocate(off, size)

    def close(self) -> None:
        super().close()
        self.shared.close()


class InaccessibleMemfdDesign(HistoricalDesign):
    key = kvm_design = hu.DESIGN_V8
    label = "v8 inaccessible"

    def setup(self) -> None:
        self.private = memfd_create_v8(self.kvm, "guest-private", hu.MFD_INACCESSIBLE, folio_order=9)
        self.private.truncate(self.size)
        self.map_memfd_shared()
        self.add_memslot()


class RestrictedMemDesign(HistoricalDesign):
    key = kvm_design = hu.DESIGN_V9
    label = "v9 restricted"
    invalidation: ClassVar[Invalidation] = "range"

    def setup(self) -> None:
        self.private = memfd_restricted(self.kvm, 0, folio_order=9, invalidation=self.invalidation)
        self.private.truncate(self.size)
        self.map_memfd_shared()
        self.add_memslot()


class RestrictedMemFolioDesign(RestrictedMemDesign):
    """v9 with the reply's proposal: invalidation per folio, carrying its order."""

    key = "restrictedmem_folio"
    label = "v9 + folio"
    invalidation = "folio"


class GuestMemfdDesign(SeparateDesign):
    key = "guest_memfd"
    label = "v14 guest_memfd"

    def setup(self) -> None:
        self.gmem: GmemFile = self.vm.create_guest_memfd(self.size, 0)
        follow_gmem_folios(self.gmem.inode)
        self.map_memfd_shared()
        assert self.host is not None
        self.vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, self.gpa, self.size, self.host.addr,
                                        self.gmem, 0)

    def set_attributes(self, off: int, size: int, private: bool) -> None:
        self.vm.set_memory_attributes(self.gpa + off, size, PRIVATE if private else 0)

    def punch_private(self, off: int, size: int) -> None:
        self.gmem.punch_hole(off, size)

    def private_cache(self) -> PageCache:
        return self.gmem.inode.cache

    def close(self) -> None:
        super().close()
        self.gmem.close()


class InPlaceDesign(Design):
    key = "in_place"
    label = "in-place"
    model_options: ClassVar[dict[str, Any]] = {"attributes": "gmem"}

    def setup(self) -> None:
        self.gmem: GmemFile = self.vm.create_guest_memfd(
            self.size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
        follow_gmem_folios(self.gmem.inode)
        self.host = self.gmem.mmap()
        self.vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, self.gpa, self.size, 0, self.gmem, 0)

    def convert(self, off: int, size: int, private: bool) -> None:
        self.gmem.set_memory_attributes2(off, size, PRIVATE if private else 0, 0)
        self.on_step()

    def discard(self, off: int, size: int) -> None:
        self.gmem.punch_hole(off, size)
        self.on_step()

    def stage_image(self, off: int, data: bytes) -> None:
        # Written where it will run, then converted with PRESERVE (encrypted in place): no copy.
        self.host_write(off, data)
        self.gmem.set_memory_attributes2(off, len(data), PRIVATE, u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE)
        self.on_step()

    def private_cache(self) -> PageCache:
        return self.gmem.inode.cache

    def close(self) -> None:
        super().close()
        self.gmem.close()


DESIGNS: tuple[type[Design], ...] = (MemfileNotifierDesign, InaccessibleMemfdDesign, RestrictedMemDesign,
                                     GuestMemfdDesign, InPlaceDesign)
REPLY_DESIGN: type[Design] = RestrictedMemFolioDesign
BY_KEY: dict[str, type[Design]] = {d.key: d for d in (*DESIGNS, REPLY_DESIGN)}


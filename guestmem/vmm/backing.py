"""How a RAM region is backed, and the one place that knows the difference.

Four strategies, chosen by capability (never by backend name):

``separate``
    The classic CoCo layout (QEMU, Cloud Hypervisor, libkrun): a guest_memfd holds private pages
    and anonymous host memory holds shared ones; per-VM ``KVM_SET_MEMORY_ATTRIBUTES`` says which
    side the guest sees.  Two backings, so a conversion leaves a copy on the other side unless the
    VMM discards it.
``inplace``
    One guest_memfd created ``MMAP|INIT_SHARED``, mmap'ed as the shared memory, with per-file
    attributes set by ``KVM_SET_MEMORY_ATTRIBUTES2`` (the in-place conversion series).  One copy of
    memory; nothing to discard on conversion.  Chosen when the VM reports
    ``KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES``.
``shared-only``
    A VM without private memory whose RAM is a guest_memfd ``MMAP|INIT_SHARED`` (Firecracker's
    "secret freedom" shape, and what this host's kernel offers).  Conversions to private are refused.
``anonymous``
    No guest_memfd at all: plain anonymous memory in a memslot (kernels before 6.8).

A guest_memfd memslot always gets the file's own mmap address as ``userspace_addr`` where the file
is mmap'ed: some kernels insist on it, and where the address is ignored it does no harm.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from guestmem import uapi as u
from guestmem.api import GuestMemfd, Kvm, Mapping, Vm
from guestmem.errors import CapabilityMissing
from guestmem.vmm.flavours import FlavourSpec
from guestmem.vmm.layout import RegionSpec

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP_SHARED_FLAGS = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED


class Strategy(StrEnum):
    SEPARATE = "separate"
    INPLACE = "inplace"
    SHARED_ONLY = "shared-only"
    ANONYMOUS = "anonymous"

    @property
    def single_backing(self) -> bool:
        return self is not Strategy.SEPARATE

    @property
    def private_memory(self) -> bool:
        return self in (Strategy.SEPARATE, Strategy.INPLACE)


STRATEGY_NAMES = ("auto", *(s.value for s in Strategy))


@dataclass(frozen=True)
class Capabilities:
    """What one VM offers, asked once with ``KVM_CHECK_EXTENSION`` on the VM fd."""

    vm_attributes: int  # KVM_CAP_MEMORY_ATTRIBUTES
    gmem_attributes: int  # KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES
    guest_memfd: bool
    gmem_flags: int  # KVM_CAP_GUEST_MEMFD_FLAGS
    pre_fault: bool
    exit_hypercall: int  # mask of hypercalls that may exit to userspace
    content_modes: int  # KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS (RFC v5 only)
    user_memory2: bool

    @classmethod
    def probe(cls, vm: Vm) -> Capabilities:
        c = vm.check_extension
        return cls(
            vm_attributes=c(u.KVM_CAP_MEMORY_ATTRIBUTES),
            gmem_attributes=c(u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES),
            guest_memfd=bool(c(u.KVM_CAP_GUEST_MEMFD)),
            gmem_flags=c(u.KVM_CAP_GUEST_MEMFD_FLAGS),
            pre_fault=bool(c(u.KVM_CAP_PRE_FAULT_MEMORY)),
            exit_hypercall=c(u.KVM_CAP_EXIT_HYPERCALL),
            content_modes=c(u.KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS),
            user_memory2=bool(c(u.KVM_CAP_USER_MEMORY2)),
        )

    @property
    def map_gpa_range_exit(self) -> bool:
        return bool(self.exit_hypercall & (1 << u.KVM_HC_MAP_GPA_RANGE))

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


def choose_strategy(caps: Capabilities, spec: FlavourSpec, requested: str = "auto") -> Strategy:
    """Pick (or check) a backing strategy for a VM of flavour ``spec`` with capabilities ``caps``.

    Raises :class:`CapabilityMissing` naming the capability a requested or needed strategy lacks.
    """
    inplace_ok = bool(caps.gmem_attributes & PRIVATE) and bool(caps.gmem_flags & u.GUEST_MEMFD_FLAG_MMAP)
    separate_ok = bool(caps.vm_attributes & PRIVATE) and caps.guest_memfd
    shared_only_ok = caps.guest_memfd and caps.gmem_flags & MMAP_SHARED_FLAGS == MMAP_SHARED_FLAGS
    if requested == "auto":
        if spec.private_memory:
            if inplace_ok:
                return Strategy.INPLACE
            if separate_ok:
                return Strategy.SEPARATE
            raise CapabilityMissing("KVM_CAP_MEMORY_ATTRIBUTES",
                                    f"a {spec.vm_type_name} reports neither per-VM nor guest_memfd "
                                    "private attributes")
        return Strategy.SHARED_ONLY if shared_only_ok else Strategy.ANONYMOUS
    strategy = Strategy(requested)
    if strategy.private_memory and not spec.private_memory:
        raise CapabilityMissing("private memory", f"flavour {spec.name!r} has none; backing "
                                f"{strategy.value!r} needs a private-memory VM type")
    needs = {
        Strategy.INPLACE: (inplace_ok, "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"),
        Strategy.SEPARATE: (separate_ok, "KVM_CAP_MEMORY_ATTRIBUTES"),
        Strategy.SHARED_ONLY: (shared_only_ok, "KVM_CAP_GUEST_MEMFD_FLAGS (MMAP|INIT_SHARED)"),
        Strategy.ANONYMOUS: (True, ""),
    }
    ok, cap = needs[strategy]
    if not ok:
        raise CapabilityMissing(cap, f"needed for backing {strategy.value!r}")
    return strategy


class RegionBacking:
    """The memory behind one RAM region and its memslot.

    ``shared`` is the host's view of the region (the shared side); offsets into it equal offsets
    into the region.  ``gmem`` is the region's guest_memfd (None for ``anonymous``), bound at
    offset 0.
    """

    def __init__(self, kvm: Kvm, vm: Vm, spec: RegionSpec, slot: int, strategy: Strategy,
                 caps: Capabilities) -> None:
        self.spec = spec
        self.base = spec.gpa  # the region's first gpa: offset 0 of ``shared`` and ``gmem``
        self.slot = slot
        self.strategy = strategy
        self.vm = vm
        self.gmem: GuestMemfd | None = None
        self.shared: Mapping
        if strategy is Strategy.SEPARATE:
            self.gmem = vm.create_guest_memfd(spec.size, 0)
            self.shared = kvm.mmap_anonymous(spec.size)
            vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, spec.gpa, spec.size, self.shared.addr,
                                       self.gmem, 0)
        elif strategy in (Strategy.INPLACE, Strategy.SHARED_ONLY):
            flags = u.GUEST_MEMFD_FLAG_MMAP | (caps.gmem_flags & u.GUEST_MEMFD_FLAG_INIT_SHARED)
            self.gmem = vm.create_guest_memfd(spec.size, flags)
            if not flags & u.GUEST_MEMFD_FLAG_INIT_SHARED and strategy is Strategy.INPLACE:
                # Pages start private without INIT_SHARED; every region starts shared here.
                self.gmem.set_memory_attributes2(0, spec.size, 0, 0)
            self.shared = self.gmem.mmap(spec.size)
            vm.set_user_memory_region2(slot, u.KVM_MEM_GUEST_MEMFD, spec.gpa, spec.size, self.shared.addr,
                                       self.gmem, 0)
        else:
            self.shared = kvm.mmap_anonymous(spec.size)
            if caps.user_memory2:
                vm.set_user_memory_region2(slot, 0, spec.gpa, spec.size, self.shared.addr)
            else:
                vm.set_user_memory_region(slot, 0, spec.gpa, spec.size, self.shared.addr)

    # --- addressing -----------------------------------------------------------------------------
    def offset(self, gpa: int) -> int:
        off = gpa - self.spec.gpa
        assert 0 <= off <= self.spec.size, (hex(gpa), self.spec)
        return off

    # --- conversion primitives ------------------------------------------------------------------
    def set_attributes(self, gpa: int, size: int, private: bool, content_flags: int = 0) -> None:
        """Make ``[gpa, gpa+size)`` private or shared (per-VM or per-file attributes)."""
        attrs = PRIVATE if private else 0
        if self.strategy is Strategy.SEPARATE:
            self.vm.set_memory_attributes(gpa, size, attrs)
        elif self.strategy is Strategy.INPLACE:
            assert self.gmem is not None
            self.gmem.set_memory_attributes2(self.offset(gpa), size, attrs, content_flags)
        else:
            raise AssertionError(f"{self.strategy.value} regions have no private memory")

    def discard_shared(self, gpa: int, size: int) -> None:
        """Drop the shared side of a separate-backing range (``madvise(MADV_REMOVE)``)."""
        self.shared.discard(self.offset(gpa), size)

    def punch_private(self, gpa: int, size: int) -> None:
        """Free the guest_memfd pages of a range (``fallocate(PUNCH_HOLE)``)."""
        assert self.gmem is not None
        self.gmem.punch_hole(self.offset(gpa), size)

    def allocate_private(self, gpa: int, size: int) -> None:
        assert self.gmem is not None
        self.gmem.allocate(self.offset(gpa), size)

    # --- host access to the shared side ----------------------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        return self.shared.read(self.offset(gpa), size)

    def write(self, gpa: int, data: bytes) -> None:
        self.shared.write(self.offset(gpa), data)

    def fill(self, gpa: int, size: int, byte: int) -> None:
        self.shared.fill(self.offset(gpa), size, byte)

    def close(self) -> None:
        """Delete the memslot, then unmap and close the backing (the guest_memfd last)."""
        try:
            if self.strategy is Strategy.ANONYMOUS:
                self.vm.set_user_memory_region2(self.slot, 0, self.spec.gpa, 0, self.shared.addr)
            else:
                self.vm.set_user_memory_region2(self.slot, u.KVM_MEM_GUEST_MEMFD, self.spec.gpa, 0,
                                                self.shared.addr, self.gmem, 0)
        except OSError:
            pass  # the VM may already be gone; closing the files still frees the memory
        self.shared.close()
        if self.gmem is not None:
            self.gmem.close()

"""Issue 4's end-to-end flow on the SNP-like flavour: boot with private memory, share a bounce
buffer in place (one copy of memory), do I/O through it, take it back private, while a pinned
page blocks conversion with EAGAIN.

One difference from the issue's wording, on purpose: the series lets SNP/TDX VMs use PRESERVE
to private only *before* the launch is finalized, so after boot the buffer goes back private
with UNSPECIFIED (the guest re-validates it, and copies out what it wants to keep first, as real
SNP guests do); PRESERVE there is refused with EOPNOTSUPP, which this test checks too.
"""

from __future__ import annotations

import errno

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitHypercall, ExitMemoryFault, ExitSync
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Accept, MapGpaRange, Program, Sync, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32
RAM = 64 * PS
BOUNCE = 48 * PS  # the bounce buffer: 8 pages inside RAM
BPAGES = 8
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def _convert(gmem, vm, ex, mode: int = 0) -> None:
    """A tiny VMM: turn a MAP_GPA_RANGE exit into an in-place conversion."""
    offset = ex.gpa - GPA
    gmem.set_memory_attributes2(offset, ex.npages * PS, PRIVATE if ex.to_private else 0, mode)
    ex.ret = 0


def test_snp_boot_bounce_buffer_in_place() -> None:
    kvm = guestmem.open("model", attributes="gmem")
    vm = kvm.create_vm(u.KVM_X86_SNP_VM)
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
    gmem = vm.create_guest_memfd(RAM, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    host = gmem.mmap()
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, RAM, 0, gmem, 0)

    # Launch: the host loads an image into (still shared) memory, encrypts it in place.
    host.fill(0, 16 * PS, 0x4B)
    gmem.set_memory_attributes2(0, 16 * PS, PRIVATE, u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE)
    vm.launch_finalize()
    with pytest.raises(GuestAccessFault):
        host.read(0, 1)  # the image is private now

    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([
        Verify(GPA, 16 * PS, 0x4B, "private"),            # the measured image, decrypted
        Accept(GPA + 16 * PS, RAM - 16 * PS),               # boot: accept the rest (lazily converted)
        Write(GPA + 16 * PS, RAM - 16 * PS, 0x01, "private"),
        MapGpaRange(GPA + BOUNCE, BPAGES, u.KVM_MAP_GPA_RANGE_DECRYPTED),  # share the bounce buffer
        Write(GPA + BOUNCE, BPAGES * PS, 0xD0, "shared"),   # a request for the device
        Sync(1),
        Verify(GPA + BOUNCE, BPAGES * PS, 0xE1, "shared"),  # the device's answer
        MapGpaRange(GPA + BOUNCE, BPAGES, u.KVM_MAP_GPA_RANGE_ENCRYPTED),  # take it back
        Accept(GPA + BOUNCE, BPAGES * PS),
        Write(GPA + BOUNCE, BPAGES * PS, 0x02, "private"),
        Verify(GPA + BOUNCE, BPAGES * PS, 0x02, "private"),
    ]))
    conversions = faults = 0
    frames_before_io = None
    while True:
        ex = vcpu.run()
        vm.check_invariants()
        if isinstance(ex, ExitMemoryFault):  # the guest touched shared memory as private
            gmem.set_memory_attributes2(ex.gpa - GPA, ex.size, PRIVATE if ex.private else 0)
            faults += 1
        elif isinstance(ex, ExitHypercall):
            if ex.to_private:
                # A DMA pin on the buffer blocks the conversion, changing nothing.
                with host.pin(BOUNCE + 3 * PS, PS), pytest.raises(KvmError) as ei:
                    _convert(gmem, vm, ex)
                assert ei.value.errno == errno.EAGAIN and ei.value.error_offset == BOUNCE + 3 * PS
                assert not gmem.inode.is_private(BOUNCE // PS)
                # PRESERVE is a launch-time promise on SNP: refused after finalize.
                with pytest.raises(KvmError) as ei:
                    _convert(gmem, vm, ex, u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE)
                assert ei.value.errno == errno.EOPNOTSUPP
            _convert(gmem, vm, ex)
            conversions += 1
        elif isinstance(ex, ExitSync):
            # The device sees the guest's request in the same pages the guest wrote (one copy).
            frames_before_io = kvm.pool.allocated
            assert host.read(BOUNCE, BPAGES * PS) == bytes([0xD0]) * BPAGES * PS
            host.fill(BOUNCE, BPAGES * PS, 0xE1)
            assert kvm.pool.allocated == frames_before_io  # no second backing was allocated
        else:
            assert isinstance(ex, ExitHalt), ex
            break
    assert conversions == 2 and faults >= 1
    assert kvm.pool.allocated == RAM // PS  # exactly one copy of guest memory
    assert kvm.rmp.directmap_splits >= 1 and kvm.rmp.directmap_restores >= 0
    with pytest.raises(GuestAccessFault):
        host.read(BOUNCE, 1)

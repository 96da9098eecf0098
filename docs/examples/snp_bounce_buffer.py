"""An SNP-like guest shares a bounce buffer with a device and takes it back: a complete program
against guestmem's public API only (``guestmem.api``, ``guestmem.uapi``, ``guestmem.guest``).

Run it: ``python docs/examples/snp_bounce_buffer.py``.  It uses in-place conversion (one
guest_memfd holds shared and private pages alike), so it opens the model with
``attributes="gmem"``; on a host kernel with SEV-SNP and the in-place series the same program
runs with ``guestmem.open("kernel")``.
"""

from __future__ import annotations

import errno

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitHypercall, ExitMemoryFault, ExitSync, GuestMemfd
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest import Accept, MapGpaRange, Program, Sync, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32  # guest RAM starts at 4 GiB
RAM = 64 * PS
BOUNCE = 48 * PS  # offset of the 8-page bounce buffer inside RAM
BPAGES = 8


def convert(gmem: GuestMemfd, gpa: int, size: int, private: bool) -> None:
    """The VMM's whole conversion policy: flip the pages in place (no second copy)."""
    gmem.set_memory_attributes2(gpa - GPA, size, u.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)


def main() -> None:
    kvm = guestmem.open("model", attributes="gmem")
    vm = kvm.create_vm(u.KVM_X86_SNP_VM)
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
    gmem = vm.create_guest_memfd(RAM, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    host = gmem.mmap()  # the VMM's (and the device's) view of guest memory
    vm.set_user_memory_region2(slot=1, flags=u.KVM_MEM_GUEST_MEMFD, guest_phys_addr=GPA,
                               memory_size=RAM, userspace_addr=0, guest_memfd=gmem,
                               guest_memfd_offset=0)

    # Launch: load an image into (still shared) memory, make it private keeping its contents
    # (PRESERVE is allowed before the launch is finalized), then finalize.
    host.fill(0, 16 * PS, 0x4B)
    gmem.set_memory_attributes2(0, 16 * PS, u.KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE)
    vm.launch_finalize()
    try:
        host.read(0, 1)
    except GuestAccessFault:
        print("the host can no longer read the launched image (SIGBUS)")

    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([
        Verify(GPA, 16 * PS, 0x4B, "private"),              # the image, as the guest sees it
        Accept(GPA + 16 * PS, RAM - 16 * PS),                 # accept the rest of RAM
        MapGpaRange(GPA + BOUNCE, BPAGES, u.KVM_MAP_GPA_RANGE_DECRYPTED),  # share the buffer
        Write(GPA + BOUNCE, BPAGES * PS, 0xD0, "shared"),     # a request for the device
        Sync(1),                                              # ring the doorbell
        Verify(GPA + BOUNCE, BPAGES * PS, 0xE1, "shared"),    # the device's answer
        MapGpaRange(GPA + BOUNCE, BPAGES, u.KVM_MAP_GPA_RANGE_ENCRYPTED),  # take it back
        Accept(GPA + BOUNCE, BPAGES * PS),
    ]))
    faults = 0
    while True:
        ex = vcpu.run()
        vm.check_invariants()
        if isinstance(ex, ExitMemoryFault):  # the guest touched shared memory as private
            convert(gmem, ex.gpa, ex.size, ex.private)  # (lazy accept: one exit per page)
            faults += 1
            continue
        print(ex)
        if isinstance(ex, ExitHypercall):  # KVM_HC_MAP_GPA_RANGE
            if ex.to_private:
                try:
                    with host.pin(BOUNCE, PS):  # a DMA still in flight on the buffer
                        convert(gmem, ex.gpa, ex.npages * PS, True)
                except KvmError as err:
                    assert err.errno == errno.EAGAIN
                    print(f"conversion refused while pinned: {err}")
            convert(gmem, ex.gpa, ex.npages * PS, ex.to_private)
            ex.ret = 0
        elif isinstance(ex, ExitSync):  # the device does its work in the shared pages
            assert host.read(BOUNCE, BPAGES * PS) == bytes([0xD0]) * BPAGES * PS
            host.fill(BOUNCE, BPAGES * PS, 0xE1)
        else:
            assert isinstance(ex, ExitHalt), ex
            break
    print(f"done after {faults} memory-fault exits: the buffer is private again and the guest read "
          "the device's answer")


if __name__ == "__main__":
    main()

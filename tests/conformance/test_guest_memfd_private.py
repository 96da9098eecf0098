"""Port of ``guest_memfd_test.c:test_guest_private_mem``, which the in-place conversion series
adds to upstream's guest_memfd test: guest_memfd used as the guest's private memory.

With per-VM attributes (what released kernels have), so it runs on both backends: a
KVM_X86_SW_PROTECTED_VM, one page of guest_memfd at 4 GiB in slot 1 (GUEST_MEMFD, anonymous
memory as the shared side), the page set private, the guest writes 0xff and reads it back.
Stronger than upstream: the whole page, and the shared side did not receive the write.  Hosts
without KVM_X86_SW_PROTECTED_VM or KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) skip, naming it.  The
per-guest_memfd form is in tests/model/test_gmem_conversions_selftest.py.
"""

from __future__ import annotations

import guestmem.uapi as u
from guestmem.api import ExitHalt, Kvm
from guestmem.guest.ops import Program, Verify, Write

from .support import GMEM_GPA, PAGE, check, require_cap, require_vm_type

SLOT = 1


def test_guest_private_mem(backend: Kvm) -> None:
    vm = require_vm_type(backend, u.KVM_X86_SW_PROTECTED_VM)
    with vm, backend.mmap_anonymous(PAGE) as shared:
        require_cap(vm, u.KVM_CAP_MEMORY_ATTRIBUTES, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        gmem = vm.create_guest_memfd(PAGE, 0)
        vm.set_user_memory_region2(SLOT, u.KVM_MEM_GUEST_MEMFD, GMEM_GPA, PAGE, shared.addr,
                                   guest_memfd=gmem, guest_memfd_offset=0)
        vm.set_memory_attributes(GMEM_GPA, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        check(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.load(Program([Write(GMEM_GPA, PAGE, 0xFF), Verify(GMEM_GPA, PAGE, 0xFF)]))
        ex = vcpu.run()
        check(vm)
        assert isinstance(ex, ExitHalt), ex
        assert shared.read(0, PAGE) == bytes(PAGE), "the private write reached the shared side"
        vcpu.close()
        gmem.close()

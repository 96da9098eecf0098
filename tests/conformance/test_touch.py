"""The Touch op (one store per stride) on both backends: the same pages change, the rest don't."""

from __future__ import annotations

import pytest

import guestmem.uapi as u
from guestmem.api import Kvm
from guestmem.guest.ops import Program, Touch, Verify
from tests.conformance.support import check

PS = u.PAGE_SIZE
GPA = 1 << 32


@pytest.mark.parametrize("stride", [PS, 3 * PS + 8])
def test_touch_writes_one_byte_per_stride(backend: Kvm, stride: int) -> None:
    size = 64 * PS
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    host = gmem.mmap()
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, host.addr, gmem, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Touch(GPA + 8, size - 8, 0xC5, stride), Verify(GPA, 8, 0)]))
    assert vcpu.run().name == "halt"
    check(vm)
    data = host.read(0, size)
    touched = {8 + k * stride for k in range((size - 8 + stride - 1) // stride)}
    assert all(data[i] == (0xC5 if i in touched else 0) for i in range(size))

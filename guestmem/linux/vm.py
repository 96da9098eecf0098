"""A real VM (``KVM_CREATE_VM``): memslots, guest_memfd creation, attributes, capabilities, vCPUs.

Each method is one ioctl on the VM fd with the arguments packed exactly as given (so a bad argument
reaches the kernel and its errno comes back).  The only state kept here is what userspace must keep:
the vCPUs this VM created (closed with it) and the lazily created loader memslot
(:mod:`guestmem.linux.loader`).  Closing a VM does not close its guest_memfds: the kernel keeps the
VM alive for them, and they stay fully usable.
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.args import u32, u64
from guestmem.errors import KvmError
from guestmem.guest import x86
from guestmem.linux import _sys
from guestmem.linux.gmem import CLOSED_FD, KernelGuestMemfd
from guestmem.linux.loader import Loader
from guestmem.linux.vcpu import KernelVcpu

if TYPE_CHECKING:
    from guestmem.api import GuestMemfd
    from guestmem.linux.system import KernelKvm

# An fd number no process can have open: what a closed GuestMemfd object is passed as, so the
# kernel (not this module) answers EBADF, after its own earlier checks.


def _close_vm(fd: int, vcpus: list[weakref.ref[KernelVcpu]], loader: list[Loader]) -> None:
    for ref in vcpus:
        vcpu = ref()
        if vcpu is not None:
            vcpu.close()
    vcpus.clear()
    try:
        os.close(fd)
    except OSError:
        pass
    for ld in loader:
        ld.close()
    loader.clear()


_U64_MAX = (1 << 64) - 1
_CHECK_EXTENSION = u.KVM_CHECK_EXTENSION

class KernelVm:
    """A KVM VM of type ``vm_type``."""

    def __init__(self, kvm: KernelKvm, fd: int, vm_type: int) -> None:
        self.fd = fd
        self.vm_type = vm_type
        self.kvm = kvm
        # Weak: a vCPU keeps its VM alive (it needs the loader memory), not the other way round.
        self._vcpus: list[weakref.ref[KernelVcpu]] = []
        self._loader: list[Loader] = []  # 0 or 1 element, shared with the finalizer
        self._hypercall_exit_enabled = False
        self._open = True  # False once close() ran: read on every ioctl, so a plain attribute
        self._finalizer = weakref.finalize(self, _close_vm, fd, self._vcpus, self._loader)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _fd(self, op: str) -> int:
        if not self._open:
            raise KvmError(errno.EBADF, op, "VM is closed")
        return self.fd

    # -- capabilities -------------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        # Inlined (argument rule, open check, ioctl, errno): a capability probe is a ~0.3 us
        # ioctl, and each Python call layered on it would cost as much again.
        if type(cap) is not int or not 0 <= cap <= _U64_MAX:
            cap = u64(cap, "cap")
        if not self._open:
            raise KvmError(errno.EBADF, "KVM_CHECK_EXTENSION", "VM is closed")
        ret: int = _sys.ioctl_int(self.fd, _CHECK_EXTENSION, cap)
        if ret < 0:
            raise KvmError(-ret, "KVM_CHECK_EXTENSION")
        return ret

    def enable_cap(self, cap: int, flags: int = 0, args: tuple[int, ...] = ()) -> None:
        cap, flags = u32(cap, "cap"), u32(flags, "flags")
        if isinstance(args, str | bytes) or not hasattr(args, "__len__"):
            raise TypeError(f"args must be a sequence of ints, not {type(args).__name__}")
        if len(args) > 4:
            raise OverflowError("struct kvm_enable_cap has 4 args")
        args = tuple(u64(a, f"args[{i}]") for i, a in enumerate(args))
        arg = u.kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            arg.args[i] = value
        _sys.ioctl(self._fd("KVM_ENABLE_CAP"), u.KVM_ENABLE_CAP, arg, "KVM_ENABLE_CAP")

    # -- guest_memfd and memslots -------------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> KernelGuestMemfd:
        size, flags = u64(size, "size"), u64(flags, "flags")
        arg = u.kvm_create_guest_memfd(size=size, flags=flags)
        fd = _sys.ioctl(self._fd("KVM_CREATE_GUEST_MEMFD"), u.KVM_CREATE_GUEST_MEMFD, arg,
                        "KVM_CREATE_GUEST_MEMFD")
        return KernelGuestMemfd(self, fd, size, flags)

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None:
        slot, flags = u32(slot, "slot"), u32(flags, "flags")
        guest_phys_addr = u64(guest_phys_addr, "guest_phys_addr")
        memory_size = u64(memory_size, "memory_size")
        userspace_addr = u64(userspace_addr, "userspace_addr")
        arg = u.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                            memory_size=memory_size, userspace_addr=userspace_addr)
        _sys.ioctl(self._fd("KVM_SET_USER_MEMORY_REGION"), u.KVM_SET_USER_MEMORY_REGION, arg,
                   "KVM_SET_USER_MEMORY_REGION")

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, guest_memfd: GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``.  ``guest_memfd`` may be a GuestMemfd, a raw fd, or None
        (field 0, as a zero-initialised C struct has).  A closed GuestMemfd object is passed as an fd
        number no process has open, so the kernel answers ``EBADF`` where it would for a closed fd."""
        slot, flags = u32(slot, "slot"), u32(flags, "flags")
        guest_phys_addr = u64(guest_phys_addr, "guest_phys_addr")
        memory_size = u64(memory_size, "memory_size")
        userspace_addr = u64(userspace_addr, "userspace_addr")
        guest_memfd_offset = u64(guest_memfd_offset, "guest_memfd_offset")
        if guest_memfd is None:
            gfd = 0
        elif not hasattr(guest_memfd, "fd"):
            gfd = u32(guest_memfd, "guest_memfd")
        else:
            gfd = CLOSED_FD if getattr(guest_memfd, "closed", False) else guest_memfd.fd
        arg = u.kvm_userspace_memory_region2(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                             memory_size=memory_size, userspace_addr=userspace_addr,
                                             guest_memfd_offset=guest_memfd_offset,
                                             guest_memfd=gfd & 0xFFFF_FFFF)
        _sys.ioctl(self._fd("KVM_SET_USER_MEMORY_REGION2"), u.KVM_SET_USER_MEMORY_REGION2, arg,
                   "KVM_SET_USER_MEMORY_REGION2")

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        address, size = u64(address, "address"), u64(size, "size")
        attributes, flags = u64(attributes, "attributes"), u64(flags, "flags")
        arg = u.kvm_memory_attributes(address=address, size=size, attributes=attributes, flags=flags)
        _sys.ioctl(self._fd("KVM_SET_MEMORY_ATTRIBUTES"), u.KVM_SET_MEMORY_ATTRIBUTES, arg,
                   "KVM_SET_MEMORY_ATTRIBUTES")

    # -- vCPUs and the guest-program loader ---------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> KernelVcpu:
        vcpu_id = u64(vcpu_id, "vcpu_id")
        fd = _sys.ioctl(self._fd("KVM_CREATE_VCPU"), u.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        try:
            vcpu = KernelVcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size(), self.kvm.supported_cpuid())
        except BaseException:
            os.close(fd)
            raise
        self._vcpus[:] = [r for r in self._vcpus if r() is not None]
        self._vcpus.append(weakref.ref(vcpu))
        return vcpu

    def loader(self) -> Loader:
        """The loader memslot (created on first use; see :mod:`guestmem.linux.loader`)."""
        if not self._loader:
            self._loader.append(Loader(self._fd("KVM_SET_USER_MEMORY_REGION")))
        return self._loader[0]

    @property
    def hypercall_insn(self) -> x86.Hypercall:
        return x86.vendor_hypercall(self.kvm.cpu_vendor())

    def enable_hypercall_exit(self) -> bool:
        """Enable ``KVM_EXIT_HYPERCALL`` for ``KVM_HC_MAP_GPA_RANGE`` if the kernel offers it.

        Returns whether it is enabled.  Nothing enables it implicitly (``load()`` does not): without
        it the guest's hypercall gets ``-KVM_ENOSYS``, which is itself behaviour worth testing.
        """
        if self._hypercall_exit_enabled:
            return True
        mask = self.check_extension(u.KVM_CAP_EXIT_HYPERCALL)
        want = 1 << u.KVM_HC_MAP_GPA_RANGE
        if not mask & want:
            return False
        self.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 0, (want,))
        self._hypercall_exit_enabled = True
        return True

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the vCPUs this VM created, the VM fd and the loader memory (guest_memfds stay open)."""
        self._open = False
        self._finalizer()

    def __enter__(self) -> KernelVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = u.VM_TYPE_NAMES.get(self.vm_type, str(self.vm_type))
        return f"KernelVm({name}, {'closed' if self.closed else f'fd={self.fd}'})"

"""A real VM (``KVM_CREATE_VM``): memslots, guest_memfd creation, attributes, capabilities, vCPUs.

Each method is one ioctl on the VM fd with the arguments packed exactly as given (so a bad argument
reaches the kernel and its errno comes back).  The only state kept here is what userspace must keep:
the vCPUs this VM created (closed with it) and the lazily created loader memslot
(:mod:`guestmem.linux.loader`).  Closing a VM does not close its guest_memfds: the kernel keeps the
VM alive for them, and they stay fully usable.
"""

from __future__ import annotations

import ctypes
import errno
import os
import weakref
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.args import as_bytes, u32, u64
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

    # -- confidential launch -----------------------------------------------------------------------
    def launch_update(self, gpa: int, size: int, src: bytes | None = None) -> int:
        """Add initial private memory to the guest's launch measurement: ``SNP_LAUNCH_UPDATE`` on an
        SNP VM, ``KVM_TDX_INIT_MEM_REGION`` (measured, through the first vCPU) on a TDX VM; on other
        VM types the same ``KVM_MEMORY_ENCRYPT_OP`` is issued and the kernel answers (ENOTTY).
        ``src`` (exactly ``size`` bytes) is copied in; None encrypts the pages in place (SNP).
        Returns the bytes added."""
        gpa, size = u64(gpa, "gpa"), u64(size, "size")
        buf = None if src is None else ctypes.create_string_buffer(bytes(as_bytes(src, "src")), size)
        uaddr = 0 if buf is None else ctypes.addressof(buf)
        if self.vm_type == u.KVM_X86_TDX_VM:
            vcpus = [v for v in (r() for r in self._vcpus) if v is not None and not v.closed]
            if not vcpus:
                raise KvmError(errno.EINVAL, "KVM_TDX_INIT_MEM_REGION", "create a vCPU first")
            region = u.kvm_tdx_init_mem_region(source_addr=uaddr, gpa=gpa, nr_pages=size // u.PAGE_SIZE)
            tcmd = u.kvm_tdx_cmd(id=u.KVM_TDX_INIT_MEM_REGION, flags=u.KVM_TDX_MEASURE_MEMORY_REGION,
                                 data=ctypes.addressof(region))
            _sys.ioctl(vcpus[0]._fd("KVM_TDX_INIT_MEM_REGION"), u.KVM_MEMORY_ENCRYPT_OP, tcmd,
                       "KVM_TDX_INIT_MEM_REGION")
            return size - int(region.nr_pages) * u.PAGE_SIZE
        update = u.kvm_sev_snp_launch_update(gfn_start=gpa // u.PAGE_SIZE, uaddr=uaddr, len=size,
                                             type=u.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        scmd = u.kvm_sev_cmd(id=u.KVM_SEV_SNP_LAUNCH_UPDATE, data=ctypes.addressof(update))
        _sys.ioctl(self._fd("SNP_LAUNCH_UPDATE"), u.KVM_MEMORY_ENCRYPT_OP, scmd, "SNP_LAUNCH_UPDATE")
        return size - int(update.len)

    def launch_finalize(self) -> None:
        """End the launch (``SNP_LAUNCH_FINISH`` / ``KVM_TDX_FINALIZE_VM``); afterwards the guest may
        run and pre-faulting is allowed.  Other VM types: the kernel's answer (ENOTTY)."""
        if self.vm_type == u.KVM_X86_TDX_VM:
            tcmd = u.kvm_tdx_cmd(id=u.KVM_TDX_FINALIZE_VM)
            _sys.ioctl(self._fd("KVM_TDX_FINALIZE_VM"), u.KVM_MEMORY_ENCRYPT_OP, tcmd, "KVM_TDX_FINALIZE_VM")
            return
        finish = u.kvm_sev_snp_launch_finish()
        scmd = u.kvm_sev_cmd(id=u.KVM_SEV_SNP_LAUNCH_FINISH, data=ctypes.addressof(finish))
        _sys.ioctl(self._fd("SNP_LAUNCH_FINISH"), u.KVM_MEMORY_ENCRYPT_OP, scmd, "SNP_LAUNCH_FINISH")

    def check_invariants(self, quiescent: bool = True) -> None:
        """The model checks docs/design.md's invariants on its own state; the kernel's state is not
        visible from userspace, so on this backend there is nothing to check (it never raises)."""

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

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch (:mod:`guestmem.linux.fileops`)."""
        from guestmem.linux.fileops import vm_ioctl

        return vm_ioctl(self, request, arg)

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

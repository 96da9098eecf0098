"""``/dev/kvm`` itself: the system fd, VM creation, and host memory helpers.

:class:`KernelKvm` is the kernel backend's implementation of :class:`guestmem.api.Kvm`.  It also
caches what every vCPU needs from the system fd (the ``kvm_run`` mmap size and the supported CPUID).
"""

from __future__ import annotations

import errno
import os
import weakref

from guestmem import fileabi as fa
from guestmem import uapi as u
from guestmem.args import s64, u64
from guestmem.errors import KvmError
from guestmem.linux import _sys
from guestmem.linux.abi import KVM_GET_SUPPORTED_CPUID, KVM_MAX_CPUID_ENTRIES, cpu_vendor, kvm_cpuid2
from guestmem.linux.memory import KernelHostFile, KernelMapping
from guestmem.linux.vm import KernelVm


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_U64_MAX = (1 << 64) - 1
_CHECK_EXTENSION = u.KVM_CHECK_EXTENSION

class KernelKvm:
    """The real KVM system (``backend = "kernel"``)."""

    backend = "kernel"

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmError(err.errno or errno.ENODEV, f"open {path}") from None
        self.path = path
        self._open = True  # False once close() ran: read on every ioctl, so a plain attribute
        self._finalizer = weakref.finalize(self, _close_quiet, self.fd)
        self._mmap_size: int | None = None
        self._cpuid: kvm_cpuid2 | None = None
        self._cpuid_error: KvmError | None = None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _fd(self, op: str) -> int:
        if not self._open:
            raise KvmError(errno.EBADF, op, "/dev/kvm is closed")
        return self.fd

    @_sys.int_ioctl_method(u.KVM_GET_API_VERSION, "KVM_GET_API_VERSION", takes_arg=False)
    def api_version(self) -> int:
        return _sys.ioctl_fast(self._fd("KVM_GET_API_VERSION"), u.KVM_GET_API_VERSION, 0,
                               "KVM_GET_API_VERSION")

    @_sys.int_ioctl_method(_CHECK_EXTENSION, "KVM_CHECK_EXTENSION")
    def check_extension(self, cap: int) -> int:
        # Inlined (argument rule, open check, ioctl, errno): a capability probe is a ~0.3 us
        # ioctl, and each Python call layered on it would cost as much again.
        if type(cap) is not int or not 0 <= cap <= _U64_MAX:
            cap = u64(cap, "cap")
        if not self._open:
            raise KvmError(errno.EBADF, "KVM_CHECK_EXTENSION", "/dev/kvm is closed")
        ret: int = _sys.ioctl_int(self.fd, _CHECK_EXTENSION, cap)
        if ret < 0:
            raise KvmError(-ret, "KVM_CHECK_EXTENSION")
        return ret

    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> KernelVm:
        vm_type = u64(vm_type, "vm_type")
        fd = _sys.ioctl(self._fd("KVM_CREATE_VM"), u.KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
        return KernelVm(self, fd, vm_type)

    def mmap_anonymous(self, size: int) -> KernelMapping:
        size = u64(size, "size")
        self._fd("mmap")
        return KernelMapping.anonymous(size)

    # -- host memory management (mmap, NUMA policy, fork) ---------------------------------------------
    def mmap(self, length: int, prot: int = 3, flags: int = 0x01, fd: object = None,
             offset: int = 0) -> KernelMapping:
        """``mmap(NULL, length, prot, flags, fd, offset)``; the kernel answers."""
        from guestmem import mman
        from guestmem.linux.memory import map_request

        mman.convert_mmap_args(length, prot, flags, fd, offset)  # the integer rule before EBADF
        self._fd("mmap")
        return map_request(length, prot, flags, fd, offset)

    def set_mempolicy(self, mode: int, nodemask: int | None = None, maxnode: int = 64) -> None:
        """``set_mempolicy`` of this process (every thread allocating from now on)."""
        from guestmem import mman
        from guestmem.args import s32

        mode, maxnode = s32(mode, "mode"), u64(maxnode, "maxnode")
        nodemask = mman.nodemask_value(nodemask)
        self._fd("set_mempolicy")
        _sys.set_mempolicy(mode, nodemask, maxnode)

    def numa_nodes(self) -> list[int]:
        from guestmem.linux.memory import host_numa_nodes

        return host_numa_nodes()

    def fork(self):  # -> KernelChild
        from guestmem.linux.fork import KernelChild

        self._fd("fork")
        return KernelChild()

    def memfd_create(self, size: int, flags: int = fa.MFD_CLOEXEC) -> KernelHostFile:
        size, flags = s64(size, "size"), fa.check_memfd_flags(flags)
        self._fd("memfd_create")
        return KernelHostFile(size, flags=flags)

    # -- what vCPUs need ----------------------------------------------------------------------------
    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = _sys.ioctl(self._fd("KVM_GET_VCPU_MMAP_SIZE"), u.KVM_GET_VCPU_MMAP_SIZE, 0,
                                         "KVM_GET_VCPU_MMAP_SIZE")
        return self._mmap_size

    def supported_cpuid(self) -> kvm_cpuid2 | None:
        """``KVM_GET_SUPPORTED_CPUID`` (None if the host does not offer it, e.g. a non-x86 KVM)."""
        if self._cpuid is None and self._cpuid_error is None:
            cpuid = kvm_cpuid2(nent=KVM_MAX_CPUID_ENTRIES)
            try:
                _sys.ioctl(self._fd("KVM_GET_SUPPORTED_CPUID"), KVM_GET_SUPPORTED_CPUID, cpuid,
                           "KVM_GET_SUPPORTED_CPUID")
                self._cpuid = cpuid
            except KvmError as err:
                self._cpuid_error = err
        return self._cpuid

    def cpu_vendor(self) -> str:
        cpuid = self.supported_cpuid()
        return cpu_vendor(cpuid) if cpuid is not None else ""

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch (:mod:`guestmem.linux.fileops`)."""
        from guestmem.linux.fileops import system_ioctl

        return system_ioctl(self, request, arg)

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close ``/dev/kvm`` (VMs created from it stay usable: their fds are independent)."""
        self._open = False
        self._finalizer()

    def __enter__(self) -> KernelKvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KernelKvm({self.path!r}, {'closed' if self.closed else f'fd={self.fd}'})"


def open_kernel(path: str = "/dev/kvm") -> KernelKvm:
    """Open the real KVM at ``path``; ``KvmError`` (ENOENT, EACCES, ...) if it cannot be opened."""
    return KernelKvm(path)

"""The kernel backend: :mod:`guestmem.api` over the real ``/dev/kvm``.

It is the ground truth the model is checked against: every call is the real ioctl, ``mmap``,
``fallocate`` or file operation, and every refusal is the kernel's own errno (``KvmError``).  Nothing
here emulates or predicts the kernel.  Where the host lacks a feature, the call fails the way that
kernel fails it.  ``guestmem.open("kernel")`` calls :func:`open_kernel`.

Modules: ``system`` (``/dev/kvm``), ``vm``, ``gmem`` (guest_memfd), ``vcpu`` (runs compiled guest
programs, decodes exits), ``memory`` (SIGBUS-safe mappings, pins, memfds), ``loader`` (the memslot
holding guest code and page tables), ``watchdog``, ``caps`` (host probing for ``guestmem caps``),
``demo`` (``guestmem demo``), ``abi`` and ``_sys`` (ctypes plumbing).
"""

from guestmem.linux.gmem import KernelGuestMemfd
from guestmem.linux.loader import LOADER_GPA, LOADER_SIZE, LOADER_SLOT
from guestmem.linux.memory import KernelHostFile, KernelMapping, KernelPin
from guestmem.linux.system import KernelKvm, open_kernel
from guestmem.linux.vcpu import ExitFailEntry, KernelVcpu
from guestmem.linux.vm import KernelVm

__all__ = [
    "LOADER_GPA",
    "LOADER_SIZE",
    "LOADER_SLOT",
    "ExitFailEntry",
    "KernelGuestMemfd",
    "KernelHostFile",
    "KernelKvm",
    "KernelMapping",
    "KernelPin",
    "KernelVcpu",
    "KernelVm",
    "open_kernel",
]

"""ABI pieces only the kernel backend needs (vCPU CPUID setup), kept out of :mod:`guestmem.uapi`.

``guestmem.uapi`` holds the guest-memory ABI both backends share; setting up a real x86 vCPU also
needs ``KVM_GET_SUPPORTED_CPUID``/``KVM_SET_CPUID2`` (``arch/x86/include/uapi/asm/kvm.h``), which the
model never uses.
"""

from __future__ import annotations

import ctypes

from guestmem import uapi as u

KVM_MAX_CPUID_ENTRIES = 256


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` with room for ``KVM_MAX_CPUID_ENTRIES`` entries (the ioctl's size is 8,
    the header's)."""

    _fields_ = [
        ("nent", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("entries", kvm_cpuid_entry2 * KVM_MAX_CPUID_ENTRIES),
    ]


assert ctypes.sizeof(kvm_cpuid_entry2) == 40
KVM_GET_SUPPORTED_CPUID = u._iowr(0x05, 8)  # _IOWR(KVMIO, 0x05, struct kvm_cpuid2) (header: 8 bytes)
KVM_SET_CPUID2 = u._iow(0x90, 8)  # _IOW(KVMIO, 0x90, struct kvm_cpuid2)


def cpu_vendor(cpuid: kvm_cpuid2) -> str:
    """The vendor string of CPUID leaf 0 (``GenuineIntel``, ``AuthenticAMD``, ...); '' if absent."""
    for entry in cpuid.entries[: cpuid.nent]:
        if entry.function == 0:
            return b"".join(int(r).to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx)).decode(
                "ascii", "replace")
    return ""

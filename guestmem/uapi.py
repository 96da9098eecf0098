"""The KVM guest-private-memory ABI: ioctl numbers, ``ctypes`` structs, flags, exits, capabilities.

One source of truth for every number both backends use.  Values follow upstream
``include/uapi/linux/kvm.h`` (and ``arch/x86/include/uapi/asm/kvm.h``, ``kvm_para.h``) as of Linux
6.18, plus the in-place conversion series (seed 004 and its revisions), whose numbers are not
upstream yet and are marked as such.  Struct sizes are asserted at import time against upstream's.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
HPAGE_2M: Final = 2 << 20
HPAGE_1G: Final = 1 << 30

# --- ioctl number encoding (asm-generic/ioctl.h) ----------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (
        size << _IOC_SIZESHIFT
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, KVMIO, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure] | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_WRITE, KVMIO, nr, size)


def _ior(nr: int, struct: type[ctypes.Structure] | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_READ, KVMIO, nr, size)


def _iowr(nr: int, struct: type[ctypes.Structure] | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_READ | _IOC_WRITE, KVMIO, nr, size)


KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

# --- VM types (x86) ---------------------------------------------------------------------------------
KVM_X86_DEFAULT_VM: Final = 0
KVM_X86_SW_PROTECTED_VM: Final = 1
KVM_X86_SEV_VM: Final = 2
KVM_X86_SEV_ES_VM: Final = 3
KVM_X86_SNP_VM: Final = 4
KVM_X86_TDX_VM: Final = 5
VM_TYPE_NAMES: Final = {
    KVM_X86_DEFAULT_VM: "DEFAULT",
    KVM_X86_SW_PROTECTED_VM: "SW_PROTECTED",
    KVM_X86_SEV_VM: "SEV",
    KVM_X86_SEV_ES_VM: "SEV_ES",
    KVM_X86_SNP_VM: "SNP",
    KVM_X86_TDX_VM: "TDX",
}

# --- memslot flags ----------------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
KVM_USER_MEM_SLOTS: Final = 32764  # x86: KVM_MEM_SLOTS_NUM (32767) - private slots (3)
KVM_MEM_SLOTS_NUM: Final = 32767
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1
KVM_ADDRESS_SPACE_NUM: Final = 2  # x86 (SMM); a VM with private memory has only 1

# --- guest_memfd flags ------------------------------------------------------------------------------
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1
GUEST_MEMFD_FLAG_NAMES: Final = {GUEST_MEMFD_FLAG_MMAP: "MMAP", GUEST_MEMFD_FLAG_INIT_SHARED: "INIT_SHARED"}

# --- memory attributes and memory-fault exits -------------------------------------------------------
KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3

# KVM_SET_MEMORY_ATTRIBUTES2 content modes (in-place conversion RFC v3..v5 only; dropped in v6).
KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED: Final = 0
KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO: Final = 1 << 0
KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE: Final = 1 << 1

# --- fallocate(2) modes (linux/falloc.h) ------------------------------------------------------------
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_NO_HIDE_STALE: Final = 0x04
FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_INSERT_RANGE: Final = 0x20
FALLOC_FL_UNSHARE_RANGE: Final = 0x40
FALLOC_FL_WRITE_ZEROES: Final = 0x80  # Linux 6.17+

# --- exits ------------------------------------------------------------------------------------------
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_MEMORY_FAULT: Final = 39
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1
KVM_INTERNAL_ERROR_EMULATION: Final = 1

# --- hypercalls (kvm_para.h) ------------------------------------------------------------------------
KVM_HC_MAP_GPA_RANGE: Final = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K: Final = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M: Final = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G: Final = 1 << 1
KVM_MAP_GPA_RANGE_ENC_STAT_MASK: Final = 1 << 4  # ENCRYPTED
KVM_MAP_GPA_RANGE_ENCRYPTED: Final = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED: Final = 0
KVM_HYPERCALL_LONG_MODE: Final = 1 << 0
# Errors a hypercall returns to the guest in RAX (negated): include/uapi/linux/kvm_para.h
KVM_ENOSYS: Final = 1000
KVM_EFAULT: Final = 14
KVM_EINVAL: Final = 22
KVM_E2BIG: Final = 7
KVM_EPERM: Final = 1

# --- capabilities -----------------------------------------------------------------------------------
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244
# In-place conversion series: numbers the postings disagree on (249 in v7 patch 13, 251 in the
# rebased tree).  The model makes them configurable; these are the defaults.
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: Final = 249
KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS: Final = 250  # RFC v5 only (content modes)

CAP_NAMES: Final = {
    KVM_CAP_USER_MEMORY: "USER_MEMORY",
    KVM_CAP_NR_MEMSLOTS: "NR_MEMSLOTS",
    KVM_CAP_SYNC_MMU: "SYNC_MMU",
    KVM_CAP_READONLY_MEM: "READONLY_MEM",
    KVM_CAP_MULTI_ADDRESS_SPACE: "MULTI_ADDRESS_SPACE",
    KVM_CAP_IMMEDIATE_EXIT: "IMMEDIATE_EXIT",
    KVM_CAP_EXIT_HYPERCALL: "EXIT_HYPERCALL",
    KVM_CAP_USER_MEMORY2: "USER_MEMORY2",
    KVM_CAP_MEMORY_FAULT_INFO: "MEMORY_FAULT_INFO",
    KVM_CAP_MEMORY_ATTRIBUTES: "MEMORY_ATTRIBUTES",
    KVM_CAP_GUEST_MEMFD: "GUEST_MEMFD",
    KVM_CAP_VM_TYPES: "VM_TYPES",
    KVM_CAP_PRE_FAULT_MEMORY: "PRE_FAULT_MEMORY",
    KVM_CAP_GUEST_MEMFD_FLAGS: "GUEST_MEMFD_FLAGS",
}

# --- structs ----------------------------------------------------------------------------------------
_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    _fields_ = [
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
        ("guest_memfd_offset", _u64),
        ("guest_memfd", _u32),
        ("pad1", _u32),
        ("pad2", _u64 * 14),
    ]


class kvm_memory_attributes(ctypes.Structure):
    _fields_ = [("address", _u64), ("size", _u64), ("attributes", _u64), ("flags", _u64)]


class kvm_memory_attributes2(ctypes.Structure):
    """In-place conversion series (v7/v8 layout): ``offset`` aliases ``address``; out: ``error_offset``."""

    _fields_ = [
        ("offset", _u64),
        ("size", _u64),
        ("attributes", _u64),
        ("flags", _u64),
        ("error_offset", _u64),
        ("reserved", _u64 * 11),
    ]


class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = [("size", _u64), ("flags", _u64), ("reserved", _u64 * 6)]


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [("gpa", _u64), ("size", _u64), ("flags", _u64), ("padding", _u64 * 5)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", _u32), ("flags", _u32), ("args", _u64 * 4), ("pad", _u8 * 64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, _u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", _u64), ("limit", _u16), ("padding", _u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", _u64),
        ("cr2", _u64),
        ("cr3", _u64),
        ("cr4", _u64),
        ("cr8", _u64),
        ("efer", _u64),
        ("apic_base", _u64),
        ("interrupt_bitmap", _u64 * 4),
    ]


# kvm_run: the header, then a 256-byte union of per-exit payloads.
class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", _u8), ("size", _u8), ("port", _u16), ("count", _u32), ("data_offset", _u64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", _u64), ("data", _u8 * 8), ("len", _u32), ("is_write", _u8)]


class _kvm_run_hypercall(ctypes.Structure):
    _fields_ = [("nr", _u64), ("args", _u64 * 6), ("ret", _u64), ("flags", _u64)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", _u32), ("ndata", _u32), ("data", _u64 * 16)]


class _kvm_run_memory_fault(ctypes.Structure):
    _fields_ = [("flags", _u64), ("gpa", _u64), ("size", _u64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", _u64), ("cpu", _u32)]


class _kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", _u32), ("ndata", _u32), ("data", _u64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("hypercall", _kvm_run_hypercall),
        ("internal", _kvm_run_internal),
        ("memory_fault", _kvm_run_memory_fault),
        ("fail_entry", _kvm_run_fail_entry),
        ("system_event", _kvm_run_system_event),
        ("padding", _u8 * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", _u8),
        ("immediate_exit", _u8),
        ("padding1", _u8 * 6),
        ("exit_reason", _u32),
        ("ready_for_interrupt_injection", _u8),
        ("if_flag", _u8),
        ("flags", _u16),
        ("cr8", _u64),
        ("apic_base", _u64),
        ("u", _kvm_run_exit),
        ("kvm_valid_regs", _u64),
        ("kvm_dirty_regs", _u64),
        ("s", _u8 * 2048),
    ]


# Upstream sizes; a mismatch is a bug in this file, caught at import.
_EXPECTED_SIZES = {
    kvm_userspace_memory_region: 32,
    kvm_userspace_memory_region2: 160,
    kvm_memory_attributes: 32,
    kvm_memory_attributes2: 128,
    kvm_create_guest_memfd: 64,
    kvm_pre_fault_memory: 64,
    kvm_enable_cap: 104,
    kvm_regs: 144,
    kvm_segment: 24,
    kvm_sregs: 312,
    kvm_run: 2352,
}
for _struct, _size in _EXPECTED_SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct), _size)
assert kvm_run.u.offset == 32
# The in-place series asserts that address/size/attributes/flags sit at the same offsets in both.
for _f in ("size", "attributes", "flags"):
    assert getattr(kvm_memory_attributes2, _f).offset == getattr(kvm_memory_attributes, _f).offset
assert kvm_memory_attributes2.offset.offset == kvm_memory_attributes.address.offset

# --- ioctls -----------------------------------------------------------------------------------------
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, 8)
KVM_SET_USER_MEMORY_REGION2: Final = _iow(0x49, kvm_userspace_memory_region2)
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, kvm_regs)
KVM_SET_REGS: Final = _iow(0x82, kvm_regs)
KVM_GET_SREGS: Final = _ior(0x83, kvm_sregs)
KVM_SET_SREGS: Final = _iow(0x84, kvm_sregs)
KVM_ENABLE_CAP: Final = _iow(0xA3, kvm_enable_cap)
KVM_SET_MEMORY_ATTRIBUTES: Final = _iow(0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD: Final = _iowr(0xD4, kvm_create_guest_memfd)
KVM_PRE_FAULT_MEMORY: Final = _iowr(0xD5, kvm_pre_fault_memory)
KVM_SET_MEMORY_ATTRIBUTES2: Final = _iowr(0xD2, kvm_memory_attributes2)  # on the guest_memfd fd

# --- confidential launch (arch/x86/include/uapi/asm/kvm.h) ------------------------------------------
KVM_MEMORY_ENCRYPT_OP: Final = _iowr(0xBA, 8)  # the argument is an unsigned long (a pointer)
KVM_SEV_SNP_LAUNCH_UPDATE: Final = 101
KVM_SEV_SNP_LAUNCH_FINISH: Final = 102
KVM_SEV_SNP_PAGE_TYPE_NORMAL: Final = 0x1
KVM_TDX_INIT_MEM_REGION: Final = 3
KVM_TDX_FINALIZE_VM: Final = 4
KVM_TDX_MEASURE_MEMORY_REGION: Final = 1 << 0


class kvm_sev_cmd(ctypes.Structure):
    _fields_ = [("id", _u32), ("pad0", _u32), ("data", _u64), ("error", _u32), ("sev_fd", _u32)]


class kvm_sev_snp_launch_update(ctypes.Structure):
    _fields_ = [("gfn_start", _u64), ("uaddr", _u64), ("len", _u64), ("type", ctypes.c_uint8),
                ("pad0", ctypes.c_uint8), ("flags", ctypes.c_uint16), ("pad1", _u32), ("pad2", _u64 * 4)]


class kvm_sev_snp_launch_finish(ctypes.Structure):
    _fields_ = [("id_block_uaddr", _u64), ("id_auth_uaddr", _u64), ("id_block_en", ctypes.c_uint8),
                ("auth_key_en", ctypes.c_uint8), ("vcek_disabled", ctypes.c_uint8),
                ("host_data", ctypes.c_uint8 * 32), ("pad0", ctypes.c_uint8 * 3), ("flags", ctypes.c_uint16),
                ("pad1", _u64 * 4)]


class kvm_tdx_cmd(ctypes.Structure):
    _fields_ = [("id", _u32), ("flags", _u32), ("data", _u64), ("hw_error", _u64)]


class kvm_tdx_init_mem_region(ctypes.Structure):
    _fields_ = [("source_addr", _u64), ("gpa", _u64), ("nr_pages", _u64)]


assert ctypes.sizeof(kvm_sev_cmd) == 24 and ctypes.sizeof(kvm_tdx_cmd) == 24
assert ctypes.sizeof(kvm_sev_snp_launch_update) == 64 and ctypes.sizeof(kvm_sev_snp_launch_finish) == 88
assert KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA

assert KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
assert KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2
assert KVM_CREATE_GUEST_MEMFD == 0xC040AED4
assert KVM_PRE_FAULT_MEMORY == 0xC040AED5
assert KVM_SET_MEMORY_ATTRIBUTES2 == 0xC080AED2

# --- the same numbers with names (IntFlag/IntEnum: still ints) ---------------------------------------
# The plain constants above are what the code uses (fast, and exactly the header's values); these
# named views are what values are *shown* as, and what a user may pass for readability:
# ``repr(GuestMemfdFlag(3))`` is ``GUEST_MEMFD_FLAG_MMAP|INIT_SHARED``.


class _KernelNames:
    """repr/str as the kernel's headers spell a value: ``KVM_MEM_READONLY|GUEST_MEMFD``."""

    def __repr__(self) -> str:
        value = int(self)  # type: ignore[call-overload]
        cls = type(self)
        if issubclass(cls, enum.IntFlag):
            names = [m.name for m in cls if m.value and value & m.value == m.value]  # type: ignore[attr-defined]
            rest = value & ~sum(m.value for m in cls if m.value and value & m.value == m.value)  # type: ignore[attr-defined]
            if not names:
                return hex(value) if value else "0"
            prefix = _common_prefix(names)
            parts = [names[0]] + [n[len(prefix):] for n in names[1:]]
            return "|".join(parts + ([hex(rest)] if rest else []))
        return str(getattr(self, "name", None) or value)

    __str__ = __repr__


def _common_prefix(names: list[str]) -> str:
    """The ``WORD_`` prefix every name shares (``GUEST_MEMFD_FLAG_``), to shorten all but the first."""
    if len(names) < 2:
        return ""
    parts = [n.split("_") for n in names]
    common = []
    for words in zip(*parts, strict=False):
        if len(set(words)) != 1:
            break
        common.append(words[0])
    return "_".join(common) + "_" if common else ""


class VmType(_KernelNames, enum.IntEnum):
    KVM_X86_DEFAULT_VM = KVM_X86_DEFAULT_VM
    KVM_X86_SW_PROTECTED_VM = KVM_X86_SW_PROTECTED_VM
    KVM_X86_SEV_VM = KVM_X86_SEV_VM
    KVM_X86_SEV_ES_VM = KVM_X86_SEV_ES_VM
    KVM_X86_SNP_VM = KVM_X86_SNP_VM
    KVM_X86_TDX_VM = KVM_X86_TDX_VM


class MemFlag(_KernelNames, enum.IntFlag):
    KVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES
    KVM_MEM_READONLY = KVM_MEM_READONLY
    KVM_MEM_GUEST_MEMFD = KVM_MEM_GUEST_MEMFD


class GuestMemfdFlag(_KernelNames, enum.IntFlag):
    GUEST_MEMFD_FLAG_MMAP = GUEST_MEMFD_FLAG_MMAP
    GUEST_MEMFD_FLAG_INIT_SHARED = GUEST_MEMFD_FLAG_INIT_SHARED


class MemoryAttribute(_KernelNames, enum.IntFlag):
    KVM_MEMORY_ATTRIBUTE_PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


class MemoryExitFlag(_KernelNames, enum.IntFlag):
    KVM_MEMORY_EXIT_FLAG_PRIVATE = KVM_MEMORY_EXIT_FLAG_PRIVATE


class ContentMode(_KernelNames, enum.IntFlag):
    """``KVM_SET_MEMORY_ATTRIBUTES2`` flags in RFC v5 (0 is UNSPECIFIED)."""

    KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO = KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO
    KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE = KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE


class MapGpaRangeAttr(_KernelNames, enum.IntFlag):
    """``KVM_HC_MAP_GPA_RANGE``'s attrs argument (4K is the absence of both size bits)."""

    ENCRYPTED = KVM_MAP_GPA_RANGE_ENCRYPTED
    PAGE_SZ_2M = KVM_MAP_GPA_RANGE_PAGE_SZ_2M
    PAGE_SZ_1G = KVM_MAP_GPA_RANGE_PAGE_SZ_1G


class FallocFlag(_KernelNames, enum.IntFlag):
    FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE
    FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE
    FALLOC_FL_NO_HIDE_STALE = FALLOC_FL_NO_HIDE_STALE
    FALLOC_FL_COLLAPSE_RANGE = FALLOC_FL_COLLAPSE_RANGE
    FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE
    FALLOC_FL_INSERT_RANGE = FALLOC_FL_INSERT_RANGE
    FALLOC_FL_UNSHARE_RANGE = FALLOC_FL_UNSHARE_RANGE
    FALLOC_FL_WRITE_ZEROES = FALLOC_FL_WRITE_ZEROES


class Hypercall(_KernelNames, enum.IntEnum):
    KVM_HC_MAP_GPA_RANGE = KVM_HC_MAP_GPA_RANGE


class ExitReason(_KernelNames, enum.IntEnum):
    KVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN
    KVM_EXIT_EXCEPTION = KVM_EXIT_EXCEPTION
    KVM_EXIT_IO = KVM_EXIT_IO
    KVM_EXIT_HYPERCALL = KVM_EXIT_HYPERCALL
    KVM_EXIT_DEBUG = KVM_EXIT_DEBUG
    KVM_EXIT_HLT = KVM_EXIT_HLT
    KVM_EXIT_MMIO = KVM_EXIT_MMIO
    KVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN
    KVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY
    KVM_EXIT_INTR = KVM_EXIT_INTR
    KVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR
    KVM_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT
    KVM_EXIT_MEMORY_FAULT = KVM_EXIT_MEMORY_FAULT


def named(enum_cls: type[enum.IntEnum] | type[enum.IntFlag], value: int) -> object:
    """``value`` as a member of ``enum_cls`` when it is one (flags: any combination), else the int."""
    try:
        return enum_cls(value)
    except ValueError:
        return value

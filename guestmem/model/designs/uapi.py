"""The uAPI numbers of the three designs that were posted but never merged (seeds 001, 002, 000).

They live here, not in :mod:`guestmem.uapi`, because that module is the ABI of upstream Linux as
merged; these are the ABIs of the v7, v8 and v9 postings of the fd-based private memory series,
which the model runs so that their trade-offs can be measured.  Two of them collide with numbers
upstream later gave to something else, and the collisions are kept on purpose (a v7 kernel really
meant ``F_SEAL_AUTO_ALLOCATE`` by ``0x20``, which 6.3 reassigned to ``F_SEAL_EXEC``; every posting
used bit 2 of the memslot flags for ``KVM_MEM_PRIVATE``, which 6.8 reassigned to
``KVM_MEM_GUEST_MEMFD``).
"""

from __future__ import annotations

from typing import Final

from guestmem import uapi as u

# --- memfd_create(2) flags (include/uapi/linux/memfd.h) ----------------------------------------------
MFD_CLOEXEC: Final = 0x0001
MFD_ALLOW_SEALING: Final = 0x0002
MFD_HUGETLB: Final = 0x0004
MFD_INACCESSIBLE: Final = 0x0008  # v7 (seed 001) and v8 (seed 002); never merged
MFD_ALL_FLAGS: Final = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB | MFD_INACCESSIBLE

# --- memfd seals: v7 patch 01 (reassigned to F_SEAL_EXEC upstream in 6.3) --------------------------------
F_SEAL_AUTO_ALLOCATE: Final = 0x0020

# --- memfile_notifier node flags (v7 include/linux/memfile_notifier.h) ----------------------------------
MEMFILE_F_USER_INACCESSIBLE: Final = 1 << 0  # no read/write/mmap from userspace
MEMFILE_F_UNMOVABLE: Final = 1 << 1  # no page migration
MEMFILE_F_UNRECLAIMABLE: Final = 1 << 2  # no swap-out / reclaim
MEMFILE_F_ALLOWED_MASK: Final = MEMFILE_F_USER_INACCESSIBLE | MEMFILE_F_UNMOVABLE | MEMFILE_F_UNRECLAIMABLE
# What KVM registers with (v7 patch 11: KVM_MEMFILE_FLAGS).
KVM_MEMFILE_FLAGS: Final = MEMFILE_F_ALLOWED_MASK

# --- pseudo-filesystem magics (include/uapi/linux/magic.h, as posted) -----------------------------------
INACCESSIBLE_MAGIC: Final = 0x494E4143  # "INAC", v8
RESTRICTEDMEM_MAGIC: Final = 0x5245534D  # "RESM", v9

# --- syscall (arch/x86/entry/syscalls/syscall_64.tbl, v9) -----------------------------------------------
NR_MEMFD_RESTRICTED: Final = 451

# --- KVM (include/uapi/linux/kvm.h as posted in v7..v9) ---------------------------------------------------
KVM_MEM_PRIVATE: Final = 1 << 2  # the same bit upstream later named KVM_MEM_GUEST_MEMFD
assert KVM_MEM_PRIVATE == u.KVM_MEM_GUEST_MEMFD
KVM_ENC_REGION_SIZE: Final = 16  # struct kvm_enc_region { __u64 addr; __u64 size; }
KVM_MEMORY_ENCRYPT_REG_REGION: Final = u._ior(0xBB, KVM_ENC_REGION_SIZE)
KVM_MEMORY_ENCRYPT_UNREG_REGION: Final = u._ior(0xBC, KVM_ENC_REGION_SIZE)
# struct kvm_userspace_memory_region_ext: the v1 region, then {private,restricted}_offset (u64),
# {private,restricted}_fd (u32), pad1 (u32), pad2[14] (u64).
KVM_USERSPACE_MEMORY_REGION_EXT_SIZE: Final = 32 + 8 + 4 + 4 + 14 * 8

# The keys the comparison uses for each design (``guestmem compare --json``).
DESIGN_V7: Final = "memfile_notifier"
DESIGN_V8: Final = "inaccessible_memfd"
DESIGN_V9: Final = "restrictedmem"
HISTORICAL_DESIGNS: Final = (DESIGN_V7, DESIGN_V8, DESIGN_V9)

"""The loader memslot: where a kernel-backend guest's page tables, GDT, TSS, stack and code live.

Guest programs touch only the memory the test or VMM binds; everything the CPU itself needs sits in
one extra memslot that each :class:`~guestmem.linux.vm.KernelVm` creates lazily on the first
``Vcpu.load()``:

* slot ``LOADER_SLOT`` = ``KVM_USER_MEM_SLOTS - 1`` (32763 on x86), address space 0;
* GPA window ``[LOADER_GPA, LOADER_GPA + LOADER_SIZE)`` = ``[0xff000000, 0x100000000)``, the 16 MiB
  just below 4 GiB (above the IOAPIC/LAPIC/TSS pages KVM may use at 0xfec00000-0xfeffffff);
* backed by private anonymous memory (``MAP_NORESERVE``: untouched pages cost nothing).

Users must keep their own memslots out of that slot id and GPA window (otherwise ``load()`` fails
with the kernel's ``EEXIST``).  The layout inside the window is :mod:`guestmem.guest.x86`'s:
tables at the bottom (2 MiB of page directories identity-mapping 512 GiB), code from
``x86.CODE_OFFSET`` (4 MiB) up to ``IMAGE_OFFSET`` (12 MiB), in per-vCPU regions, and the top
4 MiB for a :class:`~guestmem.guest.image.GuestImage` (``[0xffc00000, 0x100000000)``).
"""

from __future__ import annotations

import numpy as np

from guestmem import uapi as u
from guestmem.guest import image as guest_image
from guestmem.guest import x86
from guestmem.linux import _sys
from guestmem.linux.memory import KernelMapping

LOADER_SLOT = u.KVM_USER_MEM_SLOTS - 1
LOADER_GPA = 0xFF00_0000
LOADER_SIZE = 16 << 20
CODE_REGION_MIN = 64 << 10
IMAGE_OFFSET = guest_image.IMAGE_AREA_GPA - LOADER_GPA  # compiled programs' code regions stop here
assert LOADER_GPA + LOADER_SIZE == guest_image.IMAGE_AREA_END


class Loader:
    """The loader window of one VM: its memory, its memslot, and the code regions handed to vCPUs."""

    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd
        self.memory = KernelMapping.anonymous(LOADER_SIZE, shared=False)
        try:
            region = u.kvm_userspace_memory_region(slot=LOADER_SLOT, flags=0, guest_phys_addr=LOADER_GPA,
                                                   memory_size=LOADER_SIZE, userspace_addr=self.memory.addr)
            _sys.ioctl(vm_fd, u.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
            self._write_tables()
        except BaseException:
            self.memory.close()
            raise
        self._next_code = x86.CODE_OFFSET
        self._regions: dict[int, tuple[int, int]] = {}  # vcpu id -> (offset, size)

    def _write_tables(self) -> None:
        for offset, entries in x86.page_table_entries(LOADER_GPA).items():
            self.memory.write(offset, np.asarray(entries, dtype=np.uint64).tobytes())
        index = np.arange(x86.PD_PAGES * 512, dtype=np.uint64)
        pds = (index << np.uint64(21)) | np.uint64(x86.pd_entry(0))
        self.memory.write(x86.PD_OFFSET, pds.tobytes())
        self.memory.write(x86.GDT_OFFSET, x86.gdt_bytes(LOADER_GPA))

    def code_region(self, vcpu_id: int, size: int) -> int:
        """The GPA where ``vcpu_id`` may place ``size`` bytes of code (reused across its loads)."""
        offset, cap = self._regions.get(vcpu_id, (0, 0))
        if size > cap:
            cap = max(CODE_REGION_MIN, -(-size // u.PAGE_SIZE) * u.PAGE_SIZE)
            if self._next_code + cap > IMAGE_OFFSET:
                raise ValueError(f"program of {size} bytes does not fit in the loader window "
                                 f"({IMAGE_OFFSET - self._next_code} bytes left)")
            offset, self._next_code = self._next_code, self._next_code + cap
            self._regions[vcpu_id] = (offset, cap)
        return LOADER_GPA + offset

    def place_image(self, image: guest_image.GuestImage) -> None:
        """Write ``image`` (code, then its zeroed ``.bss``) at its base in the image area."""
        self.write(image.base, image.memory())

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa - LOADER_GPA, data)

    def close(self) -> None:
        self.memory.close()

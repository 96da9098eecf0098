"""The model's loader window: the same memslot, GPA window and layout the kernel backend uses.

Why the same: the x86 vCPU must run the *exact* bytes :func:`guestmem.guest.x86.compile_program`
emits, at the same addresses, over the same page tables, so that a program behaves identically on
both backends.  So, as :mod:`guestmem.linux.loader` does on ``/dev/kvm``, each model VM gets (lazily,
on the first ``load()`` of an x86 vCPU) one ordinary memslot ``LOADER_SLOT`` over anonymous memory
of the model's host process at ``[LOADER_GPA, LOADER_GPA + LOADER_SIZE)``, holding the identity
map (2 MiB pages over 512 GiB), the GDT and the per-vCPU code regions.  Being an ordinary memslot,
it goes through the model's SPTEs like any other memory (instruction fetches and page-table walks
fault it in), and a user memslot overlapping it makes ``load()`` fail with ``EEXIST`` as on the
kernel.  The constants are the kernel backend's (a test checks they agree); the model does not
import the kernel backend.

On a TDX-like VM the window is reached with the shared GPA bit set (CR3, the table pointers and
the window's own 2 MiB entries carry it), because the window is ordinary memory without a
guest_memfd and a private access to it would be a memory fault; everything else in the identity
map is private, as a TD's memory is.  (A real TD executes only from private memory; the window is
the model's stand-in for firmware-loaded code, so this departure is on purpose.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from guestmem import uapi as u
from guestmem.guest import x86
from guestmem.guest.image import IMAGE_AREA_GPA

if TYPE_CHECKING:
    from guestmem.model.kvm.vm import ModelVm
    from guestmem.model.process import ModelMapping

TDX_GPAW = 40  # as guestmem.model.kvm.x86.cpu.TDX_GPAW
LOADER_SLOT = u.KVM_USER_MEM_SLOTS - 1
LOADER_GPA = 0xFF00_0000
LOADER_SIZE = 16 << 20
CODE_REGION_MIN = 64 << 10
IMAGE_OFFSET = IMAGE_AREA_GPA - LOADER_GPA  # guestmem/guest/image.py: images live above


class ModelLoader:
    """One VM's loader window: its memory, its memslot, and the code regions handed to vCPUs."""

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm
        # The GPA bits through which the CPU reaches the window (TDX: the shared bit).
        self.alias = 1 << (TDX_GPAW - 1) if vm.arch.name == "tdx" else 0
        self.memory: ModelMapping = vm.system.mmap_anonymous(LOADER_SIZE)
        try:
            vm.set_user_memory_region(LOADER_SLOT, 0, LOADER_GPA, LOADER_SIZE, self.memory.addr)
            self._write_tables()
        except BaseException:
            self.memory.close()
            raise
        self._next_code = x86.CODE_OFFSET
        self._regions: dict[int, tuple[int, int]] = {}  # vcpu id -> (offset, size)

    def _write_tables(self) -> None:
        for offset, entries in x86.page_table_entries(LOADER_GPA | self.alias).items():
            self.memory.write(offset, np.asarray(entries, dtype=np.uint64).tobytes())
        index = np.arange(x86.PD_PAGES * 512, dtype=np.uint64)
        pds = (index << np.uint64(21)) | np.uint64(x86.pd_entry(0))
        first = LOADER_GPA >> 21
        pds[first : first + LOADER_SIZE // (2 << 20)] |= np.uint64(self.alias)
        self.memory.write(x86.PD_OFFSET, pds.tobytes())
        self.memory.write(x86.GDT_OFFSET, x86.gdt_bytes(LOADER_GPA))

    def code_region(self, vcpu_id: int, size: int) -> int:
        """The GPA where ``vcpu_id`` may place ``size`` bytes of code (reused across its loads)."""
        offset, cap = self._regions.get(vcpu_id, (0, 0))
        if size > cap:
            cap = max(CODE_REGION_MIN, -(-size // u.PAGE_SIZE) * u.PAGE_SIZE)
            if self._next_code + cap > IMAGE_OFFSET:  # the top 4 MiB hold a GuestImage
                raise ValueError(f"program of {size} bytes does not fit in the loader window "
                                 f"({IMAGE_OFFSET - self._next_code} bytes left)")
            offset, self._next_code = self._next_code, self._next_code + cap
            self._regions[vcpu_id] = (offset, cap)
        return LOADER_GPA + offset

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa - LOADER_GPA, data)

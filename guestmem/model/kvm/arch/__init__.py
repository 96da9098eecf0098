"""Confidential-computing flavours: the few arch hooks in which VM types differ.

A flavour is chosen by VM type at ``create_vm``.  Everything else in the model is shared; a
flavour only answers: does this VM have private memory, how does the hardware say whether an
access is private, what must happen when a private page is first handed to the guest (prepare)
or given back (invalidate), how large private mappings may be, and whether private and shared
SPTEs live in separate trees (TDX's mirror roots).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.model.mm.encryption import scramble

PS = u.PAGE_SIZE
VERIFY_CHUNK = 256 * PS  # 1 MiB: what a guest read is checked in, page aligned

if TYPE_CHECKING:
    from guestmem.api import Exit
    from guestmem.guest.ops import Access
    from guestmem.model.kvm.guest_memfd import GmemFile, GmemInode
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.vcpu import ModelVcpu
    from guestmem.model.kvm.vm import ModelVm
    from guestmem.model.mm.frames import FramePool


class Flavour:
    """The DEFAULT VM type: no private memory."""

    name = "default"
    vm_type = u.KVM_X86_DEFAULT_VM
    has_private_mem = False
    # The hardware reports private/shared per access (SNP C-bit, TDX shared-GPA bit).
    hw_access_kind = False
    mirrored_tdp = False
    max_private_order = 18
    # Guest-state protection (SEV-ES and later): no READONLY memslots.
    has_protected_state = False

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm

    def fault_is_private(self, gfn: int, access: Access) -> bool:
        """Whether a guest access faults as private.  Software-protected and default VMs take
        the gfn's current attribute (upstream sets PFERR_PRIVATE_ACCESS from it); hardware
        flavours take the guest's own choice."""
        if self.hw_access_kind and access != "auto":
            return access == "private"
        if self.hw_access_kind:
            return True  # a CoCo guest's ordinary accesses are private (C-bit set / shared bit clear)
        return self.vm.mem_is_private(gfn)

    def access_kind(self, access: Access) -> bool | None:
        """Which SPTE kind a guest access may go through: None = whatever is mapped (the SPTE's kind
        always equals the gfn's attribute); True/False where the hardware tags each access."""
        if not self.hw_access_kind:
            return None
        return access != "shared"

    def guest_write(self, pool: FramePool, pfn: int, off: int, n: int, byte: int, private: bool) -> None:
        """The guest stores ``byte`` over ``n`` bytes at byte ``off`` of the frames from ``pfn``."""
        pool.view(pfn, (off + n + PS - 1) // PS).reshape(-1)[off : off + n].fill(byte)

    def guest_read(self, pool: FramePool, pfn: int, off: int, n: int, private: bool) -> np.ndarray:
        """What the guest reads there (a memory-encryption engine decrypts private pages)."""
        return pool.view(pfn, (off + n + PS - 1) // PS).reshape(-1)[off : off + n]

    def guest_first_mismatch(self, pool: FramePool, pfn: int, off: int, n: int, byte: int,
                             private: bool) -> tuple[int, int] | None:
        """Where the guest, reading ``n`` bytes at byte ``off`` of the frames from ``pfn``, first
        sees something other than ``byte``: (offset from ``off``, the byte seen), or None.  Reads in
        chunks, so that checking all of a large guest needs no copy (decrypted, or a comparison
        mask) of all of it."""
        pos, end = off, off + n
        while pos < end:
            stop = min(end, (pos // VERIFY_CHUNK + 1) * VERIFY_CHUNK)
            seen = self.guest_read(pool, pfn, pos, stop - pos, private)
            bad = np.flatnonzero(seen != byte)
            if bad.size:
                k = int(bad[0])
                return pos - off + k, int(seen[k])
            pos = stop
        return None

    def guest_access_fault(self, gfn: int, end: int, private: bool, write: bool) -> tuple[int, str] | None:
        """A guest-side exception before the access (SNP #VC on an unvalidated page, TDX #VE on an
        unaccepted one): ``(gfn, reason)`` for the first such gfn in [gfn, end), else None."""
        return None

    def accept(self, vcpu: ModelVcpu, gpa: int, size: int) -> Exit | None:
        """Guest acceptance of private pages (TDX ACCEPT / SNP PVALIDATE); nothing to do here."""
        return None

    def pre_fault_allowed(self) -> bool:
        """``kvm->arch.pre_fault_allowed``: false for SNP/TDX until the launch is finalized."""
        return True

    finalized = True
    gfn_alias_bit = 0  # TDX: the shared bit, which no memslot may reach

    def check_fault_allowed(self) -> None:
        """Raise (and bug the VM) where a guest fault is not allowed yet."""

    def decode_gpa(self, gpa: int, access: Access) -> tuple[int, Access]:
        """Split a guest address into the gpa KVM sees and the access kind it implies."""
        return gpa, access

    def private_zapped(self, gfn: int, end: int) -> None:
        """Private SPTEs over [gfn, end) were removed (TDX: the pages leave the TD)."""

    def host_may_access(self, pfn: int, n: int) -> int | None:
        """The first frame of the run the host may not touch (SNP: guest-owned in the RMP)."""
        return None

    def on_accept(self, pool: FramePool, gfn: int, end: int, pfn: int) -> None:
        """The guest accepted private gfns [gfn, end); nothing to record without acceptance."""

    def launch_update(self, gpa: int, size: int, src: bytes | None) -> int:
        raise KvmError(errno.ENOTTY, "launch_update", f"{self.name} VMs have no launch flow")

    def launch_finalize(self) -> None:
        raise KvmError(errno.ENOTTY, "launch_finalize", f"{self.name} VMs have no launch flow")

    # --- content modes (in-place conversion RFC v5, kvm_arch_gmem_supported_content_modes) ----
    def supported_content_modes(self, to_private: bool) -> int:
        return 0

    def apply_content_mode(self, inode: GmemInode, start: int, end: int, mode: int, to_private: bool) -> None:
        """Carry out ``mode`` on the allocated pages of [start, end) (only supported modes reach here)."""

    def gmem_prepare(self, gmem: GmemFile, slot: Memslot, runs: list[tuple[int, int, int, int]]) -> None:
        """``kvm_arch_gmem_prepare``: make freshly handed-out pages usable as private memory."""

    def gmem_invalidate(self, pfn: int, npages: int) -> None:
        """``kvm_arch_gmem_invalidate``: pages leave private use (SNP: RMP reclaim)."""


class SwProtectedFlavour(Flavour):
    """KVM_X86_SW_PROTECTED_VM: private memory without hardware protection (for development)."""

    name = "sw-protected"
    vm_type = u.KVM_X86_SW_PROTECTED_VM
    has_private_mem = True

    def supported_content_modes(self, to_private: bool) -> int:
        return u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO | u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE

    def apply_content_mode(self, inode: GmemInode, start: int, end: int, mode: int, to_private: bool) -> None:
        pool = self.vm.system.pool
        for s, e, pfn, _ in inode.cache.lookup_range(start, end):
            if pfn is None:
                continue
            frames = pool.view(pfn, e - s).reshape(-1)
            if mode == u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO:
                frames.fill(0)
            elif mode == u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED:
                # The test vehicle scrambles, so that relying on UNSPECIFIED shows up in tests.
                scramble(frames)
            # PRESERVE: nothing to do without encryption.


def _flavours() -> dict[int, type[Flavour]]:
    from guestmem.model.kvm.arch.snp import SnpFlavour
    from guestmem.model.kvm.arch.tdx import TdxFlavour

    return {
        u.KVM_X86_DEFAULT_VM: Flavour,
        u.KVM_X86_SW_PROTECTED_VM: SwProtectedFlavour,
        u.KVM_X86_SNP_VM: SnpFlavour,
        u.KVM_X86_TDX_VM: TdxFlavour,
    }


class _Registry(dict):  # type: ignore[type-arg]
    """VM type -> flavour class, filled on first use (the flavours import this module)."""

    def _load(self) -> None:
        if not dict.__len__(self):
            self.update(_flavours())

    def __getitem__(self, key: int) -> type[Flavour]:
        self._load()
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        self._load()
        return dict.__contains__(self, key)


FLAVOURS: dict[int, type[Flavour]] = _Registry()
FLAVOUR_NAMES = {"default": u.KVM_X86_DEFAULT_VM, "sw-protected": u.KVM_X86_SW_PROTECTED_VM,
                 "snp": u.KVM_X86_SNP_VM, "tdx": u.KVM_X86_TDX_VM}

"""Confidential-computing flavours: the few arch hooks in which VM types differ.

A flavour is chosen by VM type at ``create_vm``.  Everything else in the model is shared; a
flavour only answers: does this VM have private memory, how does the hardware say whether an
access is private, what must happen when a private page is first handed to the guest (prepare)
or given back (invalidate), how large private mappings may be, and whether private and shared
SPTEs live in separate trees (TDX's mirror roots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from guestmem import uapi as u

if TYPE_CHECKING:
    from guestmem.api import Exit
    from guestmem.guest.ops import Access
    from guestmem.model.kvm.guest_memfd import GmemFile
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.vcpu import ModelVcpu
    from guestmem.model.kvm.vm import ModelVm


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

    def guest_write(self, view: np.ndarray, byte: int, pfn: int, offset: int, private: bool) -> None:
        """The guest stores ``byte`` over ``view`` (frames at ``pfn``, from byte ``offset``)."""
        view.fill(byte)

    def guest_read(self, view: np.ndarray, pfn: int, offset: int, private: bool) -> np.ndarray:
        """What the guest reads from ``view`` (a memory-encryption engine decrypts here)."""
        return view

    def accept(self, vcpu: ModelVcpu, gpa: int, size: int) -> Exit | None:
        """Guest acceptance of private pages (TDX ACCEPT / SNP PVALIDATE); nothing to do here."""
        return None

    def pre_fault_allowed(self) -> bool:
        """``kvm->arch.pre_fault_allowed``: false for SNP/TDX until the launch is finalized."""
        return True

    def gmem_prepare(self, gmem: GmemFile, slot: Memslot, runs: list[tuple[int, int, int, int]]) -> None:
        """``kvm_arch_gmem_prepare``: make freshly handed-out pages usable as private memory."""

    def gmem_invalidate(self, pfn: int, npages: int) -> None:
        """``kvm_arch_gmem_invalidate``: pages leave private use (SNP: RMP reclaim)."""


class SwProtectedFlavour(Flavour):
    """KVM_X86_SW_PROTECTED_VM: private memory without hardware protection (for development)."""

    name = "sw-protected"
    vm_type = u.KVM_X86_SW_PROTECTED_VM
    has_private_mem = True


FLAVOURS: dict[int, type[Flavour]] = {
    u.KVM_X86_DEFAULT_VM: Flavour,
    u.KVM_X86_SW_PROTECTED_VM: SwProtectedFlavour,
}

"""Confidential-computing flavours as the VMM sees them: a name, a VM type, and what it implies.

The VMM never asks the backend "which flavour are you"; it creates the VM type a flavour names
and lets the backend refuse.  What it needs to know up front is how a guest of that flavour
behaves: whether it has private memory at all, and whether the hardware tags each access as
private or shared (SNP's C-bit, TDX's shared-GPA bit).  On a software-protected VM an access takes
the gfn's current attribute, so a guest never provokes an implicit conversion by touching memory;
on SNP/TDX-like flavours a private access to shared memory is a memory-fault exit the VMM resolves
by converting (the "lazy accept" path).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from guestmem import uapi as u
from guestmem.api import Kvm, Vm
from guestmem.errors import CapabilityMissing, KvmError


@dataclass(frozen=True)
class FlavourSpec:
    name: str
    vm_type: int
    private_memory: bool
    hw_tagged_access: bool
    summary: str

    @property
    def vm_type_name(self) -> str:
        return f"KVM_X86_{u.VM_TYPE_NAMES.get(self.vm_type, str(self.vm_type))}_VM"


FLAVOURS: dict[str, FlavourSpec] = {
    "default": FlavourSpec("default", u.KVM_X86_DEFAULT_VM, False, False,
                           "ordinary VM: no private memory (guest_memfd may still back shared RAM)"),
    "sw-protected": FlavourSpec("sw-protected", u.KVM_X86_SW_PROTECTED_VM, True, False,
                                "software-protected VM: private memory without hardware protection"),
    "snp": FlavourSpec("snp", u.KVM_X86_SNP_VM, True, True,
                       "SEV-SNP-like: accesses tagged private by the C-bit"),
    "tdx": FlavourSpec("tdx", u.KVM_X86_TDX_VM, True, True,
                       "TDX-like: accesses tagged shared by the shared-GPA bit"),
}


class UnknownFlavour(ValueError):
    """A flavour name the VMM does not know (bad input, not a host limitation)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown flavour {name!r}; choose one of {', '.join(FLAVOURS)}")
        self.flavour = name


def flavour(name: str) -> FlavourSpec:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise UnknownFlavour(name) from None


def create_vm(kvm: Kvm, spec: FlavourSpec) -> Vm:
    """Create the flavour's VM type; a refusal (EINVAL) becomes :class:`CapabilityMissing` naming it."""
    try:
        return kvm.create_vm(spec.vm_type)
    except KvmError as exc:
        if exc.errno == errno.EINVAL:
            raise CapabilityMissing(spec.vm_type_name,
                                    f"KVM_CREATE_VM refused it with EINVAL on the {kvm.backend} backend"
                                    ) from None
        raise

"""The model's switches: its equivalent of Kconfig options and kvm module parameters.

They are given once, when the system is opened (``guestmem.open("model", **options)``), and are
read-only afterwards, as module parameters with mode 0444 are.  Defaults describe upstream x86 KVM
as merged (Linux 6.18) with ``CONFIG_KVM_SW_PROTECTED_VM`` built in, per-VM memory attributes, a
TDP MMU, no SMM address space, and this host's 46-bit physical address width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from guestmem import uapi as u


@dataclass(frozen=True)
class ModelOptions:
    # Where shared/private lives: "vm" = legacy per-VM KVM_SET_MEMORY_ATTRIBUTES (upstream 6.8+);
    # "gmem" = per-guest_memfd attributes set with KVM_SET_MEMORY_ATTRIBUTES2 (in-place series).
    attributes: Literal["vm", "gmem"] = "vm"
    # Which revision of the in-place conversion series to follow ("v5" = seed 004, content modes).
    inplace_revision: Literal["v5", "v8"] = "v5"
    # Capability numbers the series' postings disagree on.
    cap_guest_memfd_memory_attributes: int = u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES
    cap_memory_attributes2_flags: int = u.KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS
    # guest_memfd folio order: 0 as upstream today; 9 (2 MiB) or 18 (1 GiB) for the hugepage series.
    gmem_folio_order: int = 0
    # Host (THP-like) folio order for anonymous shared memory.
    anon_folio_order: int = 0
    # A TDP MMU (KVM_PRE_FAULT_MEMORY needs one; a shadow-paging host answers EOPNOTSUPP).
    tdp_mmu: bool = True
    # SMM address space (KVM_CAP_MULTI_ADDRESS_SPACE = 2 when on).
    smm: bool = False
    # Host MAXPHYADDR: bounds the highest gfn a memslot may reach.
    phys_bits: int = 46
    # VM types built in (KVM_CAP_VM_TYPES).
    vm_types: tuple[int, ...] = (
        u.KVM_X86_DEFAULT_VM,
        u.KVM_X86_SW_PROTECTED_VM,
        u.KVM_X86_SNP_VM,
        u.KVM_X86_TDX_VM,
    )
    # Frame pool capacity (sparse: only touched frames are resident).
    pool_bytes: int = 1 << 41
    max_vcpus: int = 1024
    # docs/findings.md #1: upstream (7.2) invalidates a guest_memfd without INIT_SHARED with the
    # PRIVATE filter only, which on TDX leaves shared SPTEs of a gmem-only slot on freed pages.
    # False reproduces upstream (and invariant 1 flags it); True zaps shared SPTEs too (the fix).
    gmem_invalidate_shared_fix: bool = False
    # Check invariant 7 (content modes) on every in-place conversion (a per-page plaintext digest
    # before and after); costs a hash of every allocated page converted.  For tests and fuzzing.
    check_content_modes: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ModelOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown model option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        opts = cls(**kwargs)
        if opts.attributes not in ("vm", "gmem"):
            raise ValueError(f"attributes must be 'vm' or 'gmem', not {opts.attributes!r}")
        if opts.inplace_revision not in ("v5", "v8"):
            raise ValueError(f"inplace_revision must be 'v5' or 'v8', not {opts.inplace_revision!r}")
        for name in ("gmem_folio_order", "anon_folio_order"):
            if getattr(opts, name) not in (0, 9, 18):
                raise ValueError(f"{name} must be 0, 9 or 18")
        return opts

    @property
    def gmem_attributes(self) -> bool:
        return self.attributes == "gmem"

    @property
    def content_modes(self) -> bool:
        """Content modes exist only in RFC v3..v5 of the in-place series."""
        return self.gmem_attributes and self.inplace_revision == "v5"

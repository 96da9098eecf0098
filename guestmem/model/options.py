"""The model's switches: its equivalent of Kconfig options and kvm module parameters.

They are given once, when the system is opened (``guestmem.open("model", **options)``), and are
read-only afterwards, as module parameters with mode 0444 are.  Defaults describe upstream x86 KVM
as of the newest mainline release (``kernel="7.2"``) with ``CONFIG_KVM_SW_PROTECTED_VM`` built in,
per-VM memory attributes, a TDP MMU, no SMM address space, and a 46-bit physical address width.
``guestmem.open("model", like="host")`` sets them from the running kernel instead
(:mod:`guestmem.host_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from guestmem import uapi as u
from guestmem.releases import NEWEST, RELEASES, ReleaseRules, rules

_CHOICES: dict[str, tuple[Any, ...]] = {
    "attributes": ("vm", "gmem"),
    "inplace_revision": ("v5", "v8"),
    "gmem_folio_order": (0, 9, 18),
    "anon_folio_order": (0, 9, 18),
    "kernel": RELEASES,
    "cpu": ("ops", "x86"),
}
# VM types without private memory (they need no CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES).
_NO_PRIVATE_MEM_TYPES = (u.KVM_X86_DEFAULT_VM, u.KVM_X86_SEV_VM, u.KVM_X86_SEV_ES_VM)
_RANGES: dict[str, tuple[int, int]] = {
    "phys_bits": (36, 52),
    "pool_bytes": (1 << 30, 1 << 47),
    "max_vcpus": (1, 4096),
}


@dataclass(frozen=True)
class ModelOptions:
    # Which kernel release's rules to follow where releases differ (guestmem/releases.py):
    # "6.8", "6.18" or "7.2" (the newest mainline, the default).
    kernel: Literal["6.8", "6.18", "7.2"] = NEWEST  # type: ignore[assignment]
    # CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: per-VM memory attributes built in.  Without it
    # KVM_CAP_MEMORY_ATTRIBUTES is 0, KVM_SET_MEMORY_ATTRIBUTES is ENOTTY (the ioctl is compiled
    # out), and VM types with private memory (which select it in Kconfig) do not exist.
    memory_attributes: bool = True
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
    # The vCPU: "ops" interprets the guest op language directly (the fast path); "x86" runs the
    # x86-64 machine code guest/x86.py compiles from it on a Unicorn CPU whose every memory access
    # goes through this model's SPTEs (the referee; guestmem/model/kvm/x86/).
    cpu: Literal["ops", "x86"] = "ops"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ModelOptions:
        """Validate every switch (name, type, allowed values) and build the options."""
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown model option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**{name: cls.check(name, value) for name, value in kwargs.items()})

    @classmethod
    def check(cls, name: str, value: Any) -> Any:
        """``value`` as switch ``name`` holds it; TypeError/ValueError saying what is allowed."""
        default = cls.__dataclass_fields__[name].default
        if name in _CHOICES:
            if value not in _CHOICES[name] or isinstance(value, bool):
                raise ValueError(f"{name} must be one of {', '.join(map(repr, _CHOICES[name]))}, "
                                 f"not {value!r}")
            return value
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, not {value!r}")
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, not {value!r}")
            low, high = _RANGES.get(name, (0, 1 << 64))
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low}..{high}, not {value}")
            return value
        if isinstance(default, tuple):  # vm_types
            if isinstance(value, str | bytes) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise TypeError(f"{name} must be a list of VM type numbers, not {value!r}")
            bad = [v for v in value if v not in u.VM_TYPE_NAMES]
            if bad:
                raise ValueError(f"{name}: unknown VM type(s) {bad}; known: "
                                 + ", ".join(f"{t} ({n})" for t, n in sorted(u.VM_TYPE_NAMES.items())))
            return tuple(value)
        raise TypeError(f"{name}: unsupported switch type")  # pragma: no cover

    @classmethod
    def parse_text(cls, name: str, text: str) -> Any:
        """A switch given on the command line (``--model name=text``), typed by its default."""
        if name not in cls.__dataclass_fields__:
            raise ValueError(f"unknown model switch {name!r}; known: "
                             f"{', '.join(f.name for f in fields(cls))}")
        default = cls.__dataclass_fields__[name].default
        value: Any = text
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(f"{name} must be true or false, not {text!r}")
            value = lowered in ("true", "1", "yes", "on")
        elif isinstance(default, int):
            try:
                value = int(text, 0)
            except ValueError:
                raise ValueError(f"{name} must be an integer, not {text!r}") from None
        elif isinstance(default, tuple):
            names = {n.lower().replace("_", "-"): t for t, n in u.VM_TYPE_NAMES.items()}
            items = [t.strip() for t in text.split(",") if t.strip()]
            try:
                value = tuple(names[t.lower().replace("_", "-")] if t.lower().replace("_", "-") in names
                              else int(t, 0) for t in items)
            except ValueError:
                raise ValueError(f"{name}: give VM types as names or numbers separated by commas, "
                                 f"not {text!r}") from None
        return cls.check(name, value)

    @property
    def release(self) -> ReleaseRules:
        """The rules of the ``kernel`` release (:mod:`guestmem.releases`)."""
        return rules(self.kernel)

    @property
    def built_vm_types(self) -> tuple[int, ...]:
        """The VM types this configuration has: asked for (``vm_types``), known to the release, and
        (for types with private memory) with memory attributes built in, per-VM or per-file."""
        known = self.release.vm_types
        return tuple(t for t in self.vm_types if t in known and (
            self.memory_attributes or self.gmem_attributes or t in _NO_PRIVATE_MEM_TYPES))

    @property
    def gmem_attributes(self) -> bool:
        return self.attributes == "gmem"

    @property
    def content_modes(self) -> bool:
        """Content modes exist only in RFC v3..v5 of the in-place series."""
        return self.gmem_attributes and self.inplace_revision == "v5"

"""Kernel releases as a switch: the rules in which Linux 6.8, 6.18 and 7.2 answer differently.

Why this exists: the model follows upstream, but "upstream" moves.  A behaviour recorded from
this host's 6.18 kernel and one read from the 7.2 sources can both be right, for their release.
So the model has a ``kernel`` switch (``guestmem.open("model", kernel="6.18")``) and every rule
that depends on the release is one field here, with the upstream lines that decide it.  The
conformance suite asks :func:`release_of` which rules a backend follows, so one test can expect
EINVAL from a 6.18 kernel and EEXIST from a 7.2 one.

What could be checked: 7.2 against ``/tmp/linux-7.2`` (the full tree), 6.18 against this host
(the recorded corpus, ``tests/conformance/host_behaviours.json``).  6.8 is reasoned from the
history notes in ``upstream-spec.md`` and the 6.8 code as merged (guest_memfd's first release);
no 6.8 host or tree was available to run against, so its rules are the least certain.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Any

from guestmem import uapi as u

RELEASES: tuple[str, ...] = ("6.8", "6.18", "7.2")
NEWEST = "7.2"
_ALL_GMEM_FLAGS = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED


@dataclass(frozen=True)
class ReleaseRules:
    """What one release does where releases differ."""

    name: str
    # Flags KVM_CREATE_GUEST_MEMFD can accept at all (the VM type may allow fewer).  6.8 has no
    # flags (`valid_flags = 0` in kvm_gmem_create); MMAP and INIT_SHARED arrived in 6.18.
    gmem_flags: int
    # Whether a VM without private memory may bind guest_memfd memslots and reports
    # KVM_CAP_GUEST_MEMFD.  6.8-6.17: check_memory_region_flags adds KVM_MEM_GUEST_MEMFD only if
    # kvm_arch_has_private_mem(kvm); 6.18 ("allow guest_memfd for all VMs") and 7.2
    # (virt/kvm/kvm_main.c:1578-1579, `if (IS_ENABLED(CONFIG_KVM_GUEST_MEMFD))`) allow every VM.
    gmem_any_vm: bool
    # KVM_PRE_FAULT_MEMORY exists (6.10+); before it, the vCPU ioctl is unknown to x86's
    # kvm_arch_vcpu_ioctl, whose default case answers EINVAL, and the capability is 0.
    pre_fault_ioctl: bool
    # VM types the release knows (KVM_X86_SW_PROTECTED_VM 6.8; SEV/SEV_ES 6.10; SNP 6.11; TDX 6.16).
    vm_types: frozenset[int]
    # kvm_gmem_bind's offset: a signed loff_t through 6.18, so `offset + size > i_size_read(inode)`
    # is a signed comparison and an offset+size past INT64_MAX wraps negative and passes (the
    # binding is accepted); 7.2 makes it uoff_t (virt/kvm/guest_memfd.c:648 and :673), so the sum
    # stays huge and the bind is EINVAL (test_invalid_binding in guest_memfd_test.c).
    bind_offset_signed: bool
    # A second binding overlapping an existing one only in file offsets: 6.8-6.18 leave r = -EINVAL
    # and `goto err`; 7.2 sets r = -EEXIST (virt/kvm/guest_memfd.c:681-686).
    bind_overlap_errno: int


_RULES: dict[str, ReleaseRules] = {
    "6.8": ReleaseRules("6.8", gmem_flags=0, gmem_any_vm=False, pre_fault_ioctl=False,
                        vm_types=frozenset({u.KVM_X86_DEFAULT_VM, u.KVM_X86_SW_PROTECTED_VM}),
                        bind_offset_signed=True, bind_overlap_errno=errno.EINVAL),
    "6.18": ReleaseRules("6.18", gmem_flags=_ALL_GMEM_FLAGS, gmem_any_vm=True, pre_fault_ioctl=True,
                         vm_types=frozenset(u.VM_TYPE_NAMES), bind_offset_signed=True,
                         bind_overlap_errno=errno.EINVAL),
    "7.2": ReleaseRules("7.2", gmem_flags=_ALL_GMEM_FLAGS, gmem_any_vm=True, pre_fault_ioctl=True,
                        vm_types=frozenset(u.VM_TYPE_NAMES), bind_offset_signed=False,
                        bind_overlap_errno=errno.EEXIST),
}


def rules(release: str) -> ReleaseRules:
    """The rules of ``release`` (one of :data:`RELEASES`); ValueError for anything else."""
    try:
        return _RULES[release]
    except KeyError:
        raise ValueError(f"kernel must be one of {', '.join(RELEASES)}, not {release!r}") from None


def parse_version(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` from a ``uname -r`` string such as ``6.18.44-fc-v1045``."""
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def release_for(uname_release: str) -> tuple[str, str | None]:
    """The switch value whose rules a running kernel follows, and a note when it is not exact.

    A release between two switch values follows the older one (the rules here are the changes,
    and a change is in every later release); one older than 6.8 has no guest_memfd at all.
    """
    version = parse_version(uname_release)
    if version is None:
        return NEWEST, f"cannot read a version from {uname_release!r}; assuming {NEWEST}"
    chosen = None
    for name in RELEASES:
        v = parse_version(name)
        assert v is not None
        if version >= v:
            chosen = name
    if chosen is None:
        return RELEASES[0], (f"{uname_release} predates guest_memfd (6.8); "
                             f"the nearest rules are {RELEASES[0]}'s")
    if parse_version(chosen) != version:
        return chosen, f"{uname_release} is between switch values; using {chosen}'s rules"
    return chosen, None


def release_of(kvm: Any) -> str:
    """The release whose rules ``kvm`` follows: the model's ``kernel`` switch, or the running
    kernel's release for the kernel backend."""
    options = getattr(kvm, "options", None)
    if options is not None and hasattr(options, "kernel"):
        return str(options.kernel)
    return release_for(os.uname().release)[0]


def rules_of(kvm: Any) -> ReleaseRules:
    return rules(release_of(kvm))

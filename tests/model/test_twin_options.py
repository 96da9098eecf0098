"""The twin's switches from a host profile, without needing the host: what matches, what is named."""

from __future__ import annotations

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.errors import KvmError
from guestmem.host_probe import COMPARED_CAPS, HostProfile, compare, twin_options


def _profile(**changes: object) -> HostProfile:
    base: dict[str, object] = dict(
        release="6.18.44-fc-v1045", kernel="6.18", kernel_note=None, modules=("kvm", "kvm_pvm"),
        vm_types=(u.KVM_X86_DEFAULT_VM,), system_caps={u.KVM_CAP_VM_TYPES: 1, u.KVM_CAP_PRE_FAULT_MEMORY: 0},
        tdp=False, memory_attributes=False, smm=False, phys_bits=48, max_vcpus=1024, online_cpus=2)
    base.update(changes)
    return HostProfile(**base)  # type: ignore[arg-type]


def test_a_host_the_switches_can_say_is_matched_whole() -> None:
    twin = twin_options(_profile())
    assert twin.unmatched == {}
    assert twin.options == {"kernel": "6.18", "memory_attributes": False, "tdp_mmu": False, "smm": False,
                            "vm_types": (u.KVM_X86_DEFAULT_VM,), "phys_bits": 48, "max_vcpus": 1024}
    kvm = guestmem.open("model", **twin.options)
    assert kvm.check_extension(u.KVM_CAP_VM_TYPES) == 1
    assert kvm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert kvm.check_extension(u.KVM_CAP_PRE_FAULT_MEMORY) == 0


@pytest.mark.parametrize(("changes", "named"), [
    ({"release": "6.12.1", "kernel": "6.8", "kernel_note": "6.12.1 is between switch values"}, "kernel"),
    ({"phys_bits": None}, "phys_bits"),
    ({"phys_bits": 57}, "phys_bits"),
    ({"max_vcpus": 0}, "max_vcpus"),
    ({"max_vcpus": 1 << 20}, "max_vcpus"),
])
def test_what_cannot_be_matched_is_named(changes: dict[str, object], named: str) -> None:
    twin = twin_options(_profile(**changes))
    assert twin.unmatched.get(named)
    guestmem.open("model", **twin.options)  # the rest still opens


def test_compare_flags_a_capability_the_twin_answers_differently() -> None:
    twin = guestmem.open("model", **twin_options(_profile()).options)
    caps = {c: twin.check_extension(c) for c in COMPARED_CAPS}
    caps[u.KVM_CAP_NR_MEMSLOTS] = 509  # a host with fewer memslots than any switch can say
    rows = compare(_profile(system_caps=caps), twin)
    bad = [r for r in rows if not r["same"]]
    assert [r["what"] for r in bad] == ["KVM_CAP_NR_MEMSLOTS (/dev/kvm)"]
    assert bad[0]["host"] == 509 and bad[0]["twin"] == u.KVM_USER_MEM_SLOTS


def test_like_host_without_a_kvm_device_raises_and_opens_nothing(tmp_path: object) -> None:
    with pytest.raises(KvmError):
        guestmem.open("model", like="host", path="/nonexistent/kvm")

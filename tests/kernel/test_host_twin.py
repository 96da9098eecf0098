"""The host probe and the model's twin of this host (``guestmem.open("model", like="host")``),
and ``guestmem caps --twin``."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.cli import main
from guestmem.errors import KvmError
from guestmem.host_probe import HYPERCALL_ROW, compare, probe_host, twin_options
from guestmem.linux import KernelKvm
from guestmem.releases import release_for


def test_probe_is_cheap_and_matches_what_the_kernel_says(kvm: KernelKvm) -> None:
    start = time.monotonic()
    profile = probe_host()
    assert time.monotonic() - start < 2.0  # the brief's budget: no guest is run
    assert profile.release == os.uname().release
    assert profile.kernel == release_for(profile.release)[0]
    flags_cap = u.KVM_CAP_GUEST_MEMFD_FLAGS
    assert profile.system_caps[flags_cap] == kvm.check_extension(flags_cap)
    mask = kvm.check_extension(u.KVM_CAP_VM_TYPES)
    assert profile.vm_types == tuple(t for t in sorted(u.VM_TYPE_NAMES) if mask >> t & 1)
    assert profile.tdp == bool(kvm.check_extension(u.KVM_CAP_PRE_FAULT_MEMORY))
    with kvm.create_vm() as vm:
        try:
            vm.set_memory_attributes(0, u.PAGE_SIZE, 0)
            built_in = True
        except KvmError as err:
            built_in = err.errno != errno.ENOTTY
    assert profile.memory_attributes == built_in
    json.dumps(profile.to_json())  # serialisable


def test_twin_answers_every_capability_as_the_host(kvm: KernelKvm) -> None:
    profile = probe_host()
    twin = twin_options(profile)
    model = guestmem.open("model", **twin.options)
    rows = compare(profile, model)
    assert len(rows) > 30
    different = [r for r in rows if not r["same"]]
    assert not different or set(r["what"] for r in different) <= set(twin.unmatched), different


def test_open_like_host(kvm: KernelKvm) -> None:
    twin = guestmem.open("model", like="host")
    assert twin.backend == "model"
    assert twin.host_profile.release == os.uname().release  # type: ignore[attr-defined]
    assert twin.check_extension(u.KVM_CAP_VM_TYPES) == kvm.check_extension(u.KVM_CAP_VM_TYPES)
    attrs_cap = u.KVM_CAP_MEMORY_ATTRIBUTES
    assert twin.check_extension(attrs_cap) == kvm.check_extension(attrs_cap)
    # Switches given beside like= apply on top of the probed ones.
    assert guestmem.open("model", like="host", pool_bytes=1 << 32).options.pool_bytes == 1 << 32


def test_twin_pre_fault_without_a_memslot_answers_as_the_host(kvm: KernelKvm) -> None:
    """The brief's example: KVM_PRE_FAULT_MEMORY on a VM that never had a memslot."""
    def errno_of(k: object) -> int:
        with k.create_vm() as vm:  # type: ignore[attr-defined]
            vcpu = vm.create_vcpu(0)
            try:
                vcpu.pre_fault_memory(1 << 32, u.PAGE_SIZE)
            except KvmError as err:
                return err.errno or -1
            finally:
                vcpu.close()
        return 0

    assert errno_of(guestmem.open("model", like="host")) == errno_of(kvm)


@pytest.mark.parametrize("bad", [("kernel", {}), ("model", {"like": "guest"})])
def test_like_is_only_for_the_model_and_only_host(bad: tuple[str, dict[str, str]]) -> None:
    backend, extra = bad
    with pytest.raises(ValueError):
        guestmem.open(backend, like=extra.get("like", "host"))


def test_caps_twin_json(kvm: KernelKvm, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caps", "--twin", "--json", "--no-hypercall-probe"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compared"] == len(report["rows"]) and report["matched"] <= report["compared"]
    assert report["twin_options"]["kernel"] == release_for(os.uname().release)[0]
    for row in report["rows"]:
        assert row["same"] or row["what"] in report["unmatched"]


def test_caps_twin_table_names_what_cannot_be_matched(kvm: KernelKvm,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caps", "--twin"]) == 0
    out = capsys.readouterr().out
    assert "twin switches:" in out and "matched" in out
    assert HYPERCALL_ROW in out
    if "cannot match" in out:
        assert "hypercall_exit" in out or "kernel" in out or "phys_bits" in out

"""Differential mode: the same lines on /dev/kvm and on the model shaped like this host."""

from __future__ import annotations

import errno

import pytest

import guestmem
from guestmem import uapi as u
from guestmem.fuzz.differential import DiffSession, fuzz_kernel, host_options, unavailable
from guestmem.fuzz.machine import Step

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"kernel backend: {unavailable()}")


def test_host_options_describe_a_model_that_opens() -> None:
    opts = host_options()
    model, kernel = guestmem.open("model", **opts), guestmem.open("kernel")
    for cap in (u.KVM_CAP_VM_TYPES, u.KVM_CAP_PRE_FAULT_MEMORY, u.KVM_CAP_MULTI_ADDRESS_SPACE):
        assert model.check_extension(cap) == kernel.check_extension(cap), cap


def test_a_difference_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    s = DiffSession(host_options())
    model_vm = type(s.kvm.create_vm(0))

    def refuse(self: object, cap: int) -> int:
        raise guestmem.KvmError(errno.EINVAL, "KVM_CHECK_EXTENSION", "injected")
    monkeypatch.setattr(model_vm, "check_extension", refuse)
    assert s.run(Step("vm1 = kvm.create_vm(0)", "kvm.create_vm", ("kvm",))) is None
    f = s.run(Step("_ = vm1.check_extension(1)", "vm.check_extension", ("vm1",)))
    assert f is not None and f.key == ("differs", "vm.check_extension", "KvmError(EINVAL)", "ok")


def test_same_bytes_on_both_backends_is_not_a_finding() -> None:
    s = DiffSession(host_options())
    for code, kind, uses in [("m1 = kvm.mmap_anonymous(0x2000)", "kvm.mmap_anonymous", ("kvm",)),
                             ("m1.fill(0x10, 0x20, 0x5a)", "mapping.fill", ("m1",)),
                             ("_ = m1.read(0x0, 0x40)", "mapping.read", ("m1",))]:
        assert s.run(Step(code, kind, uses)) is None
    assert s.ns["_"] == s.kns["_"] == bytes(16) + b"\x5a" * 32 + bytes(16)


def test_short_differential_run_prints_two_backend_reproducers() -> None:
    rep = fuzz_kernel(20, seed=3, max_steps=6, shrink_budget=1.0, max_sequences=6)
    assert rep.sequences == 6 and rep.steps > 0
    for r in rep.findings:
        assert "run(guestmem.open('kernel'))" in r.reproducer

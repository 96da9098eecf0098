"""``guestmem fuzz`` as a user runs it: the summary line, reproducers, exit status 0/1/2.

The clean path and the finding path are made deterministic by narrowing what the fuzzer does
(monkeypatching the step generator to one benign call) and by injecting a bug into the model; the
real run over the current model is the last test, expected to be clean once the lead's fixes land.
"""

from __future__ import annotations

import os

import pytest

import guestmem
from guestmem.cli import main
from guestmem.fuzz.machine import Step, StepGen


def _benign(self: StepGen, s: object) -> Step:
    return Step("kvm.check_extension(u.KVM_CAP_GUEST_MEMFD)", "kvm.check_extension", ("kvm",))


def test_clean_run_exits_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(StepGen, "next", _benign)
    assert main(["fuzz", "--minutes", "0.01", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert " sequences, " in out and out.splitlines()[0].split(" findings")[0].endswith(" 0")


def test_finding_exits_1_with_a_reproducer(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(StepGen, "next", _benign)
    kvm_cls = type(guestmem.open("model"))

    def broken(self: object, cap: int) -> int:
        raise RuntimeError("injected")
    monkeypatch.setattr(kvm_cls, "check_extension", broken)
    assert main(["fuzz", "--minutes", "0.01", "--seed", "1", "--shrink-seconds", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 findings" in out.splitlines()[0]
    assert "kvm = guestmem.open('model'" in out
    assert "kvm.check_extension(u.KVM_CAP_GUEST_MEMFD)  # crash: RuntimeError: injected" in out


def test_json_output(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    monkeypatch.setattr(StepGen, "next", _benign)
    assert main(["fuzz", "--minutes", "0.01", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["findings"] == [] and data["sequences"] >= 1


@pytest.mark.parametrize("argv", [["--minutes", "-1"], ["--minutes", "x"], ["--seed", "-3"],
                                  ["--backend", "nope"], ["--max-steps", "0"]])
def test_bad_input_exits_2(argv: list[str]) -> None:
    assert main(["fuzz", *argv]) == 2


@pytest.mark.skipif(os.access("/dev/kvm", os.R_OK | os.W_OK), reason="this host has /dev/kvm")
def test_kernel_backend_without_kvm_exits_2() -> None:
    assert main(["fuzz", "--backend", "kernel", "--minutes", "0.01"]) == 2


def test_real_run_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fuzz", "--minutes", "0.05", "--seed", "1", "--shrink-seconds", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out[:4000]

"""``guestmem caps`` / ``guestmem demo`` / bad input, through ``guestmem.cli.main``."""

from __future__ import annotations

import json

import pytest

from guestmem.cli import main


def test_bad_command_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice" in err[0]


def test_bad_demo_size_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of 4" in err[0]


def test_no_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "caps" in capsys.readouterr().out


def test_bad_device_given_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A --device the user names must be KVM: a missing one is bad input, not a silent skip."""
    assert main(["--device", "/nonexistent/kvm", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ENOENT" in err[0] and "--device" in err[0]


def test_demo_without_kvm_explains_and_exits_0(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without /dev/kvm (the default, not named by the user) still gets the model showcase."""
    monkeypatch.setattr("guestmem.cli.DEFAULT_DEVICE", "/nonexistent/kvm")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "cannot be opened" in out and "ENOENT" in out


def test_caps_json_without_kvm(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("guestmem.cli.DEFAULT_DEVICE", "/nonexistent/kvm")
    assert main(["caps", "--json"]) == 3
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["available"] is False and "ENOENT" in info["error"]
    assert len(captured.err.strip().splitlines()) == 1


def test_caps_json(kvm: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caps", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["available"] is True
    names = {c["name"] for c in info["capabilities"]}
    assert "KVM_CAP_GUEST_MEMFD" in names and "KVM_CAP_GUEST_MEMFD_FLAGS" in names
    assert info["vm_types"]["create"]["DEFAULT"] == "ok"
    for key in ("set_memory_attributes", "set_memory_attributes2", "pre_fault_memory"):
        assert info[key]["result"] == "ok" or info[key]["result"].startswith("E")
    assert isinstance(info["hypercall_exit"]["exits"], bool)


def test_caps_table(kvm: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caps", "--no-hypercall-probe"]) == 0
    out = capsys.readouterr().out
    assert "KVM_CAP_GUEST_MEMFD" in out and "VM types" in out


def test_demo_small(kvm: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "4", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["ok"] is True and result["model"]["ok"] is True
    steps = result["more"]
    assert steps["ok"] is True and steps["available"] is True
    assert len(steps["steps"]) == 11 and all(s["seconds"] >= 0 for s in steps["steps"])
    assert "ExitGuestAssert" in captured.err


def test_demo_kernel_only(kvm: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kernel-only", "--size", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["available"] is True and len(result["steps"]) == 11

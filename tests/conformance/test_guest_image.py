"""Loading a built guest (a ``GuestImage``) through the interface: the same bytes give the same exits
on every backend that runs machine code (the kernel's vCPU, the model's x86 CPU); the op
interpreter refuses it with a clear error and keeps what it had loaded.  Hostile ``load()``
arguments change nothing."""

from __future__ import annotations

import pytest

import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitSync, Kvm
from guestmem.guest import x86
from guestmem.guest.image import IMAGE_AREA_GPA, GuestImage
from guestmem.guest.ops import Program, Sync

# mov r8, [rip + data]; mov edx, PORT_SYNC; out dx, al; mov r8, rsp; out dx, al; hlt; data: dq 0x1234
_CODE = (b"\x4c\x8b\x05\x0b\x00\x00\x00" + x86.mov_imm(x86.RDX, x86.PORT_SYNC) + x86.OUT_DX_AL
         + x86.mov_rr(x86.R8, x86.RSP) + x86.OUT_DX_AL + x86.HLT + (0x1234).to_bytes(8, "little"))


def _image(load_gpa: int | None = IMAGE_AREA_GPA + 0x3000) -> GuestImage:
    return GuestImage(_CODE, load_gpa, entry=0, bss_size=0x1000, stack_top=0x1000, name="sync")


def _runs_machine_code(kvm: Kvm) -> bool:
    options = getattr(kvm, "options", None)
    return kvm.backend == "kernel" or getattr(options, "cpu", "ops") == "x86"


def test_image_runs_the_same_on_every_cpu(backend: Kvm) -> None:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    img = _image()
    if not _runs_machine_code(backend):
        vcpu.load(Program([Sync(5)]))
        with pytest.raises(ValueError, match="x86 CPU"):
            vcpu.load(img)
        assert vcpu.run() == ExitSync(value=5)  # what was loaded before is untouched
        pytest.skip("the op interpreter runs no machine code (it refuses a GuestImage)")
    vcpu.load(img)
    assert vcpu.run() == ExitSync(value=0x1234)
    assert vcpu.run() == ExitSync(value=img.stack_gpa)
    assert isinstance(vcpu.run(), ExitHalt)
    # a compiled program, then a position-independent image with the loader's stack
    vcpu.load(Program([Sync(7)]))
    assert vcpu.run() == ExitSync(value=7)
    vcpu.load(_image(None))
    assert vcpu.run() == ExitSync(value=0x1234)


@pytest.mark.parametrize("bad", [b"\xf4", bytearray(b"\xf4"), [Sync(1)], None, 3])
def test_load_refuses_other_types_and_changes_nothing(backend: Kvm, bad: object) -> None:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Sync(9)]))
    with pytest.raises(TypeError, match="Program or GuestImage"):
        vcpu.load(bad)  # type: ignore[arg-type]
    assert vcpu.run() == ExitSync(value=9)

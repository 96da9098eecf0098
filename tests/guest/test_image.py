"""GuestImage: validation of hostile input (clear TypeError/ValueError, nothing loaded) and loading a
hand-assembled image on the kernel backend (skipped without /dev/kvm)."""

from __future__ import annotations

import pytest

import guestmem.uapi as u
from guestmem.api import ExitHalt, ExitSync
from guestmem.errors import KvmError
from guestmem.guest import x86
from guestmem.guest.image import IMAGE_AREA_END, IMAGE_AREA_GPA, IMAGE_MAX_SIZE, GuestImage
from guestmem.guest.ops import Program, Sync

# mov r8, [rip + data]; mov edx, PORT_SYNC; out dx, al; mov r8, rsp; out dx, al; hlt; data: dq 0x1234
_SYNC_CODE = (b"\x4c\x8b\x05\x0b\x00\x00\x00" + x86.mov_imm(x86.RDX, x86.PORT_SYNC) + x86.OUT_DX_AL
              + x86.mov_rr(x86.R8, x86.RSP) + x86.OUT_DX_AL + x86.HLT)
assert len(_SYNC_CODE) == 7 + 5 + 1 + 3 + 1 + 1


def _sync_image(load_gpa: int | None = IMAGE_AREA_GPA + 0x1000, stack_top: int | None = 0x2000) -> GuestImage:
    return GuestImage(_SYNC_CODE + (0x1234).to_bytes(8, "little"), load_gpa, entry=0, bss_size=0x2000,
                      stack_top=stack_top, name="sync")


def test_valid_image_fields() -> None:
    img = _sync_image()
    assert img.base == IMAGE_AREA_GPA + 0x1000
    assert img.entry_gpa == img.base
    assert img.stack_gpa == img.base + 0x2000
    assert img.size == len(img.code) + 0x2000
    assert img.memory() == img.code + bytes(0x2000)
    pic = GuestImage(bytearray(b"\xf4"), None)
    assert isinstance(pic.code, bytes) and pic.base == IMAGE_AREA_GPA and pic.stack_gpa is None


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"code": "f4"}, TypeError, "code must be bytes"),
    ({"code": None}, TypeError, "code must be bytes"),
    ({"load_gpa": 4096.0}, TypeError, "load_gpa must be an int"),
    ({"load_gpa": True}, TypeError, "load_gpa must be an int"),
    ({"entry": "0"}, TypeError, "entry must be an int"),
    ({"bss_size": None}, TypeError, "bss_size must be an int"),
    ({"stack_top": 1.5}, TypeError, "stack_top must be an int"),
    ({"name": 3}, TypeError, "name must be a str"),
    ({"code": b""}, ValueError, "empty"),
    ({"load_gpa": IMAGE_AREA_GPA + 1}, ValueError, "not page-aligned"),
    ({"load_gpa": 0x1000}, ValueError, "outside the image area"),
    ({"load_gpa": IMAGE_AREA_END - 0x1000, "bss_size": 0x1000}, ValueError, "outside the image area"),
    ({"load_gpa": -4096}, ValueError, "outside the image area"),
    ({"code": b"\x90" * (IMAGE_MAX_SIZE + 1), "load_gpa": None}, ValueError, "exceed"),
    ({"bss_size": IMAGE_MAX_SIZE}, ValueError, "exceed"),
    ({"bss_size": -1}, ValueError, "bss_size must be >= 0"),
    ({"entry": 32}, ValueError, "entry 0x20 is outside"),
    ({"entry": -1}, ValueError, "outside the code"),
    ({"stack_top": 0}, ValueError, "stack_top 0x0 is outside"),
    ({"stack_top": 8}, ValueError, "not 16-byte aligned"),
    ({"stack_top": 0x30}, ValueError, "outside the image"),
])
def test_hostile_image(kwargs: dict, exc: type[Exception], words: str) -> None:
    args = {"code": b"\x90" * 31 + b"\xf4", "load_gpa": IMAGE_AREA_GPA, "entry": 0, "bss_size": 0,
            "stack_top": None, "name": "t"}
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        GuestImage(**args)


def test_image_is_frozen() -> None:
    img = _sync_image()
    with pytest.raises(AttributeError):
        img.entry = 1  # type: ignore[misc]


@pytest.fixture
def kernel_vm():
    import guestmem
    try:
        kvm = guestmem.open("kernel")
    except (KvmError, OSError) as err:
        pytest.skip(f"/dev/kvm cannot be opened: {err}")
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    yield vm
    vm.close()
    kvm.close()


@pytest.mark.kernel
def test_kernel_runs_image_and_program_in_turn(kernel_vm) -> None:
    vcpu = kernel_vm.create_vcpu(0)
    img = _sync_image()
    vcpu.load(img)
    ex = vcpu.run()
    assert ex == ExitSync(value=0x1234)
    ex = vcpu.run()
    assert ex == ExitSync(value=img.stack_gpa)
    assert isinstance(vcpu.run(), ExitHalt)
    # a compiled program after the image, then the image again (its .bss zeroed anew)
    vcpu.load(Program([Sync(7)]))
    assert vcpu.run() == ExitSync(value=7)
    vcpu.load(_sync_image(load_gpa=None, stack_top=None))
    assert vcpu.run() == ExitSync(value=0x1234)
    assert vcpu.run() == ExitSync(value=0xFF000000 + x86.STACK_TOP_OFFSET)


@pytest.mark.kernel
def test_kernel_load_refuses_other_types(kernel_vm) -> None:
    vcpu = kernel_vm.create_vcpu(0)
    for bad in (b"\xf4", [Sync(1)], None):
        with pytest.raises(TypeError, match="Program or GuestImage"):
            vcpu.load(bad)  # type: ignore[arg-type]
    assert vcpu.image is None and vcpu.program is None

"""The freestanding C guest: its build, its protocol header against the Python mirror, its launch
parameters, and its shared-memory subset on the kernel backend (skipped without gcc or /dev/kvm)."""

from __future__ import annotations

import re
import struct

import pytest

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitGuestAssert, ExitHalt
from guestmem.errors import KvmError
from guestmem.guest import cbuild
from guestmem.guest.cdevice import CGuestHost
from guestmem.guest.image import IMAGE_AREA_GPA, GuestImage

GIB4 = 1 << 32


@pytest.fixture(scope="module")
def cguest() -> cbuild.CGuest:
    try:
        return cbuild.build()
    except cbuild.CGuestBuildError as err:
        pytest.skip(str(err))


def test_proto_header_matches_python() -> None:
    header = (cbuild.SOURCE_DIR / "proto.h").read_text()
    defines = {m[1]: int(m[2].rstrip("uUlL"), 0)
               for m in re.finditer(r"#define\s+(\w+)\s+(0x[0-9A-Fa-f]+[uUlL]*|\d+)", header)}
    for name in ("PORT_CONSOLE", "PORT_SYNC", "PORT_ASSERT", "PORT_DEVICE", "PORT_RESULT", "FLAVOUR_PLAIN",
                 "FLAVOUR_SNP", "FLAVOUR_TDX", "PHASE_PAGING", "PHASE_ACCEPTED", "PHASE_SHARED",
                 "PHASE_DEVICE", "PHASE_PRIVATE", "REQ_MAGIC", "RSP_MAGIC", "REQ_HEADER", "PARAMS_MAGIC"):
        assert defines[name] == getattr(cbuild, name), name
    checks = {v: k for k, v in defines.items() if k.startswith("CHECK_")}
    assert set(checks) == set(cbuild.CHECK_NAMES)
    fields = re.findall(r"unsigned long long (\w+);", header)
    assert tuple(fields) == cbuild.PARAMS_FIELDS
    from guestmem.guest import x86
    assert (cbuild.PORT_SYNC, cbuild.PORT_ASSERT) == (x86.PORT_SYNC, x86.PORT_ASSERT)


def test_build_gives_a_linked_image(cguest: cbuild.CGuest) -> None:
    img = cguest.image
    assert isinstance(img, GuestImage)
    assert img.load_gpa == IMAGE_AREA_GPA and img.entry == 0
    assert img.stack_top is not None and img.stack_top == img.size & ~0xF
    assert struct.unpack_from("<Q", img.code, cguest.params_offset)[0] == cbuild.PARAMS_MAGIC
    assert cbuild.build() is cguest  # cached


def test_params_are_patched_in(cguest: cbuild.CGuest) -> None:
    p = cbuild.CGuestParams(data_gpa=GIB4 + 0x10000, data_pages=3, bounce_gpa=GIB4, rounds=5, payload=17,
                            seed=9)
    img = cguest.with_params(p)
    got = struct.unpack_from("<7Q", img.code, cguest.params_offset)
    assert got == (cbuild.PARAMS_MAGIC, GIB4 + 0x10000, 3, GIB4, 5, 17, 9)
    assert len(img.code) == len(cguest.image.code) and img.bss_size == cguest.image.bss_size


@pytest.mark.parametrize("kwargs, exc", [
    ({"data_pages": 0}, ValueError), ({"data_pages": 4097}, ValueError), ({"data_gpa": GIB4 + 1}, ValueError),
    ({"payload": 0}, ValueError), ({"payload": 4081}, ValueError), ({"rounds": -1}, ValueError),
    ({"bounce_gpa": GIB4 + 4096}, ValueError), ({"seed": 1 << 64}, ValueError),
    ({"rounds": 2.0}, TypeError), ({"data_pages": True}, TypeError), ({"seed": "1"}, TypeError),
])
def test_hostile_params(kwargs: dict, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        cbuild.CGuestParams(**kwargs)


def test_with_params_refuses_other_types(cguest: cbuild.CGuest) -> None:
    with pytest.raises(TypeError):
        cguest.with_params({"rounds": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("blob, words", [
    (b"not an elf", "ELF64"),
    (b"\x7fELF\x01\x01" + bytes(64), "ELF64"),
    (b"\x7fELF\x02\x01" + bytes(10) + struct.pack("<HH", 3, 62) + bytes(64), "x86-64 executable"),
])
def test_image_from_elf_refuses_garbage(blob: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        cbuild.image_from_elf(blob)


def test_missing_compiler_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-gcc-guestmem")
    with pytest.raises(cbuild.CGuestBuildError, match="'no-such-gcc-guestmem' is not on PATH"):
        cbuild.compiler()


def _run_plain(vcpu, host: CGuestHost, limit: int = 10_000) -> object:
    for _ in range(limit):
        ex = vcpu.run()
        if not host.handle(ex):
            return ex
    raise AssertionError("the guest did not stop")


@pytest.fixture
def kernel_machine():
    try:
        kvm = guestmem.open("kernel")
    except (KvmError, OSError) as err:
        pytest.skip(f"/dev/kvm cannot be opened: {err}")
    vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    mem = kvm.mmap_anonymous(1 << 20)
    vm.set_user_memory_region2(0, 0, GIB4, 1 << 20, mem.addr, None, 0)
    yield vm, mem
    vm.close()
    mem.close()
    kvm.close()


@pytest.mark.kernel
def test_shared_subset_on_kernel_backend(cguest: cbuild.CGuest, kernel_machine) -> None:
    vm, mem = kernel_machine
    vcpu = vm.create_vcpu(0)
    p = cbuild.CGuestParams(data_gpa=GIB4, data_pages=4, bounce_gpa=GIB4 + 64 * 4096, rounds=3, payload=100,
                            seed=7)
    vcpu.load(cguest.with_params(p))
    host = CGuestHost(lambda g, n: mem.read(g - GIB4, n), lambda g, d: mem.write(g - GIB4, d))
    assert isinstance(_run_plain(vcpu, host), ExitHalt)
    assert host.errors == []
    assert host.flavour == "plain"
    assert host.phases == [1, 2, 3, 4, 5]
    assert host.rounds == 3
    assert "c-guest: plain" in host.text and "pass:" in host.text
    # 4 data pages verified + 3 responses x 5 checks + params magic
    assert host.checks == 4 + 3 * 5 + 1
    # the guest's private data is really in guest memory
    word0 = struct.unpack("<Q", mem.read(0, 8))[0]
    assert word0 == (7 * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)


@pytest.mark.kernel
def test_kernel_guest_fails_on_a_wrong_device_answer(cguest: cbuild.CGuest, kernel_machine) -> None:
    vm, mem = kernel_machine
    vcpu = vm.create_vcpu(0)
    p = cbuild.CGuestParams(data_gpa=GIB4, data_pages=1, bounce_gpa=GIB4 + 64 * 4096, rounds=1, payload=8)
    vcpu.load(cguest.with_params(p))
    bad = CGuestHost(lambda g, n: mem.read(g - GIB4, n),
                     lambda g, d: mem.write(g - GIB4, d[:12] + bytes([d[12] ^ 1]) + d[13:]))
    ex = _run_plain(vcpu, bad)
    assert isinstance(ex, ExitGuestAssert)
    assert ex.op_index == 5  # CHECK_RESPONSE
    assert ex.gpa == GIB4 + 64 * 4096 + 12
    assert ex.found == ex.expected ^ 1

"""The raw ioctl escape hatch on every fd object, written once and run on both backends.

``obj.ioctl(request, arg)`` sends any uAPI struct byte for byte.  The model decodes the bytes and
calls its typed methods, so here the raw answer is compared with the typed one on the same
backend, and the wrong-fd and unknown-number answers with what this host's kernel says
(``/dev/kvm`` EINVAL, VM ENOTTY, vCPU EINVAL, guest_memfd and memfd ENOTTY).  Hostile input: short
buffers, pointers passed as integers, buffers for value arguments, wrong types, closed objects,
reserved words and pads that are not zero.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import Any

import pytest

import guestmem.fileabi as fa
import guestmem.uapi as u
from guestmem.api import Kvm
from guestmem.errors import KvmError

from .support import PAGE, errno_of, raises_errno, require_cap

SIZE = 16 * PAGE
FOREIGN = (ord("Z") << 8) | 1  # a legacy number no fd here handles
KVM_UNKNOWN = u._io(0xFF)  # a KVMIO number nobody defines


def _objects(backend: Kvm) -> dict[str, Any]:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    return {"kvm": backend, "vm": vm, "vcpu": vm.create_vcpu(0), "gmem": vm.create_guest_memfd(SIZE, 0),
            "memfd": backend.memfd_create(SIZE)}


def _buf(struct: type[ctypes.Structure], **fields: int) -> bytes:
    return bytes(struct(**fields))


def _typed_errno(fn: Callable[[], object]) -> int:
    return errno_of(fn)


# --- the system fd -------------------------------------------------------------------------------
def test_system_ioctls_match_the_typed_calls(backend: Kvm) -> None:
    assert backend.ioctl(u.KVM_GET_API_VERSION) == (u.KVM_API_VERSION, b"")
    with raises_errno(errno.EINVAL):
        backend.ioctl(u.KVM_GET_API_VERSION, 1)
    for cap in (u.KVM_CAP_GUEST_MEMFD, u.KVM_CAP_GUEST_MEMFD_FLAGS, u.KVM_CAP_VM_TYPES,
                u.KVM_CAP_USER_MEMORY2, 0, 0xFFFF_FFFF, (1 << 64) - 1):
        assert backend.ioctl(u.KVM_CHECK_EXTENSION, cap) == (backend.check_extension(cap), b"")
    assert backend.ioctl(u.KVM_GET_VCPU_MMAP_SIZE) == (3 * PAGE, b"")
    with raises_errno(errno.EINVAL):
        backend.ioctl(u.KVM_GET_VCPU_MMAP_SIZE, 5)


def test_raw_create_vm_gives_a_usable_vm(backend: Kvm) -> None:
    fd, out = backend.ioctl(u.KVM_CREATE_VM, u.KVM_X86_DEFAULT_VM)
    assert out == b""
    vm = backend.raw_objects[fd]  # type: ignore[attr-defined]
    assert vm.fd == fd and vm.check_extension(u.KVM_CAP_GUEST_MEMFD) == 1
    with raises_errno(errno.EINVAL):
        backend.ioctl(u.KVM_CREATE_VM, 0x7F)
    vm.close()


# --- the VM fd -----------------------------------------------------------------------------------
def test_raw_create_guest_memfd(backend: Kvm) -> None:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    fd, out = vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, _buf(u.kvm_create_guest_memfd, size=SIZE))
    g = vm.raw_objects[fd]  # type: ignore[attr-defined]
    assert (g.fd, g.size, g.fstat().st_size) == (fd, SIZE, SIZE)
    assert out == _buf(u.kvm_create_guest_memfd, size=SIZE)
    # kvm_gmem_create does not look at the reserved words (6.18 and 7.2): accepted.
    junk = bytearray(_buf(u.kvm_create_guest_memfd, size=PAGE))
    junk[16:] = b"\xa5" * (len(junk) - 16)
    fd2, _ = vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, bytes(junk))
    assert vm.raw_objects[fd2].fstat().st_size == PAGE  # type: ignore[attr-defined]
    for size, flags in [(0, 0), (PAGE + 1, 0), (PAGE, 1 << 63), (-PAGE & ((1 << 64) - 1), 0)]:
        want = _typed_errno(lambda s=size, f=flags: vm.create_guest_memfd(s, f))
        assert want
        with raises_errno(want):
            vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, _buf(u.kvm_create_guest_memfd, size=size, flags=flags))
    with raises_errno(errno.EFAULT):  # NULL
        vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, 0)


def test_raw_memory_region2_with_junk_pads(backend: Kvm) -> None:
    """The pads of kvm_userspace_memory_region2 are not checked: a region goes in as the typed
    call would put it, and a second one over it is EEXIST, as typed."""
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    mem = backend.mmap_anonymous(SIZE)
    r = u.kvm_userspace_memory_region2(slot=1, flags=0, guest_phys_addr=1 << 32, memory_size=SIZE,
                                       userspace_addr=mem.addr, pad1=0xFFFF_FFFF)
    for i in range(14):
        r.pad2[i] = (1 << 64) - 1 - i
    assert vm.ioctl(u.KVM_SET_USER_MEMORY_REGION2, bytes(r)) == (0, bytes(r))
    r.slot = 2
    with raises_errno(errno.EEXIST):
        vm.ioctl(u.KVM_SET_USER_MEMORY_REGION2, bytes(r))
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(2, 0, 1 << 32, SIZE, mem.addr)
    # v1 copies only its 32 bytes: a v1-sized buffer is enough, a guest_memfd flag is refused.
    v1 = _buf(u.kvm_userspace_memory_region, slot=3, guest_phys_addr=1 << 33, memory_size=SIZE,
              userspace_addr=mem.addr, flags=u.KVM_MEM_GUEST_MEMFD)
    with raises_errno(errno.EINVAL):
        vm.ioctl(u.KVM_SET_USER_MEMORY_REGION, v1)
    with pytest.raises(ValueError):
        vm.ioctl(u.KVM_SET_USER_MEMORY_REGION2, bytes(r)[:32])  # short: never sent
    # Delete slot 1 through the raw path: then re-adding slot 2 there works.
    r.slot, r.memory_size = 1, 0
    vm.ioctl(u.KVM_SET_USER_MEMORY_REGION2, bytes(r))
    vm.set_user_memory_region2(2, 0, 1 << 32, SIZE, mem.addr)


def test_raw_vm_ioctls_match_the_typed_calls(backend: Kvm) -> None:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    for cap in (u.KVM_CAP_GUEST_MEMFD_FLAGS, u.KVM_CAP_MEMORY_ATTRIBUTES, 12345):
        assert vm.ioctl(u.KVM_CHECK_EXTENSION, cap)[0] == vm.check_extension(cap)
    attrs = _buf(u.kvm_memory_attributes, address=0, size=PAGE,
                 attributes=u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    want = _typed_errno(lambda: vm.set_memory_attributes(0, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    assert errno_of(lambda: vm.ioctl(u.KVM_SET_MEMORY_ATTRIBUTES, attrs)) == want
    with raises_errno(errno.EINVAL):
        vm.ioctl(u.KVM_ENABLE_CAP, bytes(ctypes.sizeof(u.kvm_enable_cap)))  # cap 0
    cap = u.kvm_enable_cap(cap=u.KVM_CAP_EXIT_HYPERCALL, flags=1)
    with raises_errno(errno.EINVAL):
        vm.ioctl(u.KVM_ENABLE_CAP, bytes(cap))  # flags must be 0
    fd, _ = vm.ioctl(u.KVM_CREATE_VCPU, 0)
    vcpu = vm.raw_objects[fd]  # type: ignore[attr-defined]
    assert vcpu.id == 0
    with raises_errno(errno.EEXIST):
        vm.ioctl(u.KVM_CREATE_VCPU, 0)
    with raises_errno(errno.EEXIST):
        vm.create_vcpu(0)


# --- the vCPU fd ---------------------------------------------------------------------------------
def test_raw_pre_fault_memory_passes_back_the_range(backend: Kvm) -> None:
    require_cap(backend, u.KVM_CAP_PRE_FAULT_MEMORY)
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    mem = backend.mmap_anonymous(SIZE)
    vm.set_user_memory_region2(1, 0, 1 << 32, SIZE, mem.addr)
    vcpu = vm.create_vcpu(0)
    arg = _buf(u.kvm_pre_fault_memory, gpa=1 << 32, size=4 * PAGE)
    ret, out = vcpu.ioctl(u.KVM_PRE_FAULT_MEMORY, arg)
    back = u.kvm_pre_fault_memory.from_buffer_copy(out)
    assert (ret, back.gpa, back.size) == (0, (1 << 32) + 4 * PAGE, 0)
    for gpa, size, flags in [(0, PAGE, 0), (1 << 32, PAGE, 1), (1 << 32, 1, 0)]:
        want = _typed_errno(lambda g=gpa, s=size, f=flags: vcpu.pre_fault_memory(g, s, f))
        assert want
        with raises_errno(want):
            vcpu.ioctl(u.KVM_PRE_FAULT_MEMORY, _buf(u.kvm_pre_fault_memory, gpa=gpa, size=size,
                                                    flags=flags))


def test_raw_memory_encrypt_op_without_a_launch_flow(backend: Kvm) -> None:
    """A default VM has no launch flow: KVM_MEMORY_ENCRYPT_OP is ENOTTY on its VM and vCPU fds
    whatever the argument (as the typed launch calls answer)."""
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    assert _typed_errno(vm.launch_finalize) == errno.ENOTTY
    sev = u.kvm_sev_cmd(id=u.KVM_SEV_SNP_LAUNCH_FINISH)
    for target in (vm, vcpu):
        for arg in (bytes(sev), bytes(8), 0):
            with raises_errno(errno.ENOTTY):
                target.ioctl(u.KVM_MEMORY_ENCRYPT_OP, arg)


# --- guest_memfd -----------------------------------------------------------------------------------
def test_raw_set_memory_attributes2_matches_the_typed_call(backend: Kvm) -> None:
    vm = backend.create_vm(u.KVM_X86_DEFAULT_VM)
    g = vm.create_guest_memfd(SIZE, 0)
    for offset, size, attrs in [(0, PAGE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE), (1, PAGE, 0), (0, 0, 0)]:
        want = errno_of(lambda o=offset, s=size, a=attrs: g.set_memory_attributes2(o, s, a))
        arg = _buf(u.kvm_memory_attributes2, offset=offset, size=size, attributes=attrs)
        assert errno_of(lambda a=arg: g.ioctl(u.KVM_SET_MEMORY_ATTRIBUTES2, a)) == want


# --- the wrong fd, and numbers nobody has ----------------------------------------------------------
CREATE_GMEM = (u.KVM_CREATE_GUEST_MEMFD, _buf(u.kvm_create_guest_memfd, size=SIZE))
SET_ATTRS = (u.KVM_SET_MEMORY_ATTRIBUTES, bytes(ctypes.sizeof(u.kvm_memory_attributes)))
REGION2 = (u.KVM_SET_USER_MEMORY_REGION2, bytes(ctypes.sizeof(u.kvm_userspace_memory_region2)))
WRONG_FD = [
    ("kvm", *CREATE_GMEM, errno.EINVAL), ("vcpu", *CREATE_GMEM, errno.EINVAL),
    ("gmem", *CREATE_GMEM, errno.ENOTTY), ("memfd", *CREATE_GMEM, errno.ENOTTY),
    ("kvm", *SET_ATTRS, errno.EINVAL), ("vcpu", *SET_ATTRS, errno.EINVAL),
    ("gmem", *SET_ATTRS, errno.ENOTTY), ("kvm", *REGION2, errno.EINVAL),
    ("vcpu", *REGION2, errno.EINVAL), ("gmem", *REGION2, errno.ENOTTY),
    ("kvm", u.KVM_SET_MEMORY_ATTRIBUTES2, bytes(ctypes.sizeof(u.kvm_memory_attributes2)), errno.EINVAL),
    ("vm", u.KVM_SET_MEMORY_ATTRIBUTES2, bytes(ctypes.sizeof(u.kvm_memory_attributes2)), errno.ENOTTY),
    ("vm", u.KVM_RUN, 0, errno.ENOTTY), ("kvm", u.KVM_RUN, 0, errno.EINVAL),
    ("gmem", u.KVM_RUN, 0, errno.ENOTTY),
    ("vm", u.KVM_GET_API_VERSION, 0, errno.ENOTTY), ("vcpu", u.KVM_GET_API_VERSION, 0, errno.EINVAL),
    ("gmem", u.KVM_GET_API_VERSION, 0, errno.ENOTTY),
    ("vcpu", u.KVM_CHECK_EXTENSION, u.KVM_CAP_GUEST_MEMFD, errno.EINVAL),
    ("gmem", u.KVM_CHECK_EXTENSION, u.KVM_CAP_GUEST_MEMFD, errno.ENOTTY),
    ("vm", u.KVM_CREATE_VM, 0, errno.ENOTTY), ("vcpu", u.KVM_CREATE_VCPU, 1, errno.EINVAL),
    ("kvm", u.KVM_CREATE_VCPU, 1, errno.EINVAL), ("vm", u.KVM_GET_VCPU_MMAP_SIZE, 0, errno.ENOTTY),
    ("kvm", u.KVM_PRE_FAULT_MEMORY, bytes(ctypes.sizeof(u.kvm_pre_fault_memory)), errno.EINVAL),
    ("vm", u.KVM_PRE_FAULT_MEMORY, bytes(ctypes.sizeof(u.kvm_pre_fault_memory)), errno.ENOTTY),
    ("kvm", KVM_UNKNOWN, 0, errno.EINVAL), ("vm", KVM_UNKNOWN, 0, errno.ENOTTY),
    ("vcpu", KVM_UNKNOWN, 0, errno.EINVAL), ("gmem", KVM_UNKNOWN, 0, errno.ENOTTY),
    ("memfd", KVM_UNKNOWN, 0, errno.ENOTTY),
    ("kvm", FOREIGN, 0, errno.EINVAL), ("vm", FOREIGN, 0, errno.ENOTTY),
    ("vcpu", FOREIGN, 0, errno.EINVAL), ("gmem", FOREIGN, 0, errno.ENOTTY),
    ("memfd", FOREIGN, 0, errno.ENOTTY),
    ("kvm", fa.FIONREAD, bytes(4), errno.EINVAL), ("vm", fa.FIONREAD, bytes(4), errno.ENOTTY),
    ("vcpu", fa.FIONREAD, bytes(4), errno.EINVAL), ("gmem", fa.FIONREAD, bytes(4), errno.ENOTTY),
    ("kvm", fa.FIOQSIZE, bytes(8), errno.ENOTTY), ("vcpu", fa.FIOQSIZE, bytes(8), errno.ENOTTY),
    ("gmem", fa.FIOQSIZE, bytes(8), errno.ENOTTY),
    ("gmem", u.KVM_CREATE_GUEST_MEMFD, 0, errno.ENOTTY),  # NULL, but nobody here copies it
    ("vcpu", u.KVM_SET_USER_MEMORY_REGION2, 0, errno.EINVAL),
]


@pytest.mark.parametrize(("where", "request_", "arg", "err"), WRONG_FD,
                         ids=[f"{w}-{r:#x}" for w, r, _a, _e in WRONG_FD])
def test_wrong_fd_and_unknown_numbers(backend: Kvm, where: str, request_: int, arg: Any,
                                      err: int) -> None:
    objs = _objects(backend)
    target = objs[where]
    with raises_errno(err):
        target.ioctl(request_, arg)
    assert objs["gmem"].fstat().st_size == SIZE  # nothing happened to anything
    assert getattr(target, "raw_objects", {}) == {}


# --- the generic VFS ioctls every fd has ---------------------------------------------------------
@pytest.mark.parametrize("where", ["kvm", "vm", "vcpu", "gmem", "memfd"])
def test_generic_vfs_ioctls(backend: Kvm, where: str) -> None:
    objs = _objects(backend)
    target = objs[where]
    assert target.ioctl(fa.FIGETBSZ, b"\xff" * 8) == (0, PAGE.to_bytes(4, "little") + b"\xff" * 4)
    assert target.ioctl(fa.FIOCLEX) == (0, b"")
    assert target.ioctl(fa.FIONCLEX) == (0, b"")
    assert target.ioctl(fa.FIONBIO, (1).to_bytes(4, "little"))[0] == 0
    assert target.ioctl(fa.FIOASYNC, bytes(4))[0] == 0
    with raises_errno(errno.EFAULT):
        target.ioctl(fa.FIONBIO, 0)


@pytest.mark.parametrize("where", ["gmem", "memfd"])
def test_generic_ioctls_change_what_fcntl_reads(backend: Kvm, where: str) -> None:
    f = _objects(backend)[where]
    f.ioctl(fa.FIOCLEX)
    assert f.fcntl(fa.F_GETFD) == fa.FD_CLOEXEC
    f.ioctl(fa.FIONCLEX)
    assert f.fcntl(fa.F_GETFD) == 0
    f.ioctl(fa.FIONBIO, (7).to_bytes(4, "little"))
    assert f.fcntl(fa.F_GETFL) & fa.O_NONBLOCK
    f.ioctl(fa.FIONBIO, bytes(4))
    assert not f.fcntl(fa.F_GETFL) & fa.O_NONBLOCK


def test_memfd_size_ioctls(backend: Kvm) -> None:
    m = backend.memfd_create(SIZE)
    m.write(b"a", 3 * PAGE)
    m.lseek(100, fa.SEEK_SET)
    assert m.ioctl(fa.FIONREAD, bytes(4))[1] == (SIZE - 100).to_bytes(4, "little")
    assert m.ioctl(fa.FIOQSIZE, bytes(8))[1] == PAGE.to_bytes(8, "little")  # bytes allocated


# --- hostile input -------------------------------------------------------------------------------
def test_argument_rule_refuses_before_the_call(backend: Kvm) -> None:
    objs = _objects(backend)
    vm, g = objs["vm"], objs["gmem"]
    full = _buf(u.kvm_create_guest_memfd, size=SIZE)
    with pytest.raises(ValueError):
        vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, full[:-1])  # short: the kernel would read past it
    with pytest.raises(ValueError):
        vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, 0x1000)  # an address: not allowed
    with pytest.raises(ValueError):
        g.ioctl(fa.FIOQSIZE, bytes(7))
    with pytest.raises(TypeError):
        vm.ioctl(u.KVM_CREATE_VCPU, b"\x00" * 8)  # a value ioctl given a buffer
    for bad in (1.5, "0", None, True, [0]):
        with pytest.raises(TypeError):
            vm.ioctl(u.KVM_CHECK_EXTENSION, bad)
        with pytest.raises(TypeError):
            vm.ioctl(bad, 0)
    with pytest.raises(OverflowError):
        vm.ioctl(1 << 32, 0)
    with pytest.raises(OverflowError):
        vm.ioctl(u.KVM_CHECK_EXTENSION, 1 << 64)
    assert getattr(vm, "raw_objects", {}) == {}
    # A longer buffer is fine: its tail is never touched.
    fd, out = vm.ioctl(u.KVM_CREATE_GUEST_MEMFD, full + b"tail")
    assert out.endswith(b"tail") and vm.raw_objects[fd].size == SIZE  # type: ignore[attr-defined]


def test_closed_objects_are_ebadf(backend: Kvm) -> None:
    objs = _objects(backend)
    for name in ("vcpu", "gmem", "memfd", "vm", "kvm"):
        objs[name].close()
    for name, obj in objs.items():
        for request, arg in [(fa.FIOCLEX, 0), (u.KVM_CHECK_EXTENSION, 1), (KVM_UNKNOWN, 0)]:
            with pytest.raises(KvmError) as info:
                obj.ioctl(request, arg)
            assert info.value.errno == errno.EBADF, name
        with pytest.raises(ValueError):  # the argument rule still comes first
            obj.ioctl(u.KVM_CREATE_GUEST_MEMFD, b"")

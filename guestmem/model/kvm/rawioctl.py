"""The raw ioctl escape hatch on the model: bytes in, the kernel's answer out.

``obj.ioctl(request, arg)`` on any fd object of the model (system, VM, vCPU, guest_memfd, memfd)
decodes ``arg`` with the ``guestmem.uapi`` ctypes structs and calls the very method the typed
interface uses, so no rule exists twice.  What decides the answer, in the kernel's order:

1. the argument rule (:func:`guestmem.fileabi.raw_argument`; TypeError/ValueError before anything);
2. a closed object: EBADF (``fdget``);
3. the generic VFS ioctls every fd has (``do_vfs_ioctl``: FIOCLEX, FIONCLEX, FIONBIO, FIOASYNC,
   FIGETBSZ; on a memfd also FIONREAD and FIOQSIZE);
4. the fd's own ``unlocked_ioctl``: a dead (bugged) VM answers EIO on its VM and vCPU fds; a vCPU
   fd refuses a non-KVM type with EINVAL; then the ioctls the interface has are dispatched; an
   ioctl on the wrong kind of fd, or a number nobody defines, gets that fd's "unknown" answer
   (``/dev/kvm`` EINVAL, VM ENOTTY, vCPU EINVAL, guest_memfd and memfd ENOTTY, i.e. no handler).

A KVM ioctl the kernel has but the model does not implement (``KVM_GET_REGS``, ``KVM_RUN`` through
raw bytes: the model has no ``kvm_run`` page, use ``Vcpu.run()``) raises ``NotImplementedError``
rather than invent an answer.  An fd a call creates (``KVM_CREATE_VM``, ``KVM_CREATE_VCPU``,
``KVM_CREATE_GUEST_MEMFD``) is returned as the kernel returns it, and its object is kept in the
caller's ``raw_objects[fd]`` (the fd stays open until that object is closed).
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any

from guestmem import fileabi as fa
from guestmem import uapi as u
from guestmem.errors import KvmError

# Every ioctl nr include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h define for KVMIO
# (Linux 7.2).  A KVMIO number whose nr is not here is unknown to every KVM fd.
KVM_USED_NRS = frozenset({
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x09, 0x0A,
    0x41, 0x42, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x50, 0x51, 0x52, 0x53,
    0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x6A, 0x71, 0x76, 0x77, 0x78, 0x79,
    0x7A, 0x7B, 0x7C, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, *range(0x88, 0xD3), 0xD4, 0xD5,
    0xE0, 0xE1, 0xE2, 0xE3,
})

SYSTEM, VM, VCPU, GMEM, MEMFD = "/dev/kvm", "VM", "vCPU", "guest_memfd", "memfd"
_UNKNOWN = {SYSTEM: errno.EINVAL, VM: errno.ENOTTY, VCPU: errno.EINVAL, GMEM: errno.ENOTTY,
            MEMFD: errno.ENOTTY}

# The interface's ioctls, and which fd each belongs to.  On any other fd of this table the kernel
# does not handle them (kvm_dev_ioctl, kvm_vm_ioctl, kvm_vcpu_ioctl and their x86 defaults), with
# the exceptions the kernel does handle elsewhere, listed in _ELSEWHERE.
_OWNER = {
    u.KVM_GET_API_VERSION: {SYSTEM}, u.KVM_CREATE_VM: {SYSTEM}, u.KVM_GET_VCPU_MMAP_SIZE: {SYSTEM},
    u.KVM_CHECK_EXTENSION: {SYSTEM, VM}, u.KVM_ENABLE_CAP: {VM}, u.KVM_CREATE_VCPU: {VM},
    u.KVM_CREATE_GUEST_MEMFD: {VM}, u.KVM_SET_USER_MEMORY_REGION: {VM},
    u.KVM_SET_USER_MEMORY_REGION2: {VM}, u.KVM_SET_MEMORY_ATTRIBUTES: {VM},
    u.KVM_MEMORY_ENCRYPT_OP: {VM}, u.KVM_RUN: {VCPU}, u.KVM_PRE_FAULT_MEMORY: {VCPU},
    u.KVM_SET_MEMORY_ATTRIBUTES2: {GMEM},
}
# vCPU register ioctls: the model has no registers to give (NotImplementedError with a buffer),
# but only a vCPU fd has a handler for them.
for _req in (u.KVM_GET_REGS, u.KVM_SET_REGS, u.KVM_GET_SREGS, u.KVM_SET_SREGS):
    _OWNER[_req] = {VCPU}
# The nrs include/uapi/linux/kvm.h and asm/kvm.h define twice (with different sizes or
# directions); every other nr names one ioctl, so a number with a known nr but another
# size/direction is no ioctl at all (every handler's switch compares the whole number).
KVM_NRS_DEFINED_TWICE = frozenset({
    0x67, 0x9F, 0xA0, 0xA1, 0xA2, 0xA3, 0xA5, 0xA6, 0xA7, 0xA8, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE,
    0xAF, 0xB0, 0xB1, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xD0, 0xD2,
})
_KNOWN_BY_NR = {r & 0xFF: r for r in _OWNER if fa.ioc_type(r) == u.KVMIO}
# Handled by the kernel on these fds too (vCPU capabilities; TDX's per-vCPU commands).
_ELSEWHERE = {(u.KVM_ENABLE_CAP, VCPU), (u.KVM_MEMORY_ENCRYPT_OP, VCPU)}


def _unknown(kind: str, request: int) -> KvmError:
    return KvmError(_UNKNOWN[kind], "ioctl", f"{kind} fd has no ioctl {request:#x}")


def _struct(cls: type[ctypes.Structure], buf: bytearray | int) -> Any:
    """The struct the kernel would ``copy_from_user``: EFAULT for NULL."""
    if not isinstance(buf, bytearray):
        raise KvmError(errno.EFAULT, "ioctl", "NULL argument")
    return cls.from_buffer_copy(bytes(buf[: ctypes.sizeof(cls)]))


def _put(buf: bytearray, obj: ctypes.Structure) -> None:
    data = bytes(obj)
    buf[: len(data)] = data


def _value(arg: bytearray | int) -> int:
    assert isinstance(arg, int)  # raw_argument refuses a buffer for a value-taking KVM ioctl
    return arg


def _generic(obj: Any, kind: str, fd: int, request: int, arg: int | bytearray) -> int | None:
    """``do_vfs_ioctl``'s part: every fd has it, before the fd's own handler."""
    from guestmem.model.fileops import vfs_ioctl_common

    ret = vfs_ioctl_common(obj, fd, request, arg, regular=kind == MEMFD)
    if ret is not None:
        return ret
    if request in (fa.FIONREAD, fa.FIOQSIZE) and kind == MEMFD:
        if not isinstance(arg, bytearray):
            raise KvmError(errno.EFAULT, "ioctl", "NULL argument")
        if request == fa.FIONREAD:  # put_user(i_size - f_pos, (int *)) truncates to int
            arg[0:4] = ((obj._i_size() - obj._f_pos()) & 0xFFFF_FFFF).to_bytes(4, "little")
        else:
            arg[0:8] = (obj._i_blocks() * 512).to_bytes(8, "little")
        return 0
    if request == fa.FIOQSIZE:  # an anonymous inode: no size to tell
        raise KvmError(errno.ENOTTY, "ioctl(FIOQSIZE)", "not a regular file")
    return None


def _dispatch(obj: Any, kind: str, fd: int, request: object, arg: object,
              own: Any) -> tuple[int, bytes]:
    req, a = fa.raw_argument(request, arg)
    if fd < 0:
        raise KvmError(errno.EBADF, "ioctl", f"{kind} is closed")
    ret = _generic(obj, kind, fd, req, a)
    if ret is None:
        ret = own(req, a)
    return ret, bytes(a) if isinstance(a, bytearray) else b""


def _kvm_kind_check(kind: str, request: int, vm: Any) -> None:
    """The start of ``kvm_vm_ioctl``/``kvm_vcpu_ioctl``, and the wrong-fd/unknown answers."""
    if vm is not None and vm.bugged:
        raise KvmError(errno.EIO, "ioctl", "the VM is dead (KVM_BUG_ON)")
    if kind == VCPU and fa.ioc_type(request) != u.KVMIO:
        raise KvmError(errno.EINVAL, "ioctl", "not a KVM ioctl")


def _not_here(kind: str, request: int) -> KvmError | NotImplementedError:
    """A request this fd's modelled handler does not take: the fd's unknown answer where the
    kernel has no handler for it here either, else NotImplementedError."""
    if kind in (GMEM, MEMFD):  # neither file has an unlocked_ioctl for anything else: ENOTTY
        return _unknown(kind, request)
    nr = request & 0xFF
    if (fa.ioc_type(request) == u.KVMIO and nr in _KNOWN_BY_NR and nr not in KVM_NRS_DEFINED_TWICE
            and request != _KNOWN_BY_NR[nr]):
        return _unknown(kind, request)
    owners = _OWNER.get(request)
    if owners is not None and kind not in owners and (request, kind) not in _ELSEWHERE:
        return _unknown(kind, request)
    if fa.ioc_type(request) == u.KVMIO and request & 0xFF in KVM_USED_NRS:
        return NotImplementedError(f"the model does not implement ioctl {request:#x} on a {kind} fd "
                                   "through raw bytes")
    return _unknown(kind, request)


def _memory_encrypt_op(vm: Any, kind: str, request: int) -> KvmError | NotImplementedError:
    """``KVM_MEMORY_ENCRYPT_OP`` on a VM or vCPU of a type with no launch flow: ENOTTY before the
    argument is even read (this host: no ``mem_enc_ioctl`` for such a VM, as the typed
    ``launch_update``/``launch_finalize`` answer).  SNP and TDX commands are not decoded from raw
    bytes: NotImplementedError."""
    from guestmem.model.kvm.arch import Flavour

    if type(vm.arch).launch_finalize is Flavour.launch_finalize:
        return KvmError(errno.ENOTTY, "KVM_MEMORY_ENCRYPT_OP", f"{vm.arch.name} VMs have no launch flow")
    return NotImplementedError(f"the model does not decode KVM_MEMORY_ENCRYPT_OP on a {kind} fd "
                               "through raw bytes: use launch_update/launch_finalize")


def _keep(owner: Any, created: Any) -> int:
    """An fd a raw call created: the object stays referenced (the fd open) until closed."""
    objs = owner.__dict__.setdefault("raw_objects", {})
    objs[created.fd] = created
    return int(created.fd)


# --- per fd kind -----------------------------------------------------------------------------------
def system_ioctl(kvm: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    def own(req: int, a: int | bytearray) -> int:
        if req == u.KVM_GET_API_VERSION:
            if _value(a):
                raise KvmError(errno.EINVAL, "KVM_GET_API_VERSION", "argument must be 0")
            return kvm.api_version()
        if req == u.KVM_CHECK_EXTENSION:
            return kvm.check_extension(_value(a))
        if req == u.KVM_CREATE_VM:
            return _keep(kvm, kvm.create_vm(_value(a)))
        if req == u.KVM_GET_VCPU_MMAP_SIZE:
            if _value(a):
                raise KvmError(errno.EINVAL, "KVM_GET_VCPU_MMAP_SIZE", "argument must be 0")
            return 3 * u.PAGE_SIZE  # kvm_run, the PIO data page, the coalesced MMIO ring
        raise _not_here(SYSTEM, req)

    kvm.process.run_deferred()
    return _dispatch(kvm, SYSTEM, -1 if kvm.closed else kvm.fd, request, arg, own)


def vm_ioctl(vm: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    def own(req: int, a: int | bytearray) -> int:
        _kvm_kind_check(VM, req, vm)
        if req == u.KVM_CHECK_EXTENSION:
            return vm.check_extension(_value(a))
        if req == u.KVM_CREATE_VCPU:
            return _keep(vm, vm.create_vcpu(_value(a)))
        if req == u.KVM_ENABLE_CAP:
            c = _struct(u.kvm_enable_cap, a)
            vm.enable_cap(c.cap, c.flags, tuple(c.args))
            return 0
        if req == u.KVM_CREATE_GUEST_MEMFD:  # the reserved words are not checked (6.18 and 7.2)
            g = _struct(u.kvm_create_guest_memfd, a)
            return _keep(vm, vm.create_guest_memfd(g.size, g.flags))
        if req == u.KVM_SET_USER_MEMORY_REGION:
            r = _struct(u.kvm_userspace_memory_region, a)
            vm.set_user_memory_region(r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr)
            return 0
        if req == u.KVM_SET_USER_MEMORY_REGION2:  # pads are not checked either
            r2 = _struct(u.kvm_userspace_memory_region2, a)
            vm.set_user_memory_region2(r2.slot, r2.flags, r2.guest_phys_addr, r2.memory_size,
                                       r2.userspace_addr, int(r2.guest_memfd), r2.guest_memfd_offset)
            return 0
        if req == u.KVM_SET_MEMORY_ATTRIBUTES:
            m = _struct(u.kvm_memory_attributes, a)
            vm.set_memory_attributes(m.address, m.size, m.attributes, m.flags)
            return 0
        if req == u.KVM_MEMORY_ENCRYPT_OP:
            raise _memory_encrypt_op(vm, VM, req)
        raise _not_here(VM, req)

    vm.system.process.run_deferred()
    return _dispatch(vm, VM, vm.fd, request, arg, own)


def vcpu_ioctl(vcpu: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    def own(req: int, a: int | bytearray) -> int:
        _kvm_kind_check(VCPU, req, vcpu.vm)
        if req == u.KVM_PRE_FAULT_MEMORY:
            r = _struct(u.kvm_pre_fault_memory, a)
            left = vcpu.pre_fault_memory(r.gpa, r.size, r.flags)
            r.gpa, r.size = r.gpa + (r.size - left), left  # the leftover range is passed back
            _put(a, r)  # type: ignore[arg-type]
            return 0
        if req == u.KVM_MEMORY_ENCRYPT_OP:
            raise _memory_encrypt_op(vcpu.vm, VCPU, req)
        if req == u.KVM_GET_REGS and a == 0 and not vcpu.vm.arch.has_protected_state:
            # kvm_vcpu_ioctl reads the registers, then copy_to_user(NULL) fails.
            raise KvmError(errno.EFAULT, "KVM_GET_REGS", "argument is NULL")
        raise _not_here(VCPU, req)

    vcpu.vm.system.process.run_deferred()
    fd = -1 if vcpu.closed else getattr(vcpu, "fd", 0)
    return _dispatch(vcpu, VCPU, fd, request, arg, own)


def file_ioctl(f: Any, request: object, arg: object = 0) -> tuple[int, bytes]:
    kind = GMEM if f.kind == "guest_memfd" else MEMFD

    def own(req: int, a: int | bytearray) -> int:
        if kind == GMEM and req == u.KVM_SET_MEMORY_ATTRIBUTES2:
            if not f.system.options.gmem_attributes:  # no unlocked_ioctl at all: nothing is read
                raise _unknown(GMEM, req)
            m = _struct(u.kvm_memory_attributes2, a)
            try:
                f.set_memory_attributes2(m.offset, m.size, m.attributes, m.flags, tuple(m.reserved))
            except KvmError as err:
                if err.error_offset is not None:
                    m.error_offset = err.error_offset
                    _put(a, m)  # type: ignore[arg-type]
                raise
            return 0
        raise _not_here(kind, req)

    f.owner_process.run_deferred()
    return _dispatch(f, kind, f.fd, request, arg, own)

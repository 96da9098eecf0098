"""What this host's KVM supports, found by asking it: the logic behind ``guestmem caps``.

Each answer is either a capability value (``KVM_CHECK_EXTENSION`` on the system fd and on a DEFAULT
VM) or the outcome of a small well-formed call — ``"ok"`` or the errno name the kernel returned.
Nothing is inferred from kernel versions or module names; those are only reported alongside.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.guest.ops import MapGpaRange, Program, Sync

OK = "ok"
HYPERCALL_PROBE_TIMEOUT = 0.5  # seconds
KVM_DEVICE_NUMBER = (10, 232)  # MISC_MAJOR, KVM_MINOR (include/linux/miscdevice.h): fixed, not dynamic


def check_device(path: str) -> int:
    """Make sure ``path`` is a KVM device before anything uses it; returns its API version.

    A user-given ``--device`` can be anything: a missing path, a directory, a FIFO (whose open
    could block), ``/dev/null``, or a character device whose open has side effects (a watchdog,
    a tape).  So the path is ``stat``-ed first and opened only if it is the KVM misc device
    (10:232); then ``KVM_GET_API_VERSION`` must answer :data:`guestmem.uapi.KVM_API_VERSION`.
    Each refusal is a :class:`KvmError` with the errno that explains it: the ``stat``/``open``
    errno, ``ENODEV`` for something that is not a character device, ``ENOTTY`` (what the kernel
    answers a KVM ioctl on any other device) for the wrong device, ``EINVAL`` for an API
    version this code does not speak.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise KvmError(err.errno or errno.ENOENT, f"stat {path}") from None
    if not stat.S_ISCHR(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a character device"
        raise KvmError(errno.ENODEV, f"open {path}", f"{kind}, so not a KVM device")
    number = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if number != KVM_DEVICE_NUMBER:
        raise KvmError(errno.ENOTTY, f"open {path}",
                       f"character device {number[0]}:{number[1]} is not KVM "
                       f"({KVM_DEVICE_NUMBER[0]}:{KVM_DEVICE_NUMBER[1]})")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise KvmError(err.errno or errno.ENODEV, f"open {path}") from None
    try:
        from guestmem.linux import _sys

        version = _sys.ioctl(fd, u.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    finally:
        os.close(fd)
    if version != u.KVM_API_VERSION:
        raise KvmError(errno.EINVAL, "KVM_GET_API_VERSION",
                       f"{path} speaks KVM API {version}, not {u.KVM_API_VERSION}")
    return version


def errno_name(err: int | None) -> str:
    """The kernel's name for an errno (``EOPNOTSUPP``, not Python's alias ``ENOTSUP``, for 95)."""
    if err == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(err or 0, str(err))


def outcome(fn: Callable[[], object]) -> str:
    """``"ok"`` if ``fn()`` succeeds, else the errno name of the ``KvmError``/``OSError`` it raised."""
    try:
        fn()
    except OSError as err:  # KvmError included
        return errno_name(err.errno)
    return OK


def decode_bits(value: int, names: dict[int, str]) -> list[str]:
    """Names of the set bits of ``value`` (unknown bits as hex)."""
    out = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    bit = 0
    while rest >> bit:
        if rest >> bit & 1:
            out.append(f"{1 << bit:#x}")
        bit += 1
    return out


def _kvm_modules() -> list[str]:
    try:
        return sorted(m for m in os.listdir("/sys/module") if m == "kvm" or m.startswith("kvm_"))
    except OSError:
        return []


def _probe_hypercall(kvm: Any) -> dict[str, Any]:
    """Run a guest that issues KVM_HC_MAP_GPA_RANGE and see whether it reaches userspace."""
    from guestmem.api import ExitHypercall, ExitSync

    result: dict[str, Any] = {"instruction": None, "exits": False, "result": None}
    with kvm.create_vm() as vm:
        result["instruction"] = vm.hypercall_insn
        try:
            enabled = vm.enable_hypercall_exit()
        except KvmError as err:
            result["result"] = f"KVM_ENABLE_CAP: {errno_name(err.errno)}"
            return result
        if not enabled:
            result["result"] = "KVM_CAP_EXIT_HYPERCALL lacks KVM_HC_MAP_GPA_RANGE"
            return result
        vcpu = vm.create_vcpu(0)
        vcpu.run_timeout = HYPERCALL_PROBE_TIMEOUT
        vcpu.load(Program([MapGpaRange(0, 1, 0, expect_ret=None), Sync(1)]))
        try:
            ex = vcpu.run()
        except KvmError as err:
            if err.errno == errno.EINTR:
                result["result"] = (f"no exit within {HYPERCALL_PROBE_TIMEOUT} s: the "
                                    f"{vm.hypercall_insn} never completes on this host")
            else:
                result["result"] = f"KVM_RUN: {errno_name(err.errno)}"
            return result
        if isinstance(ex, ExitHypercall):
            result["exits"] = True
            result["result"] = OK
        elif isinstance(ex, ExitSync):
            result["result"] = "the hypercall returned to the guest without a userspace exit"
        else:
            result["result"] = f"unexpected exit {ex.name}"
    return result


def probe(path: str = "/dev/kvm", *, hypercall: bool = True) -> dict[str, Any]:
    """Probe the KVM at ``path``; a JSON-serialisable dict (``available`` False if it cannot be opened)."""
    from guestmem.linux.system import open_kernel

    info: dict[str, Any] = {"device": path, "kernel_release": os.uname().release,
                            "kvm_modules": _kvm_modules()}
    try:
        check_device(path)
        kvm = open_kernel(path)
    except KvmError as err:
        info.update(available=False, error=f"{errno_name(err.errno)}: {err.message}")
        return info
    info.update(available=True, error=None)
    with kvm:
        info["api_version"] = kvm.api_version()
        info["cpu_vendor"] = kvm.cpu_vendor()
        with kvm.create_vm() as vm:
            caps = []
            for cap, name in sorted(u.CAP_NAMES.items()):
                entry: dict[str, Any] = {"name": f"KVM_CAP_{name}", "cap": cap}
                for where, target in (("system", kvm), ("vm", vm)):
                    try:
                        entry[where] = target.check_extension(cap)
                    except KvmError as err:
                        entry[where] = errno_name(err.errno)
                caps.append(entry)
            info["capabilities"] = caps

            mask = kvm.check_extension(u.KVM_CAP_VM_TYPES)
            info["vm_types"] = {
                "cap": mask,
                "supported": decode_bits(mask, {1 << t: n for t, n in u.VM_TYPE_NAMES.items()}),
                "create": {name: outcome(lambda t=t: kvm.create_vm(t).close())
                           for t, name in sorted(u.VM_TYPE_NAMES.items())},
            }

            flags_sys = kvm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
            flags_vm = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
            info["guest_memfd_flags"] = {"system": flags_sys, "vm": flags_vm,
                                         "decoded": decode_bits(flags_vm, u.GUEST_MEMFD_FLAG_NAMES)}

            info["set_memory_attributes"] = {
                "call": "KVM_SET_MEMORY_ATTRIBUTES(address=0, size=4096, attributes=0) on a DEFAULT VM",
                "result": outcome(lambda: vm.set_memory_attributes(0, u.PAGE_SIZE, 0)),
            }

            def gmem_attrs2() -> None:
                with vm.create_guest_memfd(u.PAGE_SIZE, 0) as gmem:
                    gmem.set_memory_attributes2(0, u.PAGE_SIZE, 0)

            info["set_memory_attributes2"] = {
                "call": "KVM_SET_MEMORY_ATTRIBUTES2(offset=0, size=4096, attributes=0) on a guest_memfd",
                "result": outcome(gmem_attrs2),
            }

            def pre_fault() -> None:
                mem = kvm.mmap_anonymous(1 << 16)
                try:
                    vm.set_user_memory_region(0, 0, 0, 1 << 16, mem.addr)
                    with vm.create_vcpu(0) as vcpu:
                        vcpu.pre_fault_memory(0, u.PAGE_SIZE)
                finally:
                    vm.set_user_memory_region(0, 0, 0, 0, 0)
                    mem.close()

            info["pre_fault_memory"] = {
                "call": "KVM_PRE_FAULT_MEMORY(gpa=0, size=4096) over an anonymous memslot",
                "result": outcome(pre_fault),
            }

        if hypercall:
            try:
                info["hypercall_exit"] = _probe_hypercall(kvm)
            except KvmError as err:
                info["hypercall_exit"] = {"exits": False,
                                          "result": f"{err.operation}: {errno_name(err.errno)}"}
    return info

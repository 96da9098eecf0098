"""Helpers for the conformance suite: skipping on missing host features, errno assertions,
invariant checks, and a host loop that drives guest programs (on one thread or several).

Everything here is written against :mod:`guestmem.api` only, so it works on both backends.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

import guestmem.uapi as u
from guestmem.api import (
    Exit,
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitSync,
    Kvm,
    Vcpu,
    Vm,
)
from guestmem.errors import KvmError
from guestmem.guest.ops import Op, Program, Sync

PAGE: int = u.PAGE_SIZE
SZ_2M: int = u.HPAGE_2M
SZ_4G: int = 1 << 32

# set_memory_region_test.c / private_mem_kvm_exits_test.c: "somewhat arbitrary location and slot,
# intended to not overlap anything".
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SIZE = SZ_2M
MEM_REGION_SLOT = 10

# guest_memfd_test.c / private_mem_conversions_test.c put guest_memfd slots at 4 GiB.
GMEM_GPA = SZ_4G

# A guard against hangs (a deadlocked vCPU thread, a guest that never halts), not a performance
# assertion: generous, and overridable for slow machines.
HANG_TIMEOUT = float(os.environ.get("GUESTMEM_TEST_HANG_TIMEOUT", "900"))

VM_TYPES: list[Any] = [pytest.param(t, id=name) for t, name in sorted(u.VM_TYPE_NAMES.items())]


def vm_type_name(vm_type: int) -> str:
    return f"KVM_X86_{u.VM_TYPE_NAMES.get(vm_type, str(vm_type))}_VM"


def cap_name(cap: int) -> str:
    return f"KVM_CAP_{u.CAP_NAMES.get(cap, str(cap))}"


def require_vm_type(kvm: Kvm, vm_type: int) -> Vm:
    """Create a VM of ``vm_type``, or skip the test if the backend answers EINVAL (unsupported type)."""
    try:
        return kvm.create_vm(vm_type)
    except KvmError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip(f"host lacks {vm_type_name(vm_type)} (KVM_CREATE_VM: EINVAL)")
        raise


def require_cap(kvm_or_vm: Kvm | Vm, cap: int, mask: int | None = None) -> int:
    """Return ``check_extension(cap)``; skip if it is 0 (or has none of the bits in ``mask``)."""
    value = kvm_or_vm.check_extension(cap)
    if not value:
        pytest.skip(f"host lacks {cap_name(cap)}")
    if mask is not None and not value & mask:
        pytest.skip(f"host lacks {cap_name(cap)} bits {mask:#x} (it reports {value:#x})")
    return value


def check(*objs: object) -> None:
    """Check the model's invariants (docs/design.md) on every object that can check them.

    The kernel backend has no ``check_invariants``; there this is a no-op.
    """
    for obj in objs:
        checker = getattr(obj, "check_invariants", None)
        if checker is not None:
            checker()


@contextmanager
def raises_errno(err: int) -> Iterator[pytest.ExceptionInfo[KvmError]]:
    """Assert that the block raises ``KvmError`` with exactly ``err``."""
    with pytest.raises(KvmError) as excinfo:
        yield excinfo
    got = excinfo.value.errno
    assert got == err, (
        f"expected {errno.errorcode.get(err, err)}, got {errno.errorcode.get(got or 0, got)}: {excinfo.value}"
    )


def errno_of(fn: Callable[[], object]) -> int:
    """Run ``fn``; return 0 if it succeeded, else the ``KvmError``'s errno."""
    try:
        fn()
    except KvmError as exc:
        return exc.errno or -1
    return 0


_hypercall_probe: dict[str, str | None] = {}
HYPERCALL_PROBE_TIMEOUT = 2.0  # seconds; only used where the backend offers a per-run timeout


def require_map_gpa_range_exit(kvm: Kvm) -> None:
    """Skip unless a guest's KVM_HC_MAP_GPA_RANGE reaches userspace as KVM_EXIT_HYPERCALL.

    Asks the capability first (KVM_CAP_EXIT_HYPERCALL must have the MAP_GPA_RANGE bit), then
    tries once per backend: on some hosts (kvm_pvm) the hypercall instruction is re-executed
    forever and ``run()`` only returns when the backend's watchdog interrupts it (EINTR).  Where a
    vCPU has a ``run_timeout`` knob (the kernel backend), the probe shortens it.
    """
    if kvm.check_extension(u.KVM_CAP_EXIT_HYPERCALL) & (1 << u.KVM_HC_MAP_GPA_RANGE) == 0:
        pytest.skip("host lacks KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE")
    if kvm.backend not in _hypercall_probe:
        _hypercall_probe[kvm.backend] = _probe_map_gpa_range(kvm)
    reason = _hypercall_probe[kvm.backend]
    if reason:
        pytest.skip(reason)


def _probe_map_gpa_range(kvm: Kvm) -> str | None:
    from guestmem.guest.ops import MapGpaRange

    with kvm.create_vm(u.KVM_X86_DEFAULT_VM) as vm:
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
        vcpu = vm.create_vcpu(0)
        if hasattr(vcpu, "run_timeout"):
            vcpu.run_timeout = HYPERCALL_PROBE_TIMEOUT
        vcpu.load(Program([MapGpaRange(SZ_4G, 1, 0, expect_ret=None)]))
        try:
            ex = vcpu.run()
        except KvmError as exc:
            if exc.errno == errno.EINTR:
                return ("host's KVM_HC_MAP_GPA_RANGE hypercall never exits to userspace "
                        f"(KVM_RUN interrupted: {exc})")
            raise
        finally:
            vcpu.close()
        assert isinstance(ex, ExitHypercall), f"MAP_GPA_RANGE probe: expected KVM_EXIT_HYPERCALL, got {ex!r}"
    return None


# --- guest programs with host actions ---------------------------------------------------------------


class GuestScript:
    """A guest program under construction, with a host action attached to each ``Sync``.

    ``sync(action)`` appends ``Sync(n)`` with a fresh ``n``; when the vCPU exits with
    ``ExitSync(n)``, :func:`drive` calls ``action()`` before re-entering the guest.  This plays the
    role of upstream's ``GUEST_SYNC*`` ucalls, whose arguments tell the host what to check.
    """

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.actions: dict[int, Callable[[], None]] = {}

    def __call__(self, *ops: Op) -> GuestScript:
        self.ops.extend(ops)
        return self

    def sync(self, action: Callable[[], None] | None = None) -> GuestScript:
        value = len(self.actions) + 1
        self.actions[value] = action or (lambda: None)
        self.ops.append(Sync(value))
        return self

    def program(self) -> Program:
        return Program(self.ops)


HypercallHandler = Callable[[ExitHypercall], None]


def drive(vm: Vm, vcpu: Vcpu, script: GuestScript, on_hypercall: HypercallHandler | None = None,
          *, check_each: bool = True, max_exits: int = 1_000_000) -> list[Exit]:
    """Load ``script`` into ``vcpu`` and run it to ``Halt``, serving syncs and hypercalls.

    Every exit, and every host action, is followed by ``check(vm)`` unless ``check_each`` is
    false: a multi-vCPU test passes false for its worker threads, because the VM is quiescent only
    when *all* its vCPUs and host threads are (an invalidation another thread has begun is a
    legitimate transient state), and checks after joining them instead.
    A guest assertion or an exit the script does not expect fails the test (``AssertionError``, so
    it also propagates out of worker threads).  Returns the exits seen.
    """
    maybe_check = (lambda: check(vm)) if check_each else (lambda: None)
    vcpu.load(script.program())
    seen: list[Exit] = []
    for _ in range(max_exits):
        ex = vcpu.run()
        seen.append(ex)
        maybe_check()
        if isinstance(ex, ExitHalt):
            return seen
        if isinstance(ex, ExitSync):
            action = script.actions.get(ex.value)
            assert action is not None, f"vCPU {vcpu.id}: unexpected sync value {ex.value}"
            action()
            maybe_check()
        elif isinstance(ex, ExitHypercall) and on_hypercall is not None:
            on_hypercall(ex)
            maybe_check()
        elif isinstance(ex, ExitGuestAssert):
            raise AssertionError(f"vCPU {vcpu.id}: {ex}")
        else:
            raise AssertionError(f"vCPU {vcpu.id}: unexpected exit {ex!r}")
    raise AssertionError(f"vCPU {vcpu.id} did not halt within {max_exits} exits")


def run_concurrently(workers: Sequence[Callable[[], None]], timeout: float = HANG_TIMEOUT) -> None:
    """Run each worker on its own thread, started together; re-raise the first failure.

    A worker still running after ``timeout`` seconds fails the test instead of hanging it (the
    thread is a daemon, so it cannot keep the interpreter alive either).
    """
    start = threading.Barrier(len(workers))
    errors: list[BaseException | None] = [None] * len(workers)

    def wrap(i: int, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait(timeout)
                fn()
            except BaseException as exc:  # reported (re-raised) on the main thread
                errors[i] = exc

        return run

    threads = [threading.Thread(target=wrap(i, fn), name=f"worker-{i}", daemon=True)
               for i, fn in enumerate(workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running after {timeout:.0f}s (hang?): {hung}"
    for exc in errors:
        if exc is not None:
            raise exc

"""A real vCPU: loads a compiled guest program, runs ``KVM_RUN`` and decodes ``kvm_run`` into typed exits.

The decoding follows :mod:`guestmem.api`: port-I/O to the guest-program doorbells becomes
:class:`ExitSync`/:class:`ExitGuestAssert` (read from the registers, see :mod:`guestmem.guest.x86`);
other port I/O, MMIO, hypercalls, HLT, shutdown and internal errors become their exit classes; and
``KVM_RUN`` failing with ``EFAULT``/``EHWPOISON`` while ``exit_reason`` is ``KVM_EXIT_MEMORY_FAULT``
becomes :class:`ExitMemoryFault` (any other failure is raised as ``KvmError``).  After a hypercall
exit, the ``ret`` the caller set on the exit object is written to ``kvm_run.hypercall.ret`` before the
next entry.  A watchdog (:mod:`guestmem.linux.watchdog`) bounds each ``KVM_RUN``.
"""

from __future__ import annotations

import errno
import mmap
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guestmem import uapi as u
from guestmem.api import (
    Exit,
    ExitFailEntry,
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitInternalError,
    ExitIo,
    ExitMemoryFault,
    ExitMmio,
    ExitShutdown,
    ExitSync,
    ExitUnknown,
)
from guestmem.args import u64
from guestmem.errors import EHWPOISON, KvmError
from guestmem.guest import x86
from guestmem.guest.image import GuestImage
from guestmem.guest.ops import Program
from guestmem.linux import _sys, watchdog
from guestmem.linux.abi import KVM_SET_CPUID2, kvm_cpuid2
from guestmem.linux.loader import LOADER_GPA

if TYPE_CHECKING:
    from guestmem.linux.vm import KernelVm

DEFAULT_RUN_TIMEOUT = 60.0  # seconds; per KVM_RUN call


def decode_failure(run: u.kvm_run, err: int) -> ExitMemoryFault | None:
    """``KVM_RUN`` failed with ``err``: a memory-fault exit if the kernel filled one in, else None."""
    if err in (errno.EFAULT, EHWPOISON) and run.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
        mf = run.u.memory_fault
        return ExitMemoryFault(gpa=int(mf.gpa), size=int(mf.size), flags=int(mf.flags), errno=err)
    return None


def decode_exit(run: u.kvm_run, raw: Any, doorbell: Callable[[int], Exit]) -> Exit:
    """Decode a successful ``KVM_RUN``'s ``kvm_run`` into a typed exit.

    ``raw`` is the whole kvm_run mapping (port-I/O data lives at ``io.data_offset`` in it);
    ``doorbell(port)`` builds the exit for a guest-program doorbell write.
    """
    reason = run.exit_reason
    if reason == u.KVM_EXIT_IO:
        io = run.u.io
        if io.direction == u.KVM_EXIT_IO_OUT and io.port in (x86.PORT_SYNC, x86.PORT_ASSERT):
            return doorbell(io.port)
        nbytes = io.size * io.count
        data = bytes(raw[io.data_offset : io.data_offset + nbytes])
        return ExitIo(port=io.port, size=io.size, direction=io.direction, data=data, count=io.count)
    if reason == u.KVM_EXIT_MMIO:
        m = run.u.mmio
        return ExitMmio(phys_addr=int(m.phys_addr), len=int(m.len), is_write=bool(m.is_write),
                        data=bytes(m.data)[: min(int(m.len), 8)])
    if reason == u.KVM_EXIT_HYPERCALL:
        hc = run.u.hypercall
        return ExitHypercall(nr=int(hc.nr), args=tuple(int(a) for a in hc.args), ret=0,
                             longmode=bool(hc.flags & u.KVM_HYPERCALL_LONG_MODE))
    if reason == u.KVM_EXIT_HLT:
        return ExitHalt()
    if reason == u.KVM_EXIT_SHUTDOWN:
        return ExitShutdown()
    if reason == u.KVM_EXIT_INTERNAL_ERROR:
        it = run.u.internal
        return ExitInternalError(suberror=int(it.suberror),
                                 data=tuple(int(d) for d in it.data[: min(int(it.ndata), 16)]))
    if reason == u.KVM_EXIT_FAIL_ENTRY:
        fe = run.u.fail_entry
        return ExitFailEntry(hardware_entry_failure_reason=int(fe.hardware_entry_failure_reason),
                             cpu=int(fe.cpu))
    return ExitUnknown(raw_reason=int(reason))


def _close_vcpu(fd: int, run_map: mmap.mmap) -> None:
    try:
        run_map.close()
    except (BufferError, ValueError):
        pass  # a ctypes view is still alive; the mapping goes with the process
    try:
        os.close(fd)
    except OSError:
        pass


class KernelVcpu:
    """One vCPU of a :class:`KernelVm`; ``run_timeout`` bounds each ``run()`` (None = no watchdog)."""

    def __init__(self, vm: KernelVm, vcpu_id: int, fd: int, mmap_size: int,
                 cpuid: kvm_cpuid2 | None) -> None:
        self.id = vcpu_id
        self.fd = fd
        self.run_timeout: float | None = DEFAULT_RUN_TIMEOUT
        self._vm = vm
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._finalizer = weakref.finalize(self, _close_vcpu, fd, self._run_map)
        self._run = u.kvm_run.from_buffer(self._run_map)
        self._pending_hypercall: ExitHypercall | None = None
        # An MMIO read waiting for its data: whatever the caller put in ``data`` is what the guest
        # reads (complete_emulated_mmio copies kvm_run.mmio.data into the instruction), as the model.
        self._pending_mmio_read: ExitMmio | None = None
        self._has_run = False
        self.program: Program | None = None
        self.image: GuestImage | None = None
        self.compiled: x86.CompiledProgram | None = None
        watchdog.ensure_handler()
        if cpuid is not None:
            # As upstream's selftests do: give the guest what KVM supports (long mode, NX, ...).
            _sys.ioctl(fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _fd(self, op: str) -> int:
        if self.closed:
            raise KvmError(errno.EBADF, op, "vCPU is closed")
        return self.fd

    # -- registers ----------------------------------------------------------------------------------
    def get_regs(self) -> u.kvm_regs:
        regs = u.kvm_regs()
        _sys.ioctl(self._fd("KVM_GET_REGS"), u.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: u.kvm_regs) -> None:
        _sys.ioctl(self._fd("KVM_SET_REGS"), u.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> u.kvm_sregs:
        sregs = u.kvm_sregs()
        _sys.ioctl(self._fd("KVM_GET_SREGS"), u.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: u.kvm_sregs) -> None:
        _sys.ioctl(self._fd("KVM_SET_SREGS"), u.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    # -- programs -----------------------------------------------------------------------------------
    def load(self, program: Program | GuestImage) -> None:
        """Point the vCPU at ``program`` in 64-bit mode: a :class:`Program` is compiled into this
        vCPU's code region; a :class:`GuestImage` is written (code and zeroed ``.bss``) at its base
        in the loader window's image area and started at its entry with its stack."""
        if not isinstance(program, Program | GuestImage):
            raise TypeError(f"program must be a guestmem.guest.Program or GuestImage, "
                            f"not {type(program).__name__}")
        self._fd("load")
        vm = self._vm
        loader = vm.loader()
        compiled: x86.CompiledProgram | None = None
        if isinstance(program, Program):
            probe = x86.compile_program(program, 0, hypercall=vm.hypercall_insn)
            base = loader.code_region(self.id, len(probe.code))
            compiled = x86.compile_program(program, base, hypercall=vm.hypercall_insn)
            entry, stack = compiled.entry, LOADER_GPA + x86.STACK_TOP_OFFSET
        else:
            entry, stack = program.entry_gpa, program.stack_gpa or LOADER_GPA + x86.STACK_TOP_OFFSET
        self._complete_pending()
        if compiled is not None:
            loader.write(compiled.base, compiled.code)
        else:
            assert isinstance(program, GuestImage)
            loader.place_image(program)
        sregs = self.get_sregs()
        x86.setup_long_mode(sregs, LOADER_GPA)
        self.set_sregs(sregs)
        regs = u.kvm_regs()
        regs.rip = entry
        regs.rsp = stack
        regs.rflags = 0x2
        self.set_regs(regs)
        if isinstance(program, Program):
            self.program, self.image = program, None
        else:
            self.program, self.image = None, program
        self.compiled = compiled
        self._pending_hypercall = None
        self._pending_mmio_read = None

    def _complete_pending(self) -> None:
        """Let KVM finish an exit that needs completion (port/MMIO input, a hypercall's return)
        before the registers are replaced: ``KVM_RUN`` with ``immediate_exit`` runs the completion
        and returns ``EINTR`` without entering the guest (as api.rst advises before saving state)."""
        if not self._has_run:
            return
        run = self._run
        run.immediate_exit = 1
        try:
            _sys.ioctl(self._fd("KVM_RUN"), u.KVM_RUN, 0, "KVM_RUN")
        except KvmError as err:
            if err.errno != errno.EINTR:
                raise
        finally:
            run.immediate_exit = 0

    # -- running ------------------------------------------------------------------------------------
    def _kick(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None and not self.closed:
            run.immediate_exit = 1

    def run(self) -> Exit:
        fd = self._fd("KVM_RUN")
        run = self._run
        if self._pending_hypercall is not None:
            run.u.hypercall.ret = self._pending_hypercall.ret & ((1 << 64) - 1)
            self._pending_hypercall = None
        if self._pending_mmio_read is not None:
            ex, self._pending_mmio_read = self._pending_mmio_read, None
            run.u.mmio.data[:] = list(bytes(ex.data[: ex.len]).ljust(8, b"\0")[:8])
        self._has_run = True
        while True:
            run.immediate_exit = 0
            with watchdog.armed(self.run_timeout, self._kick) as fired:
                try:
                    _sys.ioctl(fd, u.KVM_RUN, 0, "KVM_RUN")
                    failure: KvmError | None = None
                except KvmError as err:
                    failure = err
            if failure is None:
                return self._decode()
            fault = decode_failure(run, failure.errno or 0)
            if fault is not None:
                return fault
            if failure.errno == errno.EINTR:
                if fired[0]:
                    rip = self.get_regs().rip
                    raise KvmError(errno.EINTR, "KVM_RUN",
                                   f"watchdog: the vCPU did not exit within {self.run_timeout} s "
                                   f"(guest rip={rip:#x})")
                continue  # a stray signal (or a late kick from an earlier run): enter again
            raise failure

    def _decode(self) -> Exit:
        ex = decode_exit(self._run, self._run_map, self._doorbell)
        if isinstance(ex, ExitHypercall):
            self._pending_hypercall = ex
        elif isinstance(ex, ExitMmio) and not ex.is_write:
            ex.data = bytes(ex.len)  # nothing was read yet: zeros unless the host answers
            self._pending_mmio_read = ex
        return ex

    def _doorbell(self, port: int) -> Exit:
        regs = self.get_regs()
        if port == x86.PORT_SYNC:
            return ExitSync(value=int(regs.r8))
        index, kind = int(regs.r11), int(regs.r12)
        op = self.program[index] if self.program is not None and 0 <= index < len(self.program) else None
        if kind == x86.ASSERT_HYPERCALL:
            expected, found = x86.sign64(regs.r9), x86.sign64(regs.r10)
            message = f"op {index}: {op!r} returned {found}, expected {expected}"
        else:
            expected, found = int(regs.r9), int(regs.r10)
            message = f"op {index}: {op!r}" if self.image is None else f"{self.image.name}: check {index}"
        return ExitGuestAssert(gpa=int(regs.r8), expected=expected, found=found, op_index=index,
                               message=message)

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY``; returns the bytes left unmapped (the kernel's updated ``size``)."""
        gpa, size, flags = u64(gpa, "gpa"), u64(size, "size"), u64(flags, "flags")
        arg = u.kvm_pre_fault_memory(gpa=gpa, size=size, flags=flags)
        try:
            _sys.ioctl(self._fd("KVM_PRE_FAULT_MEMORY"), u.KVM_PRE_FAULT_MEMORY, arg, "KVM_PRE_FAULT_MEMORY")
        except KvmError as exc:
            exc.size_left = int(arg.size)  # the kernel copies the range back on failure too
            raise
        return int(arg.size)

    # -- lifetime -----------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch (:mod:`guestmem.linux.fileops`)."""
        from guestmem.linux.fileops import vcpu_ioctl

        return vcpu_ioctl(self, request, arg)

    def close(self) -> None:
        if self.closed:
            return
        del self._run  # drop the ctypes view so the kvm_run mapping can be unmapped
        self._finalizer()

    def __enter__(self) -> KernelVcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KernelVcpu(id={self.id}, {'closed' if self.closed else f'fd={self.fd}'})"

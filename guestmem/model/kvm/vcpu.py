"""A vCPU of the model: runs a guest program directly and returns the same typed exits as the
kernel backend's vCPU.

There is no instruction emulation: each op of :mod:`guestmem.guest.ops` is carried out against
guest physical memory through the MMU, exactly as the hardware would touch it — through present
SPTEs, and through the fault path where none is present.  Progress inside an op is kept, so an
exit in the middle of a 1 GiB write (a memory fault the VMM resolves by converting) resumes where
it stopped, as the faulting instruction would be re-executed.
"""

from __future__ import annotations

import errno
import sys
import threading
from typing import TYPE_CHECKING

from guestmem import native
from guestmem import uapi as u
from guestmem.api import (
    Exit,
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitMmio,
    ExitSync,
)
from guestmem.args import u64
from guestmem.errors import KvmError
from guestmem.guest.image import GuestImage
from guestmem.guest.ops import Accept, Halt, MapGpaRange, Program, Sync, Touch, Verify, Write
from guestmem.model.kvm.fault import Emulate, page_fault
from guestmem.model.kvm.mmio import StringMmio, no_memory, peek, straddling_element

if TYPE_CHECKING:
    from guestmem.model.kvm.vm import ModelVm
    from guestmem.model.kvm.x86 import X86Cpu

PS = u.PAGE_SIZE
U64 = (1 << 64) - 1

# The accelerator of the lazy-accept path (_fastfault.c): ``run_accept(vcpu)`` does what run()
# does for an Accept op's common case, or answers NotImplemented before changing anything it has
# not finished.  None when not built or GUESTMEM_PURE is set; tests set it to None to compare.
_fast = native.load("model.kvm._fastfault")
_fast_ready = False
_fast_why = ""  # why the accelerator was turned off after loading (setup refused this build)


def _fast_setup() -> None:
    """Hand the accelerator the classes and constants its checks compare against (on first use:
    the arch modules import this one).  If it refuses them (a class it reads changed shape, e.g.
    RangeMap's flat layout), it is turned off for this process and the Python path runs."""
    global _fast, _fast_ready, _fast_why
    import weakref

    from guestmem import errors, ranges, sync
    from guestmem.api import ExitMemoryFault
    from guestmem.model.kvm import guest_memfd, mmu
    from guestmem.model.kvm.arch.snp import Rmp, SnpFlavour
    from guestmem.model.kvm.arch.tdx import TdxFlavour
    from guestmem.model.kvm.memslot import Memslots
    from guestmem.model.kvm.vm import ModelVm
    from guestmem.model.mm import encryption, frames, pagecache

    # What the C runs instead of: if any is replaced (a test's monkeypatch), the Python path runs.
    try:
        originals = tuple((owner, name, getattr(owner, name)) for owner, name in (
            (sys.modules[__name__], "page_fault"), (ModelVcpu, "_accept"), (ModelVcpu, "_run"),
            (guest_memfd.GmemFile, "get_pfn_range"), (guest_memfd.GmemFile, "_get_pfn_one"),
            (pagecache.PageCache, "get_page"), (frames.FramePool, "alloc_range"),
            (frames.FramePool, "_find"), (mmu.Mmu, "translate"), (mmu.Mmu, "install"),
            (mmu.Mmu, "retry"), (ModelVm, "mem_is_private"), (ModelVm, "attribute_run_end"),
            (Memslots, "lookup"), (SnpFlavour, "gmem_prepare"), (SnpFlavour, "on_accept"),
            (SnpFlavour, "mark_accepted"), (SnpFlavour, "accept_key"), (TdxFlavour, "on_accept"),
            (TdxFlavour, "gmem_prepare"), (TdxFlavour, "mark_accepted"), (TdxFlavour, "accept_key"),
            (Rmp, "assign"), (encryption.EncryptionEngine, "defer_zeros"),
            (frames.FramePool, "defer"),
            (ranges.RangeMap, "get"), (ranges.RangeMap, "set"), (ranges.RangeMap, "segments"),
        ))
        assert _fast is not None
        _fast.setup({
            "RangeMap": ranges.RangeMap, "Spte": mmu.Spte, "ExitMemoryFault": ExitMemoryFault,
            "Accept": Accept, "Program": Program, "SnpFlavour": SnpFlavour, "TdxFlavour": TdxFlavour,
            "sync_dict": vars(sync), "ranges_dict": vars(ranges), "held": sync._held,
            "finalize_registry": weakref.finalize._registry,  # type: ignore[attr-defined]
            "originals": originals, "exit_template": ExitMemoryFault(0, 0, 0, 0),
            "EHWPOISON": errors.EHWPOISON, "MAX_INDEX": pagecache.MAX_INDEX,
            "EFAULT": errno.EFAULT, "EIO": errno.EIO, "ATTR_PRIVATE": u.KVM_MEMORY_ATTRIBUTE_PRIVATE,
            "EXIT_PRIVATE": u.KVM_MEMORY_EXIT_FLAG_PRIVATE, "MEM_GUEST_MEMFD": u.KVM_MEM_GUEST_MEMFD,
            "MEM_READONLY": u.KVM_MEM_READONLY,
        })
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        _fast, _fast_why = None, f"_fastfault does not fit this tree: {exc}"
    _fast_ready = True


class ModelVcpu:
    """Implements :class:`guestmem.api.Vcpu` for the model."""

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.program: Program | None = None
        self.image: GuestImage | None = None  # a built image, run by the x86 CPU
        self.pc = 0
        self.progress = 0  # bytes of the current Write/Verify already done
        self.halted = False
        self.closed = False
        self._pending: Exit | None = None  # a hypercall or MMIO exit awaiting completion
        self._mmio: StringMmio | None = None  # the MMIO exits of the op in progress (mmio.py)
        self._running = threading.Lock()
        self.stats = {"exits": 0, "faults": 0, "bytes_written": 0, "bytes_verified": 0}
        # With ModelOptions.cpu == "x86": the x86-64 CPU that runs the compiled program instead.
        self.cpu: X86Cpu | None = None

    # --- Vcpu -----------------------------------------------------------------------------------
    def load(self, program: Program | GuestImage) -> None:
        if not isinstance(program, Program | GuestImage):
            raise TypeError(f"program must be a guestmem.guest.Program or GuestImage, "
                            f"not {type(program).__name__}")
        if self.closed:
            raise KvmError(errno.EBADF, "load", "vCPU is closed")
        if isinstance(program, GuestImage) and self.vm.system.options.cpu != "x86":
            raise ValueError("a GuestImage is x86-64 machine code: it needs the model's x86 CPU "
                             "(guestmem.open(\"model\", cpu=\"x86\"))")
        if self.vm.system.options.cpu == "x86":
            if self.cpu is None:
                from guestmem.model.kvm.x86 import X86Cpu

                self.cpu = X86Cpu(self.vm, self.id)
            if isinstance(program, GuestImage):
                from guestmem.model.kvm.x86.image import load_image

                load_image(self.cpu, program)
                self.program, self.image = None, program
                self.pc, self.progress, self.halted, self._pending = 0, 0, False, None
                return
            self.cpu.load_program(program)
        self.program, self.image = program, None
        self.pc = 0
        self.progress = 0
        self.halted = False
        self._pending = None

    def close(self) -> None:
        self.closed = True
        if self.cpu is not None:
            self.cpu.close()
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            self.vm.system.process.close_fd(fd)

    def ioctl(self, request: int, arg: bytes | int = 0) -> tuple[int, bytes]:
        """The raw escape hatch (:mod:`guestmem.model.kvm.rawioctl`)."""
        from guestmem.model.kvm.rawioctl import vcpu_ioctl

        return vcpu_ioctl(self, request, arg)

    def run(self) -> Exit:
        if _fast is not None:  # the accelerator first; NotImplemented: this path from where it stopped
            if not _fast_ready:
                _fast_setup()
            ex = _fast.run_accept(self) if _fast is not None else NotImplemented
            if ex is not NotImplemented:
                return ex  # type: ignore[no-any-return]
        self.vm.system.process.run_deferred()
        if self.closed:
            raise KvmError(errno.EBADF, "KVM_RUN", "vCPU is closed")
        if self.vm.bugged:
            raise KvmError(errno.EIO, "KVM_RUN", "the VM is bugged (KVM_BUG_ON)")
        if self.program is None and self.image is None:
            raise KvmError(errno.EINVAL, "KVM_RUN", "no guest program loaded")
        if not self._running.acquire(blocking=False):
            raise KvmError(errno.EBUSY, "KVM_RUN", "vCPU is already running on another thread")
        try:
            ex = self._run() if self.cpu is None else self.cpu.run()
        finally:
            self._running.release()
        self.stats["exits"] += 1
        return ex

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY``: map [gpa, gpa+size) as if the guest had touched it.  Returns
        the bytes left unmapped (0 when done); raises if not even the first page could be, with
        ``size_left`` = ``size`` (kvm_vcpu_ioctl copies the untouched range back)."""
        gpa, size, flags = u64(gpa, "gpa"), u64(size, "size"), u64(flags, "flags")
        try:
            return self._pre_fault_memory(gpa, size, flags)
        except KvmError as exc:
            exc.size_left = size
            raise

    def _pre_fault_memory(self, gpa: int, size: int, flags: int) -> int:
        op = "KVM_PRE_FAULT_MEMORY"
        self.vm.system.process.run_deferred()
        if self.closed:
            raise KvmError(errno.EBADF, op, "vCPU is closed")
        vm = self.vm
        if vm.bugged:
            raise KvmError(errno.EIO, op, "the VM is bugged (KVM_BUG_ON)")
        if not vm.system.options.release.pre_fault_ioctl:
            raise KvmError(errno.EINVAL, op, "no such vCPU ioctl before 6.10 (kvm_arch_vcpu_ioctl)")
        if flags:
            raise KvmError(errno.EINVAL, op, "flags must be 0")
        if gpa % PS or size % PS or gpa + size <= gpa or gpa + size > U64:
            raise KvmError(errno.EINVAL, op, "range unaligned, empty or wrapping")
        if not vm.system.options.tdp_mmu:
            # Shadow paging: kvm_mmu_reload runs before the TDP check (mmu.c:5104 vs :5050) and
            # fails with ENOSPC while no memslot has sized n_max_mmu_pages (mmu.c:2899-2900).
            if not vm.mmu_pages_sized and vm.arch.pre_fault_allowed():
                raise KvmError(errno.ENOSPC, op, "shadow MMU has no pages yet (no memslot ever)")
            raise KvmError(errno.EOPNOTSUPP, op, "pre-faulting needs a TDP MMU")
        if not vm.arch.pre_fault_allowed():
            raise KvmError(errno.EOPNOTSUPP, op, "VM is not finalized")
        gfn, end = gpa // PS, (gpa + size) // PS
        start = gfn
        while gfn < end:
            private = vm.has_private_mem and vm.mem_is_private(gfn)
            try:
                res = page_fault(vm, gfn, end, "private" if private else "shared", False)
            except KvmError as exc:  # e.g. the shared side's userspace_addr is not mapped
                if gfn == start:
                    raise KvmError(exc.errno or errno.EFAULT, op, exc.message) from None
                break  # what was mapped stays mapped: report the bytes left, as upstream does
            if isinstance(res, int):
                gfn = res
                continue
            err = errno.ENOENT if isinstance(res, Emulate) else res.errno
            if gfn == start:
                raise KvmError(err, op, f"gpa {gfn * PS:#x} cannot be mapped")
            break
        return (end - gfn) * PS

    # --- the interpreter ------------------------------------------------------------------------
    def _run(self) -> Exit:
        assert self.program is not None
        if self.halted:
            return ExitHalt()
        pending, self._pending = self._pending, None
        if isinstance(pending, ExitHypercall):
            op = self.program[self.pc]
            assert isinstance(op, MapGpaRange)
            self.pc += 1
            if op.expect_ret is not None and (pending.ret & U64) != (op.expect_ret & U64):
                return self._assert_hypercall(op, pending.ret)
        while True:
            op = self.program[self.pc]
            if isinstance(op, Write | Verify | Touch):
                ex = self._access(op, pending if isinstance(pending, ExitMmio) else None)
                pending = None
                if ex is not None:
                    return ex
                self.pc += 1
                self.progress = 0
            elif isinstance(op, MapGpaRange):
                ex = self._hypercall(op)
                if ex is not None:
                    return ex
            elif isinstance(op, Accept):
                ex = self._accept(op)
                if ex is not None:
                    return ex
                self.pc += 1
                self.progress = 0
            elif isinstance(op, Sync):
                self.pc += 1
                return ExitSync(op.value)
            elif isinstance(op, Halt):
                self.halted = True
                return ExitHalt()
            else:  # pragma: no cover - Program validates ops
                raise TypeError(op)

    def _hypercall(self, op: MapGpaRange) -> Exit | None:
        """``__kvm_emulate_hypercall`` for KVM_HC_MAP_GPA_RANGE."""
        vm = self.vm
        ret: int
        if not vm.exit_hypercall_mask & (1 << u.KVM_HC_MAP_GPA_RANGE):
            ret = -u.KVM_ENOSYS
        elif op.gpa % PS or op.npages <= 0 or (op.gpa >> u.PAGE_SHIFT) + op.npages > U64:
            ret = -u.KVM_EINVAL
        else:
            ex = ExitHypercall(u.KVM_HC_MAP_GPA_RANGE, (op.gpa, op.npages, op.attrs, 0, 0, 0), 0, True)
            self._pending = ex
            return ex
        self.pc += 1
        if op.expect_ret is not None and (ret & U64) != (op.expect_ret & U64):
            return self._assert_hypercall(op, ret)
        return None

    def _assert_hypercall(self, op: MapGpaRange, ret: int) -> ExitGuestAssert:
        # The return code as the kernel backend (and the x86 vCPU) report it: RAX read as signed.
        found = ret & U64
        found = found - (1 << 64) if found >> 63 else found
        return ExitGuestAssert(op.gpa, op.expect_ret or 0, found, self.pc - 1,
                               f"MAP_GPA_RANGE returned {found}, expected {op.expect_ret}")

    def _access(self, op: Write | Verify | Touch, mmio_done: ExitMmio | None) -> Exit | None:
        """Carry out a Write, Touch or Verify from its saved progress; return an exit or None."""
        vm = self.vm
        write = not isinstance(op, Verify)
        stride = op.stride if isinstance(op, Touch) else 1
        gpa, access = vm.arch.decode_gpa(op.gpa, op.access)
        end = gpa + op.size
        pos = gpa + self.progress
        if mmio_done is not None and self._mmio is not None:
            step = self._mmio.complete(mmio_done)
            if not isinstance(step, int):
                return self._mmio_exit(step)
            pos = step
            self.progress = pos - gpa
        want = vm.arch.access_kind(access)
        while pos < end:
            gfn = pos // PS
            end_gfn = (end + PS - 1) // PS
            with vm.mmu_lock():
                runs = vm.mmu.translate(0, gfn, end_gfn, want, write)
                for s, e, pfn, private in runs:
                    a, b = max(pos, s * PS), min(end, e * PS)
                    exc = vm.arch.guest_access_fault(a // PS, (b + PS - 1) // PS, private, write)
                    if exc is not None:
                        self.progress = max(a, exc[0] * PS) - gpa
                        return ExitGuestAssert(max(a, exc[0] * PS), op.pattern, 0, self.pc, exc[1])
                    off = a - s * PS
                    pool = vm.system.pool
                    if stride > 1:
                        first = a + (-(a - gpa)) % stride  # the first touch point at or after a
                        for p in range(first, b, stride) if (b - first) // stride < 64 or private else ():
                            vm.arch.guest_write(pool, pfn, p - s * PS, 1, op.pattern, private)
                        if (b - first) // stride >= 64 and not private:
                            view = pool.view(pfn, e - s).reshape(-1)
                            view[first - s * PS : b - s * PS : stride] = op.pattern
                        self.stats["bytes_written"] += max(0, (b - first + stride - 1) // stride)
                    elif write:
                        vm.arch.guest_write(pool, pfn, off, b - a, op.pattern, private)
                        self.stats["bytes_written"] += b - a
                    else:
                        miss = vm.arch.guest_first_mismatch(pool, pfn, off, b - a, op.pattern, private)
                        if miss is not None:
                            k, seen_byte = miss
                            self.progress = a + k - gpa
                            boundary = straddling_element(vm, op, gpa, a + k)
                            if boundary is None:
                                return self._fail(op, a + k, seen_byte)
                            self._mmio = StringMmio(op, gpa, self.pc, lambda x: no_memory(vm, x, False),
                                                    lambda x: peek(vm, x, access))
                            return self._mmio_exit(self._mmio.begin(boundary))
                        self.stats["bytes_verified"] += b - a
                    pos = b
                    self.progress = pos - gpa
            if pos >= end:
                break
            gfn = pos // PS
            self.stats["faults"] += 1
            res = page_fault(vm, gfn, end_gfn, access, write)
            if isinstance(res, int):
                continue
            if isinstance(res, Emulate):  # the exits the compiled op would give (mmio.py)
                self._mmio = StringMmio(op, gpa, self.pc, lambda a: no_memory(vm, a, write),
                                        lambda a: peek(vm, a, access))
                return self._mmio_exit(self._mmio.begin(pos))
            return res
        return None

    def _mmio_exit(self, ex: Exit) -> Exit:
        if isinstance(ex, ExitMmio):
            self._pending = ex
        return ex

    def _accept(self, op: Accept) -> Exit | None:
        """TDG.MEM.PAGE.ACCEPT / PVALIDATE over the op's range, from its saved progress: each page
        is faulted in as private (a shared attribute makes that a memory-fault exit, i.e. the
        guest asking for the conversion), then marked accepted by the flavour."""
        vm = self.vm
        if not vm.arch.hw_access_kind:
            return None  # nothing to accept without hardware protection (a no-op, as documented)
        gpa, _ = vm.arch.decode_gpa(op.gpa, "private")
        end = gpa + op.size
        pos = gpa + self.progress
        pool = vm.system.pool
        while pos < end:
            gfn, end_gfn = pos // PS, (end + PS - 1) // PS
            with vm.mmu_lock():
                runs = vm.mmu.translate(0, gfn, end_gfn, True, False)
                for s, e, pfn, _private in runs:
                    vm.arch.on_accept(pool, s, e, pfn)
                    pos = min(end, e * PS)
                    self.progress = pos - gpa
            if pos >= end:
                break
            res = page_fault(vm, pos // PS, end_gfn, "private", False)
            if isinstance(res, int):
                continue
            if isinstance(res, Emulate):
                return ExitGuestAssert(pos, 0, 0, self.pc, "accept of a gpa with no memory behind it")
            return res
        return None

    def _fail(self, op: Verify | Write, gpa: int, found: int) -> ExitGuestAssert:
        return ExitGuestAssert(gpa, op.pattern, found, self.pc, "Verify")

    def __repr__(self) -> str:
        return f"ModelVcpu(id={self.id}, pc={self.pc})"

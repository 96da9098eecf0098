"""The x86-64 CPU of one model vCPU (see the package docstring for the design and its reasons).

:class:`X86Machine` is per VM: it owns the VM's x86 CPUs, the loader window and the plaintext twin,
and receives the MMU's zaps.  :class:`X86Cpu` is per vCPU: a Unicorn engine, its TLB-fill hook (the
guest page walk plus the SPTE lookup) and its run loop, which turns what stopped the engine into
the exits the kernel gives.

Threads: a vCPU thread holds ``uc_lock`` while the engine runs and never blocks on ``mmu_lock``
while holding it (the fill hook only *tries* ``mmu_lock`` and otherwise leaves guest mode to retry);
a zap holds ``mmu_lock`` and takes ``uc_lock``, kicking the engine (``emu_stop``) until it gets it.
So the lock order is ``mmu_lock`` -> ``uc_lock`` everywhere and a zap can always finish.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import unicorn as uc_mod
from unicorn import x86_const as X

from guestmem import uapi as u
from guestmem.api import (
    Exit,
    ExitGuestAssert,
    ExitHalt,
    ExitHypercall,
    ExitInternalError,
    ExitIo,
    ExitMemoryFault,
    ExitMmio,
    ExitShutdown,
    ExitSync,
)
from guestmem.guest import x86
from guestmem.model.kvm.fault import Emulate, page_fault
from guestmem.model.kvm.x86 import loader as loader_mod
from guestmem.model.kvm.x86.loader import LOADER_GPA, ModelLoader
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.guest.image import GuestImage
    from guestmem.guest.ops import Access
    from guestmem.model.kvm.mmu import Spte
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
U64 = (1 << 64) - 1
_uc_reg_read = uc_mod.unicorn_py3.unicorn.uclib.uc_reg_read
POOL_BASE = 1 << 48  # Unicorn-physical address of frame 0 of the frame pool
PLAIN_BASE = 1 << 49  # ... of the plaintext twin of frame 0 (encrypted flavours)
MMIO_PADDR = 1 << 50  # the two-page window an MMIO instruction is single-stepped through
PHYS_BITS = 40  # the guest's MAXPHYADDR (Unicorn's default CPU)
SNP_C_BIT = 39  # CPUID 0x8000001F EBX[5:0]: guest RAM below 512 GiB
TDX_GPAW = loader_mod.TDX_GPAW  # TDG.VP.INFO GPAW = 40; shared bit 39 (real TDX: 48 or 52)
RUN_COUNT = 1 << 62  # instruction budget per entry: makes every hook's emu_stop precise
MSR_EFER = 0xC000_0080
_PTE_P, _PTE_RW, _PTE_PS = 1, 2, 0x80
_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
EXC_PF, EXC_UD = 14, 6


@dataclass
class Stats:
    """What the bench reports: engine entries, TLB fills, faults taken, exits by kind."""

    entries: int = 0
    fills: int = 0
    faults: int = 0
    shootdowns: int = 0
    tlb_flushes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Stop(Exception):
    """Internal: why the fill hook refused a translation (recorded, not raised out of the hook)."""


class PlaintextTwin:
    """The plaintext of the private frames an x86 CPU uses, one sparse anonymous mapping per pool
    chunk (shared by all the VM's CPUs).  ``live`` marks the frames whose twin is current."""

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm
        self.pool = vm.system.pool
        self.chunk_pages = self.pool.chunk_pages
        self._maps: dict[int, mmap.mmap] = {}
        self._arrays: dict[int, np.ndarray] = {}
        self.live: RangeMap[bool] = RangeMap(False)

    def chunk(self, c: int) -> tuple[np.ndarray, int]:
        arr = self._arrays.get(c)
        if arr is None:
            m = mmap.mmap(-1, self.chunk_pages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
            self._maps[c] = m  # 0x4000 = MAP_NORESERVE: untouched twin pages cost nothing
            arr = self._arrays[c] = np.frombuffer(m, dtype=np.uint8)
        return arr, arr.ctypes.data

    def page(self, pfn: int) -> np.ndarray:
        c, i = divmod(pfn, self.chunk_pages)
        return self.chunk(c)[0][i * PS : (i + 1) * PS]

    def make_live(self, pfn: int) -> None:
        """Decrypt frame ``pfn`` into its twin unless the twin is already current."""
        if self.live.get(pfn):
            return
        engine = self.vm.arch.engine  # type: ignore[attr-defined]
        engine.decrypt_into(pfn, self.pool.view(pfn, 1).reshape(-1), self.page(pfn))
        self.live.set(pfn, pfn + 1, True)

    def retire(self, pfn: int, n: int) -> None:
        """The private mapping of frames [pfn, pfn+n) is gone from every CPU: write the plaintext
        back as ciphertext and drop the twin pages."""
        engine = self.vm.arch.engine  # type: ignore[attr-defined]
        for s, e, live in list(self.live.segments(pfn, pfn + n)):
            if not live:
                continue
            for p in range(s, e):
                engine.encrypt_into(p, self.page(p), self.pool.view(p, 1).reshape(-1))
                c, i = divmod(p, self.chunk_pages)
                self._maps[c].madvise(mmap.MADV_DONTNEED, i * PS, PS)
            self.live.set(s, e, False)


_SETUP_LOCK = threading.RLock()  # creating a VM's X86Machine and loader window once


class X86Machine:
    """The x86 side of one VM: its CPUs, loader window and plaintext twin; the MMU's zap listener."""

    def __init__(self, vm: ModelVm) -> None:
        self.vm = vm
        self.cpus: list[X86Cpu] = []
        self.loader: ModelLoader | None = None
        self.twin = PlaintextTwin(vm) if getattr(vm.arch, "engine", None) is not None else None
        vm.mmu.cpu_view = self

    @staticmethod
    def of(vm: ModelVm) -> X86Machine:
        with _SETUP_LOCK:
            view = vm.mmu.cpu_view
            if view is None:
                view = X86Machine(vm)
            assert isinstance(view, X86Machine)
            return view

    def get_loader(self) -> ModelLoader:
        """The loader window, created on first use (vCPUs may load concurrently)."""
        with _SETUP_LOCK:
            if self.loader is None:
                self.loader = ModelLoader(self.vm)
            return self.loader

    def zapped(self, as_id: int, runs: list[tuple[int, int, Spte]]) -> None:
        """SPTEs over ``runs`` were removed (``mmu_lock`` held): shoot down every CPU's TLB entries
        for them, then retire the plaintext twin of the private frames they mapped."""
        if as_id != 0:
            return
        for cpu in list(self.cpus):
            cpu.shootdown(runs)
        if self.twin is not None:
            for s, e, sp in runs:
                if sp.private:
                    self.twin.retire(s + sp.delta, e - s)


def _pool_chunk_addr(vm: ModelVm, c: int) -> int:
    return vm.system.pool.chunk_address(c)


class X86Cpu:
    """One vCPU's x86-64 CPU (Unicorn).  ``run()`` returns the next exit."""

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.machine = X86Machine.of(vm)
        self.pool = vm.system.pool
        self.uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_64)
        self.uc.ctl_set_tlb_mode(uc_mod.UC_TLB_VIRTUAL)
        self.uc_lock = threading.RLock()
        # Shootdowns waiting for this CPU to leave guest mode: the vCPU does not re-enter while
        # any is pending, so a kicked CPU cannot win uc_lock back before the zap that kicked it.
        self._shootdown_cv = threading.Condition(threading.Lock())
        self._shootdowns_waiting = 0
        self._kicked = False
        self._error: uc_mod.UcError | None = None
        self._event: tuple[Any, ...] | None = None
        self._pending: Exit | None = None
        self._mmio: _MmioStep | None = None
        self._read_step: _MmioStep | None = None  # an MMIO read waiting for the VMM's data
        self._chunks: set[int] = set()
        self._plain_chunks: set[int] = set()
        # gfn -> (pfn delta, private) for every gfn the TLB may hold a translation of, or whose
        # page the walk cache below holds; both are emptied by every TLB flush.
        self.tlb: dict[int, tuple[int, bool]] = {}
        # Guest-physical page-table pages the walk has read since the last flush: (pa page) ->
        # their qwords as the CPU sees them (the frame, or its plaintext twin).
        self._table_cache: dict[int, np.ndarray] = {}
        self.stats = Stats()
        self.exits: dict[str, int] = {}
        self.compiled: x86.CompiledProgram | None = None
        self.program: Any = None
        self.image: GuestImage | None = None  # a built image (x86/image.py), instead of a program
        self.ghcb_msr = 0  # MSR_AMD64_SEV_ES_GHCB as the image's wrmsr/rdmsr see it (x86/image.py)
        self.msr_hooks: list[Any] = []
        # Where a hypercall's result goes on the next run, and the RIP after the instruction.
        self.hypercall_return: tuple[str, int] = ("rax", 0)
        self.machine.cpus.append(self)
        uc = self.uc
        uc.hook_add(uc_mod.UC_HOOK_TLB_FILL, self._fill)
        uc.hook_add(uc_mod.UC_HOOK_INTR, self._intr)
        uc.hook_add(uc_mod.UC_HOOK_INSN_INVALID, self._invalid)
        uc.hook_add(uc_mod.UC_HOOK_INSN, self._out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(uc_mod.UC_HOOK_INSN, self._in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(uc_mod.UC_HOOK_INSN, self._cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.mmio_map(MMIO_PADDR, 2 * PS, self._mmio_read, None, self._mmio_write, None)
        self._queued: list[Exit] = []  # further exits of one instruction (an access split by page)

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        with self.vm.mmu_lock(), self.uc_lock:
            if self in self.machine.cpus:
                self.machine.cpus.remove(self)
            self.tlb.clear()

    # --- loading --------------------------------------------------------------------------------
    def load_code(self, code_gpa: int, code: bytes, entry: int) -> None:
        """Place ``code`` at ``code_gpa`` in the loader window and reset the CPU to 64-bit long mode
        at ``entry`` over the loader's identity map (the kernel backend's starting state)."""
        loader = self.machine.get_loader()
        loader.write(code_gpa, code)
        uc = self.uc
        with self.uc_lock:
            uc.ctl_flush_tb()  # the window's bytes changed under any translated blocks
            self._flush_tlb()
            uc.reg_write(X.UC_X86_REG_CR3, (LOADER_GPA | loader.alias) + x86.PML4_OFFSET)
            uc.reg_write(X.UC_X86_REG_CR4, x86.CR4_PAE)
            uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, x86.EFER_LME | x86.EFER_LMA))
            uc.reg_write(X.UC_X86_REG_CR0, x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE
                         | x86.CR0_WP | x86.CR0_PG)
            for reg in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX,
                        X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_RBP, X.UC_X86_REG_R8,
                        X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11, X.UC_X86_REG_R12,
                        X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15):
                uc.reg_write(reg, 0)
            uc.reg_write(X.UC_X86_REG_RSP, LOADER_GPA + x86.STACK_TOP_OFFSET)
            uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
            uc.reg_write(X.UC_X86_REG_RIP, entry)
        self._pending = None
        self._mmio = None

    def load_bytes(self, code: bytes) -> int:
        """Load hand-assembled 64-bit ``code`` into this vCPU's code region of the loader window
        and start there; returns its GPA (= linear address under the identity map)."""
        base = self.machine.get_loader().code_region(self.id, len(code))
        self.compiled, self.program = None, None
        self.load_code(base, bytes(code), base)
        return base

    def load_program(self, program: Any) -> None:
        """Compile a guest Program exactly as the kernel backend does and load it."""
        loader = self.machine.get_loader()
        probe = x86.compile_program(program, 0)
        base = loader.code_region(self.id, len(probe.code))
        compiled = x86.compile_program(program, base)
        self.compiled, self.program, self.image = compiled, program, None
        self.load_code(base, compiled.code, compiled.entry)

    # --- registers (for tests and the firmware) -------------------------------------------------
    def reg(self, name: str) -> int:
        with self.uc_lock:
            return int(self.uc.reg_read(getattr(X, "UC_X86_REG_" + name.upper())))

    def set_reg(self, name: str, value: int) -> None:
        with self.uc_lock:
            self.uc.reg_write(getattr(X, "UC_X86_REG_" + name.upper()), value & U64)

    # --- TLB ------------------------------------------------------------------------------------
    def _flush_tlb(self) -> None:
        self.uc.ctl(uc_mod.UC_CTL_TLB_FLUSH, uc_mod.UC_CTL_IO_WRITE)
        self.tlb = {}  # rebound, not cleared: a zap may be reading the old one under mmu_lock
        self._table_cache = {}
        self.stats.tlb_flushes += 1

    def tlb_holds(self, start: int, end: int) -> bool:
        """Whether the TLB (or the walk cache) may hold a translation of any gfn in [start, end)."""
        tlb = self.tlb
        if end - start <= len(tlb):
            return any(g in tlb for g in range(start, end))
        return any(start <= g < end for g in list(tlb))

    def shootdown(self, runs: list[tuple[int, int, Spte]]) -> None:
        """Called by a zap with ``mmu_lock`` held (any thread): if this CPU's TLB may hold any of
        the zapped gfns, get it out of guest mode and flush its TLB before the zap goes on.

        No kick is needed otherwise: ``self.tlb`` is only added to inside a fill holding
        ``mmu_lock``, before the engine gets the translation, so under ``mmu_lock`` it is a
        superset of what the engine's TLB can hold."""
        if not any(self.tlb_holds(s, e) for s, e, _ in runs):
            return
        if self.uc_lock.acquire(blocking=False):
            waited = False
        else:
            with self._shootdown_cv:
                self._shootdowns_waiting += 1
            waited = True
            while not self.uc_lock.acquire(timeout=0.0005):
                self._kicked = True
                self.uc.emu_stop()
        try:
            self._flush_tlb()
            self.stats.shootdowns += 1
        finally:
            self.uc_lock.release()
            if waited:
                with self._shootdown_cv:
                    self._shootdowns_waiting -= 1
                    self._shootdown_cv.notify_all()

    # --- guest-physical decoding ------------------------------------------------------------------
    def _decode_pa(self, pa: int) -> tuple[int, Access]:
        """A guest-physical address from a page-table entry -> (gfn, access kind), as the flavour's
        hardware decides: SNP the C-bit (set = private), TDX the shared bit (set = shared)."""
        arch = self.vm.arch
        if arch.name == "snp":
            c = 1 << SNP_C_BIT
            return (pa & ~c) >> 12, "private" if pa & c else "shared"
        if arch.name == "tdx":
            s = 1 << (TDX_GPAW - 1)
            return (pa & ~s) >> 12, "shared" if pa & s else "private"
        return pa >> 12, "auto"

    def _usable_spte(self, gfn: int, access: Access, write: bool) -> Spte | None:
        sp = self.vm.mmu.sptes[0].get(gfn)
        if sp is None or (write and not sp.writable):
            return None
        if access != "auto" and sp.private != (access == "private"):
            return None
        return sp

    def _page(self, gfn: int, access: Access, write: bool) -> tuple[int, Spte]:
        """The Unicorn-physical address of the page the CPU may use for ``gfn`` (``mmu_lock``
        held), or raise _Stop with the event that must be handled outside guest mode."""
        sp = self._usable_spte(gfn, access, write)
        if sp is None:
            raise _Stop(("fault", gfn, access, write, None))
        pfn = gfn + sp.delta
        arch = self.vm.arch
        twin = self.machine.twin
        if sp.private and twin is not None:
            key = arch.accept_key(gfn, pfn)  # type: ignore[attr-defined]
            if not arch.accepted.get(key):  # type: ignore[attr-defined]
                raise _Stop(("exception", "unvalidated private page", gfn))
            c = pfn // twin.chunk_pages
            if c not in self._plain_chunks:
                raise _Stop(("plain_chunk", c))
            twin.make_live(pfn)
            return PLAIN_BASE + pfn * PS, sp
        c = pfn // self.pool.chunk_pages
        if c not in self._chunks:
            raise _Stop(("chunk", c))
        return POOL_BASE + pfn * PS, sp

    def _read_pa_qword(self, pa: int) -> int:
        key = pa & _ADDR_MASK
        table = self._table_cache.get(key)
        if table is None:
            gfn, access = self._decode_pa(key)
            base, sp = self._page(gfn, access, False)
            self.tlb[gfn] = (sp.delta, sp.private)
            table = self._host_page(base).view(np.uint64)
            self._table_cache[key] = table
        return int(table[(pa & 0xFFF) >> 3])

    def _host_page(self, base: int) -> np.ndarray:
        if base >= PLAIN_BASE:
            assert self.machine.twin is not None
            return self.machine.twin.page((base - PLAIN_BASE) // PS)
        return self.pool.view((base - POOL_BASE) // PS, 1).reshape(-1)

    def _walk(self, va: int, write: bool) -> int:
        """The guest's 4-level page walk for ``va``: the guest-physical address (with the C-bit or
        shared bit as the leaf entry holds it).  Raises _Stop on a fault."""
        cr3 = ctypes.c_uint64()
        _uc_reg_read(self.uc._uch, X.UC_X86_REG_CR3, ctypes.byref(cr3))  # the binding's is 30x slower
        table = cr3.value & _ADDR_MASK
        writable = True
        for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
            idx = (va >> shift) & 511
            ent = self._read_pa_qword(table + idx * 8)
            if not ent & _PTE_P:
                raise _Stop(("exception", f"#PF: not present at level {level}", va))
            if (ent & _ADDR_MASK) >> PHYS_BITS:
                raise _Stop(("exception", "#PF: reserved address bits", va))
            writable = writable and bool(ent & _PTE_RW)
            if level in (3, 2) and ent & _PTE_PS:
                size = 1 << shift
                base = ent & _ADDR_MASK & ~(size - 1)
                if write and not writable:
                    raise _Stop(("exception", "#PF: write to a read-only page", va))
                return base | (va & (size - 1) & ~0xFFF)
            if level == 1:
                if write and not writable:
                    raise _Stop(("exception", "#PF: write to a read-only page", va))
                return ent & _ADDR_MASK
            table = ent & _ADDR_MASK
        raise AssertionError("unreachable")

    # --- hooks (run inside the engine; they never block on mmu_lock) --------------------------------
    def _fill(self, uc: Any, vaddr: int, access: int, entry: Any, _ud: Any) -> bool:
        if self._event is not None:
            return False
        self.stats.fills += 1
        write = access == uc_mod.UC_MEM_WRITE
        # mmu_lock, tried and never waited for (see the module docstring).  The raw lock: nothing
        # called under it here asserts ownership, and the named lock's bookkeeping doubled the
        # cost of a fill.
        raw = self.vm.mmu_lock._lock
        if not raw.acquire(blocking=False):
            self._event = ("retry",)
            return False
        try:
            try:
                pa = self._walk(vaddr, write)
                gfn, kind = self._decode_pa(pa)
                mmio = self._mmio
                if mmio is not None and gfn in mmio.gfns:
                    entry.paddr = MMIO_PADDR + mmio.gfns.index(gfn) * PS + (vaddr & 0xFFF)
                    entry.perms = uc_mod.UC_PROT_READ | uc_mod.UC_PROT_WRITE
                    return True
                base, sp = self._page(gfn, kind, write)
            except _Stop as stop:
                ev = stop.args[0]
                self._event = (*ev[:4], vaddr) if ev[0] == "fault" else ev
                return False
            self.tlb[gfn] = (sp.delta, sp.private)
        finally:
            raw.release()
        entry.paddr = base + (vaddr & 0xFFF)
        entry.perms = uc_mod.UC_PROT_READ | uc_mod.UC_PROT_EXEC | (
            uc_mod.UC_PROT_WRITE if sp.writable else 0)
        return True

    def _intr(self, uc: Any, intno: int, _ud: Any) -> None:
        if self._event is None:
            self._event = ("exception", f"vector {intno}", int(uc.reg_read(X.UC_X86_REG_RIP)))
        uc.emu_stop()

    def _invalid(self, uc: Any, _ud: Any) -> bool:
        if self._event is None:
            self._event = ("insn",)
        return False

    def _out(self, uc: Any, port: int, size: int, value: int, _ud: Any) -> None:
        if self._event is None:
            self._event = ("out", port, size, value)
        uc.emu_stop()

    def _in(self, uc: Any, port: int, size: int, _ud: Any) -> int:
        if self._event is None:
            self._event = ("in", port, size)
        uc.emu_stop()
        return 0

    def _cpuid(self, uc: Any, _ud: Any) -> int:
        from guestmem.model.kvm.x86 import firmware

        return firmware.cpuid(self)

    def _mmio_read(self, uc: Any, offset: int, size: int, _ud: Any) -> int:
        step = self._mmio
        assert step is not None
        step.accesses.append((offset, size, False, 0))
        data = b""
        for start, reply in step.replies.items():  # the part of the VMM's data at this offset
            if start <= offset < start + len(reply):
                data = reply[offset - start : offset - start + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def _mmio_write(self, uc: Any, offset: int, size: int, value: int, _ud: Any) -> None:
        step = self._mmio
        assert step is not None
        step.accesses.append((offset, size, True, value))

    # --- the run loop ---------------------------------------------------------------------------
    def _enter(self, count: int = RUN_COUNT) -> None:
        with self._shootdown_cv:
            while self._shootdowns_waiting:
                self._shootdown_cv.wait()
        with self.uc_lock:
            self._event = None
            self._kicked = False
            self.stats.entries += 1
            rip = int(self.uc.reg_read(X.UC_X86_REG_RIP))
            self._error = None
            try:
                self.uc.emu_start(rip, 0, count=count)
            except uc_mod.UcError as err:
                self._error = err  # the reason is in self._event (a refused fill, an invalid insn)

    def _count(self, ex: Exit) -> Exit:
        self.exits[ex.name] = self.exits.get(ex.name, 0) + 1
        return ex

    def run(self) -> Exit:
        ex = self._complete_pending()
        if ex is not None:
            return self._count(ex)
        while True:
            self._enter()
            ev = self._event
            if ev is None and self._error is not None:
                # The engine stopped for a reason no hook saw: KVM's answer to an instruction it
                # cannot emulate (never seen in the tests; better than re-entering forever).
                return self._count(ExitInternalError(u.KVM_INTERNAL_ERROR_EMULATION,
                                                     (int(self._error.errno), self.reg("rip"))))
            if ev is None:
                if self._kicked:
                    continue  # a shootdown took the CPU out of guest mode; re-enter
                if self._last_byte_is_hlt():
                    return self._count(ExitHalt())
                continue
            ex = self._handle(ev)
            if ex is not None:
                return self._count(ex)

    def _last_byte_is_hlt(self) -> bool:
        rip = self.reg("rip")
        data = self.read_virt(rip - 1, 1)
        return data == x86.HLT

    def _handle(self, ev: tuple[Any, ...]) -> Exit | None:
        kind = ev[0]
        if kind == "retry":
            return None
        if kind == "chunk":
            self._map_chunk(ev[1])
            return None
        if kind == "plain_chunk":
            assert self.machine.twin is not None
            _, addr = self.machine.twin.chunk(ev[1])
            span = self.machine.twin.chunk_pages * PS
            with self.uc_lock:
                self.uc.mem_map_ptr(PLAIN_BASE + ev[1] * span, span, uc_mod.UC_PROT_ALL, addr)
            self._plain_chunks.add(ev[1])
            return None
        if kind == "fault":
            return self._fault(ev[1], ev[2], ev[3], ev[4])
        if kind == "exception":
            return ExitShutdown()
        if kind == "out":
            return self._port_out(ev[1], ev[2], ev[3])
        if kind == "in":
            ex = ExitIo(port=ev[1], size=ev[2], direction=u.KVM_EXIT_IO_IN, data=bytes(ev[2]), count=1)
            self._pending = ex
            return ex
        if kind == "insn":
            from guestmem.model.kvm.x86 import firmware

            return firmware.emulate(self)
        raise AssertionError(f"unknown CPU event {ev!r}")  # pragma: no cover

    def _map_chunk(self, c: int) -> None:
        span = self.pool.chunk_pages * PS
        addr = _pool_chunk_addr(self.vm, c)
        with self.uc_lock:
            self.uc.mem_map_ptr(POOL_BASE + c * span, span, uc_mod.UC_PROT_ALL, addr)
        self._chunks.add(c)

    def _fault(self, gfn: int, access: Access, write: bool, vaddr: int | None = None) -> Exit | None:
        """An EPT/NPT violation: the model's fault path from ``gfn``.  One page, as KVM maps; but
        when a ``rep`` string instruction faults, the rest of the range it is walking (RCX
        elements from RDI/RSI, as far as the guest maps it contiguously, at most 2 MiB) is faulted
        in at once -- what the op interpreter does for the op the instruction came from."""
        self.stats.faults += 1
        end = gfn + 1
        if vaddr is not None:
            end = gfn + self._string_extent(gfn, vaddr, write)
        res = page_fault(self.vm, gfn, end, access, write)
        if isinstance(res, int):
            return None
        if isinstance(res, Emulate):
            return self._mmio_exit(gfn)
        assert isinstance(res, ExitMemoryFault)
        return res

    def _string_extent(self, gfn: int, vaddr: int, write: bool) -> int:
        """How many pages from ``vaddr``'s the faulting ``rep`` string instruction is still going
        to touch, contiguous in guest-physical memory (1 for any other instruction)."""
        with self.uc_lock:
            rip, rcx, rdi, rsi, flags = (int(self.uc.reg_read(r)) for r in (
                X.UC_X86_REG_RIP, X.UC_X86_REG_RCX, X.UC_X86_REG_RDI, X.UC_X86_REG_RSI,
                X.UC_X86_REG_RFLAGS))
        code = self.read_virt(rip, 3)
        if len(code) < 2 or code[0] not in (0xF2, 0xF3) or flags & (1 << 10):
            return 1
        rex, op = (code[1], code[2]) if 0x40 <= code[1] <= 0x4F and len(code) == 3 else (0, code[1])
        if op not in (0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAE, 0xAF):
            return 1
        size = 1 if op % 2 == 0 else (8 if rex & 8 else 4)
        left = 0
        for start in (rdi, rsi):
            if start <= vaddr < start + rcx * size:
                left = start + rcx * size - vaddr
        pages = min(512, ((vaddr & 0xFFF) + left + PS - 1) // PS)
        if pages <= 1:
            return 1
        n = 0
        with self.vm.mmu_lock(), self.uc_lock:
            try:
                kind = self._decode_pa(self._walk(vaddr & ~0xFFF, write))[1]
                while n < pages and self._decode_pa(
                        self._walk((vaddr & ~0xFFF) + n * PS, write)) == (gfn + n, kind):
                    n += 1
            except _Stop:
                pass  # the walk itself needs a fault further on: stop there
        return max(1, n)

    # --- port I/O and the guest-program doorbells ------------------------------------------------
    def _port_out(self, port: int, size: int, value: int) -> Exit:
        if port == x86.PORT_SYNC:
            return ExitSync(value=self.reg("r8"))
        if port == x86.PORT_ASSERT:
            index, kind = self.reg("r11"), self.reg("r12")
            program = self.program
            if kind == x86.ASSERT_HYPERCALL:
                expected, found = x86.sign64(self.reg("r9")), x86.sign64(self.reg("r10"))
                message = f"op {index}: {program[index] if program else ''!r} returned {found}, " \
                          f"expected {expected}"
            else:
                expected, found = self.reg("r9"), self.reg("r10")
                message = (f"op {index}: {program[index] if program else ''!r}" if self.image is None
                           else f"{self.image.name}: check {index}")
            return ExitGuestAssert(gpa=self.reg("r8"), expected=expected, found=found, op_index=index,
                                   message=message)
        return ExitIo(port=port, size=size, direction=u.KVM_EXIT_IO_OUT,
                      data=(value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), count=1)

    # --- MMIO: the faulting instruction is single-stepped through a capturing window ------------
    def _mmio_exit(self, gfn: int) -> Exit | None:
        """No memslot: KVM emulates the instruction.  Step it once through the MMIO window (the
        gfn, and the next one when an operand crosses into it) to learn its accesses; each part
        in one page is one exit with its length and data.  A write completes now (further parts
        are returned by the next runs); a read is undone, its parts are returned one per run, and
        the instruction is stepped again with the VMM's data once all have it."""
        step = _MmioStep([gfn])
        with self.uc_lock:
            ctx = self.uc.context_save()
        while True:
            self._mmio = step
            self._step_mmio()
            self._mmio = None
            ev = self._event
            if step.accesses or ev is None or ev[0] != "fault" or len(step.gfns) > 1 \
                    or ev[1] != gfn + 1:
                break
            # The operand crosses into the next page: fault it (RAM is mapped; no memslot joins
            # the window), and step again from the same state.
            res = page_fault(self.vm, ev[1], ev[1] + 1, ev[2], ev[3])
            if isinstance(res, ExitMemoryFault):
                with self.uc_lock:
                    self.uc.context_restore(ctx)
                return res
            if isinstance(res, Emulate):
                step.gfns.append(ev[1])
            step.accesses.clear()
            with self.uc_lock:
                self.uc.context_restore(ctx)
        if not step.accesses:  # the instruction stopped before its MMIO access: handle that
            return self._handle(ev) if ev is not None else None
        parts = step.parts()
        if parts[0][2]:  # a write: done
            exits: list[Exit] = [ExitMmio(step.gpa(o), n, True, d) for o, n, _, d in parts]
            self._queued = exits[1:]
            return exits[0]
        with self.uc_lock:
            self.uc.context_restore(ctx)
        step.pending = [ExitMmio(step.gpa(o), n, False, bytes(8)) for o, n, _, _ in parts]
        step.offsets = [o for o, _, _, _ in parts]
        step.accesses.clear()
        self._read_step = step
        ex = step.pending[0]
        self._pending = ex
        return ex

    def _step_mmio(self) -> None:
        with self.uc_lock:
            self._flush_tlb()
        self._enter(count=1)
        with self.uc_lock:
            self._flush_tlb()

    def _complete_pending(self) -> Exit | None:
        if self._queued:
            return self._queued.pop(0)
        pending, self._pending = self._pending, None
        if isinstance(pending, ExitMmio) and not pending.is_write:
            step = self._read_step
            assert step is not None
            i = step.pending.index(pending)
            step.replies[step.offsets[i]] = bytes(pending.data[: pending.len])
            if i + 1 < len(step.pending):  # the operand's next part: its own exit first
                self._pending = step.pending[i + 1]
                return self._pending
            self._read_step = None
            self._mmio = step
            self._step_mmio()
            self._mmio = None
        elif isinstance(pending, ExitIo) and pending.direction == u.KVM_EXIT_IO_IN:
            data = int.from_bytes(bytes(pending.data[: pending.size]).ljust(pending.size, b"\0"), "little")
            with self.uc_lock:
                if pending.size == 4:
                    self.uc.reg_write(X.UC_X86_REG_RAX, data)  # a 32-bit result zero-extends
                elif pending.size == 2:
                    self.uc.reg_write(X.UC_X86_REG_AX, data)
                else:
                    self.uc.reg_write(X.UC_X86_REG_AL, data)
        elif isinstance(pending, ExitHypercall):
            from guestmem.model.kvm.x86 import firmware

            return firmware.complete_hypercall(self, pending)
        return None

    # --- reading guest virtual memory (instruction bytes) ----------------------------------------
    def read_virt(self, va: int, n: int) -> bytes:
        """``n`` bytes at guest virtual ``va`` as the CPU sees them; b"" if any page is not mapped
        (this never faults anything in)."""
        out = b""
        with self.vm.mmu_lock(), self.uc_lock:
            while n > 0:
                take = min(n, PS - (va & 0xFFF))
                try:
                    pa = self._walk(va & ~0xFFF, False)
                    gfn, kind = self._decode_pa(pa)
                    base, _ = self._page(gfn, kind, False)
                except _Stop:
                    return b""
                page = self._host_page(base)
                out += page[va & 0xFFF : (va & 0xFFF) + take].tobytes()
                va, n = va + take, n - take
        return out

    def translate(self, va: int, write: bool = False) -> tuple[int, Access] | tuple[None, str]:
        """The guest page walk for ``va`` (``mmu_lock`` held by the caller): (gfn, access kind), or
        (None, why) when the walk itself needs a fault or raises an exception."""
        try:
            pa = self._walk(va, write)
        except _Stop as stop:
            return None, repr(stop.args[0])
        gfn, kind = self._decode_pa(pa)
        return gfn, kind


@dataclass
class _MmioStep:
    """One instruction stepped through the MMIO window: its pages (window page i is ``gfns[i]``),
    the accesses the engine made (it may split one operand into parts), and for a read the exits
    still to answer and the VMM's data by window offset."""

    gfns: list[int]
    accesses: list[tuple[int, int, bool, int]] = field(default_factory=list)
    replies: dict[int, bytes] = field(default_factory=dict)
    pending: list[ExitMmio] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def gpa(self, offset: int) -> int:
        return self.gfns[offset // PS] * PS + offset % PS

    def parts(self) -> list[tuple[int, int, bool, bytes]]:
        """The first operand's accesses joined per page: (window offset, length, write, data) --
        one exit per page part, as KVM's emulator reports a split access."""
        out: list[tuple[int, int, bool, bytes]] = []
        write = self.accesses[0][2]
        for o, n, w, v in self.accesses:
            if w != write:
                break
            data = (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            if out and out[-1][0] + out[-1][1] == o and o % PS and out[-1][1] + n <= 8:
                po, pn, _, pd = out[-1]
                out[-1] = (po, pn + n, w, pd + data)
            elif out and sum(p[1] for p in out) + n > 8:
                break
            else:
                out.append((o, n, w, data))
        return out


def check_cpu_view(vm: ModelVm) -> None:
    """Invariants 1 and 2 for the CPU's view (``mmu_lock`` held): every gfn an x86 CPU's TLB may
    translate is mapped by a present SPTE naming the same frame with the same kind, and every
    live plaintext-twin frame is mapped by a private SPTE."""
    from guestmem.model.kvm.invariants import InvariantError

    view = vm.mmu.cpu_view
    if not isinstance(view, X86Machine):
        return
    sptes = vm.mmu.sptes[0]
    for cpu in view.cpus:
        for gfn, v in list(cpu.tlb.items()):
            sp = sptes.get(gfn)
            if sp is None or (sp.delta, sp.private) != v:
                raise InvariantError(f"invariant 1: vCPU {cpu.id}'s TLB may translate gfn {gfn:#x}, "
                                     "which no present SPTE maps that way")
    if view.twin is not None:
        mapped: RangeMap[bool] = RangeMap(False)
        for s, e, sp in sptes.items():
            if sp is not None and sp.private:
                mapped.set(s + sp.delta, e + sp.delta, True)
        for s, e, live in view.twin.live.items():
            if live and mapped.first_match(s, e, lambda v: not v) is not None:
                raise InvariantError(f"invariant 1: plaintext twin of frames [{s:#x}, {e:#x}) is live "
                                     "without a private SPTE mapping them")


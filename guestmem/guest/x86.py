"""Compile a guest :class:`~guestmem.guest.ops.Program` to x86-64 machine code for a real KVM vCPU.

Why this exists: the model's vCPU interprets ops directly, but the kernel backend needs bytes a real
(or emulated) x86 CPU executes.  The bytes are hand-assembled here (no assembler at run time), and the
tiny machine environment they need (identity page tables, a GDT with a TSS, the ``kvm_sregs`` values)
is described here too, so that everything x86-specific lives in one module that is testable without
``/dev/kvm``.

**Mode: 64-bit long mode, identity-mapped with 2 MiB pages.**  Upstream's guest_memfd selftests put
the guest_memfd slot at GPA 4 GiB, which 32-bit flat protected mode cannot address, and long mode was
measured to work on the development host (``kvm_pvm``, whose instruction emulator runs every guest
instruction).  2 MiB pages (not 1 GiB ones) because 2 MiB pages exist in every long-mode CPU, while
1 GiB pages need ``pdpe1gb`` in the guest CPUID, which that host's ``KVM_GET_SUPPORTED_CPUID`` does
not offer.  The map covers ``[0, IDENTITY_MAP_LIMIT)`` (512 GiB: one PML4 entry, 512 page
directories); programs touching memory beyond it are refused at compile time.

**Bulk ops use string instructions** (``rep stosq``/``repe scasq`` for the 8-byte body,
``rep stosb``/``repe scasb`` for the tail), because an emulating host pays per executed instruction
(~0.45 µs per iteration measured), so one iteration per 8 bytes is the cheapest loop there is.

**Host protocol (port-I/O doorbells).**  ``Sync(v)`` loads ``r8 = v`` and does ``out dx, al`` with
``dx = PORT_SYNC``; a failed check loads ``r8 = gpa``, ``r9 = expected``, ``r10 = found``,
``r11 = op index``, ``r12 = kind`` (``ASSERT_VERIFY`` or ``ASSERT_HYPERCALL``) and writes to
``PORT_ASSERT``.  The host reads the registers (``KVM_GET_REGS``) on those exits.  ``Halt`` is
``hlt; jmp back to hlt``, so every further run halts again.

**Hypercalls.**  ``MapGpaRange`` is ``KVM_HC_MAP_GPA_RANGE``: ``rax = 12, rbx = gpa, rcx = npages,
rdx = attrs`` then ``vmcall`` (Intel) or ``vmmcall`` (AMD/Hygon), chosen by the caller from the CPUID
vendor; the guest compares ``rax`` with ``expect_ret`` and asserts on a mismatch.  (On ``kvm_pvm``
neither instruction ever exits: the emulator re-patches and re-executes it forever.)

**Access kinds.**  A host without private memory cannot express ``"private"``/``"shared"`` accesses
(no C-bit, no shared-GPA bit on a DEFAULT VM), so they compile exactly like ``"auto"``.  ``Accept``
compiles to nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from guestmem import uapi as u
from guestmem.guest.ops import Accept, Halt, MapGpaRange, Program, Sync, Touch, Verify, Write

# --- registers --------------------------------------------------------------------------------------
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)

# --- host protocol ----------------------------------------------------------------------------------
PORT_SYNC = 0x5EC0
PORT_ASSERT = 0x5EC1
ASSERT_VERIFY = 0
ASSERT_HYPERCALL = 1

Hypercall = Literal["vmcall", "vmmcall"]
_HYPERCALL_BYTES = {"vmcall": b"\x0f\x01\xc1", "vmmcall": b"\x0f\x01\xd9"}

# --- machine layout (offsets inside the loader window the backend maps) -----------------------------
IDENTITY_MAP_LIMIT = 512 << 30  # one PML4 entry's worth, with 2 MiB pages
PML4_OFFSET = 0x0000
PDPT_OFFSET = 0x1000
GDT_OFFSET = 0x2000
TSS_OFFSET = 0x3000
STACK_TOP_OFFSET = 0x10000  # the stack occupies [0x4000, 0x10000); programs do not use it today
PD_OFFSET = 0x10000  # 512 page directories, 2 MiB
PD_PAGES = 512
CODE_OFFSET = 0x400000  # code regions from here to the end of the window
TABLES_SIZE = PD_OFFSET + PD_PAGES * u.PAGE_SIZE

KERNEL_CS = 0x08
KERNEL_DS = 0x10
KERNEL_TSS = 0x18
TSS_LIMIT = 0x67

_PTE_P, _PTE_RW, _PTE_PS = 1 << 0, 1 << 1, 1 << 7
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

_MASK64 = (1 << 64) - 1


def vendor_hypercall(vendor: str) -> Hypercall:
    """The hypercall instruction for a CPUID vendor string (``GenuineIntel`` → vmcall)."""
    return "vmmcall" if vendor in ("AuthenticAMD", "HygonGenuine") else "vmcall"


# --- encoder ----------------------------------------------------------------------------------------


def _rex(w: bool, r: int = 0, x: int = 0, b: int = 0) -> bytes:
    val = 0x40 | (int(w) << 3) | ((r >> 3) << 2) | ((x >> 3) << 1) | (b >> 3)
    return bytes([val]) if val != 0x40 else b""


def mov_imm(reg: int, imm: int) -> bytes:
    """``mov reg, imm``: the 5/6-byte zero-extending ``mov r32, imm32`` when it fits, else ``movabs``."""
    imm &= _MASK64
    if imm <= 0xFFFF_FFFF:
        return _rex(False, b=reg) + bytes([0xB8 + (reg & 7)]) + struct.pack("<I", imm)
    return _rex(True, b=reg) + bytes([0xB8 + (reg & 7)]) + struct.pack("<Q", imm)


def mov_rr(dst: int, src: int) -> bytes:
    """``mov dst, src`` (64-bit registers; opcode 89 /r)."""
    return _rex(True, r=src, b=dst) + bytes([0x89, 0xC0 | ((src & 7) << 3) | (dst & 7)])


def cmp_rr(a: int, b: int) -> bytes:
    """``cmp a, b`` (64-bit; opcode 39 /r computes a - b)."""
    return _rex(True, r=b, b=a) + bytes([0x39, 0xC0 | ((b & 7) << 3) | (a & 7)])


def sub_imm8(reg: int, imm: int) -> bytes:
    """``sub reg, imm8`` (64-bit; opcode 83 /5 ib)."""
    return _rex(True, b=reg) + bytes([0x83, 0xE8 | (reg & 7), imm & 0xFF])


def lea_disp8(dst: int, base: int, disp: int) -> bytes:
    """``lea dst, [base + disp8]`` (base must not be rsp/r12 or rbp/r13)."""
    assert base & 7 not in (4, 5)
    return _rex(True, r=dst, b=base) + bytes([0x8D, 0x40 | ((dst & 7) << 3) | (base & 7), disp & 0xFF])


def movzx_byte_disp8(dst: int, base: int, disp: int) -> bytes:
    """``movzx dst32, byte [base + disp8]``."""
    assert base & 7 not in (4, 5)
    return _rex(False, r=dst, b=base) + bytes([0x0F, 0xB6, 0x40 | ((dst & 7) << 3) | (base & 7), disp & 0xFF])


CLD = b"\xfc"
HLT = b"\xf4"
OUT_DX_AL = b"\xee"
REP_STOSB = b"\xf3\xaa"
REP_STOSQ = b"\xf3\x48\xab"
REPE_SCASB = b"\xf3\xae"
REPE_SCASQ = b"\xf3\x48\xaf"


@dataclass
class Assembler:
    """A byte buffer with labels and rel32 fixups; ``base`` is the GPA (= linear address) of byte 0."""

    base: int
    buf: bytearray = field(default_factory=bytearray)
    labels: dict[str, int] = field(default_factory=dict)
    fixups: list[tuple[int, str]] = field(default_factory=list)
    _counter: int = 0

    def here(self) -> int:
        return len(self.buf)

    def emit(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.buf += chunk

    def new_label(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}.{self._counter}"

    def bind(self, label: str) -> None:
        if label in self.labels:
            raise ValueError(f"label {label} bound twice")
        self.labels[label] = self.here()

    def _rel32(self, opcode: bytes, label: str) -> None:
        self.emit(opcode)
        self.fixups.append((self.here(), label))
        self.emit(b"\0\0\0\0")

    def jmp(self, label: str) -> None:
        self._rel32(b"\xe9", label)

    def je(self, label: str) -> None:
        self._rel32(b"\x0f\x84", label)

    def jne(self, label: str) -> None:
        self._rel32(b"\x0f\x85", label)

    def halt_forever(self) -> None:
        """``hlt; jmp back``: every run from here on exits with HLT."""
        self.emit(HLT, b"\xeb\xfd")

    def finish(self) -> bytes:
        for pos, label in self.fixups:
            if label not in self.labels:
                raise ValueError(f"unbound label {label}")
            rel = self.labels[label] - (pos + 4)
            self.buf[pos : pos + 4] = struct.pack("<i", rel)
        return bytes(self.buf)


# --- compiler ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledProgram:
    """Machine code for one program, placed at GPA ``base``; execution starts at ``entry``."""

    code: bytes
    base: int
    entry: int
    op_offsets: tuple[int, ...]  # GPA of each op's first instruction
    has_hypercall: bool


def _repeat(pattern: int) -> int:
    return pattern * 0x0101_0101_0101_0101


def _check_reach(op: Write | Verify | Touch) -> None:
    if op.gpa + op.size > IDENTITY_MAP_LIMIT:
        raise ValueError(f"{type(op).__name__}: [{op.gpa:#x}, {op.gpa + op.size:#x}) is beyond the guest's "
                         f"identity map (limit {IDENTITY_MAP_LIMIT:#x})")


def _emit_assert(asm: Assembler, index: int, kind: int) -> None:
    """r8/r9/r10 are already set; add op index and kind, ring the doorbell, and stop."""
    asm.emit(mov_imm(R11, index), mov_imm(R12, kind), mov_imm(RDX, PORT_ASSERT), OUT_DX_AL)
    asm.halt_forever()


def _emit_write(asm: Assembler, op: Write) -> None:
    qwords, tail = divmod(op.size, 8)
    asm.emit(mov_imm(RDI, op.gpa), mov_imm(RAX, _repeat(op.pattern)))
    if qwords:
        asm.emit(mov_imm(RCX, qwords), REP_STOSQ)
    if tail:
        asm.emit(mov_imm(RCX, tail), REP_STOSB)


def _emit_touch(asm: Assembler, op: Touch) -> None:
    """``mov [rdi], al; add rdi, stride; dec rcx; jnz`` over every touch point."""
    count = (op.size + op.stride - 1) // op.stride
    loop = asm.new_label("touch")
    asm.emit(mov_imm(RDI, op.gpa), mov_imm(RAX, op.pattern), mov_imm(RCX, count))
    asm.bind(loop)
    asm.emit(b"\x88\x07",                                   # mov byte [rdi], al
             b"\x48\x81\xc7" + struct.pack("<i", op.stride),  # add rdi, imm32
             b"\x48\xff\xc9")                                # dec rcx
    asm.jne(loop)


def _emit_verify(asm: Assembler, op: Verify, index: int) -> None:
    qwords, tail = divmod(op.size, 8)
    ok, narrow, fail = asm.new_label("ok"), asm.new_label("narrow"), asm.new_label("fail")
    asm.emit(mov_imm(RDI, op.gpa), mov_imm(RAX, _repeat(op.pattern)))
    if qwords:
        asm.emit(mov_imm(RCX, qwords), REPE_SCASQ)
        asm.jne(narrow)
    if tail:
        asm.emit(mov_imm(RCX, tail), REPE_SCASB)
        asm.jne(fail)
    asm.jmp(ok)
    if qwords:
        # The mismatching qword ends at rdi: rescan its 8 bytes to find the first bad byte.
        asm.bind(narrow)
        asm.emit(sub_imm8(RDI, 8), mov_imm(RCX, 8), REPE_SCASB)
    asm.bind(fail)  # rdi is one past the first mismatching byte
    asm.emit(lea_disp8(R8, RDI, -1), movzx_byte_disp8(R10, RDI, -1), mov_imm(R9, op.pattern))
    _emit_assert(asm, index, ASSERT_VERIFY)
    asm.bind(ok)


def _emit_map_gpa_range(asm: Assembler, op: MapGpaRange, index: int, hypercall: Hypercall) -> None:
    asm.emit(mov_imm(RAX, u.KVM_HC_MAP_GPA_RANGE), mov_imm(RBX, op.gpa), mov_imm(RCX, op.npages),
             mov_imm(RDX, op.attrs), _HYPERCALL_BYTES[hypercall])
    if op.expect_ret is None:
        return
    ok = asm.new_label("hc_ok")
    asm.emit(mov_imm(R9, op.expect_ret), cmp_rr(RAX, R9))
    asm.je(ok)
    asm.emit(mov_imm(R8, op.gpa), mov_rr(R10, RAX))
    _emit_assert(asm, index, ASSERT_HYPERCALL)
    asm.bind(ok)


def compile_program(program: Program | Iterable[object], base: int, *,
                    hypercall: Hypercall = "vmcall") -> CompiledProgram:
    """Compile ``program`` to code that runs at GPA ``base`` (64-bit mode, identity-mapped)."""
    if not isinstance(program, Program):
        program = Program(program)  # type: ignore[arg-type]
    asm = Assembler(base)
    asm.emit(CLD)
    offsets: list[int] = []
    has_hc = False
    for index, op in enumerate(program):
        offsets.append(base + asm.here())
        if isinstance(op, Write):
            _check_reach(op)
            _emit_write(asm, op)
        elif isinstance(op, Verify):
            _check_reach(op)
            _emit_verify(asm, op, index)
        elif isinstance(op, Touch):
            _check_reach(op)
            _emit_touch(asm, op)
        elif isinstance(op, MapGpaRange):
            has_hc = True
            _emit_map_gpa_range(asm, op, index, hypercall)
        elif isinstance(op, Sync):
            asm.emit(mov_imm(R8, op.value), mov_imm(RDX, PORT_SYNC), OUT_DX_AL)
        elif isinstance(op, Halt):
            asm.halt_forever()
        elif isinstance(op, Accept):
            pass  # nothing to accept on a host without private memory
        else:  # pragma: no cover - Program() already rejects other types
            raise TypeError(f"cannot compile {op!r}")
    return CompiledProgram(asm.finish(), base, base, tuple(offsets), has_hc)


def sign64(value: int) -> int:
    """Interpret a 64-bit register value as signed (hypercall return codes are ``-KVM_E*``)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


# --- machine environment ----------------------------------------------------------------------------


def page_table_entries(window_base: int) -> dict[int, list[int]]:
    """PML4 and PDPT contents (as ``{offset: [qwords]}``) for an identity map whose tables live in the
    loader window at GPA ``window_base``; the page directories come from :func:`pd_entries`."""
    pml4 = [(window_base + PDPT_OFFSET) | _PTE_P | _PTE_RW]
    pdpt = [(window_base + PD_OFFSET + i * u.PAGE_SIZE) | _PTE_P | _PTE_RW for i in range(PD_PAGES)]
    return {PML4_OFFSET: pml4, PDPT_OFFSET: pdpt}


def pd_entry(index: int) -> int:
    """The ``index``-th 2 MiB identity-map entry (index = GPA >> 21)."""
    return (index << 21) | _PTE_P | _PTE_RW | _PTE_PS


def gdt_bytes(window_base: int) -> bytes:
    """A GDT: null, 64-bit code (0x08), data (0x10), and a 64-bit busy TSS (0x18, 16 bytes)."""
    code64 = 0x00AF_9B00_0000_FFFF
    data = 0x00CF_9300_0000_FFFF
    base = window_base + TSS_OFFSET
    tss_lo = (TSS_LIMIT & 0xFFFF) | ((base & 0xFF_FFFF) << 16) | (0x8B << 40) | (((base >> 24) & 0xFF) << 56)
    tss_hi = base >> 32
    return struct.pack("<5Q", 0, code64, data, tss_lo, tss_hi)


def _seg(seg: u.kvm_segment, selector: int, type_: int, *, s: int = 1, long: int = 0, db: int = 0,
         g: int = 1, base: int = 0, limit: int = 0xFFFF_FFFF) -> None:
    seg.base, seg.limit, seg.selector, seg.type = base, limit, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, db, s, long, g, 0, 0


def setup_long_mode(sregs: u.kvm_sregs, window_base: int) -> None:
    """Fill ``sregs`` for 64-bit ring 0 with the tables at ``window_base`` (see the module doc)."""
    _seg(sregs.cs, KERNEL_CS, 0xB, long=1)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _seg(seg, KERNEL_DS, 0x3, db=1)
    _seg(sregs.tr, KERNEL_TSS, 0xB, s=0, g=0, base=window_base + TSS_OFFSET, limit=TSS_LIMIT)
    sregs.ldt.unusable = 1
    sregs.gdt.base, sregs.gdt.limit = window_base + GDT_OFFSET, 5 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0  # any exception escalates to a triple fault (SHUTDOWN)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr4 = CR4_PAE
    sregs.cr3 = window_base + PML4_OFFSET
    sregs.efer = EFER_LME | EFER_LMA

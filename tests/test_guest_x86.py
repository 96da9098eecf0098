"""The x86-64 guest compiler (``guestmem.guest.x86``): encodings, control flow, machine layout.

Needs no /dev/kvm: the bytes are checked against hand-verified encodings (Intel SDM), and the
compiled programs' jumps are checked to land where they should.
"""

from __future__ import annotations

import struct

import pytest

import guestmem.uapi as u
from guestmem.guest import x86
from guestmem.guest.ops import Accept, Halt, MapGpaRange, Program, Sync, Verify, Write

BASE = 0xFF40_0000


@pytest.mark.parametrize(("code", "expected"), [
    (x86.mov_imm(x86.RAX, 1), "b801000000"),
    (x86.mov_imm(x86.RDX, x86.PORT_SYNC), "bac05e0000"),
    (x86.mov_imm(x86.R8, 5), "41b805000000"),
    (x86.mov_imm(x86.R12, 0xFFFF_FFFF), "41bcffffffff"),
    (x86.mov_imm(x86.RDI, 1 << 32), "48bf0000000001000000"),
    (x86.mov_imm(x86.R9, -22), "49b9eaffffffffffffff"),
    (x86.mov_rr(x86.R10, x86.RAX), "4989c2"),
    (x86.mov_rr(x86.RAX, x86.RBX), "4889d8"),
    (x86.cmp_rr(x86.RAX, x86.R9), "4c39c8"),
    (x86.sub_imm8(x86.RDI, 8), "4883ef08"),
    (x86.lea_disp8(x86.R8, x86.RDI, -1), "4c8d47ff"),
    (x86.movzx_byte_disp8(x86.R10, x86.RDI, -1), "440fb657ff"),
    (x86.REP_STOSQ, "f348ab"),
    (x86.REPE_SCASB, "f3ae"),
])
def test_encodings(code: bytes, expected: str) -> None:
    assert code.hex() == expected


def test_hypercall_instruction_by_vendor() -> None:
    assert x86.vendor_hypercall("GenuineIntel") == "vmcall"
    assert x86.vendor_hypercall("AuthenticAMD") == "vmmcall"
    assert x86.vendor_hypercall("HygonGenuine") == "vmmcall"
    intel = x86.compile_program(Program([MapGpaRange(0, 1, 0)]), BASE, hypercall="vmcall")
    amd = x86.compile_program(Program([MapGpaRange(0, 1, 0)]), BASE, hypercall="vmmcall")
    assert b"\x0f\x01\xc1" in intel.code and b"\x0f\x01\xd9" not in intel.code
    assert b"\x0f\x01\xd9" in amd.code
    assert intel.has_hypercall


def test_program_ends_in_a_halt_loop() -> None:
    compiled = x86.compile_program(Program([Sync(3)]), BASE)
    assert compiled.code.endswith(b"\xf4\xeb\xfd")  # hlt; jmp -3 (back to hlt)
    assert compiled.code.startswith(x86.CLD)
    assert compiled.entry == BASE
    assert len(compiled.op_offsets) == 2  # Sync + the implicit Halt


def test_sync_sets_r8_and_rings_the_doorbell() -> None:
    code = x86.compile_program(Program([Sync(0x1234)]), BASE).code
    expected = x86.mov_imm(x86.R8, 0x1234) + x86.mov_imm(x86.RDX, x86.PORT_SYNC) + x86.OUT_DX_AL
    assert expected in code


def test_write_uses_qwords_then_bytes() -> None:
    code = x86.compile_program(Program([Write(1 << 32, 21, 0xAB)]), BASE).code
    assert x86.mov_imm(x86.RAX, 0xABABABABABABABAB) in code
    assert x86.mov_imm(x86.RCX, 2) + x86.REP_STOSQ in code
    assert x86.mov_imm(x86.RCX, 5) + x86.REP_STOSB in code
    small = x86.compile_program(Program([Write(0, 3, 1)]), BASE).code
    assert x86.REP_STOSQ not in small and x86.REP_STOSB in small


def _rel32_targets(code: bytes) -> list[tuple[int, int]]:
    """(instruction offset, target offset) of every jmp/jcc rel32 the compiler emitted."""
    out = []
    for i in range(len(code) - 5):
        if code[i] == 0xE9 or (code[i] == 0x0F and code[i + 1] in (0x84, 0x85)):
            size = 5 if code[i] == 0xE9 else 6
            rel = struct.unpack_from("<i", code, i + size - 4)[0]
            out.append((i, i + size + rel))
    return out


def test_verify_control_flow_lands_on_the_right_code() -> None:
    program = Program([Verify(1 << 32, 21, 0x5A), Sync(1)])
    compiled = x86.compile_program(program, BASE)
    code = compiled.code
    sync_at = compiled.op_offsets[1] - BASE
    targets = {t for _, t in _rel32_targets(code)}
    narrow = x86.sub_imm8(x86.RDI, 8) + x86.mov_imm(x86.RCX, 8) + x86.REPE_SCASB
    fail = x86.lea_disp8(x86.R8, x86.RDI, -1)
    assert code.index(narrow) in targets  # jne after repe scasq
    assert code.index(fail) in targets  # jne after the tail's repe scasb
    assert sync_at in targets  # the success path skips the failure stub
    assert x86.mov_imm(x86.R11, 0) + x86.mov_imm(x86.R12, x86.ASSERT_VERIFY) in code


def test_map_gpa_range_checks_the_return_value() -> None:
    code = x86.compile_program(Program([MapGpaRange(1 << 32, 2, 0x10, expect_ret=-22)]), BASE).code
    setup = (x86.mov_imm(x86.RAX, u.KVM_HC_MAP_GPA_RANGE) + x86.mov_imm(x86.RBX, 1 << 32)
             + x86.mov_imm(x86.RCX, 2) + x86.mov_imm(x86.RDX, 0x10))
    assert setup in code
    assert x86.mov_imm(x86.R9, -22) + x86.cmp_rr(x86.RAX, x86.R9) in code
    assert x86.mov_imm(x86.R12, x86.ASSERT_HYPERCALL) in code
    unchecked = x86.compile_program(Program([MapGpaRange(0, 1, 0, expect_ret=None)]), BASE).code
    assert x86.cmp_rr(x86.RAX, x86.R9) not in unchecked


def test_access_kinds_and_accept_compile_like_auto() -> None:
    auto = x86.compile_program(Program([Write(0, 8, 1), Accept(0, 8), Verify(0, 8, 1)]), BASE)
    kinds = x86.compile_program(Program([Write(0, 8, 1, access="private"), Accept(0, 8),
                                         Verify(0, 8, 1, access="shared")]), BASE)
    assert auto.code == kinds.code
    assert kinds.op_offsets[1] == kinds.op_offsets[2]  # Accept emits nothing


def test_halt_mid_program_and_label_uniqueness() -> None:
    compiled = x86.compile_program(Program([Halt(), Verify(0, 9, 1), Verify(0, 9, 2)]), BASE)
    assert compiled.code.count(b"\xf4\xeb\xfd") == 4  # 2 halts + 2 failure stubs


def test_beyond_identity_map_is_refused() -> None:
    with pytest.raises(ValueError, match="identity map"):
        x86.compile_program(Program([Write(x86.IDENTITY_MAP_LIMIT - 1, 2, 0)]), BASE)
    x86.compile_program(Program([Write(x86.IDENTITY_MAP_LIMIT - 1, 1, 0)]), BASE)


def test_unbound_label_is_an_error() -> None:
    asm = x86.Assembler(BASE)
    asm.jmp("nowhere")
    with pytest.raises(ValueError):
        asm.finish()


def test_sign64() -> None:
    assert x86.sign64((1 << 64) - 22) == -22
    assert x86.sign64(5) == 5


def test_page_tables_identity_map_with_2m_pages() -> None:
    tables = x86.page_table_entries(0xFF00_0000)
    assert tables[x86.PML4_OFFSET] == [(0xFF00_0000 + x86.PDPT_OFFSET) | 3]
    pdpt = tables[x86.PDPT_OFFSET]
    assert len(pdpt) == 512 and pdpt[4] == (0xFF00_0000 + x86.PD_OFFSET + 4 * 4096) | 3
    assert x86.pd_entry(2048) == (4 << 30) | 0x83  # GPA 4 GiB, present|rw|PS
    assert x86.TABLES_SIZE <= x86.CODE_OFFSET


def test_gdt_and_long_mode_sregs() -> None:
    gdt = x86.gdt_bytes(0xFF00_0000)
    assert len(gdt) == 40
    code64 = struct.unpack_from("<Q", gdt, x86.KERNEL_CS)[0]
    assert (code64 >> 53) & 1 == 1 and (code64 >> 47) & 1 == 1  # L and P
    tss_lo, tss_hi = struct.unpack_from("<QQ", gdt, x86.KERNEL_TSS)
    base = ((tss_lo >> 16) & 0xFFFFFF) | (((tss_lo >> 56) & 0xFF) << 24) | (tss_hi << 32)
    assert base == 0xFF00_0000 + x86.TSS_OFFSET
    sregs = u.kvm_sregs()
    x86.setup_long_mode(sregs, 0xFF00_0000)
    assert sregs.efer & (x86.EFER_LME | x86.EFER_LMA) == x86.EFER_LME | x86.EFER_LMA
    assert sregs.cr0 & x86.CR0_PG and sregs.cr0 & x86.CR0_PE and sregs.cr4 & x86.CR4_PAE
    assert sregs.cr3 == 0xFF00_0000 + x86.PML4_OFFSET
    assert (sregs.cs.l, sregs.cs.db, sregs.cs.selector) == (1, 0, x86.KERNEL_CS)
    assert (sregs.tr.s, sregs.tr.type, sregs.tr.base) == (0, 0xB, 0xFF00_0000 + x86.TSS_OFFSET)

"""What the x86 vCPU does for the instructions the hardware hands to KVM or to trusted firmware.

Why here and not in the engine: Unicorn treats these as invalid instructions (it has no SVM/VMX
guest mode), so the engine stops on them with RIP at the instruction and this module carries them
out against the model -- the hypercall as ``__kvm_emulate_hypercall`` does, PVALIDATE as the SNP
hardware (RMP) does, TDCALL as the TDX module does -- then advances RIP past them.

* ``vmcall``/``vmmcall`` (rax = nr): KVM_HC_MAP_GPA_RANGE (rbx gpa, rcx npages, rdx attrs) exits
  to userspace as :class:`ExitHypercall` when ``KVM_CAP_EXIT_HYPERCALL`` enables it; the VMM's
  ``ret`` is returned in rax.  Anything else returns ``-KVM_ENOSYS``, an unaligned/empty/wrapping
  range ``-KVM_EINVAL`` (upstream's checks, in its order).
* PVALIDATE (SNP-like; F2 0F 01 FF): rax = guest virtual address, ecx = 0 (4 KiB) / 1 (2 MiB),
  edx = 1 validate / 0 rescind.  The page is reached through the guest's own page tables and as
  a *private* access, so a page whose attribute is shared gives the fault table's
  KVM_EXIT_MEMORY_FAULT (private) and the instruction is re-executed after the VMM converts.
  eax = 0, 1 FAIL_INPUT (bad size/operation or misaligned 2 MiB), 6 FAIL_SIZEMISMATCH (2 MiB asked
  for a page the RMP holds as 4 KiB: no 2 MiB private mapping); CF = 1 when the validated state
  already was the requested one.
* VMGEXIT (F3 0F 01 D9) with the GHCB MSR protocol, for built images (:mod:`.image`): Unicorn
  neither stores MSR 0xC0010130 nor lets ``wrmsr``/``rdmsr`` be hooked, so the image's own
  ``wrmsr``/``rdmsr`` instructions get address-bounded code hooks that keep the MSR; a
  page-state-change request exits as a one-page KVM_HC_MAP_GPA_RANGE and the response is written
  back to the MSR (``snp_begin_psc_msr``/``snp_complete_psc_msr``).  Compiled programs never use it.
* TDCALL (TDX-like; 66 0F 01 CC), leaf in rax, status in rax: TDG.VP.INFO (1) returns GPAW in
  rcx[5:0]; TDG.MEM.PAGE.ACCEPT (6) accepts rcx = gpa | level (0 4 KiB, 1 2 MiB) as a private
  access (shared attribute -> memory-fault exit, re-executed), 0xC0000B0A00000000 when already
  accepted; TDG.VP.VMCALL (0) with r10 = 0, r11 = 0x10001 (MapGPA), r12 = gpa (shared bit =
  convert to shared), r13 = size exits as KVM_HC_MAP_GPA_RANGE with the shared bit stripped, and
  r10 = 0 on success afterwards (0x8000000000000000 TDG.VP.VMCALL_INVALID_OPERAND otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as X

from guestmem import uapi as u
from guestmem.api import Exit, ExitHypercall, ExitShutdown
from guestmem.model.kvm.fault import Emulate, page_fault

if TYPE_CHECKING:
    from guestmem.model.kvm.x86.cpu import X86Cpu

PS = u.PAGE_SIZE
U64 = (1 << 64) - 1
VMCALL = b"\x0f\x01\xc1"
VMMCALL = b"\x0f\x01\xd9"
PVALIDATE = b"\xf2\x0f\x01\xff"
VMGEXIT = b"\xf3\x0f\x01\xd9"
TDCALL = b"\x66\x0f\x01\xcc"
PVALIDATE_FAIL_INPUT = 1
PVALIDATE_FAIL_SIZEMISMATCH = 6
TDX_SUCCESS = 0
TDX_OPERAND_INVALID = 0xC000_0100_0000_0000
TDX_PAGE_ALREADY_ACCEPTED = 0xC000_0B0A_0000_0000
TDG_VP_VMCALL, TDG_VP_INFO, TDG_MEM_PAGE_ACCEPT = 0, 1, 6
TDVMCALL_MAP_GPA = 0x10001
TDVMCALL_SUCCESS = 0
TDVMCALL_INVALID_OPERAND = 0x8000_0000_0000_0000
RFLAGS_CF = 1
TDX_CPUID_LEAF = 0x21


def cpuid(cpu: X86Cpu) -> int:
    """The CPUID hook: SNP-like VMs report SEV and SEV-SNP with the C-bit position in 0x8000001F
    (and 0x8000001F as the maximum extended leaf);
    TDX-like VMs the "IntelTDX    " signature in leaf 0x21; every other leaf (and every other VM) is
    Unicorn's.  Returns 1 to skip the instruction."""
    from guestmem.model.kvm.x86.cpu import SNP_C_BIT

    uc = cpu.uc
    if cpu.vm.arch.name == "tdx" and int(uc.reg_read(X.UC_X86_REG_EAX)) & 0xFFFF_FFFF == TDX_CPUID_LEAF:
        # The TDX module's signature leaf, "IntelTDX    " in ebx, edx, ecx (Linux's tdx_early_init
        # reads it before any TDCALL, which would be #UD on a CPU without TDX).
        uc.reg_write(X.UC_X86_REG_RAX, 0)
        uc.reg_write(X.UC_X86_REG_RBX, int.from_bytes(b"Inte", "little"))
        uc.reg_write(X.UC_X86_REG_RDX, int.from_bytes(b"lTDX", "little"))
        uc.reg_write(X.UC_X86_REG_RCX, int.from_bytes(b"    ", "little"))
        return 1
    if cpu.vm.arch.name == "snp" and int(uc.reg_read(X.UC_X86_REG_EAX)) & 0xFFFF_FFFF == 0x8000_0000:
        # An SNP host is an AMD CPU whose extended leaves reach 0x8000001F (Unicorn's stop at
        # 0x80000008, so a guest checking the maximum, as Linux's sev_enable does, saw no SEV).
        uc.reg_write(X.UC_X86_REG_RAX, 0x8000_001F)
        uc.reg_write(X.UC_X86_REG_RBX, int.from_bytes(b"Auth", "little"))
        uc.reg_write(X.UC_X86_REG_RDX, int.from_bytes(b"enti", "little"))
        uc.reg_write(X.UC_X86_REG_RCX, int.from_bytes(b"cAMD", "little"))
        return 1
    if cpu.vm.arch.name == "snp" and int(uc.reg_read(X.UC_X86_REG_EAX)) & 0xFFFF_FFFF == 0x8000_001F:
        uc.reg_write(X.UC_X86_REG_RAX, (1 << 1) | (1 << 4))
        uc.reg_write(X.UC_X86_REG_RBX, SNP_C_BIT)
        uc.reg_write(X.UC_X86_REG_RCX, 0)
        uc.reg_write(X.UC_X86_REG_RDX, 0)
        return 1
    return 0


def emulate(cpu: X86Cpu) -> Exit | None:
    """The engine stopped on an instruction it does not know (RIP at it): carry it out."""
    rip = cpu.reg("rip")
    code = cpu.read_virt(rip, 4)
    arch = cpu.vm.arch.name
    if code[:3] in (VMCALL, VMMCALL):
        return _hypercall(cpu, rip, 3)
    if code == PVALIDATE and arch == "snp":
        return _pvalidate(cpu, rip)
    if code == TDCALL and arch == "tdx":
        return _tdcall(cpu, rip)
    if code == VMGEXIT and arch == "snp":
        from guestmem.model.kvm.x86.image import vmgexit

        return vmgexit(cpu, rip)  # the GHCB MSR protocol (page-state change)
    return ExitShutdown()  # #UD with no IDT: a triple fault


# --- hypercalls ------------------------------------------------------------------------------------

def _hypercall(cpu: X86Cpu, rip: int, length: int) -> Exit | None:
    nr, gpa, npages, attrs = (cpu.reg(r) for r in ("rax", "rbx", "rcx", "rdx"))
    ret = _map_gpa_range_check(cpu, nr, gpa, npages)
    if ret is None:
        ex = ExitHypercall(u.KVM_HC_MAP_GPA_RANGE, (gpa, npages, attrs, 0, 0, 0), 0, True)
        cpu._pending = ex
        cpu.hypercall_return = ("rax", rip + length)
        return ex
    cpu.set_reg("rax", ret)
    cpu.set_reg("rip", rip + length)
    return None


def _map_gpa_range_check(cpu: X86Cpu, nr: int, gpa: int, npages: int) -> int | None:
    """``__kvm_emulate_hypercall``'s answer without an exit, or None when it exits to userspace."""
    if nr != u.KVM_HC_MAP_GPA_RANGE or not cpu.vm.exit_hypercall_mask & (1 << u.KVM_HC_MAP_GPA_RANGE):
        return -u.KVM_ENOSYS & U64
    if gpa % PS or npages == 0 or (gpa >> u.PAGE_SHIFT) + npages > U64:
        return -u.KVM_EINVAL & U64
    return None


def complete_hypercall(cpu: X86Cpu, ex: ExitHypercall) -> None:
    """The next run after a hypercall exit: hand the VMM's ``ret`` to the guest and move on."""
    reg, next_rip = cpu.hypercall_return
    if reg == "ghcb":  # an SNP page-state change through the GHCB MSR: the response goes there
        from guestmem.model.kvm.x86.image import complete_psc

        complete_psc(cpu, ex)
    elif reg == "r10":  # TDG.VP.VMCALL<MapGPA>: the TDCALL succeeded, the VMCALL status in r10
        cpu.set_reg("r10", TDVMCALL_SUCCESS if ex.ret == 0 else TDVMCALL_INVALID_OPERAND)
        cpu.set_reg("rax", TDX_SUCCESS)
    else:
        cpu.set_reg(reg, ex.ret & U64)
    cpu.set_reg("rip", next_rip)


# --- private pages: fault them in as a private access ----------------------------------------------

def _private_spte(cpu: X86Cpu, gfn: int, npages: int) -> Exit | int | None:
    """Make [gfn, gfn+npages) privately mapped through the fault path.  Returns the order of the
    SPTE mapping ``gfn`` once all are mapped, or the exit to return (memory fault), or None when
    the instruction must simply be re-executed."""
    vm = cpu.vm
    g = gfn
    while g < gfn + npages:
        with vm.mmu_lock():
            sp = vm.mmu.sptes[0].get(g)
        if sp is not None and sp.private:
            g += 1
            continue
        res = page_fault(vm, g, gfn + npages, "private", False)
        if isinstance(res, Emulate):
            return ExitShutdown()  # no memory behind it: the hardware would #PF/#VC the guest
        if not isinstance(res, int):
            return res
    with vm.mmu_lock():
        sp = vm.mmu.sptes[0].get(gfn)
        return sp.order if sp is not None and sp.private else None


def _set_validated(cpu: X86Cpu, gfn: int, npages: int, value: bool) -> bool:
    """Set the flavour's validated/accepted state of [gfn, gfn+npages) (``mmu_lock`` held);
    returns whether anything changed.  A rescind shoots the CPUs' TLB entries down, since a TLB
    fill is where a private page's validation is checked."""
    vm = cpu.vm
    arch = vm.arch
    changed = False
    runs = []
    for s, e, sp in list(vm.mmu.sptes[0].segments(gfn, gfn + npages)):
        assert sp is not None and sp.private
        k0 = arch.accept_key(s, s + sp.delta)  # type: ignore[attr-defined]
        acc = arch.accepted  # type: ignore[attr-defined]
        if acc.any_match(k0, k0 + (e - s), lambda v, want=value: bool(v) != want):
            changed = True
            if value:
                arch.on_accept(vm.system.pool, s, e, s + sp.delta)
            else:
                acc.set(k0, k0 + (e - s), False)
            runs.append((s, e, sp))
    if changed and not value:
        for other in list(cpu.machine.cpus):
            other.shootdown(runs)
    return changed


# --- SNP: PVALIDATE ---------------------------------------------------------------------------------

def _pvalidate(cpu: X86Cpu, rip: int) -> Exit | None:
    va, size, op = cpu.reg("rax"), cpu.reg("rcx") & 0xFFFF_FFFF, cpu.reg("rdx") & 0xFFFF_FFFF
    npages = 512 if size == 1 else 1
    if size > 1 or op > 1 or (size == 1 and va & ((2 << 20) - 1)):
        return _pvalidate_done(cpu, rip, PVALIDATE_FAIL_INPUT, False)
    vm = cpu.vm
    with vm.mmu_lock():
        gfn, kind = cpu.translate(va & ~0xFFF)
    if gfn is None:  # the walk needs a page-table page faulted in, or the guest took a #PF
        return _walk_fault(cpu, va)
    assert isinstance(gfn, int)
    if kind != "private":
        return ExitShutdown()  # PVALIDATE through a C-bit-clear mapping: #GP, no IDT
    res = _private_spte(cpu, gfn, npages)
    if res is None:
        return None
    if not isinstance(res, int):
        return res
    if size == 1 and res < 9:
        return _pvalidate_done(cpu, rip, PVALIDATE_FAIL_SIZEMISMATCH, False)
    with vm.mmu_lock():
        if vm.mmu.translate(0, gfn, gfn + npages, True, False)[-1:] and \
                sum(e - s for s, e, _, _ in vm.mmu.translate(0, gfn, gfn + npages, True, False)) == npages:
            changed = _set_validated(cpu, gfn, npages, bool(op))
        else:
            return None  # zapped meanwhile: re-execute
    return _pvalidate_done(cpu, rip, 0, not changed)


def _pvalidate_done(cpu: X86Cpu, rip: int, eax: int, cf: bool) -> None:
    cpu.set_reg("rax", eax)
    flags = cpu.reg("rflags")
    cpu.set_reg("rflags", (flags | RFLAGS_CF) if cf else (flags & ~RFLAGS_CF))
    cpu.set_reg("rip", rip + len(PVALIDATE))
    return None


def _walk_fault(cpu: X86Cpu, va: int) -> Exit | None:
    """The guest walk for ``va`` stopped: fault the page-table page in, or it was a guest #PF."""
    from guestmem.model.kvm.x86.cpu import _Stop

    with cpu.vm.mmu_lock():
        try:
            cpu._walk(va, False)
            return None
        except _Stop as stop:
            ev = stop.args[0]
    if ev[0] == "fault":
        return cpu._fault(ev[1], ev[2], ev[3])
    if ev[0] in ("chunk", "plain_chunk"):
        return cpu._handle(ev)
    return ExitShutdown()


# --- TDX: TDCALL ------------------------------------------------------------------------------------

def _tdcall(cpu: X86Cpu, rip: int) -> Exit | None:
    from guestmem.model.kvm.x86.cpu import TDX_GPAW

    leaf = cpu.reg("rax")
    nxt = rip + len(TDCALL)
    if leaf == TDG_VP_INFO:
        cpu.set_reg("rcx", TDX_GPAW)
        return _td_done(cpu, nxt, TDX_SUCCESS)
    if leaf == TDG_MEM_PAGE_ACCEPT:
        return _td_accept(cpu, nxt)
    if leaf == TDG_VP_VMCALL:
        return _td_vmcall(cpu, rip, nxt)
    return _td_done(cpu, nxt, TDX_OPERAND_INVALID)


def _td_done(cpu: X86Cpu, nxt: int, status: int) -> None:
    cpu.set_reg("rax", status)
    cpu.set_reg("rip", nxt)
    return None


def _td_accept(cpu: X86Cpu, nxt: int) -> Exit | None:
    from guestmem.model.kvm.x86.cpu import TDX_GPAW

    rcx = cpu.reg("rcx")
    level, gpa = rcx & 7, rcx & ~0xFFF & U64
    npages = {0: 1, 1: 512}.get(level)
    if npages is None or gpa & (npages * PS - 1) or gpa >> (TDX_GPAW - 1):
        return _td_done(cpu, nxt, TDX_OPERAND_INVALID)
    gfn = gpa >> u.PAGE_SHIFT
    res = _private_spte(cpu, gfn, npages)
    if res is None:
        return None
    if not isinstance(res, int):
        return res
    with cpu.vm.mmu_lock():
        runs = cpu.vm.mmu.translate(0, gfn, gfn + npages, True, False)
        if sum(e - s for s, e, _, _ in runs) != npages:
            return None  # zapped meanwhile: re-execute
        changed = _set_validated(cpu, gfn, npages, True)
    return _td_done(cpu, nxt, TDX_SUCCESS if changed else TDX_PAGE_ALREADY_ACCEPTED)


def _td_vmcall(cpu: X86Cpu, rip: int, nxt: int) -> Exit | None:
    from guestmem.model.kvm.x86.cpu import TDX_GPAW

    if cpu.reg("r10") != 0 or cpu.reg("r11") != TDVMCALL_MAP_GPA:
        cpu.set_reg("r10", TDVMCALL_INVALID_OPERAND)
        return _td_done(cpu, nxt, TDX_SUCCESS)
    shared_bit = 1 << (TDX_GPAW - 1)
    start, size = cpu.reg("r12"), cpu.reg("r13")
    gpa = start & ~shared_bit
    if (not cpu.vm.exit_hypercall_mask & (1 << u.KVM_HC_MAP_GPA_RANGE) or gpa % PS or size % PS
            or size == 0 or gpa + size > shared_bit):
        cpu.set_reg("r10", TDVMCALL_INVALID_OPERAND)
        return _td_done(cpu, nxt, TDX_SUCCESS)
    attrs = u.KVM_MAP_GPA_RANGE_DECRYPTED if start & shared_bit else u.KVM_MAP_GPA_RANGE_ENCRYPTED
    ex = ExitHypercall(u.KVM_HC_MAP_GPA_RANGE, (gpa, size // PS, attrs, 0, 0, 0), 0, True)
    cpu._pending = ex
    cpu.hypercall_return = ("r10", nxt)
    return ex

"""Built guest images on the model's x86 CPU, and the SNP GHCB MSR protocol they use.

Why: a :class:`~guestmem.guest.image.GuestImage` (the C guest) is loaded as the kernel backend
loads it -- its bytes and zeroed ``.bss`` at its base in the loader window's image area, ``rip`` at
its entry, ``rsp`` at its stack, the loader's long-mode state otherwise -- so the same binary runs on
both backends.

The GHCB MSR protocol (SNP page-state change): the guest writes ``MSR_AMD64_SEV_ES_GHCB``
(0xC0010130) and executes VMGEXIT; KVM reads the MSR (``sev_handle_vmgexit_msr_protocol``) and, for
a page-state-change request, exits to userspace with ``KVM_HC_MAP_GPA_RANGE`` for that one page
(``snp_begin_psc_msr``); on completion it writes the response into the MSR, which the guest reads
back.  Unicorn neither keeps an unknown MSR nor lets ``wrmsr``/``rdmsr`` be hooked, so the MSR is
kept here: every ``wrmsr``/``rdmsr`` *in the image's code* gets an address-bounded code hook (free
everywhere else: Unicorn instruments only instructions inside a hook's range), which records a
write of 0xC0010130 and answers a read of it (skipping the instruction).  Byte pairs that only look
like ``wrmsr``/``rdmsr`` inside another instruction never start an instruction, so their hooks never
fire.  The hooks exist only on SNP-like VMs, as the MSR does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import unicorn as uc_mod
from unicorn import x86_const as X

from guestmem import uapi as u
from guestmem.api import Exit, ExitHypercall, ExitShutdown
from guestmem.guest.image import GuestImage

if TYPE_CHECKING:
    from guestmem.model.kvm.x86.cpu import X86Cpu

MSR_GHCB = 0xC001_0130
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | GHCB_MSR_PSC_RESP
SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED = 1, 2
WRMSR, RDMSR = b"\x0f\x30", b"\x0f\x32"
VMGEXIT_LEN = 4


def load_image(cpu: X86Cpu, image: GuestImage) -> None:
    """Load ``image`` on ``cpu`` (see the module doc); the code regions of compiled programs end
    below the image area, so the two never overlap."""
    from guestmem.guest import x86
    from guestmem.model.kvm.x86.loader import LOADER_GPA

    cpu.load_code(image.base, image.memory(), image.entry_gpa)
    cpu.set_reg("rsp", image.stack_gpa if image.stack_gpa is not None else LOADER_GPA + x86.STACK_TOP_OFFSET)
    cpu.compiled, cpu.program = None, None
    cpu.image = image
    cpu.ghcb_msr = 0
    _install_msr_hooks(cpu, image)


def _install_msr_hooks(cpu: X86Cpu, image: GuestImage) -> None:
    uc: Any = cpu.uc
    with cpu.uc_lock:
        for handle in getattr(cpu, "msr_hooks", ()):
            uc.hook_del(handle)
        cpu.msr_hooks = []
        if cpu.vm.arch.name != "snp":
            return
        for pattern, hook in ((WRMSR, _wrmsr), (RDMSR, _rdmsr)):
            at = image.code.find(pattern)
            while at >= 0:
                va = image.base + at
                cpu.msr_hooks.append(uc.hook_add(uc_mod.UC_HOOK_CODE, hook, cpu, va, va))
                at = image.code.find(pattern, at + 1)
        uc.ctl_flush_tb()  # hooks apply to blocks translated from now on


def _wrmsr(uc: Any, address: int, size: int, cpu: X86Cpu) -> None:
    if int(uc.reg_read(X.UC_X86_REG_RCX)) & 0xFFFF_FFFF == MSR_GHCB:
        lo = int(uc.reg_read(X.UC_X86_REG_RAX)) & 0xFFFF_FFFF
        hi = int(uc.reg_read(X.UC_X86_REG_RDX)) & 0xFFFF_FFFF
        cpu.ghcb_msr = (hi << 32) | lo
    # the instruction itself then runs (Unicorn drops the value)


def _rdmsr(uc: Any, address: int, size: int, cpu: X86Cpu) -> None:
    if int(uc.reg_read(X.UC_X86_REG_RCX)) & 0xFFFF_FFFF == MSR_GHCB:
        value = cpu.ghcb_msr
        uc.reg_write(X.UC_X86_REG_RAX, value & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_RDX, value >> 32)
        uc.reg_write(X.UC_X86_REG_RIP, address + len(RDMSR))  # answered: skip the instruction


def vmgexit(cpu: X86Cpu, rip: int) -> Exit | None:
    """VMGEXIT with the GHCB MSR protocol (``sev_handle_vmgexit_msr_protocol``): a page-state
    change becomes a one-page ``KVM_HC_MAP_GPA_RANGE`` exit when the VMM enabled it, else the error
    response; any other request terminates the guest (here: ``ExitShutdown``)."""
    msr = cpu.ghcb_msr
    if msr & 0xFFF != GHCB_MSR_PSC_REQ:
        return ExitShutdown()
    gfn = (msr >> 12) & ((1 << 40) - 1)
    op = (msr >> 52) & 0xF
    nxt = rip + VMGEXIT_LEN
    if op not in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED) or \
            not cpu.vm.exit_hypercall_mask & (1 << u.KVM_HC_MAP_GPA_RANGE):
        cpu.ghcb_msr = GHCB_MSR_PSC_RESP_ERROR
        cpu.set_reg("rip", nxt)
        return None
    attrs = u.KVM_MAP_GPA_RANGE_ENCRYPTED if op == SNP_PAGE_STATE_PRIVATE else u.KVM_MAP_GPA_RANGE_DECRYPTED
    ex = ExitHypercall(u.KVM_HC_MAP_GPA_RANGE, (gfn << 12, 1, attrs, 0, 0, 0), 0, True)
    cpu._pending = ex
    cpu.hypercall_return = ("ghcb", nxt)
    return ex


def complete_psc(cpu: X86Cpu, ex: ExitHypercall) -> None:
    """``snp_complete_psc_msr``: the VMM's ``ret`` becomes the response in the GHCB MSR."""
    cpu.ghcb_msr = GHCB_MSR_PSC_RESP_ERROR if ex.ret else GHCB_MSR_PSC_RESP


"""The model's x86-64 vCPU: real machine code on the Unicorn engine, every memory access through
the model's MMU.

Why: the op interpreter (:mod:`guestmem.model.kvm.vcpu`) is fast but is the model's own reading of
what a guest does.  This CPU executes the exact bytes :func:`guestmem.guest.x86.compile_program`
emits for the kernel backend (or any hand-assembled guest), so the model is refereed by the same
instructions a real vCPU runs.  Select it with ``guestmem.open("model", cpu="x86")``.

How memory is wired (``cpu.py``):

* Unicorn runs in its *virtual TLB* mode: on every TLB miss it asks :meth:`X86Cpu._fill` for the
  translation.  The fill walks the guest's own 4-level page tables (from CR3; 4 KiB, 2 MiB and
  1 GiB leaves), which yields a guest-physical address and, on SNP-like VMs, the C-bit (TDX-like:
  the shared GPA bit) -- the private/shared decision the hardware makes.  It then looks the gfn up
  in the model's SPTEs.  Only a present SPTE of the right kind gives a TLB entry, pointing at the
  frame the SPTE names, writable only if the SPTE is.  Anything else stops the CPU at the faulting
  instruction and the run loop takes the model's fault path (:func:`~guestmem.model.kvm.fault.page_fault`),
  exactly as an EPT/NPT violation exits to KVM: map and re-enter, or return the memory-fault or
  MMIO exit.  Guest page-table pages are read through the SPTEs the same way.
* "Unicorn-physical" addresses are host frames, not guest-physical ones: the frame pool is mapped
  (one region per pool chunk) at :data:`POOL_BASE`, so the whole guest costs a handful of Unicorn
  regions however fragmented its SPTEs are (mapping an SPTE per Unicorn region was measured at
  28 ms per map with 4,000 regions).
* Every zap (invalidation, attribute change, punch, memslot delete or move, release) calls
  :meth:`X86Machine.zapped` under ``mmu_lock``: each x86 vCPU of the VM is kicked out of guest mode
  and, if its TLB holds any zapped gfn, its TLB is flushed before the zap returns -- the
  remote-TLB-flush IPI.  A stale translation is therefore impossible by construction, and
  :func:`check_cpu_view` (invariants 1 and 2, for the CPU's view) verifies that every gfn the TLB
  may hold is still mapped by a present SPTE with the same frame and kind.

Encrypted flavours (SNP-like, TDX-like): frames of private pages hold ciphertext, which is what the
host sees.  The CPU must load and store plaintext at engine speed, with no hook per access, so the
plaintext of a private page the CPU uses lives in a *plaintext twin* of its frame
(:class:`PlaintextTwin`, one sparse anonymous mapping per pool chunk, mapped into Unicorn at
:data:`PLAIN_BASE`): decrypted from the frame when a TLB fill first needs it, encrypted back into the
frame (and the twin page dropped) when its private SPTE is zapped, after every CPU's TLB has been
flushed.  The two copies can differ only while a private SPTE maps the page, which is exactly when
the host may not touch it (invariant 4), and everything that reads private frames on the host side
(conversion, content modes, punch, release) zaps first.

Departures from hardware, on purpose: guest page-table walks and instruction fetches follow the
C-bit / shared bit of the entry that points at them, as data accesses do (real SNP treats them as
private); accessed/dirty bits are not written back; the CPU has no IDT delivery, so any guest
exception (#PF on a not-present or read-only page, #UD, #GP, #VC/#VE on an unvalidated private page)
is a triple fault, ``ExitShutdown``, which is what the loader's zero-limit IDT gives on real
hardware too.
"""

from guestmem.model.kvm.x86.cpu import (
    PLAIN_BASE,
    POOL_BASE,
    PlaintextTwin,
    X86Cpu,
    X86Machine,
    check_cpu_view,
)

__all__ = ["PLAIN_BASE", "POOL_BASE", "PlaintextTwin", "X86Cpu", "X86Machine", "check_cpu_view"]

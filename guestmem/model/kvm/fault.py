"""The guest page-fault path: seed 003's decision table over a run of gfns.

``page_fault`` is ``kvm_mmu_page_fault`` -> ``kvm_mmu_faultin_pfn`` -> install, applied to a run
of consecutive gfns at once.  It takes the longest prefix of the run over which every input to
the decision is uniform (memslot, attribute, access kind), decides it the way upstream decides a
single gfn, and returns either how far it mapped or the exit the first gfn produces.  The per-gfn
semantics are unchanged; only the bookkeeping is per range.

Order, as upstream: private-ness of the access; mismatch with the gfn's attribute -> memory-fault
exit; no memslot -> memory-fault exit if private, else emulated MMIO; snapshot ``mmu_seq``; from
guest_memfd when private or the slot is GMEM_ONLY (no guest_memfd -> memory-fault exit; a
``get_pfn`` error -> memory-fault exit with that errno); else from the host mapping at
``userspace_addr``; finally, under ``mmu_lock``, retry if an invalidation raced, else install.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.api import ExitMemoryFault
from guestmem.errors import KvmError
from guestmem.model.kvm import dirty_log
from guestmem.model.kvm import mmu as mmu_mod
from guestmem.model.process import HostFault
from guestmem.sync import schedule_point

if TYPE_CHECKING:
    from guestmem.guest.ops import Access
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
MAX_RETRIES = 10_000


@dataclass
class Emulate:
    """No memslot and a shared access: KVM emulates the instruction as MMIO (RET_PF_EMULATE)."""

    gfn: int


def memory_fault(gfn: int, private: bool, err: int = errno.EFAULT) -> ExitMemoryFault:
    """``kvm_prepare_memory_fault_exit``: gpa of the gfn, one page, PRIVATE flag per the access."""
    return ExitMemoryFault(gfn << u.PAGE_SHIFT, PS, u.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0, err)


def page_fault(vm: ModelVm, gfn: int, end: int, access: Access, write: bool, as_id: int = 0
               ) -> int | ExitMemoryFault | Emulate:
    """Fault in gfns from ``gfn`` (up to ``end``).  Returns the gfn up to which the range is now
    mapped (> ``gfn``), an :class:`ExitMemoryFault`, or :class:`Emulate` for MMIO.  Raises
    ``KvmError(EFAULT)`` where ``KVM_RUN`` itself fails (an unmapped ``userspace_addr``)."""
    mmu = vm.mmu
    mmu.stats["faults"] += 1
    vm.arch.check_fault_allowed()
    read_only: set[int] = set()
    for _ in range(MAX_RETRIES):
        seq = mmu.seq
        read_only.clear()
        is_private = vm.arch.fault_is_private(gfn, access)
        if is_private != vm.mem_is_private(gfn):
            return memory_fault(gfn, is_private)
        slot = vm.memslots[as_id].lookup(gfn)
        if slot is None:
            return memory_fault(gfn, True) if is_private else Emulate(gfn)
        stop = min(end, slot.end_gfn, vm.attribute_run_end(gfn, end))
        logging = slot.dirty_bitmap is not None
        if logging and write:
            stop = gfn + 1  # a logging slot takes one write fault per page: each is logged
        # Upstream's window: mmu_seq is snapshotted and the attribute read; anything may change
        # before mmu_lock is taken, which is what the recheck under mmu_lock is for.
        schedule_point("fault: mmu_seq read", gfn, seq, is_private)
        if write and slot.readonly:
            return Emulate(gfn)  # a write to a read-only slot is emulated MMIO
        if mmu.in_progress and mmu.retry(seq, gfn, gfn + 1):
            mmu.stats["retries"] += 1
            _yield(gfn)
            continue
        if is_private or slot.gmem_only:
            if not slot.has_gmem:
                return memory_fault(gfn, is_private)
            gfile = slot.gmem_file
            if gfile is None:
                return memory_fault(gfn, is_private, errno.EFAULT)
            runs, err = gfile.get_pfn_range(slot, gfn, stop)
            if not runs and vm.memslots[as_id].lookup(gfn) is not slot:
                # The slot was deleted or moved since the lookup, and its binding went with it.
                # Upstream cannot see that: the deletion's synchronize_srcu waits for this fault,
                # whose get_pfn still finds the binding and whose mmu_seq recheck then fails.
                # So: RET_PF_RETRY, as there (not get_pfn's EIO for a binding gone astray).
                mmu.stats["retries"] += 1
                _yield(gfn)
                continue
            if not runs:
                return memory_fault(gfn, is_private, err or errno.EFAULT)
        else:
            runs = host_runs(vm, slot, gfn, stop, write, read_only)
        covered = gfn
        for s, e, _, _ in sorted(runs):
            if s <= covered < e:
                covered = min(e, stop)
        covered = max(covered, gfn + 1)
        schedule_point("fault: pfn resolved", gfn, covered, seq)
        with vm.mmu_lock():
            stale = mmu.retry(seq, gfn, covered)
            if not stale:
                top = 0 if logging else mmu_mod.max_order_for(vm, is_private)
                # While logging, a read maps write-protected so the first write faults.
                writable = not slot.readonly and (write or not logging) and gfn not in read_only
                for s, e, pfn, order in runs:
                    mmu.install(slot, gfn, covered, s, e, pfn, order, is_private, writable, top)
                if logging and write:
                    dirty_log.mark_dirty(slot, gfn, covered)
        if not stale:
            return covered
        # RET_PF_RETRY: back into the guest, which faults again; let the invalidation finish.
        mmu.stats["retries"] += 1
        _yield(gfn)
    raise KvmError(errno.EIO, "KVM_RUN", f"fault at gfn {gfn:#x} retried {MAX_RETRIES} times")


def host_runs(vm: ModelVm, slot: Memslot, gfn: int, stop: int, write: bool,
              read_only: set[int] | None = None) -> list[tuple[int, int, int, int]]:
    """Resolve gfns through ``userspace_addr`` (``hva_to_pfn``/GUP): runs ``(s, e, pfn, order)``.
    ``gfn`` is added to ``read_only`` when the host maps the pages read-only (a read-only
    protection, or a MAP_PRIVATE page not yet copied): KVM then maps them write-protected."""
    if read_only is None:
        read_only = set()
    hva = slot.gfn_to_hva(gfn)
    hit = vm.system.process.resolve(hva)
    if hit is None:
        raise KvmError(errno.EFAULT, "KVM_RUN", f"gfn {gfn:#x}: userspace_addr {hva:#x} is not mapped")
    mapping, off = hit
    first = mapping.pgoff + off // PS
    n = min(stop - gfn, (mapping.length - off + PS - 1) // PS)
    # A MAP_FIXED piece further on is another mapping, or (once unmapped) a hole: either way GUP
    # stops before it, and the pages there are resolved (or refused) on their own.
    for c in mapping.children:
        lo = c.addr - mapping.addr
        if lo > off:
            n = min(n, (lo - off) // PS)
    n, host_writable = mapping.gup_range(off - off % PS, n, write)
    if n == 0:  # GUP refuses (PROT_NONE, or a write to a read-only mapping): KVM_RUN fails
        raise KvmError(errno.EFAULT, "KVM_RUN", f"gfn {gfn:#x}: the host mapping at {hva:#x} "
                       f"does not allow this {'write' if write else 'read'}")
    if not host_writable:
        read_only.add(gfn)
    try:
        source = mapping.source  # MAP_PRIVATE: the copy-on-write view, not the file
        folio_runs = getattr(source, "folio_runs", None)
        if folio_runs is not None:
            raw = folio_runs(first, first + n)
        else:
            raw = [(s, e, pfn, 0) for s, e, pfn in source.host_fault(first, first + n, write)]
    except HostFault as f:
        # GUP faulted in the pages before the one that failed, and only those get host PTEs.
        if f.index > first:
            mapping.mapped.set(off // PS, off // PS + f.index - first, True)
        raise KvmError(errno.EFAULT, "KVM_RUN", f"gfn {gfn:#x}: host access to {hva:#x} faults") from None
    mapping.mapped.set(off // PS, off // PS + n, True)  # GUP faulted them into the host
    base = gfn - first
    return [(s + base, e + base, pfn, order) for s, e, pfn, order in raw]


def _yield(gfn: int) -> None:
    """A fault that must wait for an invalidation lets other threads run (the explorer's fair
    scheduler runs someone else here rather than let the fault spin)."""
    import time

    schedule_point("yield: fault retry", gfn)
    time.sleep(0)


"""The oracle: what must hold after every step of a schedule, and once every thread is done.

After each step, at moments when neither ``slots_lock`` nor ``mmu_lock`` is held (the moments
``vm.check_invariants(quiescent=False)`` itself could observe, since it takes both), the DESIGN
invariants are checked, plus two structural rules upstream relies on: no memslot points at a
released guest_memfd file (``kvm_gmem_release`` clears the pointer so that ``kvm_gmem_get_pfn``
never touches a freed file) and no SPTE maps a hardware-poisoned page (``kvm_gmem_error_folio``
zaps).  Before a thread resumes from a host access or pin point, the pages it is about to touch
must not be private.  At the end: the full (quiescent) invariants and the race's postcondition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem import uapi as u
from guestmem.explore.scheduler import Violation
from guestmem.model.kvm.guest_memfd import GmemFile
from guestmem.model.kvm.invariants import InvariantError, check_vm

if TYPE_CHECKING:
    from guestmem.explore.races import World
    from guestmem.explore.scheduler import Execution


def _invariant(e: InvariantError) -> Violation:
    msg = str(e)
    kind = " ".join(msg.split()[:2]) if msg.startswith("invariant ") else "invariant"
    return Violation(kind, msg, 0)


def structural(world: World) -> Violation | None:
    vm = world.vm
    for ms in vm.memslots:
        for slot in ms:
            f = slot.gmem_file
            if f is not None and f.released:
                return Violation("use-after-free", f"memslot {slot.id} still points at a released "
                                 "guest_memfd file (kvm_gmem_get_pfn would use a freed file)", 0)
            if f is None:
                continue
            inode = f.inode
            for s, e, sp in vm.mmu.present(slot.as_id, slot.base_gfn, slot.end_gfn):
                if sp is None or not (sp.private or slot.gmem_only):
                    continue
                if inode.hwpoison.any_match(slot.gfn_to_index(s), slot.gfn_to_index(e), bool):
                    return Violation("hwpoison", f"an SPTE over gfns [{s:#x},{e:#x}) maps a "
                                     "hardware-poisoned page (memory failure must zap)", 0)
    return None


def pins_on_private(world: World) -> Violation | None:
    """Invariant 4's pin half at any moment (``check_system`` only runs it when quiescent)."""
    f = world.gmem
    if f is None or not world.kvm.options.gmem_attributes or f.inode.freed:
        return None
    inode = f.inode
    pinned = inode.cache.first_elevated(0, inode.npages)
    while pinned is not None:
        if inode.is_private(pinned):
            return Violation("invariant 4 (pin)", f"host pin on private guest_memfd page {pinned:#x}", 0)
        pinned = inode.cache.first_elevated(pinned + 1, inode.npages)
    return None


def host_fault_served_private(world: World, ex: Execution) -> Violation | None:
    """Did the host fault handler hand out a private page?  The handler runs under the invalidate
    lock (shared); the attributes as they were when the thread dropped that lock are remembered,
    and when the thread then reaches its access point, a page private *then* is one the handler
    served (a page that turned private only since is the stale-translation finding instead)."""
    if not ex.steps or world.gmem is None or not world.kvm.options.gmem_attributes:
        return None
    t = ex.by_name[ex.steps[-1].thread]
    if t.finished:
        return None
    seen: dict[str, object] = world.notes.setdefault("attrs_at_unlock", {})  # type: ignore[assignment]
    if t.point == "release filemap_invalidate_lock (shared)":
        seen[t.name] = world.gmem.inode.attributes.copy()
        return None
    if t.point not in ("host: access", "host: pin") or t.name not in seen or not t.info:
        return None
    attrs = seen[t.name]
    start, end = int(t.info[1]), int(t.info[2])  # type: ignore[call-overload]
    first = attrs.first_match(start, end,  # type: ignore[attr-defined]
                              lambda v: bool(v & u.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    if first is None:
        return None
    return Violation("invariant 4 (host fault)", f"the host fault handler served private guest_memfd "
                     f"page {first:#x} (no SIGBUS)", 0, t.name)


def step(world: World, ex: Execution) -> Violation | None:
    v = host_fault_served_private(world, ex)
    if v is not None:
        return v
    vm = world.vm
    if vm.slots_lock.owner is not None or vm.mmu_lock.owner is not None:
        return None
    try:
        check_vm(vm, quiescent=False)
    except InvariantError as e:
        return _invariant(e)
    return structural(world) or pins_on_private(world)


def final(world: World, results: dict[str, object]) -> Violation | None:
    try:
        world.vm.check_invariants(quiescent=True)
    except InvariantError as e:
        return _invariant(e)
    v = structural(world)
    if v is not None:
        return v
    msg = world.post(world, results)
    return Violation("postcondition", msg, 0) if msg else None


def point_check(name: str, point: str, info: tuple[object, ...]) -> tuple[str, str] | None:
    """Invariant 4 at the instant of a host access or pin: the pages must still be shared."""
    if point not in ("host: access", "host: pin") or not info:
        return None
    f = info[0]
    if not isinstance(f, GmemFile) or not f.system.options.gmem_attributes:
        return None
    start, end = int(info[1]), int(info[2])  # type: ignore[call-overload]
    first = f.inode.attributes.first_match(start, end, lambda v: bool(v & u.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    if first is not None:
        what, verb = ("pin", "pins") if point == "host: pin" else ("access", "accesses")
        return (f"invariant 4 (host {what})",
                f"the host {verb} guest_memfd page {first:#x}, which is private now")
    return None


def observe(world: World) -> str:
    """What the model looked like after a step: the invalidation state and the SPTEs of the two
    pages the races fight over."""
    from guestmem.explore.races import GPA, PS, P

    mmu = world.vm.mmu
    kinds = []
    for g in (GPA // PS + P, GPA // PS + P + 1):
        sp = mmu.sptes[0].get(g)
        kind = "-" if sp is None else ("private" if sp.private else "shared")
        if sp is not None and sp.order:
            kind += f"/order {sp.order}"
        kinds.append(kind)
    return f"seq={mmu.seq} in_progress={mmu.in_progress} spte[P,P+1]={','.join(kinds)}"

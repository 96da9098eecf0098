"""The invariants of docs/design.md, checkable at any quiescent moment: ``vm.check_invariants()``.

Each check walks ranges (SPTE runs, attribute runs, page-cache runs), never pages, so it is cheap
enough to run after every step of every test.  A violation raises :class:`InvariantError` naming
the invariant and the gfn range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guestmem import uapi as u
from guestmem.model.kvm.mmu import Spte

if TYPE_CHECKING:
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.system import ModelKvm
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE


class InvariantError(AssertionError):
    pass


def _fail(n: int, msg: str) -> None:
    raise InvariantError(f"invariant {n} violated: {msg}")


def _backing_pfns(vm: ModelVm, slot: Memslot, sp: Spte, s: int, e: int
                  ) -> list[tuple[int, int, int | None, int]]:
    """What the backing store holds for gfns [s, e): pieces (gs, ge, pfn_of_gs or None, order)."""
    if sp.private or slot.gmem_only:
        f = slot.gmem_file
        if f is None or f.released:
            _fail(1, f"SPTE at gfn {s:#x} maps guest_memfd memory of a closed file")
        assert f is not None
        i0 = slot.gfn_to_index(s)
        return [(slot.index_to_gfn(a), slot.index_to_gfn(b), pfn, o)
                for a, b, pfn, o in f.inode.cache.lookup_range(i0, i0 + (e - s))]
    # One SPTE run may cover several host mappings (a MAP_FIXED piece inside a mapping whose
    # frames happen to continue the run's pfns): resolve each mapping's part on its own.
    out: list[tuple[int, int, int | None, int]] = []
    g = s
    while g < e:
        hit = vm.system.process.resolve(slot.gfn_to_hva(g))
        if hit is None:
            _fail(1, f"shared SPTE at gfn {g:#x} maps an unmapped host address")
        assert hit is not None
        mapping, off = hit
        n = (mapping.length - off + PS - 1) // PS
        for c in getattr(mapping, "children", ()):
            lo = c.addr - mapping.addr
            if not c.closed and lo > off:
                n = min(n, (lo - off) // PS)
        ge = min(e, g + max(1, n))
        out.extend(_mapping_pfns(mapping, off, g, ge))
        g = ge
    return out


def _mapping_pfns(mapping: Any, off: int, s: int, e: int) -> list[tuple[int, int, int | None, int]]:
    """What one host mapping holds for gfns [s, e) starting at mapping offset ``off``."""
    if hasattr(mapping.source, "overlay"):  # MAP_PRIVATE: its copies, else the file's pages
        first = mapping.pgoff + off // PS
        pieces = mapping.source.lookup_range(first, first + (e - s))
        return [(a - first + s, b - first + s, pfn, o) for a, b, pfn, o in pieces]
    cache = getattr(mapping.file, "cache", None)
    if cache is None:
        inode = getattr(mapping.file, "inode", None)
        cache = inode.cache if inode is not None else None
    if cache is None:
        return []
    first = mapping.pgoff + off // PS
    pieces = cache.lookup_range(first, first + (e - s))
    return [(a - first + s, b - first + s, pfn, o) for a, b, pfn, o in pieces]


def check_vm(vm: ModelVm, quiescent: bool = True) -> None:
    mmu = vm.mmu
    # 5: no invalidation left open once everything is quiescent.
    if quiescent and mmu.in_progress:
        _fail(5, f"{mmu.in_progress} invalidation(s) still in progress")
    vm.attributes.check()
    for as_id, sptes in enumerate(mmu.sptes):
        sptes.check()
        for rs, re_, sp in sptes.items():
            assert sp is not None
            # A merged SPTE run may cross adjacent memslots: check it slot by slot.
            for s, e, slot in vm.memslots[as_id].in_range(rs, re_):
                if slot is None:
                    _fail(1, f"SPTEs [{s:#x},{e:#x}) outside any memslot")
                assert slot is not None
                _check_run(vm, slot, sp, s, e)
    for ms in vm.memslots:
        for slot in ms:
            for mixed in slot.lpage_mixed.values():
                mixed.check()
    # 8: no guest write goes unlogged in a dirty-logging slot.
    from guestmem.model.kvm import dirty_log

    unlogged = dirty_log.check(vm)
    if unlogged:
        _fail(8, unlogged)
    if mmu.cpu_view is not None:  # 1 and 2 for the x86 CPUs' TLBs and plaintext twin
        from guestmem.model.kvm.x86.cpu import check_cpu_view

        check_cpu_view(vm)
    if quiescent:
        check_system(vm.system)


def _check_run(vm: ModelVm, slot: Memslot, sp: Spte, s: int, e: int) -> None:
    """Invariants 1-3 for SPTEs [s, e) of one memslot."""
    # 1: the frame is still the one the backing store holds at that index.
    for gs, ge, pfn, order in _backing_pfns(vm, slot, sp, s, e):
        if pfn is None:
            _fail(1, f"SPTE maps gfns [{gs:#x},{ge:#x}) whose pages were removed")
        elif pfn - gs != sp.delta:
            _fail(1, f"SPTE at gfn {gs:#x} maps pfn {gs + sp.delta:#x}, backing holds {pfn:#x}")
        # 3: a hugepage SPTE never exceeds its folio.
        if sp.order > order:
            _fail(3, f"{1 << sp.order}-page SPTE at gfn {gs:#x} over an order-{order} folio")
    if not vm.has_private_mem:
        return
    # 2: the SPTE's kind matches the gfn's current attribute.
    g = s
    while g < e:
        ge = min(e, vm.attribute_run_end(g, e))
        if vm.mem_is_private(g) != sp.private:
            _fail(2, f"{'private' if sp.private else 'shared'} SPTE over gfns "
                     f"[{g:#x},{ge:#x}) whose attribute differs")
        g = ge
    if sp.private and not slot.has_gmem:
        _fail(2, f"private SPTE at gfn {s:#x} in a slot without guest_memfd")
    # 3: no hugepage over mixed attributes.
    if sp.order:
        size = 1 << sp.order
        g = s
        while g < e:
            g = vm.attribute_run_end(g, e)
            if g < e and g % size:
                _fail(3, f"hugepage SPTE at gfn {g & ~(size - 1):#x} spans mixed attributes")


def check_system(system: ModelKvm) -> None:
    # 6: frames are conserved: every allocated frame is held by exactly the live page caches,
    # or was dropped by its file while pinned and waits for the unpin.
    held = sum(f.cache.nr_pages for f in system.live_files()) + system.pool.deferred
    allocated = system.pool.allocated
    if held != allocated:
        _fail(6, f"{allocated} frames allocated but page caches and pins hold {held}")
    # 4: no host pin on a private guest_memfd page (conversion to private refuses pinned pages).
    if system.options.gmem_attributes:
        for owner in system.live_files():
            inode = getattr(owner, "attributes", None)
            if inode is None:
                continue
            pinned = owner.cache.first_elevated(0, owner.npages)
            while pinned is not None:
                if owner.is_private(pinned):
                    _fail(4, f"host pin on private guest_memfd page {pinned:#x}")
                pinned = owner.cache.first_elevated(pinned + 1, owner.npages)

"""The TDP MMU: SPTEs, mapping levels, lpage MIXED tracking and the invalidation protocol.

SPTEs live in one RangeMap per address space, keyed by gfn, with value :class:`Spte` (kind,
level, ``pfn - gfn``, writable).  Physically contiguous mappings of the same kind and level
therefore merge into one entry: a fully mapped 64 GiB guest is a handful of entries, and zapping
any range costs what the number of entries in it costs.

The invalidation protocol is upstream's (kvm_main.c, ``include/linux/kvm_host.h``):
``invalidate_begin`` bumps ``in_progress`` (resetting the range when it goes 0->1),
``range_add`` widens the pending range, ``invalidate_end`` bumps ``seq`` then drops
``in_progress``.  A fault snapshots ``seq`` before it looks anything up and installs SPTEs only if,
under ``mmu_lock``, no invalidation covering its gfns is in progress and ``seq`` is unchanged;
otherwise it retries.  That is what keeps a racing fault from installing a stale SPTE.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guestmem import uapi as u
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.kvm.memslot import Memslot
    from guestmem.model.kvm.vm import ModelVm

FILTER_PRIVATE = 1 << 0  # enum kvm_gfn_range_filter
FILTER_SHARED = 1 << 1
FILTER_ALL = FILTER_PRIVATE | FILTER_SHARED
INVALID_GFN = -1
LEVEL_ORDERS = (18, 9, 0)  # 1 GiB, 2 MiB, 4 KiB
LEVEL_NAMES = {0: "4K", 9: "2M", 18: "1G"}


@dataclass(frozen=True)
class Spte:
    """A leaf SPTE (or a merged run of identical-shape leaves).  pfn = gfn + delta."""

    private: bool
    order: int
    delta: int
    writable: bool = True


class Mmu:
    """One VM's secondary MMU."""

    def __init__(self, vm: ModelVm, nr_as: int) -> None:
        self.vm = vm
        self.sptes: list[RangeMap[Spte | None]] = [RangeMap(None) for _ in range(nr_as)]
        # Invalidation state; every change happens under the VM's mmu_lock.
        self.seq = 0
        self.in_progress = 0
        self.range_start = INVALID_GFN
        self.range_end = INVALID_GFN
        self.stats = {"zapped_pages": 0, "zaps": 0, "installs": 0, "faults": 0, "retries": 0,
                      "hugepage_installs": 0}
        # The x86 CPUs' view of these SPTEs (guestmem.model.kvm.x86.X86Machine), told of every zap
        # so that no CPU keeps a translation the SPTEs no longer give; None with the op vCPU.
        self.cpu_view: Any = None

    # --- invalidation protocol -----------------------------------------------------------------
    def invalidate_begin(self) -> None:
        assert self.vm.mmu_lock.held()
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = self.range_end = INVALID_GFN

    def range_add(self, start: int, end: int) -> None:
        assert self.in_progress > 0, "range_add outside invalidate_begin/end"
        if self.range_start == INVALID_GFN:
            self.range_start, self.range_end = start, end
        else:
            self.range_start = min(self.range_start, start)
            self.range_end = max(self.range_end, end)

    def invalidate_end(self) -> None:
        assert self.vm.mmu_lock.held()
        self.seq += 1
        self.in_progress -= 1
        assert self.in_progress >= 0, "unbalanced invalidate_end"

    def retry(self, seq: int, start: int, end: int) -> bool:
        """``mmu_invalidate_retry_gfn`` over [start, end): must the fault retry?"""
        if self.in_progress and (self.range_start == INVALID_GFN or
                                 (start < self.range_end and end > self.range_start)):
            return True
        return self.seq != seq

    # --- SPTE queries ---------------------------------------------------------------------------
    def present(self, as_id: int, start: int, end: int) -> Iterator[tuple[int, int, Spte | None]]:
        return self.sptes[as_id].segments(start, end)

    def translate(self, as_id: int, gfn: int, end: int, want_private: bool | None, write: bool
                  ) -> list[tuple[int, int, int, bool]]:
        """The mapped prefix of [gfn, end) usable for this access: runs ``(s, e, pfn_of_s, private)``
        up to the first gfn without a usable SPTE.  ``want_private`` None = any kind."""
        runs: list[tuple[int, int, int, bool]] = []
        for s, e, sp in self.sptes[as_id].segments(gfn, end):
            if sp is None or (want_private is not None and sp.private != want_private) or (
                    write and not sp.writable):
                break
            runs.append((s, e, s + sp.delta, sp.private))
        return runs

    def count(self) -> dict[str, int]:
        """Mapped pages and mappings per level, and private/shared page counts."""
        out = {"4K": 0, "2M": 0, "1G": 0, "private_pages": 0, "shared_pages": 0}
        for m in self.sptes:
            for s, e, sp in m.items():
                assert sp is not None
                out[LEVEL_NAMES[sp.order]] += (e - s) >> sp.order
                out["private_pages" if sp.private else "shared_pages"] += e - s
        return out

    # --- zapping ----------------------------------------------------------------------------------
    def unmap_gfn_range(self, slot: Memslot, start: int, end: int, attr_filter: int = FILTER_ALL) -> bool:
        """``kvm_mmu_unmap_gfn_range``: add to the invalidation range and zap [start, end)."""
        self.range_add(start, end)
        return self.zap(slot.as_id, start, end, attr_filter)

    def zap(self, as_id: int, start: int, end: int, attr_filter: int = FILTER_ALL) -> bool:
        """Remove leaf SPTEs in [start, end).  A hugepage SPTE partly inside goes whole.  The
        filter selects private/shared SPTEs only where the flavour keeps them in separate trees
        (mirrored TDP, TDX); elsewhere every SPTE in range goes, as upstream."""
        assert self.vm.mmu_lock.held()
        if not self.vm.arch.mirrored_tdp:
            attr_filter = FILTER_ALL
        m = self.sptes[as_id]
        zapped = False
        removed: list[tuple[int, int, Spte]] = []
        for s, e, sp in list(m.segments(start, end)):
            if sp is None:
                continue
            if not attr_filter & (FILTER_PRIVATE if sp.private else FILTER_SHARED):
                continue
            size = 1 << sp.order
            if sp.order and sp.private and self.vm.arch.mirrored_tdp:
                # TDX: a private hugepage is demoted (split into 4K S-EPT entries) rather than
                # removed whole, since removing a private page takes it out of the TD.
                s2, e2 = s & ~(size - 1), (e + size - 1) & ~(size - 1)
                small = Spte(sp.private, 0, sp.delta, sp.writable)
                for ws, we, wsp in list(m.segments(s2, e2)):
                    if wsp == sp:
                        m.set(ws, we, small)
                self.stats["demotions"] = self.stats.get("demotions", 0) + 1
                sp = small
                size = 1
            # Widen to whole SPTEs at this level.
            s2, e2 = s & ~(size - 1), (e + size - 1) & ~(size - 1)
            for ws, we, wsp in list(m.segments(s2, e2)):
                if wsp == sp:
                    m.set(ws, we, None)
                    removed.append((ws, we, sp))
                    self.stats["zapped_pages"] += we - ws
                    if sp.private:
                        self.vm.arch.private_zapped(ws, we)
            zapped = True
        if zapped:
            self.stats["zaps"] += 1
        if removed and self.cpu_view is not None:
            self.cpu_view.zapped(as_id, removed)
        return zapped

    def zap_all(self) -> None:
        with self.vm.mmu_lock():
            for as_id, m in enumerate(self.sptes):
                removed = [(s, e, sp) for s, e, sp in m.items() if sp is not None]
                m.clear()
                if removed and self.cpu_view is not None:
                    self.cpu_view.zapped(as_id, removed)

    # --- installation -----------------------------------------------------------------------------
    def install(self, slot: Memslot, req_start: int, req_end: int, run_start: int, run_end: int,
                pfn: int, folio_order: int, private: bool, writable: bool, max_order: int) -> None:
        """Map the gfns of [req_start, req_end) that fall in the backing run [run_start, run_end)
        (``pfn`` backs ``run_start``), each at the largest level that is allowed: within the
        folio's order and ``max_order`` (arch/attribute limits), the slot holding the whole
        hugepage and not MIXED, gfn and pfn congruent.  A hugepage may map gfns outside the
        requested range, as a real fault on one gfn maps the whole hugepage."""
        assert self.vm.mmu_lock.held()
        m = self.sptes[slot.as_id]
        delta = pfn - run_start
        top = min(folio_order, max_order)

        def place(a: int, b: int, order_cap: int) -> None:
            # [a, b) is aligned to 2^order_cap (or a sub-range at order 0).
            for order in LEVEL_ORDERS:
                if order > order_cap:
                    continue
                size = 1 << order
                if order == 0:
                    lo, hi = max(a, req_start), min(b, req_end)
                    if lo < hi:
                        m.set(lo, hi, Spte(private, 0, delta, writable))
                        self.stats["installs"] += 1
                    return
                blk = a & ~(size - 1)
                while blk < b:
                    nxt = blk + size
                    if nxt <= req_start or blk >= req_end:
                        blk = nxt
                        continue
                    if (blk >= run_start and nxt <= run_end and delta % size == 0
                            and slot.lpage_allowed(blk, order)):
                        m.set(blk, nxt, Spte(private, order, delta, writable))
                        self.stats["installs"] += 1
                        self.stats["hugepage_installs"] += 1
                    else:
                        place(max(blk, a), min(nxt, b), order - 9 if order == 18 else 0)
                    blk = nxt
                return

        place(run_start, run_end, top)


# --- lpage MIXED tracking (arch/x86/kvm/mmu/mmu.c) ------------------------------------------------

def hugepage_has_attrs(vm: ModelVm, slot: Memslot, gfn: int, order: int, attrs: int) -> bool:
    """All gfns of the hugepage at ``gfn`` hold ``attrs`` (and, for 1 GiB, no 2 MiB part is MIXED)."""
    start = gfn >> order << order
    end = start + (1 << order)
    if order == 9:
        return vm.attributes.all_equal(start, end, attrs)
    sub = slot.lpage_mixed.get(9)
    if sub is not None and sub.any_match(start >> 9, end >> 9, bool):
        return False
    return vm.attributes.all_equal(start, end, attrs)


def init_memslot_lpage(vm: ModelVm, slot: Memslot) -> None:
    """``kvm_mmu_init_memslot_memory_attributes``: compute MIXED for every hugepage wholly inside a
    new slot, by walking attribute ranges (cost grows with ranges, not hugepages)."""
    if not vm.has_private_mem:
        return
    for order in (9, 18):
        mixed: RangeMap[bool] = RangeMap(False)
        slot.lpage_mixed[order] = mixed
        size = 1 << order
        first = (slot.base_gfn + size - 1) >> order
        last = slot.end_gfn >> order
        if first >= last:
            continue
        _mark_mixed_boundaries(vm, slot, mixed, first, last, order)


def _mark_mixed_boundaries(vm: ModelVm, slot: Memslot, mixed: RangeMap[bool], first: int, last: int,
                           order: int) -> None:
    """Set MIXED exactly on hugepages in [first, last) (hugepage indices) that straddle an
    attribute boundary (or, for 1 GiB, contain a MIXED 2 MiB page)."""
    mixed.set(first, last, False)
    for s, _e, _ in vm.attributes.segments(first << order, last << order):
        hp = s >> order
        if s & ((1 << order) - 1) and first <= hp < last:
            mixed.set(hp, hp + 1, True)
    if order == 18 and 9 in slot.lpage_mixed:
        for s, e, v in slot.lpage_mixed[9].items():
            if v:
                lo, hi = max(s >> 9, first), min((e + 511) >> 9, last)
                if lo < hi:
                    mixed.set(lo, hi, True)


def post_set_attributes(vm: ModelVm, slot: Memslot, start: int, end: int, attrs: int) -> None:
    """``kvm_arch_post_set_memory_attributes`` for the part [start, end) of ``slot``: head and tail
    hugepages straddling the range are recomputed; those wholly inside lose MIXED."""
    for order in (9, 18):
        mixed = slot.lpage_mixed.get(order)
        if mixed is None:
            continue
        size = 1 << order
        gfn = start >> order << order
        if gfn != start or gfn + size > end:
            if gfn >= slot.base_gfn and gfn + size <= slot.end_gfn:
                mixed.set(gfn >> order, (gfn >> order) + 1,
                          not hugepage_has_attrs(vm, slot, gfn, order, attrs))
            gfn += size
        full_end = gfn + ((end - gfn) // size) * size if end > gfn else gfn
        if full_end > gfn:
            mixed.set(gfn >> order, full_end >> order, False)
            gfn = full_end
        if gfn < end and gfn + size <= slot.end_gfn:
            mixed.set(gfn >> order, (gfn >> order) + 1,
                      not hugepage_has_attrs(vm, slot, gfn, order, attrs))


def pre_set_attributes_range_add(vm: ModelVm, slot: Memslot, start: int, end: int) -> None:
    """``kvm_arch_pre_set_memory_attributes``' head/tail rule: a straddling hugepage that could be
    mapped huge right now joins the invalidation, so no hugepage is installed mid-change."""
    for order in (9, 18):
        size = 1 << order
        mixed = slot.lpage_mixed.get(order)

        def is_mixed(g: int, _m: RangeMap[bool] | None = mixed, _o: int = order) -> bool:
            return bool(_m is not None and _m.get(g >> _o))

        hs = start >> order << order
        te = (end - 1) >> order << order
        if ((hs != start or hs + size > end) and hs >= slot.base_gfn
                and hs + size <= slot.end_gfn and not is_mixed(hs)):
            vm.mmu.range_add(hs, hs + size)
        if te == hs:
            continue
        if te + size > end and te + size <= slot.end_gfn and not is_mixed(te):
            vm.mmu.range_add(te, te + size)


def max_order_for(vm: ModelVm, private: bool) -> int:
    """The largest mapping order the VM allows for this kind of memory."""
    top = 18
    if private:
        top = min(top, vm.arch.max_private_order)
    # With guest_memfd attributes the series never derives a level from attributes (v6+ bugs the
    # VM if asked); the level comes from the folio order alone.  Upstream folios are order 0, so
    # that is 4K; with the hugepage extension, split/merge keep every large folio uniform.
    return top


_ = u

"""The conversion manager: one place that turns a guest's (or the host's) request into attribute
changes, listener notifications, discards and pre-faults, in the right order.

What peers do in pieces, done once (see ``peer-systems.md``):

* validation first, all pieces before any change: page-size bits honoured (a 2 MiB request must
  be 2 MiB aligned), unknown attribute bits and bad ranges refused with ``-KVM_EINVAL`` to the
  guest, never an exception in the VMM;
* requests cut at region boundaries (QEMU's cross-region split); a to-shared request over an MMIO
  hole accepted and ignored as firmware expects (QEMU's 32-bit PCI hole quirk), a to-private one
  refused;
* only the pages whose state really changes are converted and announced (QEMU's "mixed range"
  handling), from range maps, not bitmaps;
* to private: listeners unmap first (a pinned page would make an in-place conversion fail with
  EAGAIN), then the attribute, then the shared copy is discarded unless the policy says it must
  not be (hugetlb, preallocated, a legacy IOMMU pinning everything; pinned pages are deferred);
* to shared: the attribute, then the private copy is punched (separate backing only), then
  listeners map;
* optionally pre-fault the converted range (QEMU since 2025), tolerating EOPNOTSUPP/ENOENT;
* one conversion at a time (libkrun's single worker, QEMU's BQL), every step traced and sampled
  for the residency bound.
"""

from __future__ import annotations

import errno
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from guestmem import uapi as u
from guestmem.api import ExitHypercall, ExitMemoryFault, Mapping, Vcpu
from guestmem.errors import KvmError
from guestmem.vmm import state as st
from guestmem.vmm.accounting import Accounting
from guestmem.vmm.backing import Capabilities, RegionBacking, Strategy
from guestmem.vmm.layout import Layout
from guestmem.vmm.listeners import ConversionListener
from guestmem.vmm.policy import DiscardPolicy, private_discard_blocker, shared_discard_blocker
from guestmem.vmm.state import PageTracker
from guestmem.vmm.trace import CONVERSION, FAULT, INVALIDATION, PREFAULT, WARNING, EventTrace

PAGE = u.PAGE_SIZE
KNOWN_ATTRS = u.KVM_MAP_GPA_RANGE_ENCRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M | u.KVM_MAP_GPA_RANGE_PAGE_SZ_1G
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE
ZERO = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO

_TO_PRIVATE, _TO_SHARED = "a conversion to private", "a conversion to shared"

#: Memory faults and other requests on one page of RAM take
#: :meth:`ConversionManager._convert_one_page`, one straight path, instead of the general path it
#: is a specialisation of (identical in every count, state change and error).  The differential
#: test (tests/vmm/test_vmm_fast_fault.py) turns it off to compare the two.
FAST_FAULT = True
_ORIGIN_KEYS = {o: f"requests_{o}" for o in ("fault", "hypercall", "host")}  # no formatting per request
_LAST_PAGE = (1 << 64) - PAGE  # the highest page-aligned gpa a one-page request may start at
_ATTR_PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
_PRIVATE_MEMORY = (Strategy.SEPARATE, Strategy.INPLACE)  # Strategy.private_memory, as a tuple
_UNDISCARDABLE = ("hugetlb", "prealloc")  # shared backings policy.shared_discard_blocker keeps

Prefault = Literal["off", "private", "all"]
PREFAULT_MODES = ("off", "private", "all")
ContentMode = Literal["auto", "preserve", "zero", "unspecified"]
CONTENT_MODES = ("auto", "preserve", "zero", "unspecified")


@dataclass(frozen=True)
class Outcome:
    """The result of one conversion request."""

    ok: bool
    ret: int  # what the guest gets in RAX: 0 or -KVM_E*
    changed_pages: int = 0
    unchanged_pages: int = 0
    hole_bytes: int = 0
    error: str | None = None


# The outcomes of a one-page conversion that worked: frozen, so one of each serves every fault.
_PAGE_CHANGED = Outcome(True, 0, 1, 0, 0)
_PAGE_UNCHANGED = Outcome(True, 0, 0, 1, 0)


def _fail(msg: str, ret: int = -u.KVM_EINVAL) -> Outcome:
    return Outcome(False, ret, error=msg)


class ConversionManager:
    """Converts guest RAM between shared and private; see the module docstring."""

    def __init__(self, layout: Layout, regions: Sequence[RegionBacking], tracker: PageTracker,
                 strategy: Strategy, caps: Capabilities, policy: DiscardPolicy, accounting: Accounting,
                 trace: EventTrace, *, prefault: Prefault = "off", content: ContentMode = "auto") -> None:
        self.layout = layout
        self.regions = list(regions)
        self.tracker = tracker
        self.strategy = strategy
        self.caps = caps
        self.policy = policy
        self.accounting = accounting
        self.trace = trace
        self.prefault = prefault
        self.content = content
        self.listeners: list[ConversionListener] = []
        self.default_vcpu: Vcpu | None = None
        self.stats: Counter[str] = Counter()
        self.warnings: list[str] = []
        self._lock = threading.RLock()

    # --- listeners ------------------------------------------------------------------------------
    def add_listener(self, listener: ConversionListener, host: object) -> None:
        with self._lock:
            listener.attach(host)  # type: ignore[arg-type]
            self.listeners.append(listener)

    def _listener_blockers(self) -> list[str]:
        return [b for b in (lst.discard_blocker() for lst in self.listeners) if b]

    # --- exits ----------------------------------------------------------------------------------
    def handle_map_gpa_range(self, ex: ExitHypercall, tid: int, vcpu: Vcpu | None) -> Outcome:
        """Answer a ``KVM_HC_MAP_GPA_RANGE`` exit: sets ``ex.ret`` and returns the outcome."""
        if ex.nr != u.KVM_HC_MAP_GPA_RANGE:
            out = _fail(f"hypercall {ex.nr} is not handled", -u.KVM_ENOSYS)
        elif ex.attrs & ~KNOWN_ATTRS:
            out = _fail(f"MAP_GPA_RANGE: unknown attribute bits {ex.attrs & ~KNOWN_ATTRS:#x}")
        elif ex.page_size == 0:
            out = _fail(f"MAP_GPA_RANGE: both page-size bits set in {ex.attrs:#x}")
        elif ex.npages <= 0:
            out = _fail("MAP_GPA_RANGE: npages is 0")
        else:
            out = self.convert(ex.gpa, ex.npages * PAGE, ex.to_private, origin="hypercall", tid=tid,
                               vcpu=vcpu, granule=ex.page_size)
        if not out.ok:
            self.stats["guest_errors"] += 1
            self.trace.instant(WARNING, "MAP_GPA_RANGE refused", tid, gpa=hex(ex.gpa), npages=ex.npages,
                               attrs=hex(ex.attrs), ret=out.ret, reason=out.error)
        ex.ret = out.ret
        return out

    def handle_memory_fault(self, ex: ExitMemoryFault, tid: int, vcpu: Vcpu | None) -> Outcome:
        """Resolve a ``KVM_EXIT_MEMORY_FAULT`` by converting to the kind the access wanted.  A
        fault that cannot be resolved is not the guest's error to handle: ``ok`` is False and the
        run loop stops the vCPU with the reason."""
        if self.trace.enabled:
            with self.trace.span(FAULT, "memory fault", tid, gpa=hex(ex.gpa), size=ex.size,
                                 private=ex.private) as args:
                out = self._memory_fault(ex, tid, vcpu)
                args["ok"] = out.ok
            return out
        # The common case, inline: a well-formed fault on one page of RAM with no listener to
        # tell goes straight to _convert_one_page; everything else takes the general path.
        flags = ex.flags
        if FAST_FAULT and ex.errno == errno.EFAULT and not flags & ~u.KVM_MEMORY_EXIT_FLAG_PRIVATE:
            gpa = ex.gpa
            start = gpa // PAGE * PAGE
            if gpa + max(ex.size, 1) <= start + PAGE and start <= _LAST_PAGE and not self.listeners:
                i = self.layout.region_at(start)
                to_private = flags == u.KVM_MEMORY_EXIT_FLAG_PRIVATE
                if i is not None and (not to_private or self.strategy in _PRIVATE_MEMORY):
                    self.stats["memory_faults"] += 1
                    return self._convert_one_page(self.regions[i], start, to_private, tid, vcpu,
                                                  "requests_fault")
        return self._memory_fault(ex, tid, vcpu)

    def _memory_fault(self, ex: ExitMemoryFault, tid: int, vcpu: Vcpu | None) -> Outcome:
        self.stats["memory_faults"] += 1
        if ex.flags & ~u.KVM_MEMORY_EXIT_FLAG_PRIVATE:
            return _fail(f"memory fault with unknown flags {ex.flags:#x} at gpa {ex.gpa:#x}")
        if ex.errno != errno.EFAULT:
            name = errno.errorcode.get(ex.errno, str(ex.errno))
            return _fail(f"memory fault at gpa {ex.gpa:#x} with errno {name} "
                         "(hardware-poisoned or unusable page)")
        start = ex.gpa // PAGE * PAGE
        end = (ex.gpa + max(ex.size, 1) + PAGE - 1) // PAGE * PAGE
        return self.convert(start, end - start, ex.private, origin="fault", tid=tid, vcpu=vcpu)

    def _convert_one_page(self, region: RegionBacking, gpa: int, to_private: bool, tid: int,
                          vcpu: Vcpu | None, origin_key: str) -> Outcome:
        """``convert(gpa, PAGE, to_private, origin=...)`` for the common request -- one page of RAM
        (every lazily accepted page, every 4 KiB MAP_GPA_RANGE), no listener, trace off -- as one
        straight path: the same steps in the same order, the same counters, tracker state,
        accounting check, pre-fault and errors as the general path (:meth:`_convert`), with
        the page's tracker state written once: the attribute and the discard that follows it are
        one state change (written before the discard only if the discard raises, so the tracker
        never claims a discard that did not happen).  ``origin_key`` is ``"requests_<origin>"``."""
        stats = self.stats
        stats["requests"] += 1
        stats[origin_key] += 1
        tracker = self.tracker
        gfn = gpa // PAGE
        with self._lock:
            # Read without the tracker's lock: every writer of the tracker's state holds the
            # conversion lock (held here), so the state cannot change under this read; readers
            # elsewhere (the accounting) take the tracker's lock against the write below.
            old = tracker.state.get(gfn)
            if bool(old & st.PRIVATE) == to_private:
                # (+= 0: the key exists after this request, as after the general path's count)
                stats["pages_to_private" if to_private else "pages_to_shared"] += 0
                stats["pages_unchanged"] += 1
                return _PAGE_UNCHANGED
            separate = region.strategy is Strategy.SEPARATE
            if separate:
                try:
                    region.vm.set_memory_attributes(gpa, PAGE, _ATTR_PRIVATE if to_private else 0)
                except KvmError as exc:
                    stats["errors"] += 1
                    return Outcome(False, -u.KVM_EINVAL, 0, 0, 0, self._attributes_failed(exc, gpa, PAGE))
            else:
                err = self._set_attributes(region, gpa, PAGE, to_private, tid)
                if err is not None:
                    stats["errors"] += 1
                    return Outcome(False, -u.KVM_EINVAL, 0, 0, 0, err)
            policy = self.policy
            if to_private:
                new = old | st.PRIVATE | st.PRIVATE_POP
                if policy.preallocate_private:
                    self._set_state(gfn, old, new)
                    old = new
                    region.allocate_private(gpa, PAGE)
                if separate:
                    if policy.shared_backing in _UNDISCARDABLE or not policy.discard_shared:
                        stats["shared_discards_skipped"] += 1
                    elif tracker.any_pins and tracker.pinned(gfn):
                        tracker.deferred_discard.set(gfn, gfn + 1, True)
                        stats["shared_discards_deferred"] += 1
                    else:
                        try:
                            region.shared.discard(gpa - region.base, PAGE)
                        except BaseException:
                            self._set_state(gfn, old, new)
                            raise
                        new &= ~st.SHARED_POP
                        stats["shared_discards"] += 1
                stats["pages_to_private"] += 1
            else:
                new = (old & ~st.PRIVATE) | st.SHARED_POP
                if separate:
                    if policy.discard_private:
                        try:
                            region.punch_private(gpa, PAGE)
                        except BaseException:
                            self._set_state(gfn, old, new)
                            raise
                        new &= ~st.PRIVATE_POP
                        stats["private_punches"] += 1
                    else:
                        stats["private_punches_skipped"] += 1
                stats["pages_to_shared"] += 1
            self._set_state(gfn, old, new)
            stats["pages_unchanged"] += 0
            stats["conversions"] += 1
        self.accounting.after_conversion(_TO_PRIVATE if to_private else _TO_SHARED, tid)
        if self.prefault == "all" or (to_private and self.prefault == "private"):
            self._prefault(vcpu or self.default_vcpu, gpa, PAGE, tid)
        return _PAGE_CHANGED

    def _set_state(self, gfn: int, old: int, new: int) -> None:
        """Write one page's tracker state (``old`` is what it holds now)."""
        if new != old:
            tracker = self.tracker
            with tracker._lock:
                tracker.state.set(gfn, gfn + 1, new)

    # --- conversion -------------------------------------------------------------------------------
    def convert(self, gpa: int, size: int, to_private: bool, *, origin: str, tid: int,
                vcpu: Vcpu | None = None, granule: int = PAGE) -> Outcome:
        """Convert ``[gpa, gpa+size)``; ``granule`` is the page size the request was made in."""
        if (size == PAGE and granule == PAGE and FAST_FAULT and not gpa % PAGE and 0 <= gpa <= _LAST_PAGE
                and not self.listeners and not self.trace.enabled):
            i = self.layout.region_at(gpa)
            if i is not None and (not to_private or self.strategy in _PRIVATE_MEMORY):
                key = _ORIGIN_KEYS.get(origin) or f"requests_{origin}"
                return self._convert_one_page(self.regions[i], gpa, to_private, tid, vcpu, key)
        if not self.trace.enabled:
            out = self._convert(gpa, size, to_private, origin, tid, granule)
        else:
            kind = "private" if to_private else "shared"
            with self.trace.span(CONVERSION, f"to {kind}", tid, gpa=hex(gpa), size=size,
                                 origin=origin) as args:
                out = self._convert(gpa, size, to_private, origin, tid, granule)
                args.update(ok=out.ok, changed_pages=out.changed_pages, ret=out.ret)
                if out.error:
                    args["error"] = out.error
        if out.ok and out.changed_pages and self._want_prefault(to_private):
            self._prefault(vcpu or self.default_vcpu, gpa, size, tid)
        return out

    def _convert(self, gpa: int, size: int, to_private: bool, origin: str, tid: int, granule: int) -> Outcome:
        self.stats["requests"] += 1
        self.stats[f"requests_{origin}"] += 1
        if size <= 0 or gpa < 0 or gpa % granule or size % granule or gpa + size > 1 << 64:
            return self._refuse(f"range [{gpa:#x}, +{size:#x}) is not aligned to its {granule >> 10} KiB "
                                "page size (or is empty)")
        pieces = self.layout.split(gpa, size)
        holes = [p for p in pieces if p.region is None]
        if holes and to_private:
            h = holes[0]
            return self._refuse(f"[{h.gpa:#x}, {h.end:#x}) is not RAM (an MMIO hole); it cannot become "
                                "private")
        ram = [p for p in pieces if p.region is not None]
        if to_private and ram and not self.strategy.private_memory:
            return self._refuse(f"this VM has no private memory ({self.strategy.value} backing)")
        hole_bytes = sum(p.size for p in holes)
        if hole_bytes:
            self.stats["hole_bytes_ignored"] += hole_bytes
            self.trace.instant(CONVERSION, "MMIO hole ignored", tid, bytes=hole_bytes)
        changed = unchanged = 0
        with self._lock:
            for p in ram:
                assert p.region is not None
                region = self.regions[p.region]
                runs = self.tracker.changing_runs(p.gpa // PAGE, p.end // PAGE, to_private)
                unchanged += p.size // PAGE - sum(e - s for s, e in runs)
                for s, e in runs:
                    err = self._convert_run(region, s * PAGE, (e - s) * PAGE, to_private, tid)
                    if err is not None:
                        self.stats["errors"] += 1
                        return Outcome(False, -u.KVM_EINVAL, changed, unchanged, hole_bytes, err)
                    changed += e - s
            self.stats["pages_to_private" if to_private else "pages_to_shared"] += changed
            self.stats["pages_unchanged"] += unchanged
            if changed:
                self.stats["conversions"] += 1
        if changed:
            # Outside the conversion lock: another vCPU's conversion never waits for a measurement
            # (the accounting reads each structure under that structure's own lock, and takes no
            # second measurement while one is under way).
            self.accounting.sample(_TO_PRIVATE if to_private else _TO_SHARED, tid, force=False)
        return Outcome(True, 0, changed, unchanged, hole_bytes)

    def _refuse(self, msg: str) -> Outcome:
        self.stats["refused"] += 1
        return _fail(msg)

    def _convert_run(self, region: RegionBacking, gpa: int, size: int, to_private: bool, tid: int
                     ) -> str | None:
        """Convert one run whose pages all have the other kind; return an error or None."""
        s, e = gpa // PAGE, (gpa + size) // PAGE
        if to_private:
            for lst in self.listeners:
                try:
                    lst.before_to_private(gpa, size)
                except Exception as exc:  # a listener that cannot let go blocks the conversion
                    return f"listener {lst.name} failed to release [{gpa:#x}, +{size:#x}): {exc}"
                left = lst.mapped(gpa, size)
                if left and lst.discard_blocker() is None:
                    # A listener that follows conversions must have let go: a mapping it keeps
                    # would outlive the discard of the shared copy (a stale DMA mapping).  One
                    # that cannot follow (legacy VFIO) disables discard instead.
                    return f"listener {lst.name} still maps {left:#x} bytes of a range going private"
                self.trace.instant(INVALIDATION, f"{lst.name} unmap", tid, gpa=hex(gpa), size=size)
        err = self._set_attributes(region, gpa, size, to_private, tid)
        if err is not None:
            if to_private:  # nothing changed: let the listeners map the range again
                for lst in self.listeners:
                    lst.after_to_shared(gpa, size)
            return err
        self.tracker.set_kind(s, e, to_private)
        if to_private:
            if self.policy.preallocate_private:
                region.allocate_private(gpa, size)
            self._drop_shared(region, gpa, size, tid)
        else:
            self._drop_private(region, gpa, size, tid)
            for lst in self.listeners:
                lst.after_to_shared(gpa, size)
                self.trace.instant(INVALIDATION, f"{lst.name} map", tid, gpa=hex(gpa), size=size)
        return None

    def _content_flags(self, to_private: bool) -> int:
        modes = self.caps.content_modes
        if self.strategy is not Strategy.INPLACE or not modes:
            return 0
        want = {"auto": PRESERVE, "preserve": PRESERVE, "zero": 0 if to_private else ZERO,
                "unspecified": 0}[self.content]
        return want if want & modes else 0

    def _set_attributes(self, region: RegionBacking, gpa: int, size: int, to_private: bool, tid: int
                        ) -> str | None:
        flags = self._content_flags(to_private)
        for _attempt in range(2):
            try:
                region.set_attributes(gpa, size, to_private, flags)
                return None
            except KvmError as exc:
                if exc.errno == errno.EOPNOTSUPP and flags:
                    self.stats["content_mode_fallbacks"] += 1
                    flags = 0  # the flavour cannot honour the mode in this direction
                    continue
                return self._attributes_failed(exc, gpa, size)
        return "setting attributes failed"

    @staticmethod
    def _attributes_failed(exc: KvmError, gpa: int, size: int) -> str:
        where = f" at offset {exc.error_offset:#x}" if exc.error_offset is not None else ""
        return f"setting attributes on [{gpa:#x}, +{size:#x}) failed: {exc}{where}"

    # --- discards -----------------------------------------------------------------------------------
    def _drop_shared(self, region: RegionBacking, gpa: int, size: int, tid: int) -> None:
        blocker = shared_discard_blocker(self.policy, region.strategy, self._listener_blockers())
        if blocker is not None:
            if region.strategy is Strategy.SEPARATE:
                self.stats["shared_discards_skipped"] += 1
                self.trace.instant(INVALIDATION, "shared discard skipped", tid, gpa=hex(gpa), size=size,
                                   reason=blocker)
            return
        s, e = gpa // PAGE, (gpa + size) // PAGE
        if e == s + 1 and not self.trace.enabled:  # one page: one pin lookup, no run lists
            if self.tracker.pinned(s):
                self.tracker.deferred_discard.set(s, e, True)
                self.stats["shared_discards_deferred"] += 1
            else:
                region.discard_shared(gpa, PAGE)
                self.tracker.dropped(s, e, st.SHARED_POP)
                self.stats["shared_discards"] += 1
            return
        for a, b in self.tracker.pinned_runs(s, e):
            self.tracker.deferred_discard.set(a, b, True)
            self.stats["shared_discards_deferred"] += 1
            self.trace.instant(INVALIDATION, "shared discard deferred", tid, gpa=hex(a * PAGE),
                               size=(b - a) * PAGE, reason="pages pinned for DMA")
        tracing = self.trace.enabled
        for a, b in self.tracker.unpinned_runs(s, e):
            if tracing:
                with self.trace.span(INVALIDATION, "discard shared", tid, gpa=hex(a * PAGE),
                                     size=(b - a) * PAGE):
                    region.discard_shared(a * PAGE, (b - a) * PAGE)
            else:
                region.discard_shared(a * PAGE, (b - a) * PAGE)
            self.tracker.dropped(a, b, st.SHARED_POP)
            self.stats["shared_discards"] += 1

    def _drop_private(self, region: RegionBacking, gpa: int, size: int, tid: int) -> None:
        blocker = private_discard_blocker(self.policy, region.strategy)
        if blocker is not None:
            if region.strategy is Strategy.SEPARATE:
                self.stats["private_punches_skipped"] += 1
            return
        with self.trace.span(INVALIDATION, "punch private", tid, gpa=hex(gpa), size=size):
            region.punch_private(gpa, size)
        self.tracker.dropped(gpa // PAGE, (gpa + size) // PAGE, st.PRIVATE_POP)
        self.stats["private_punches"] += 1

    def release_deferred(self, gpa: int, size: int, tid: int) -> None:
        """Pins on ``[gpa, gpa+size)`` went away: do the shared discards that waited for them."""
        with self._lock:
            s, e = gpa // PAGE, (gpa + size) // PAGE
            for a, b, pending in list(self.tracker.deferred_discard.segments(s, e)):
                if not pending:
                    continue
                for c, d in self.tracker.unpinned_runs(a, b):
                    self.tracker.deferred_discard.set(c, d, False)
                    for x, y, private in self.tracker.kind_runs(c, d):
                        if not private:
                            continue  # went shared again meanwhile: the copy is live
                        region = self.regions[self.layout.region_at(x * PAGE) or 0]
                        with self.trace.span(INVALIDATION, "discard shared (deferred)", tid,
                                             gpa=hex(x * PAGE), size=(y - x) * PAGE):
                            region.discard_shared(x * PAGE, (y - x) * PAGE)
                        self.tracker.dropped(x, y, st.SHARED_POP)
                        self.stats["shared_discards"] += 1
            self.accounting.sample("a deferred discard", tid, force=False)

    def discard(self, gpa: int, size: int, tid: int, side: str = "both") -> Outcome:
        """Give the pages of ``[gpa, gpa+size)`` back to the host without converting them
        (balloon / free page reporting).  ``side``: "both", "shared" or "private"."""
        if gpa % PAGE or size % PAGE or size <= 0:
            return _fail("discard range must be page aligned and non-empty")
        pieces = self.layout.split(gpa, size)
        if any(p.region is None for p in pieces):
            return _fail(f"[{gpa:#x}, +{size:#x}) is not all RAM")
        freed = 0
        with self._lock, self.trace.span(INVALIDATION, f"balloon discard {side}", tid, gpa=hex(gpa),
                                         size=size) as args:
            blockers = self._listener_blockers()
            for p in pieces:
                assert p.region is not None
                region = self.regions[p.region]
                s, e = p.gpa // PAGE, p.end // PAGE
                mapped = sum(lst.mapped(p.gpa, p.size) for lst in self.listeners)
                if region.strategy is Strategy.SEPARATE:
                    if side in ("both", "private"):
                        region.punch_private(p.gpa, p.size)
                        self.tracker.dropped(s, e, st.PRIVATE_POP)
                    if side in ("both", "shared"):
                        reason = ("; ".join(blockers) if blockers else
                                  "pages are mapped for DMA" if mapped else
                                  "shared side is hugetlb-backed or preallocated"
                                  if self.policy.shared_backing != "anon" else None)
                        if reason is None and not self.tracker.pinned_runs(s, e):
                            region.discard_shared(p.gpa, p.size)
                            self.tracker.dropped(s, e, st.SHARED_POP)
                        else:
                            self.stats["shared_discards_skipped"] += 1
                            args["skipped"] = reason or "pages pinned for DMA"
                else:
                    if blockers or mapped or self.tracker.pinned_runs(s, e):
                        self.stats["discards_skipped"] += 1
                        args["skipped"] = "; ".join(blockers) or "pages are mapped or pinned for DMA"
                        continue
                    if region.gmem is not None:
                        region.punch_private(p.gpa, p.size)
                    else:
                        region.discard_shared(p.gpa, p.size)
                    self.tracker.dropped(s, e, st.SHARED_POP | st.PRIVATE_POP)
                freed += p.size
            self.stats["balloon_discards"] += 1
            self.stats["balloon_bytes"] += freed
            self.accounting.sample("a balloon discard", tid, force=False)
        return Outcome(True, 0, changed_pages=freed // PAGE)

    # --- pre-fault -----------------------------------------------------------------------------------
    def _want_prefault(self, to_private: bool) -> bool:
        return self.prefault == "all" or (self.prefault == "private" and to_private)

    def prefault_range(self, vcpu: Vcpu | None, gpa: int, size: int, tid: int) -> int:
        """Pre-fault the RAM pieces of ``[gpa, gpa+size)``; returns bytes mapped."""
        done = 0
        for p in self.layout.split(gpa, size):
            if p.region is not None:
                done += self._prefault(vcpu, p.gpa, p.size, tid)
        return done

    def _prefault(self, vcpu: Vcpu | None, gpa: int, size: int, tid: int) -> int:
        if vcpu is None or not self.caps.pre_fault:
            self.stats["prefault_unavailable"] += 1
            return 0
        mapped = 0
        with self.trace.span(PREFAULT, "pre-fault", tid, gpa=hex(gpa), size=size) as args:
            pos, left = gpa, size
            for _ in range(64):  # each call maps at least one page or fails
                try:
                    rest = vcpu.pre_fault_memory(pos, left)
                except KvmError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.ENOENT):
                        self.stats["prefault_unsupported"] += 1
                    else:
                        self.stats["prefault_errors"] += 1
                        self._warn(f"KVM_PRE_FAULT_MEMORY at {pos:#x}: {exc}")
                    break
                mapped += left - rest
                if rest == 0 or rest == left:
                    break
                pos, left = pos + (left - rest), rest
            args["mapped"] = mapped
        self.stats["prefaulted_bytes"] += mapped
        return mapped

    def _warn(self, msg: str) -> None:
        with self._lock:
            if msg not in self.warnings and len(self.warnings) < 20:
                self.warnings.append(msg)

    # --- host view for listeners ------------------------------------------------------------------------
    def shared_view(self, gpa: int, size: int) -> list[tuple[Mapping, int, int, int]]:
        out = []
        for p in self.layout.split(gpa, size):
            if p.region is not None:
                r = self.regions[p.region]
                out.append((r.shared, r.offset(p.gpa), p.gpa, p.size))
        return out

    def shared_runs(self) -> list[tuple[int, int]]:
        out = []
        for r in self.regions:
            s, e = r.spec.gpa // PAGE, r.spec.end // PAGE
            out += [(a * PAGE, (b - a) * PAGE) for a, b, p in self.tracker.kind_runs(s, e) if not p]
        return out

    def ram_runs(self) -> list[tuple[int, int]]:
        return [(r.spec.gpa, r.spec.size) for r in self.regions]

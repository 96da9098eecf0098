"""The vCPU's lazy-accept accelerator (``guestmem/model/kvm/_fastfault.c``) against the Python path.

The accelerator is a C specialisation of ``ModelVcpu.run()`` for an Accept op's common case; the
Python path is the reference.  Every test here runs the same steps in two worlds, one with the
accelerator and one with ``vcpu._fast = None``, and after every step compares the exit (or the
error) and the complete state both worlds can show: attributes, SPTEs and the MMU's counters, the
vCPU's pc/progress/stats, the accepted and RMP maps, the encryption engine's counters, each
guest_memfd's page cache (pages, orders, uptodate, pins, poison), the frame pool (free map,
hints, counters, references, deferred contents) and a digest of every allocated frame's
contents; plus the VM's invariants.  Hostile and edge inputs (holes between memslots, punched and
poisoned pages, pins, conversions both ways, the TDX shared bit, tiny RangeMap chunks, a held
lock, an installed explorer, a monkeypatched method, a pool chunk whose address went out) must
make the accelerator decline before it changes anything.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guestmem
import guestmem.uapi as u
from guestmem import ranges, sync
from guestmem.errors import KvmError
from guestmem.guest.ops import Accept, MapGpaRange, Program, Touch, Verify, Write
from guestmem.model.kvm import vcpu as vcpu_mod
from guestmem.model.mm.encryption import EncryptionEngine
from guestmem.uapi import PAGE_SIZE as PS

FAST = vcpu_mod._fast
pytestmark = pytest.mark.skipif(FAST is None, reason="the _fastfault accelerator is not built "
                                "(or GUESTMEM_PURE is set): nothing to compare")

GPA = 1 << 32
SLOT_PAGES = 24
HOLE_PAGES = 4  # a gap between the two memslots: a private fault there has no memslot
NPAGES = 2 * SLOT_PAGES + HOLE_PAGES  # the guest range the ops address
KEY = bytes(range(64))  # a fixed engine key: both worlds must produce the same ciphertext
FLAVOURS = {"snp": u.KVM_X86_SNP_VM, "tdx": u.KVM_X86_TDX_VM, "sw": u.KVM_X86_SW_PROTECTED_VM}
TDX_SHARED = 1 << 47


class Counting:
    """The accelerator, counting the runs it answered (so a test can fail if it never ran)."""

    def __init__(self) -> None:
        self.answered = 0

    def run_accept(self, vcpu: Any) -> Any:
        ex = FAST.run_accept(vcpu)
        if ex is not NotImplemented:
            self.answered += 1
        return ex

    def __getattr__(self, name: str) -> Any:
        return getattr(FAST, name)


class World:
    """One model system with an SNP/TDX/sw-protected VM, two gmem memslots with a hole between,
    one vCPU; ``fast`` says whether its steps run with the accelerator."""

    def __init__(self, flavour: str, fast: bool) -> None:
        self.fast = fast
        self.counting = Counting()
        self.kvm = guestmem.open("model")
        self.vm = self.kvm.create_vm(FLAVOURS[flavour])
        if hasattr(self.vm.arch, "engine"):
            self.vm.arch.engine = EncryptionEngine(KEY)
        self.gmem = self.vm.create_guest_memfd(2 * SLOT_PAGES * PS, 0)
        self.vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, SLOT_PAGES * PS, 0, self.gmem, 0)
        self.vm.set_user_memory_region2(2, u.KVM_MEM_GUEST_MEMFD, GPA + (SLOT_PAGES + HOLE_PAGES) * PS,
                                        SLOT_PAGES * PS, 0, self.gmem, SLOT_PAGES * PS)
        if hasattr(self.vm.arch, "launch_finalize") and flavour != "sw":
            self.vm.launch_finalize()
        self.vcpu = self.vm.create_vcpu(0)
        self.unpins: list[Callable[[], None]] = []

    def call(self, fn: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
        """Run one step in this world: its outcome as a comparable value."""
        monkeypatch.setattr(vcpu_mod, "_fast", self.counting if self.fast else None)
        try:
            res = fn()
        except KvmError as exc:
            return ("KvmError", exc.errno)
        except (ValueError, TypeError) as exc:
            return (type(exc).__name__, str(exc))
        finally:
            monkeypatch.setattr(vcpu_mod, "_fast", FAST)
        if res is None or isinstance(res, int | bool):
            return res
        fields = sorted(vars(res).items()) if hasattr(res, "__dict__") else None
        return (type(res).__name__, repr(res), fields)

    def state(self) -> dict[str, Any]:
        vm, kvm = self.vm, self.kvm
        self.vm.check_invariants()
        pool = kvm.pool
        mmu = vm.mmu
        arch = vm.arch
        items = lambda m: tuple(m.items())  # noqa: E731
        out: dict[str, Any] = {
            "attributes": items(vm.attributes),
            "sptes": tuple(items(m) for m in mmu.sptes),
            "mmu": (mmu.seq, mmu.in_progress, mmu.range_start, mmu.range_end, dict(mmu.stats),
                    mmu._last_small),
            "vcpu": (self.vcpu.pc, self.vcpu.progress, self.vcpu.halted, dict(self.vcpu.stats),
                     repr(self.vcpu._pending)),
            "bugged": vm.bugged,
            "accepted": items(arch.accepted) if hasattr(arch, "accepted") else None,
            "engine": ((arch.engine.pages_encrypted, arch.engine.pages_decrypted)
                       if hasattr(arch, "engine") else None),
            "pool": (items(pool._free), pool._nfree, tuple(pool._hint), pool.stats.as_dict(),
                     items(pool._refs), items(pool._deferred),
                     pool.deferred_runs()),  # before the digest below settles them
        }
        rmp = getattr(kvm, "rmp", None)
        out["rmp"] = None if rmp is None else (items(rmp.assigned), rmp.directmap_splits,
                                                 rmp.directmap_restores)
        inode = self.gmem.inode
        cache = inode.cache
        out["gmem"] = (items(cache._delta), items(cache._order), items(cache._uptodate),
                       items(cache._refs), cache._nr, cache.stats.as_dict(), items(inode.hwpoison),
                       tuple((s, e, sl.id) for s, e, sl in self.gmem.bindings.items()))
        h = hashlib.blake2b(digest_size=16)
        for pfn, n in pool.allocated_runs():
            h.update(pfn.to_bytes(8, "little"))
            h.update(pool.view(pfn, n).tobytes())
        out["frames"] = h.hexdigest()
        return out


def gpa_of(page: int) -> int:
    return GPA + page * PS


def program(flavour: str, specs: list[tuple[str, int, int, int]]) -> Program:
    ops: list[Any] = []
    for kind, page, n, arg in specs:
        gpa, size = gpa_of(page), n * PS
        if kind == "accept":
            ops.append(Accept(gpa | (TDX_SHARED if flavour == "tdx" and arg % 7 == 6 else 0), size))
        elif kind == "write":
            ops.append(Write(gpa + arg % 64, size - arg % 64 or 1, arg & 0xFF))
        elif kind == "verify":
            ops.append(Verify(gpa, size, arg & 0xFF))
        elif kind == "touch":
            ops.append(Touch(gpa, size, arg & 0xFF, 64))
        else:
            ops.append(MapGpaRange(gpa, n, u.KVM_MAP_GPA_RANGE_ENCRYPTED, None))
    return Program(ops)


page = st.integers(0, NPAGES - 1)
op_spec = st.tuples(st.sampled_from(["accept"] * 6 + ["write", "verify", "touch", "map"]),
                    page, st.integers(1, 6), st.integers(0, 255))
step = st.one_of(
    st.tuples(st.just("run"), st.integers(1, 4)),
    st.tuples(st.just("serve")),
    st.tuples(st.just("convert"), page, st.integers(1, 8), st.booleans()),
    st.tuples(st.just("punch"), st.integers(0, 2 * SLOT_PAGES - 1), st.integers(1, 4)),
    st.tuples(st.just("poison"), st.integers(0, 2 * SLOT_PAGES - 1)),
    st.tuples(st.just("pin"), st.integers(0, 2 * SLOT_PAGES - 1), st.integers(1, 3)),
    st.tuples(st.just("unpin")),
    st.tuples(st.just("load"), st.lists(op_spec, min_size=1, max_size=5)),
)


def do_step(w: World, flavour: str, s: tuple, last: list[Any]) -> Callable[[], Any]:
    """The step as a call on world ``w``; ``last`` holds each world's last exit (for "serve")."""
    kind = s[0]
    vm, gmem = w.vm, w.gmem
    if kind == "run":
        def run() -> Any:
            ex = None
            for _ in range(s[1]):
                ex = w.vcpu.run()
                last[0] = ex
                if type(ex).__name__ != "ExitMemoryFault":
                    break
            return ex
        return run
    if kind == "serve":  # what a VMM does with a memory-fault exit: convert the page as asked
        def serve() -> Any:
            ex = last[0]
            if type(ex).__name__ != "ExitMemoryFault":
                return None
            attrs = u.KVM_MEMORY_ATTRIBUTE_PRIVATE if ex.flags & u.KVM_MEMORY_EXIT_FLAG_PRIVATE else 0
            return vm.set_memory_attributes(ex.gpa, ex.size, attrs)
        return serve
    if kind == "convert":
        attrs = u.KVM_MEMORY_ATTRIBUTE_PRIVATE if s[3] else 0
        return lambda: vm.set_memory_attributes(gpa_of(s[1]), min(s[2], NPAGES - s[1]) * PS, attrs)
    if kind == "punch":
        mode = u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE
        return lambda: gmem.fallocate(mode, s[1] * PS, min(s[2], 2 * SLOT_PAGES - s[1]) * PS)
    if kind == "poison":
        return lambda: gmem.memory_failure(s[1] * PS)
    if kind == "pin":
        def pin() -> None:
            w.unpins.append(gmem.pin_pages(s[1], min(s[1] + s[2], 2 * SLOT_PAGES)))
        return pin
    if kind == "unpin":
        def unpin() -> None:
            if w.unpins:
                w.unpins.pop(0)()
        return unpin
    return lambda: w.vcpu.load(program(flavour, s[1]))


def compare(flavour: str, steps: list[tuple], monkeypatch: pytest.MonkeyPatch) -> tuple[World, World]:
    fast, slow = World(flavour, True), World(flavour, False)
    lasts: dict[bool, list[Any]] = {True: [None], False: [None]}
    assert fast.state() == slow.state()
    for i, s in enumerate(steps):
        got = [w.call(do_step(w, flavour, s, lasts[w.fast]), monkeypatch) for w in (fast, slow)]
        assert got[0] == got[1], f"step {i} {s}: the worlds answered differently"
        a, b = fast.state(), slow.state()
        assert a == b, f"step {i} {s}: state differs in {sorted(k for k in a if a[k] != b[k])}"
    return fast, slow


def lazy_accept(n: int, start: int = 0) -> list[tuple]:
    """Accept n pages lazily: run, serve the exit, run again ... (the fault-and-convert loop)."""
    return [("load", [("accept", start, n, 0)]), *[("run", 1), ("serve",)] * (n + 1), ("run", 1)]


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_lazy_accept_is_answered_by_the_accelerator(flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's loop: every fault but the first few is answered in C, and the worlds agree."""
    fast, slow = compare(flavour, lazy_accept(12), monkeypatch)
    assert fast.counting.answered >= 10
    assert slow.counting.answered == 0
    assert fast.vcpu.pc == 1 and fast.vcpu.progress == 0


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_one_page_accepts_spread_out(flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's sampled mode: one Accept op per page, spread over the guest (and over the hole);
    the accelerator carries on from one Accept op to the next."""
    specs = [("accept", p, 1, 0) for p in range(0, NPAGES, 5)]
    steps = [("load", specs), *[("run", 1), ("serve",)] * (len(specs) + 2), ("run", 1)]
    fast, _ = compare(flavour, steps, monkeypatch)
    assert fast.counting.answered >= len(specs) - 3


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_accept_over_a_hole_and_the_second_slot(flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The range crosses the gap between the memslots: a private fault there has no memslot."""
    steps = [("convert", 0, NPAGES, True), ("convert", SLOT_PAGES - 2, 8, False)]
    steps += lazy_accept(10, SLOT_PAGES - 3)
    steps += [("run", 2), ("serve",), ("run", 2)]
    fast, _ = compare(flavour, steps, monkeypatch)
    assert fast.counting.answered >= 1


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_punched_poisoned_and_pinned_pages(flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = lazy_accept(6)
    steps += [("punch", 2, 2), ("poison", 4), ("pin", 1, 2), ("load", [("accept", 0, 8, 0)])]
    steps += [("run", 1), ("serve",)] * 10 + [("unpin",), ("punch", 4, 1), ("run", 3), ("serve",), ("run", 3)]
    compare(flavour, steps, monkeypatch)


def test_tdx_shared_bit_and_already_accepted_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Accept through the TDX shared GPA bit decodes to the private gfn; accepting pages already
    accepted leaves their contents alone (TDX_PAGE_ALREADY_ACCEPTED)."""
    again = [("write", 0, 2, 0x5A), ("accept", 0, 4, 6), ("verify", 0, 2, 0x5A)]
    steps = [*lazy_accept(4), ("load", again), ("run", 2), ("serve",), ("run", 3)]
    compare("tdx", steps, monkeypatch)


def test_sw_protected_is_left_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, _ = compare("sw", lazy_accept(3), monkeypatch)
    assert fast.counting.answered == 0  # Accept is a no-op there; the accelerator never answers


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_tiny_rangemap_chunks(flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With RangeMap chunks of 2 the maps leave the flat layout early (and some come back): the
    accelerator edits those through their own methods (only while this is the only thread), and
    every map it edits in place must stay exactly what the Python path makes of it."""
    monkeypatch.setattr(ranges, "_LOAD", 2)
    # Fragment the attributes over the second slot, accept the first lazily, then every third
    # page of the second (SPTEs, page cache and accepted maps fragment too).
    steps = [("convert", p, 1, True) for p in range(SLOT_PAGES + HOLE_PAGES, NPAGES, 2)] + lazy_accept(14)
    specs = [("accept", p, 1, 0) for p in range(SLOT_PAGES + HOLE_PAGES, NPAGES, 3)]
    steps += [("punch", 3, 2), ("load", specs), *[("run", 1), ("serve",)] * (len(specs) + 2), ("run", 1)]
    fast, _ = compare(flavour, steps, monkeypatch)
    assert any(type(m) is not ranges.RangeMap for m in (fast.vm.attributes, fast.vm.mmu.sptes[0]))
    if threading.active_count() == 1:  # (an earlier test's idle thread makes it decline instead)
        # Single-threaded, the maps past the flat layout are served through their own methods.
        assert fast.counting.answered >= 8


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=30))
def test_random_programs_agree(flavour: str, steps: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    compare(flavour, [("load", [("accept", 0, NPAGES, 0)]), *steps], monkeypatch)


# --- declining: NotImplemented before anything changes --------------------------------------------

def _world_at_a_fault(flavour: str = "snp") -> World:
    w = World(flavour, True)
    w.vcpu.load(Program([Accept(GPA, 4 * PS)]))
    ex = w.vcpu.run()  # the first fault (creates the RMP, the cipher context): the Python path
    w.vm.set_memory_attributes(ex.gpa, ex.size, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    ex = w.vcpu.run()
    w.vm.set_memory_attributes(ex.gpa, ex.size, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return w


def _declines(w: World, during: Callable[[], Any] | None = None) -> None:
    before = w.state()
    if during is None:
        assert FAST.run_accept(w.vcpu) is NotImplemented
    else:
        during()
    assert w.state() == before


def test_it_answers_at_a_fault() -> None:
    w = _world_at_a_fault()
    ex = FAST.run_accept(w.vcpu)
    assert type(ex).__name__ == "ExitMemoryFault" and ex.gpa == GPA + 2 * PS


def _held_by_another_thread(lock: Any, body: Callable[[], None]) -> None:
    """Run ``body`` on this thread while another thread holds ``lock`` (a ``with`` guard)."""
    taken, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            taken.set()
            done.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert taken.wait(10)
        body()
    finally:
        done.set()
        t.join()


def test_declines_with_a_lock_held() -> None:
    w = _world_at_a_fault()

    def declined() -> None:
        assert FAST.run_accept(w.vcpu) is NotImplemented

    for lock in (w.vm.mmu_lock(), w.gmem.inode.invalidate_lock.write(), w.kvm.pool._lock,
                 w.gmem.inode.cache._lock, w.vcpu._running):
        _declines(w, lambda lock=lock: _held_by_another_thread(lock, declined))
    # ... and with one held by this thread (the vCPU thread never holds one at KVM_RUN): the
    # accelerator sees this thread's lock stack, even for a lock it would not otherwise look at.
    before = w.state()
    for lock in (w.vm.mmu_lock(), w.vm.slots_lock()):
        with lock:
            assert FAST.run_accept(w.vcpu) is NotImplemented
    assert w.state() == before
    ex = FAST.run_accept(w.vcpu)  # free again: answered
    assert type(ex).__name__ == "ExitMemoryFault"


def test_declines_under_the_explorer() -> None:
    class Quiet:
        def point(self, name: str, ready: Any, info: tuple) -> None:
            pass

    w = _world_at_a_fault()
    old = sync.set_explorer(Quiet())
    try:
        _declines(w)
    finally:
        sync.set_explorer(old)


def test_declines_when_a_method_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    from guestmem.model.mm.pagecache import PageCache

    w = _world_at_a_fault()
    original = PageCache.get_page
    calls: list[int] = []

    def get_page(self: PageCache, index: int, **kw: Any) -> tuple[int, int]:
        calls.append(index)
        return original(self, index, **kw)

    monkeypatch.setattr(PageCache, "get_page", get_page)
    _declines(w)
    ex = w.vcpu.run()  # the Python path, through the replacement
    assert calls and type(ex).__name__ == "ExitMemoryFault"
    monkeypatch.undo()
    # A method inherited from a base class, replaced there.
    from guestmem.model.kvm.arch.encrypted import EncryptedFlavour

    monkeypatch.setattr(EncryptedFlavour, "mark_accepted", EncryptedFlavour.mark_accepted)
    w = _world_at_a_fault()  # the same function set again: a re-check finds the original
    assert type(FAST.run_accept(w.vcpu)).__name__ == "ExitMemoryFault"
    monkeypatch.setattr(EncryptedFlavour, "mark_accepted", lambda *a: None)
    _declines(_world_at_a_fault())


def test_declines_on_a_poisoning_pool_and_an_exposed_chunk() -> None:
    w = _world_at_a_fault()
    w.kvm.pool.poison = 0xCC
    _declines(w)
    w2 = _world_at_a_fault("tdx")
    w2.kvm.pool.chunk_address(0)  # a mapper outside the pool: FramePool.defer writes at once there
    # The fault itself defers nothing; the ACCEPT after it would: the C stops there.
    before_pc = w2.vcpu.pc
    ex = FAST.run_accept(w2.vcpu)
    assert ex is NotImplemented and w2.vcpu.pc == before_pc
    assert w2.kvm.pool.deferred_runs() == []


# --- the accelerator's RangeMap.set, held to the Python one -------------------------------------

def _spte(k: int) -> Any:
    from guestmem.model.kvm.mmu import Spte

    return Spte(bool(k & 1), 0, k >> 1, not k & 2)


value = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(0, 7).map(_spte))


@settings(max_examples=300, deadline=None)
@given(default=st.sampled_from([None, False, 0]),
       edits=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12), value), min_size=1, max_size=25),
       compiled=st.booleans())
def test_rangemap_set_matches_python(default: Any, edits: list[tuple[int, int, Any]], compiled: bool) -> None:
    """Same intervals, same value objects kept (identity), after every edit: in the flat layout
    (edited in place by the accelerator) and in the compiled one (edited through the RangeMap core's
    C API with the accelerator's own Spte comparison)."""
    if not vcpu_mod._fast_ready:
        vcpu_mod._fast_setup()
    saved = ranges._native
    if not compiled:
        ranges._native = None  # maps made now take the Python flat layout
    try:
        a, b = ranges.RangeMap(default), ranges.RangeMap(default)
    finally:
        ranges._native = saved
    layout = type(b)
    assert (layout is not ranges.RangeMap) == (compiled and saved is not None)
    for start, n, v in edits:
        a.set(start, start + n, v)
        done = FAST.rangemap_set(b, start, start + n, v)
        if layout is not ranges.RangeMap:
            assert done is None  # the compiled layout is always served by the C API
        if done is NotImplemented:
            b.set(start, start + n, v)
        assert type(b) is layout
        assert [(s, e) for s, e, _ in a.items()] == [(s, e) for s, e, _ in b.items()]
        # both maps were given the same value objects: a merge must keep the same one
        assert all(x is y for (_, _, x), (_, _, y) in zip(a.items(), b.items(), strict=True))
        b.check()


def test_a_refused_setup_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that does not fit this tree (here: a RangeMap without the flat slots it reads)
    is turned off at first use, and the Python path runs."""

    class Other:  # RangeMap's methods, not its flat layout's slots
        __slots__ = ("x",)
        get, set, segments = ranges.RangeMap.get, ranges.RangeMap.set, ranges.RangeMap.segments

    w = World("snp", True)
    w.vcpu.load(Program([Accept(GPA, PS)]))
    monkeypatch.setattr(vcpu_mod, "_fast_ready", False)
    monkeypatch.setattr(vcpu_mod, "_fast_why", "")
    monkeypatch.setattr(ranges, "RangeMap", Other)  # what setup hands over: not the layout it reads
    try:
        assert type(w.vcpu.run()).__name__ == "ExitMemoryFault"
        assert vcpu_mod._fast is None and "layout" in vcpu_mod._fast_why
    finally:
        monkeypatch.undo()
        vcpu_mod._fast, vcpu_mod._fast_ready = FAST, False

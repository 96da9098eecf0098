"""The compiled one-page conversion steps (guestmem/model/_fastconv.c) against the Python paths.

``KVM_SET_MEMORY_ATTRIBUTES`` and ``madvise(MADV_REMOVE)`` of one page have a compiled common case
that must be indistinguishable from the Python reference.  Each test runs the same operations on
two fresh machines, one with the accelerator and one with it switched off (the module references
set to None), and compares the complete state after every step: attributes, SPTEs, the open
invalidation and its sequence, MIXED tracking, host PTEs of every mapping, the page caches of both
files, frames, the counters, and each call's result or error; ``check_invariants`` after each step.
Hostile arguments, layouts a one-page edit would change (``_LOAD`` lowered), a lock held, the
explorer set, mapped SPTEs, populated pages and a second mapping mix fast and refused cases.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guestmem
import guestmem.uapi as u
from guestmem import ranges, sync
from guestmem.errors import KvmError
from guestmem.model import process as process_mod
from guestmem.model.kvm import attributes as attributes_mod
from guestmem.vmm import Machine, MachineConfig, RegionSpec

FAST = attributes_mod.FAST
pytestmark = pytest.mark.skipif(FAST is None,
                                reason="guestmem.model._fastconv is not built (or GUESTMEM_PURE)")

GPA = 1 << 32
PAGE = u.PAGE_SIZE
NPAGES = 1024  # 4 MiB: two 2 MiB hugepages, so MIXED tracking has work
PRIV = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
MADV_REMOVE = 9


def _machine(flavour: str) -> Machine:
    kvm = guestmem.open("model")
    cfg = MachineConfig(regions=(RegionSpec("ram", GPA, NPAGES * PAGE),), flavour=flavour, slack=4 << 20)
    return Machine(kvm, cfg)


def _items(m: object) -> tuple:
    return tuple(m.items())  # type: ignore[attr-defined]


def _cache(cache: object) -> tuple:
    c = cache
    return (_items(c._delta), _items(c._order), _items(c._uptodate), _items(c._refs), c._nr,  # type: ignore[attr-defined]
            repr(c.stats))  # type: ignore[attr-defined]


def state(m: Machine, extra: list) -> dict:
    r = m.regions[0]
    vm = r.vm
    mmu = vm.mmu
    vm.check_invariants()
    slots = []
    for ms in vm.memslots:
        for sl in ms:
            slots.append((sl.as_id, sl.id, sl.base_gfn, sl.npages,
                          tuple(sorted((o, _items(mx)) for o, mx in sl.lpage_mixed.items()))))
    proc = vm.system.process
    return {
        "attributes": _items(vm.attributes),
        "sptes": tuple(_items(s) for s in mmu.sptes),
        "invalidation": (mmu.seq, mmu.in_progress, mmu.range_start, mmu.range_end,
                         tuple(vm._notifier_begun)),
        "mmu_stats": dict(mmu.stats),
        "system_stats": dict(vm.system.stats),
        "slots": tuple(sorted(slots)),
        "mapped": tuple(sorted((mp.addr, mp.pgoff, mp.length, _items(mp.mapped)) for mp in proc.mappings())),
        "shared_cache": _cache(r.shared.file.cache),
        "gmem_cache": _cache(r.gmem.inode.cache) if hasattr(r.gmem, "inode") else None,
        "pool": (vm.system.pool.allocated, vm.system.pool.deferred),
        "arch": tuple(_items(getattr(vm.arch, k)) for k in ("accepted", "assigned") if hasattr(vm.arch, k)),
        "extra_mappings": len(extra),
    }


def _outcome(fn) -> object:
    try:
        return ("ok", fn())
    except KvmError as e:
        return ("KvmError", e.errno)
    except (TypeError, OverflowError, ValueError) as e:
        return (type(e).__name__,)


# One step of a workload: (kind, a, b, c).  Pages index the region; hostile values are spelled out.
_page = st.one_of(st.sampled_from([0, 1, 2, 255, 510, 511, 512, 513, 1022, 1023]), st.integers(0, NPAGES - 1))
_steps = st.one_of(
    st.tuples(st.just("attr"), _page, st.sampled_from([1, 1, 1, 1, 2, 512]), st.sampled_from([0, PRIV])),
    st.tuples(st.just("attr_hostile"), _page,
              st.sampled_from(["flags", "attr3", "unaligned", "size0", "float", "huge", "bool", "neg"]),
              st.just(0)),
    st.tuples(st.just("remove"), _page, st.sampled_from([1, PAGE, PAGE, PAGE, 2 * PAGE]), st.just(0)),
    st.tuples(st.just("remove_hostile"), _page, st.sampled_from(["advice", "past", "unaligned", "float",
                                                                 "dontneed"]), st.just(0)),
    st.tuples(st.just("write"), _page, st.integers(1, 3), st.just(0)),
    st.tuples(st.just("prefault"), _page, st.integers(1, 4), st.just(0)),
    st.tuples(st.just("locked"), _page, st.sampled_from([0, PRIV]), st.just(0)),
    st.tuples(st.just("explorer"), _page, st.sampled_from([0, PRIV]), st.just(0)),
    st.tuples(st.just("second_mapping"), _page, st.just(0), st.just(0)),
    st.tuples(st.just("memslot_move"), st.just(0), st.just(0), st.just(0)),
)


class _NullExplorer:
    def point(self, name: str, ready: object, info: object) -> None:
        pass


def apply(m: Machine, step: tuple, extra: list) -> object:
    kind, page, a, b = step
    r = m.regions[0]
    vm = r.vm
    gpa = GPA + page * PAGE
    sm = r.shared
    if kind == "attr":
        n = min(a, NPAGES - page)
        return _outcome(lambda: vm.set_memory_attributes(gpa, n * PAGE, b))
    if kind == "attr_hostile":
        args = {"flags": (gpa, PAGE, PRIV, 1), "attr3": (gpa, PAGE, 3, 0),
                "unaligned": (gpa + 1, PAGE, PRIV, 0),
                "size0": (gpa, 0, PRIV, 0), "float": (float(gpa), PAGE, PRIV, 0),
                "huge": (1 << 64, PAGE, PRIV, 0), "bool": (gpa, PAGE, True, 0),
                "neg": (-PAGE, PAGE, 0, 0)}[a]
        return _outcome(lambda: vm.set_memory_attributes(*args))
    if kind == "remove":
        n = a if page + (a + PAGE - 1) // PAGE <= NPAGES else PAGE
        return _outcome(lambda: sm.madvise(page * PAGE, n, MADV_REMOVE))
    if kind == "remove_hostile":
        args = {"advice": (page * PAGE, PAGE, 12345), "past": (NPAGES * PAGE, PAGE, MADV_REMOVE),
                "unaligned": (page * PAGE + 8, PAGE, MADV_REMOVE),
                "float": (page * PAGE, 4096.0, MADV_REMOVE),
                "dontneed": (page * PAGE, PAGE, 4)}[a]
        return _outcome(lambda: sm.madvise(*args))
    if kind == "write":
        n = min(a, NPAGES - page)
        return _outcome(lambda: sm.write(page * PAGE, bytes([page & 0xFF]) * (n * PAGE)))
    if kind == "prefault":
        if not vm.vcpus:
            vm.create_vcpu(0)
        n = min(a, NPAGES - page)
        return _outcome(lambda: vm.vcpus[0].pre_fault_memory(gpa, n * PAGE))
    if kind == "locked":
        with vm.slots_lock():
            return _outcome(lambda: vm.set_memory_attributes(gpa, PAGE, a))
    if kind == "explorer":
        old = sync.set_explorer(_NullExplorer())
        try:
            first = _outcome(lambda: vm.set_memory_attributes(gpa, PAGE, a))
            second = _outcome(lambda: sm.madvise(page * PAGE, PAGE, MADV_REMOVE))
        finally:
            sync.set_explorer(old)
        return first, second
    if kind == "second_mapping":
        if not extra:
            extra.append(vm.system.process.mmap(sm.file, NPAGES * PAGE, 0))
        return _outcome(lambda: extra[0].madvise(page * PAGE, PAGE, MADV_REMOVE))
    if kind == "memslot_move":
        # Delete the memslot and put it back: MIXED recomputed, SPTEs zapped, a new slot object.
        def move() -> None:
            vm.set_user_memory_region2(r.slot, u.KVM_MEM_GUEST_MEMFD, GPA, 0, sm.addr, r.gmem, 0)
            vm.set_user_memory_region2(r.slot, u.KVM_MEM_GUEST_MEMFD, GPA, NPAGES * PAGE, sm.addr, r.gmem, 0)
        return _outcome(move)
    raise AssertionError(kind)


def _switch(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(attributes_mod, "FAST", FAST if on else None)
    monkeypatch.setattr(process_mod, "_FAST", FAST if on else None)


def run_both(monkeypatch: pytest.MonkeyPatch, flavour: str, steps: list[tuple]) -> None:
    machines = {}
    extras: dict[bool, list] = {True: [], False: []}
    for on in (True, False):
        _switch(monkeypatch, on)
        machines[on] = _machine(flavour)
    for i, step in enumerate(steps):
        outs, states = {}, {}
        for on in (True, False):
            _switch(monkeypatch, on)
            outs[on] = apply(machines[on], step, extras[on])
            states[on] = state(machines[on], extras[on])
        assert outs[True] == outs[False], (i, step)
        for k in states[True]:
            assert states[True][k] == states[False][k], (i, step, k)
    _switch(monkeypatch, True)


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
@pytest.mark.parametrize("load", [512, 4])
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(_steps, min_size=1, max_size=30))
def test_random_sequences_match_python(monkeypatch: pytest.MonkeyPatch, flavour: str, load: int,
                                       steps: list[tuple]) -> None:
    """Random mixes of fast and refused cases leave identical state, step by step.  With
    ``_LOAD`` at 4 the maps change layout (flat, native) under the one-page edits."""
    with monkeypatch.context() as mp:
        mp.setattr(ranges, "_LOAD", load)
        run_both(mp, flavour, steps)


@pytest.mark.parametrize("flavour", ["snp", "tdx"])
def test_lazy_accept_pattern_matches_python(monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    """The conversion the VMM makes per lazily accepted page, over every page of two hugepages,
    with a few pages populated, pre-faulted or converted back on the way."""
    steps: list[tuple] = [("write", 5, 2, 0), ("prefault", 700, 3, 0), ("attr", 600, 1, PRIV)]
    for p in list(range(0, 512)) + list(range(512, NPAGES, 7)):
        steps += [("attr", p, 1, PRIV), ("remove", p, PAGE, 0)]
    # A whole hugepage private (MIXED cleared), then one page back and forth, a move, and back.
    steps += [("attr", 7, 1, 0), ("attr", 7, 1, PRIV), ("memslot_move", 0, 0, 0), ("attr", 8, 1, 0)]
    steps += [("attr", p, 1, 0) for p in range(0, 512, 2)]
    run_both(monkeypatch, flavour, steps)


def test_fast_paths_run_in_the_common_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator really takes the common case (the Python bodies are not reached)."""
    m = _machine("snp")
    r = m.regions[0]

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(attributes_mod, "set_vm_memory_attributes", boom)
    monkeypatch.setattr(type(m.kvm.process), "invalidate_file_range", boom)
    before = r.vm.mmu.seq
    r.vm.set_memory_attributes(GPA + 10 * PAGE, PAGE, PRIV)
    r.shared.madvise(10 * PAGE, PAGE, MADV_REMOVE)
    assert r.vm.mem_is_private(GPA // PAGE + 10)
    assert r.vm.mmu.seq == before + 2  # one invalidation each
    assert r.vm.system.stats["conversions"] == 1
    r.vm.check_invariants()


def test_refused_cases_leave_nothing_changed() -> None:
    """A refused fast call (NotImplemented) changes nothing; hostile arguments raise from the
    Python path with the errno the rules give."""
    m = _machine("snp")
    r = m.regions[0]
    vm = r.vm
    s0 = state(m, [])
    assert FAST.set_attributes_one(vm, GPA, PAGE, 3, 0) is NotImplemented
    assert FAST.set_attributes_one(vm, GPA, 2 * PAGE, PRIV, 0) is NotImplemented
    assert FAST.set_attributes_one(vm, GPA + 1, PAGE, PRIV, 0) is NotImplemented
    assert FAST.set_attributes_one(vm, True, PAGE, PRIV, 0) is NotImplemented
    assert FAST.discard_one(r.shared, 0, PAGE, 4) is NotImplemented
    assert FAST.discard_one(r.shared, NPAGES * PAGE, PAGE, MADV_REMOVE) is NotImplemented
    r.shared.write(0, b"x")  # a populated page: its frame must be freed, by the Python path
    s1 = state(m, [])
    assert FAST.discard_one(r.shared, 0, PAGE, MADV_REMOVE) is NotImplemented
    assert state(m, []) == s1
    with pytest.raises(KvmError) as ei:
        vm.set_memory_attributes(GPA, PAGE, 3)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        vm.set_memory_attributes(GPA, PAGE, PRIV, 0.0)
    with pytest.raises(OverflowError):
        vm.set_memory_attributes(1 << 64, PAGE, PRIV)
    with pytest.raises(KvmError) as ei:
        r.shared.madvise(NPAGES * PAGE, PAGE, MADV_REMOVE)
    assert ei.value.errno == errno.ENOMEM
    assert s0["attributes"] == state(m, [])["attributes"]


def test_closed_vm_and_mapping_refuse() -> None:
    """EBADF cases are the Python path's: the fast path refuses a closed VM fd or mapping."""
    m = _machine("snp")
    r = m.regions[0]
    sm = r.shared
    extra = m.kvm.process.mmap(sm.file, NPAGES * PAGE, 0)
    extra.close()
    assert FAST.discard_one(extra, 0, PAGE, MADV_REMOVE) is NotImplemented
    with pytest.raises(KvmError) as ei:
        extra.madvise(0, PAGE, MADV_REMOVE)
    assert ei.value.errno == errno.EBADF


def test_a_lock_held_elsewhere_sends_the_call_to_python() -> None:
    """Where another thread holds slots_lock, mmu_lock, the process's lock or the page cache's, the
    compiled path refuses (the Python path would wait for it), changing nothing."""
    import threading

    m = _machine("tdx")
    r = m.regions[0]
    vm = r.vm
    locks = {
        "slots_lock": (vm.slots_lock(), "attr"),
        "mmu_lock": (vm.mmu_lock(), "both"),
        "process": (vm.system.process._lock, "remove"),
        "cache": (r.shared.file.cache._lock, "remove"),
    }
    for name, (lock, which) in locks.items():
        before = state(m, [])  # (it takes the locks itself: not while another thread holds one)
        held, release = threading.Event(), threading.Event()

        def hold(lock: object = lock, held: threading.Event = held,
                 release: threading.Event = release) -> None:
            with lock:  # type: ignore[attr-defined]
                held.set()
                release.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(30)
        try:
            if which in ("attr", "both"):
                assert FAST.set_attributes_one(vm, GPA + PAGE, PAGE, PRIV, 0) is NotImplemented, name
            if which in ("remove", "both"):
                assert FAST.discard_one(r.shared, PAGE, PAGE, MADV_REMOVE) is NotImplemented, name
        finally:
            release.set()
            t.join(30)
        assert state(m, []) == before, name
    assert FAST.set_attributes_one(vm, GPA + PAGE, PAGE, PRIV, 0) is None
    assert FAST.discard_one(r.shared, PAGE, PAGE, MADV_REMOVE) is None
    vm.check_invariants()


def test_a_class_it_was_not_written_for_switches_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure() refuses a RangeMap class without the slots it reads, changing nothing (the
    module keeps working), and configure_fast then turns the accelerator off for the process."""

    class NoSlots:
        pass

    with pytest.raises(TypeError):
        FAST.configure(NoSlots, None, ranges, sync, sync._held, object, object, object)
    m = _machine("snp")
    assert FAST.set_attributes_one(m.regions[0].vm, GPA, PAGE, PRIV, 0) is None  # still configured

    class Refusing:
        def configure(self, *args: object) -> None:
            raise TypeError("not the classes it was written for")

    monkeypatch.setattr(attributes_mod, "FAST", Refusing())
    monkeypatch.setattr(process_mod, "_FAST", FAST)
    attributes_mod.configure_fast(object, object, object)
    assert attributes_mod.FAST is None and process_mod._FAST is None
    m.regions[0].vm.set_memory_attributes(GPA + PAGE, PAGE, PRIV)  # the Python path
    m.regions[0].discard_shared(GPA + PAGE, PAGE)
    m.regions[0].vm.check_invariants()

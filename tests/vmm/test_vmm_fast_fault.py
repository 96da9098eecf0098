"""The one-page memory-fault path (``ConversionManager._fault_page``) against the general
conversion path it specialises: the same guest programs, the same host actions and the same
hostile exits run once with ``guestmem.vmm.convert.FAST_FAULT`` on and once with it off, on fresh
model systems, and everything observable must come out the same -- verdicts and outcomes, the
conversion counters (with their order), the tracker's state, pins and deferred discards, the
accounting samples, peak and violations, the memory map snapshot, and the model's complete state
(attributes, SPTEs, page caches with their contents, frames, RMP/accept state).

Accounting is made deterministic for the comparison: either every conversion takes a full
measurement (no gap) or none does (an endless gap, so only the O(1) frame count is checked).
"""

from __future__ import annotations

import errno
import os
import random
import types
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from vmm_helpers import GPA, PAGE, PRIVATE_FLAG, SZ_2M, E, MiB

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitMemoryFault
from guestmem.errors import CapabilityMissing
from guestmem.fuzz.snapshot import snapshot as model_snapshot
from guestmem.guest.ops import Accept, MapGpaRange, Op, Program, Sync, Touch, Verify, Write
from guestmem.model.mm import encryption
from guestmem.scenarios import load, shipped
from guestmem.scenarios.run import run_scenario
from guestmem.vmm import Machine, MachineConfig, RegionSpec
from guestmem.vmm import accounting as acct_mod
from guestmem.vmm import convert as convert_mod
from guestmem.vmm.policy import DiscardPolicy
from guestmem.vmm.trace import EventTrace

HOLE = GPA + 64 * PAGE  # a 16-page MMIO hole between the two regions
REGIONS = (RegionSpec("low", GPA, 64 * PAGE), RegionSpec("high", HOLE + 16 * PAGE, 32 * PAGE))
RAM_PAGES = [GPA + i * PAGE for i in range(64)] + [HOLE + (16 + i) * PAGE for i in range(32)]


def _normal(snap: dict[str, Any]) -> dict[str, Any]:
    """The model snapshot without object ids (they differ between two systems, nothing else may)."""
    vms = []
    for st in snap["vms"].values():
        st = dict(st)
        st["vcpus"] = tuple(v[:5] for v in st["vcpus"])
        st["slots"] = tuple(s[:6] + s[7:] for s in st["slots"])
        vms.append(st)
    files = []
    for f in snap["files"].values():
        f = dict(f)
        if "files" in f:
            f["files"] = tuple((*g[:3], tuple(b[:2] for b in g[3])) for g in f["files"])
        files.append(f)
    return {"closed": snap["closed"], "fds": tuple(fd[:2] + fd[3:] for fd in snap["fds"]),
            "mappings": tuple(m[:3] + m[4:] for m in snap["mappings"]), "vms": vms,
            "files": sorted(files, key=repr),  # live_files() is in no particular order
            "pool": snap["pool"]}


def observe(m: Machine) -> dict[str, Any]:
    """Everything the VMM layer and the model show after a run."""
    m.vm.check_invariants()  # type: ignore[attr-defined]
    t, a = m.tracker, m.accounting
    return {
        "stats": list(m.converter.stats.items()),  # order too: a summary prints it
        "warnings": list(m.converter.warnings),
        "state": tuple(t.state.items()),
        "pins": tuple(t.pins.items()),
        "deferred": tuple(t.deferred_discard.items()),
        "counts": t.counts(),
        "samples": a.samples,
        "peak": a.peak,
        "frames_peak": a.frames_peak(),
        "violations": [(v.at, v.resident_pages, v.limit_pages, v.double_pages) for v in a.violations],
        "map": m.snapshot(64 * 1024),
        "iommu": m.iommu.stats() if m.iommu is not None else None,
        "model": _normal(model_snapshot(m.kvm)),
    }


@pytest.fixture(params=["measure-always", "measure-never"])
def sampling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "measure-always":
        monkeypatch.setattr(acct_mod, "MIN_SAMPLE_GAP_NS", 0)
        monkeypatch.setattr(acct_mod, "MEASURE_COST_FACTOR", 0)
    else:
        monkeypatch.setattr(acct_mod, "MIN_SAMPLE_GAP_NS", 1 << 62)
    return str(request.param)


Action = Callable[[Machine, ExitStack, int], None]
"""A host action run at ``Sync(value)``: ``action(machine, pins, value)``."""


def _seeded_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's memory encryption draws its per-VM keys (and scrub keys) from ``os.urandom``:
    the same stream for both runs makes their page contents comparable byte for byte."""
    rng = random.Random(10)
    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake_os.urandom = lambda n: rng.randbytes(n)
    monkeypatch.setattr(encryption, "os", fake_os)


def _both(run: Callable[[], dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(convert_mod, "FAST_FAULT", True)
    _seeded_urandom(monkeypatch)
    fast = run()
    monkeypatch.setattr(convert_mod, "FAST_FAULT", False)
    _seeded_urandom(monkeypatch)
    slow = run()
    monkeypatch.setattr(convert_mod, "FAST_FAULT", True)
    for key in slow:
        assert fast[key] == slow[key], f"fast and general paths differ in {key}"
    return fast


def run_machine(ops: list[Op], *, kvm_options: dict[str, Any] | None = None, on_sync: Action | None = None,
                trace: bool = False, **config: Any) -> dict[str, Any]:
    kvm = guestmem.open("model", **(kvm_options or {}))
    try:
        cfg = MachineConfig(regions=REGIONS, **{"slack": 0, **config})
        with Machine(kvm, cfg, trace=EventTrace(enabled=trace)) as m, ExitStack() as pins:
            m.create_vcpus(1)
            m.load({0: Program(ops)})

            def sync(_vid: int, _vcpu: object, value: int) -> None:
                if on_sync is not None:
                    on_sync(m, pins, value)

            res = m.run(on_sync=sync, timeout_s=120)
            pins.close()
            out = observe(m)
            out["result"] = (res.ok, res.error, [(v.status, v.error, dict(v.exits)) for v in res.vcpus])
            if trace:
                out["trace"] = sorted(m.trace.counts().items())
            return out
    finally:
        kvm.close()


# --- fixed workloads over every branch of the fast path ---------------------------------------------

def _lifecycle(accept: bool) -> list[Op]:
    """Private, shared again, private again, page by page and in ranges, in both regions;
    page-crossing accesses; faults that need no conversion.  With ``accept`` (SNP/TDX-like) the
    guest accepts before each private access (the accept's own faults are the lazy-accept path);
    without it the conversions are hypercalls and the host's."""
    def acc(gpa: int, size: int) -> list[Op]:
        return [Accept(gpa, size)] if accept else [MapGpaRange(gpa, size // PAGE, E)]

    return [*acc(GPA, 16 * PAGE),
            *acc(GPA + 16 * PAGE, 8 * PAGE),
            Write(GPA + 16 * PAGE, 8 * PAGE, 0x11, "private"),
            Write(GPA + 2 * PAGE - 8, 16, 0x22, "shared"),  # crosses a page boundary
            Verify(GPA + 16 * PAGE, 8 * PAGE, 0x11, "private"),
            Write(GPA + 20 * PAGE, 2 * PAGE, 0x33, "shared"),
            MapGpaRange(GPA + 24 * PAGE, 4, E),
            *acc(GPA + 24 * PAGE, 4 * PAGE),
            Write(GPA + 24 * PAGE, 4 * PAGE, 0x44, "private"),
            MapGpaRange(GPA + 24 * PAGE, 2, 0),
            Touch(GPA + 30 * PAGE, 6 * PAGE, 0x55, access="shared"),
            *acc(GPA + 30 * PAGE, 6 * PAGE),
            Touch(GPA + 30 * PAGE, 6 * PAGE, 0x56, access="private"),
            *acc(HOLE + 16 * PAGE, 4 * PAGE),
            Write(HOLE + 16 * PAGE, 4 * PAGE, 0x66, "private"),
            Verify(HOLE + 16 * PAGE, 4 * PAGE, 0x66, "private"),
            *acc(HOLE + 20 * PAGE, 8 * PAGE),
            *acc(GPA + 20 * PAGE, 2 * PAGE),  # shared pages going private again
            *acc(GPA, 2 * PAGE),
            # 4 KiB MAP_GPA_RANGE hypercalls (the conversion storm's request), one changing nothing
            MapGpaRange(GPA + 28 * PAGE, 1, E), MapGpaRange(GPA + 28 * PAGE, 1, E),
            MapGpaRange(GPA + 28 * PAGE, 1, 0), MapGpaRange(HOLE + 17 * PAGE, 1, 0),
            MapGpaRange(HOLE + 18 * PAGE, 1, E), MapGpaRange(HOLE + PAGE, 1, 0),
            MapGpaRange(HOLE + PAGE, 1, E, -u.KVM_EINVAL), MapGpaRange(GPA + 29 * PAGE, 1, E | SZ_2M, None)]


POLICIES = {
    "default": {},
    "no-shared-discard": {"policy": DiscardPolicy(discard_shared=False)},
    "no-private-punch": {"policy": DiscardPolicy(discard_private=False)},
    "hugetlb": {"policy": DiscardPolicy(shared_backing="hugetlb")},
    "prealloc": {"policy": DiscardPolicy(shared_backing="prealloc")},
    "preallocate-private": {"policy": DiscardPolicy(preallocate_private=True)},
    "prefault-private": {"prefault": "private"},
    "prefault-all": {"prefault": "all"},
    "iommu-coordinated": {"iommu": "coordinated"},
    "iommu-legacy": {"iommu": "legacy"},
}


@pytest.mark.parametrize("flavour", ["sw-protected", "snp", "tdx"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_lifecycle_same_both_ways(flavour: str, policy: str, sampling: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    accept = flavour != "sw-protected"
    out = _both(lambda: run_machine(_lifecycle(accept), flavour=flavour, **POLICIES[policy]), monkeypatch)
    assert out["result"][0], out["result"]
    assert dict(out["stats"])["memory_faults" if accept else "requests_hypercall"] > 0


@pytest.mark.parametrize("revision", ["v5", "v8"])
@pytest.mark.parametrize("content", ["auto", "preserve", "zero", "unspecified"])
def test_inplace_same_both_ways(revision: str, content: str, sampling: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In-place conversion (per-file attributes, content modes, their EOPNOTSUPP fallback)."""
    try:
        guestmem.open("model", attributes="gmem", inplace_revision=revision).close()
    except ValueError as exc:
        pytest.skip(f"the model lacks per-guest_memfd attributes: {exc}")
    opts = {"attributes": "gmem", "inplace_revision": revision}
    out = _both(lambda: run_machine(_lifecycle(False), kvm_options=opts, content=content), monkeypatch)
    assert out["result"][0], out["result"]


def test_trace_on_same_both_ways(sampling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the trace on the general path runs either way; the events are the same."""
    out = _both(lambda: run_machine(_lifecycle(True), flavour="snp", trace=True), monkeypatch)
    assert out["trace"]


def _pin_actions(m: Machine, pins: ExitStack, value: int) -> None:
    """Sync 1: pin pages 40..44 for DMA (their discards are deferred); Sync 2: release them;
    Sync 3/4: the host converts page 50 to private / shared (``origin="host"``), and page 51 and
    a page of the hole, and two pages, as a hostile host might."""
    if value == 1:
        pins.enter_context(m.dma_pin(GPA + 40 * PAGE, 4 * PAGE))
    elif value == 2:
        pins.close()
    elif value in (3, 4):
        for gpa, size in ((GPA + 50 * PAGE, PAGE), (GPA + 51 * PAGE + 8, PAGE), (HOLE, PAGE),
                          (GPA + 52 * PAGE, 2 * PAGE)):
            out = m.convert(gpa, size, value == 3)
            m.converter.warnings.append(f"host convert {gpa:#x}+{size:#x}: {out}")  # compared


@pytest.mark.parametrize("flavour", ["sw-protected", "snp"])
def test_pins_defer_discards_both_ways(flavour: str, sampling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    accept = flavour == "snp"
    ops: list[Op] = [Write(GPA + 38 * PAGE, 8 * PAGE, 0x10, "shared"), Sync(1),
                     Accept(GPA + 38 * PAGE, 8 * PAGE) if accept else MapGpaRange(GPA + 38 * PAGE, 8, E),
                     Write(GPA + 38 * PAGE, 8 * PAGE, 0x20, "private"), Sync(2),
                     Write(GPA + 41 * PAGE, 2 * PAGE, 0x30, "shared"), Sync(3), Sync(4), Sync(3)]
    out = _both(lambda: run_machine(ops, flavour=flavour, on_sync=_pin_actions), monkeypatch)
    assert out["result"][0], out["result"]
    stats = dict(out["stats"])
    assert stats["shared_discards_deferred"] == (4 if accept else 1) and out["deferred"] == ()


# --- hostile and edge exits, straight into the handler ----------------------------------------------

EDGE_EXITS = [
    (GPA, PAGE, PRIVATE_FLAG, errno.EFAULT),
    (GPA, PAGE, PRIVATE_FLAG, errno.EFAULT),  # again: already private, nothing changes
    (GPA + 5, 1, PRIVATE_FLAG, errno.EFAULT),
    (GPA + 5, 0, PRIVATE_FLAG, errno.EFAULT),  # size 0 counts as one byte
    (GPA + PAGE - 1, 2, PRIVATE_FLAG, errno.EFAULT),  # two pages
    (GPA + 3 * PAGE, 3 * PAGE, 0, errno.EFAULT),
    (GPA + 8 * PAGE, PAGE, 0, errno.EFAULT),  # to shared: already shared
    (GPA + 9 * PAGE, PAGE, PRIVATE_FLAG, 133),  # EHWPOISON
    (GPA + 9 * PAGE, PAGE, PRIVATE_FLAG | 0x10, errno.EFAULT),
    (GPA + 9 * PAGE, PAGE, 1 << 63, errno.EFAULT),
    (HOLE + PAGE, PAGE, PRIVATE_FLAG, errno.EFAULT),  # MMIO hole: refused
    (HOLE + PAGE, PAGE, 0, errno.EFAULT),  # to shared over a hole: ignored
    (HOLE - PAGE, 2 * PAGE, PRIVATE_FLAG, errno.EFAULT),  # RAM and hole
    (HOLE + 15 * PAGE, 2 * PAGE, PRIVATE_FLAG, errno.EFAULT),
    (0, PAGE, PRIVATE_FLAG, errno.EFAULT),
    ((1 << 64) - PAGE, PAGE, PRIVATE_FLAG, errno.EFAULT),
    ((1 << 64) - 1, 1, 0, errno.EFAULT),
    ((1 << 64) - 1, 2, 0, errno.EFAULT),
    (-PAGE, PAGE, PRIVATE_FLAG, errno.EFAULT),
    (GPA + 63 * PAGE, 1 << 20, PRIVATE_FLAG, errno.EFAULT),
    (GPA + 10 * PAGE, -5, PRIVATE_FLAG, errno.EFAULT),
    (GPA + 10 * PAGE, PAGE, 0, errno.EFAULT),
]


def _edge_run(flavour: str, exits: list[tuple[int, int, int, int]], **config: Any) -> dict[str, Any]:
    kvm = guestmem.open("model")
    try:
        with Machine(kvm, MachineConfig(regions=REGIONS, flavour=flavour, slack=0, **config)) as m:
            m.create_vcpus(1)
            v = m.vcpus[0]
            verdicts = []
            for gpa, size, flags, err in exits:
                ex = ExitMemoryFault(gpa=gpa, size=size, flags=flags, errno=err)
                try:
                    verdict = m.handler.handle(0, v, ex)
                    verdicts.append((verdict.action, verdict.reason))
                except Exception as exc:  # the general path's exception must be the fast one's
                    verdicts.append((type(exc).__name__, str(exc)))
            out = observe(m)
            out["verdicts"] = verdicts
            return out
    finally:
        kvm.close()


@pytest.mark.parametrize("flavour", ["default", "sw-protected", "snp", "tdx"])
def test_edge_exits_same_both_ways(flavour: str, sampling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _both(lambda: _edge_run(flavour, EDGE_EXITS), monkeypatch)
    assert any(a.value == "fail" for a, _ in out["verdicts"])


def test_stuck_guest_same_both_ways(sampling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same fault over and over: the repeat counter stops it at the same exit, both ways."""
    exits = [(GPA, PAGE, PRIVATE_FLAG, errno.EFAULT)] * 70 + [(GPA + PAGE, PAGE, 0, errno.EFAULT)]
    out = _both(lambda: _edge_run("snp", exits), monkeypatch)
    assert "stuck: 65 memory faults" in out["verdicts"][64][1]


def test_attribute_refusal_same_both_ways(sampling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model refuses KVM_SET_MEMORY_ATTRIBUTES: the same error text, counters and state."""
    def run() -> dict[str, Any]:
        kvm = guestmem.open("model")
        try:
            with Machine(kvm, MachineConfig(regions=REGIONS, flavour="snp", slack=0)) as m:
                m.create_vcpus(1)
                real = m.vm.set_memory_attributes

                def refuse(gpa: int, size: int, attrs: int) -> None:
                    if gpa == GPA + 7 * PAGE:
                        from guestmem.errors import KvmError
                        raise KvmError(errno.EAGAIN, "busy", error_offset=gpa)
                    real(gpa, size, attrs)

                m.vm.set_memory_attributes = refuse  # type: ignore[method-assign]
                verdicts = [m.handler.handle(0, m.vcpus[0], ExitMemoryFault(gpa=GPA + i * PAGE, size=PAGE,
                                                                             flags=PRIVATE_FLAG))
                            for i in (6, 7, 8)]
                del m.vm.set_memory_attributes
                out = observe(m)
                out["verdicts"] = [(x.action, x.reason) for x in verdicts]
                return out
        finally:
            kvm.close()

    out = _both(run, monkeypatch)
    assert "setting attributes on" in out["verdicts"][1][1]


def test_discard_raising_leaves_the_same_state(sampling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A discard that raises (the backend failed under it) leaves the attribute recorded and the
    shared side still counted as populated, as the general path leaves it."""
    def run() -> dict[str, Any]:
        kvm = guestmem.open("model")
        try:
            with Machine(kvm, MachineConfig(regions=REGIONS, flavour="snp", slack=0)) as m:
                m.create_vcpus(1)
                shared = m.regions[0].shared
                real = shared.discard

                def broken(off: int, size: int) -> None:
                    if off == 3 * PAGE:
                        raise OSError(errno.EIO, "discard failed")
                    real(off, size)

                shared.discard = broken  # type: ignore[method-assign]
                got = []
                for i in (2, 3, 4):
                    try:
                        got.append(m.handler.handle(0, m.vcpus[0], ExitMemoryFault(
                            gpa=GPA + i * PAGE, size=PAGE, flags=PRIVATE_FLAG)).action)
                    except OSError as exc:
                        got.append(str(exc))
                del shared.discard
                out = observe(m)
                out["got"] = got
                return out
        finally:
            kvm.close()

    out = _both(run, monkeypatch)
    assert "discard failed" in str(out["got"][1])


# --- random programs -----------------------------------------------------------------------------------

def _op(draw: hs.DrawFn) -> Op:
    page = draw(hs.sampled_from([*RAM_PAGES, HOLE, HOLE + 5 * PAGE]))
    off = draw(hs.sampled_from([0, 0, 0, 100, PAGE - 8]))
    n = draw(hs.sampled_from([1, 64, PAGE, 2 * PAGE, 5 * PAGE]))
    kind = draw(hs.sampled_from(["write", "write", "touch", "map", "accept", "sync"]))
    access = draw(hs.sampled_from(["private", "shared", "auto"]))
    if kind == "write":
        return Write(page + off, n, draw(hs.integers(0, 255)), access)  # type: ignore[arg-type]
    if kind == "touch":
        return Touch(page, n, 0x77, access=access)  # type: ignore[arg-type]
    if kind == "map":
        return MapGpaRange(page, draw(hs.integers(1, 4)), draw(hs.sampled_from([E, 0])), None)
    if kind == "accept":
        return Accept(page, draw(hs.sampled_from([PAGE, 2 * PAGE])))
    return Sync(draw(hs.sampled_from([1, 2, 3, 4])))


@hs.composite
def programs(draw: hs.DrawFn) -> list[Op]:
    return [_op(draw) for _ in range(draw(hs.integers(1, 25)))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=programs(), flavour=hs.sampled_from(["sw-protected", "snp", "tdx"]),
       policy=hs.sampled_from(sorted(POLICIES)))
def test_random_programs_same_both_ways(ops: list[Op], flavour: str, policy: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acct_mod, "MIN_SAMPLE_GAP_NS", 0)
    monkeypatch.setattr(acct_mod, "MEASURE_COST_FACTOR", 0)
    _both(lambda: run_machine(ops, flavour=flavour, on_sync=_pin_actions, **POLICIES[policy]), monkeypatch)


# --- the run loop with two vCPUs on disjoint memory ------------------------------------------------------

def test_two_vcpus_same_totals_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two vCPU threads converting disjoint pages: the interleaving differs run to run, so only
    what does not depend on it is compared (counters, tracker, attributes, exits; the accept
    state is kept per frame, and which frame a page gets depends on the interleaving)."""
    def run() -> dict[str, Any]:
        kvm = guestmem.open("model")
        try:
            with Machine(kvm, MachineConfig(regions=(RegionSpec("ram", GPA, 4 * MiB),), flavour="snp")) as m:
                m.create_vcpus(2)
                m.load({0: Program([Accept(GPA, 2 * MiB), Write(GPA, 2 * MiB, 1, "private")]),
                        1: Program([Accept(GPA + 2 * MiB, 2 * MiB), Write(GPA + 3 * MiB, 64, 2, "shared")])})
                res = m.run(timeout_s=120)
                assert res.ok, res.error
                m.vm.check_invariants()  # type: ignore[attr-defined]
                snap = model_snapshot(kvm)
                (vm,) = snap["vms"].values()
                return {"stats": sorted(m.converter.stats.items()), "state": tuple(m.tracker.state.items()),
                        "attributes": vm["attributes"],
                        "exits": sorted(res.exits.items()), "bound": m.accounting.bound_ok,
                        "frames_peak": m.accounting.frames_peak()}
        finally:
            kvm.close()

    out = _both(run, monkeypatch)
    assert out["bound"]


# --- the shipped scenarios ---------------------------------------------------------------------------

SCENARIO_MEMORY = {"snp-lazy-4g": 16 << 20, "c-guest-snp": 4 << 20, "c-guest-tdx": 4 << 20}


@pytest.mark.parametrize("name", shipped())
def test_shipped_scenarios_same_both_ways(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped scenario, run both ways: the same result, exits and bound; with one vCPU also
    the same conversion counters and resident figures (measured at every conversion, so they do
    not depend on timing).  With several vCPUs the interleaving decides how many requests find
    their pages already converted -- it differs between two runs of the same path."""
    monkeypatch.setattr(acct_mod, "MIN_SAMPLE_GAP_NS", 0)
    monkeypatch.setattr(acct_mod, "MEASURE_COST_FACTOR", 0)
    scn = load(name)

    def run() -> dict[str, Any]:
        try:
            report = run_scenario(scn, memory=SCENARIO_MEMORY.get(name), trace=False)
        except CapabilityMissing as exc:
            if scn.guest is None:
                raise
            pytest.skip(str(exc))
        s = report.summary()
        out = {"ok": (s["ok"], s["error"]), "exits": s["exits_by_reason"], "bound_ok": s["bound"]["ok"],
               "vcpus": [(v["status"], v["error"]) for v in s["vcpu_results"]]}
        if report.vcpus == 1:  # one vCPU: deterministic to the last counter
            out.update(conversions=s["conversions"], stats=list(s["machine"]["conversion"].items()),
                       bound=s["bound"], now=s["machine"]["accounting"]["now"], frames_peak=s["frames_peak"])
        return out

    out = _both(run, monkeypatch)
    assert out["ok"][0], out["ok"]

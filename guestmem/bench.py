"""``guestmem bench``: what the model's operations cost, measured in one run, written as JSON.

Every figure here is a measurement taken in the same process run, so ratios between them (model
vs kernel, conversion vs memcpy) are meaningful on the machine that ran it.  Nothing is asserted:
the numbers are for people, and for the targets the issues state (converting all of a 1 TiB
guest < 50 ms, pre-faulting 1 GiB at 2 MiB < 100 ms, touching 64 MiB within 5x of the kernel;
content modes at >= 0.25x a memcpy of the same bytes, peak resident memory <= 1.2x what the guest
touched).  Figures that depend on the memory-encryption engine name the implementation that ran
(``xts_backend``: the native C loop, or the numpy fallback).
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import guestmem
import guestmem.uapi as u
from guestmem import bench_cguest, bench_vmm, native
from guestmem.errors import KvmError
from guestmem.guest.ops import Program, Touch, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32
GiB = 1 << 30
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def _time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best of ``repeat`` wall-clock runs, in seconds (best-of filters scheduler noise)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PS


# --- model cost vs guest size ---------------------------------------------------------------------

def bench_scaling(sizes: list[int]) -> list[dict[str, Any]]:
    """Convert, pre-fault and punch over sparse guests of each size (per-VM attributes)."""
    out = []
    for size in sizes:
        out.append(_scale_one(size))
        gc.collect()
    return out


def _scale_one(size: int) -> dict[str, Any]:
    kvm = guestmem.open("model", gmem_folio_order=9)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(size, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gmem, 0)
    vcpu = vm.create_vcpu(0)
    state = {"private": False}

    def convert_all() -> None:
        state["private"] = not state["private"]
        vm.set_memory_attributes(GPA, size, PRIVATE if state["private"] else 0)

    convert_s = _time(convert_all)
    vm.set_memory_attributes(GPA, size, PRIVATE)
    prefault_bytes = min(size, GiB)
    t = time.perf_counter()
    vcpu.pre_fault_memory(GPA, prefault_bytes)  # cold: allocates the folios too
    prefault_cold_s = time.perf_counter() - t
    prefault_s = _time(lambda: (vm.mmu.zap_all(), vcpu.pre_fault_memory(GPA, prefault_bytes)))
    levels = vm.mmu.count()
    # Converting the whole guest while 1 GiB of it is mapped: the zap is part of the cost.
    t = time.perf_counter()
    vm.set_memory_attributes(GPA, size, 0)
    convert_mapped_s = time.perf_counter() - t
    vm.set_memory_attributes(GPA, size, PRIVATE)
    vcpu.pre_fault_memory(GPA, prefault_bytes)
    t = time.perf_counter()
    gmem.punch_hole(0, size)  # frees 1 GiB of frames and zaps their mappings
    punch_mapped_s = time.perf_counter() - t
    punch_s = _time(lambda: gmem.punch_hole(0, size))
    vm.check_invariants()
    row = {
        "guest_bytes": size,
        "convert_all_s": convert_s,
        "convert_all_with_1gib_mapped_s": convert_mapped_s,
        "prefault_bytes": prefault_bytes,
        "prefault_cold_s": prefault_cold_s,
        "prefault_warm_s": prefault_s,
        "prefault_mappings_2M": levels["2M"],
        "punch_all_with_1gib_allocated_s": punch_mapped_s,
        "punch_all_empty_s": punch_s,
        "attribute_ranges": len(vm.attributes),
    }
    vm.close()
    gmem.close()
    kvm.close()
    return row


# --- model vs kernel on one shared-memory workload -------------------------------------------------

def _touch_workload(backend: str, size: int, program: str) -> dict[str, Any]:
    """A DEFAULT VM with guest_memfd (MMAP|INIT_SHARED) RAM running the same program on both
    backends: ``touch`` stores one byte in every 4 KiB page (faulting all of it in), ``write``
    fills every byte and verifies it."""
    kvm = guestmem.open(backend)
    try:
        vm = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
        flags = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
        gmem = vm.create_guest_memfd(size, flags)
        host = gmem.mmap()
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, host.addr, gmem, 0)
        vcpu = vm.create_vcpu(0)
        ops = [Touch(GPA, size, 0x5A)] if program == "touch" else [Write(GPA, size, 0x5A),
                                                                   Verify(GPA, size, 0x5A)]
        vcpu.load(Program(ops))
        t = time.perf_counter()
        ex = vcpu.run()
        wall = time.perf_counter() - t
        ok = ex.name == "halt"
        host.close()
        gmem.close()
        vm.close()
        return {"backend": backend, "program": program, "bytes": size, "wall_s": wall, "ok": ok,
                "exit": ex.name}
    finally:
        kvm.close()


def bench_model_vs_kernel(touch_size: int, write_size: int) -> list[dict[str, Any]]:
    """The same guest program on the model and on /dev/kvm, in this run."""
    rows = []
    for program, size in (("touch", touch_size), ("write", write_size)):
        res: dict[str, Any] = {"program": program, "bytes": size}
        res["model"] = _touch_workload("model", size, program)
        try:
            res["kernel"] = _touch_workload("kernel", size, program)
            res["model_over_kernel"] = res["model"]["wall_s"] / res["kernel"]["wall_s"]
        except (OSError, ImportError) as e:
            res["kernel"] = {"available": False, "reason": str(e)}
        rows.append(res)
    return rows


# --- in-place conversion (issue 4) ----------------------------------------------------------------

GOAL_RATIO = 0.25  # issue 10: content modes at >= 0.25x a numpy memcpy of the same bytes


def _spread(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"median": v[len(v) // 2], "min": v[0], "max": v[-1]}


def bench_conversion_throughput(size: int, repeat: int = 3) -> dict[str, Any]:
    """Conversion of ``size`` bytes of allocated memory, per flavour, content mode and direction,
    each timed ``repeat`` times beside a numpy copy of the same bytes timed right after it, so
    every figure carries its own ratio to memcpy (median and spread over the repeats), and which
    XTS implementation ran."""
    from guestmem.model.mm.encryption import backend

    xts = backend()  # loads (the first time on a machine: builds) the native loop outside the timings
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination in once
    memcpy_all: list[float] = []
    rows = []
    modes = {"unspecified": 0, "zero": u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO,
             "preserve": u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE}
    for flavour, vm_type in (("sw-protected", u.KVM_X86_SW_PROTECTED_VM), ("snp", u.KVM_X86_SNP_VM),
                             ("tdx", u.KVM_X86_TDX_VM)):
        for mode_name, mode in modes.items():
            for direction in ("to_shared", "to_private"):
                walls: list[float] = []
                ratios: list[float] = []
                err = None
                for _ in range(repeat):
                    wall, err = _convert_once(size, vm_type, flavour, mode_name, mode, direction)
                    if wall is None:
                        break
                    # One shot, like the conversion: a best-of memcpy against a single conversion
                    # would charge all the scheduler noise of a shared machine to the conversion.
                    memcpy_s = _time(lambda: np.copyto(dst, src), 1)
                    memcpy_all.append(memcpy_s)
                    walls.append(wall)
                    ratios.append(memcpy_s / wall)
                row: dict[str, Any] = {"flavour": flavour, "mode": mode_name, "direction": direction,
                                       "error": err}
                if walls:
                    row.update(wall_s=_spread(walls), gib_per_s=size / GiB / sorted(walls)[len(walls) // 2],
                               ratio_to_memcpy=_spread(ratios),
                               meets_goal=sorted(ratios)[len(ratios) // 2] >= GOAL_RATIO)
                rows.append(row)
    memcpy_s = sorted(memcpy_all)[len(memcpy_all) // 2]
    return {"bytes": size, "repeat": repeat, "xts_backend": xts, "goal_ratio": GOAL_RATIO,
            "memcpy_s": _spread(memcpy_all), "memcpy_gib_per_s": size / GiB / memcpy_s,
            "conversions": rows}


def _convert_once(size: int, vm_type: int, flavour: str, mode_name: str, mode: int,
                  direction: str) -> tuple[float | None, str | None]:
    """One conversion of a fully allocated guest_memfd; (wall seconds, None) or (None, errno name)."""
    kvm = guestmem.open("model", attributes="gmem")
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    host = gmem.mmap()
    try:
        host.fill(0, size, 0x11)  # allocate every page
        target = PRIVATE if direction == "to_private" else 0
        if direction == "to_shared":
            gmem.set_memory_attributes2(0, size, PRIVATE, 0)
        if flavour != "sw-protected" and not (direction == "to_private" and mode_name == "preserve"):
            vm.launch_finalize()
        t = time.perf_counter()
        try:
            gmem.set_memory_attributes2(0, size, target, mode)
        except KvmError as e:
            return None, e.errname
        return time.perf_counter() - t, None
    finally:
        host.close()
        gmem.close()
        vm.close()
        kvm.close()


def bench_xts(size: int, repeat: int = 3) -> dict[str, Any]:
    """The encryption engine alone, in place over ``size`` bytes, for each implementation this
    machine can run, as a ratio to a numpy copy of the same bytes timed in the same loop."""
    from guestmem.model.mm import encryption as enc

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    out: dict[str, Any] = {"bytes": size, "default_backend": enc.backend()}
    if enc.backend() != "native":
        from guestmem.model.mm import _xts_native

        out["native_unavailable"] = _xts_native.why
    for name in ["numpy", "native"] if enc.backend() == "native" else ["numpy"]:
        engine = enc.EncryptionEngine()
        engine.backend = name
        ratios, rates = [], []
        for _ in range(repeat):
            memcpy_s = _time(lambda: np.copyto(dst, src), 1)
            wall = _time(lambda e=engine: e.encrypt_into(7, dst, dst), 1)
            ratios.append(memcpy_s / wall)
            rates.append(size / GiB / wall)
        out[name] = {"gib_per_s": _spread(rates), "ratio_to_memcpy": _spread(ratios)}
    return out


def bench_write_peak_rss(size: int, flavours: tuple[str, ...] = ("sw-protected", "snp", "tdx"),
                         ) -> list[dict[str, Any]]:
    """Peak resident memory of a process that writes all of a ``size``-byte private guest, per
    flavour, each in a fresh interpreter (``ru_maxrss`` never goes down): the growth of the peak
    over the resident size just before the write, against the guest memory touched (goal <= 1.2x)."""
    import json
    import subprocess
    from pathlib import Path

    root = str(Path(guestmem.__file__).resolve().parent.parent)
    rows = []
    for flavour in flavours:
        code = ("import json, guestmem.bench as b; "
                f"print(json.dumps(b._write_peak_child({flavour!r}, {size})))")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=900)
        if proc.returncode != 0:
            rows.append({"flavour": flavour, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
    return rows


def _write_peak_child(flavour: str, size: int) -> dict[str, Any]:
    """In a fresh process: a ``flavour`` VM whose guest accepts and writes all of ``size`` bytes of
    private memory (peak measured), then verifies all of it (peak measured again)."""
    from guestmem.guest.ops import Accept
    from guestmem.model.mm.encryption import backend

    vm_type = {"sw-protected": u.KVM_X86_SW_PROTECTED_VM, "snp": u.KVM_X86_SNP_VM,
               "tdx": u.KVM_X86_TDX_VM}[flavour]
    kvm = guestmem.open("model")
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(size, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, size, 0, gmem, 0)
    vm.set_memory_attributes(GPA, size, PRIVATE)
    if flavour != "sw-protected":
        vm.launch_finalize()
    vcpu = vm.create_vcpu(0)
    accept = [Accept(GPA, size)] if flavour != "sw-protected" else []
    vcpu.load(Program([*accept, Write(GPA, size, 0x5A)]))
    gc.collect()
    rss0 = _rss_bytes()
    t = time.perf_counter()
    ex = vcpu.run()
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vcpu.load(Program([Verify(GPA, size, 0x5A)]))  # and the guest reads all of it back
    t = time.perf_counter()
    ok = ex.name == "halt" and vcpu.run().name == "halt"
    verify_s = time.perf_counter() - t
    peak_v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"flavour": flavour, "touched_bytes": size, "ok": ok, "write_s": wall, "verify_s": verify_s,
            "xts_backend": backend(), "rss_before_write_bytes": rss0, "peak_rss_bytes": peak,
            "peak_growth_over_touched": (peak - rss0) / size, "peak_over_touched": peak / size,
            "peak_after_verify_bytes": peak_v, "peak_after_verify_over_touched": peak_v / size}


def bench_eagain_and_split(size: int) -> dict[str, Any]:
    kvm = guestmem.open("model", attributes="gmem", gmem_folio_order=9)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    host = gmem.mmap()
    host.fill(0, size, 1)

    def eagain() -> None:
        try:
            gmem.set_memory_attributes2(0, size, PRIVATE, 0)
        except KvmError as e:
            assert e.errno == errno.EAGAIN

    with host.pin(size - PS, PS):  # the last page pinned: the check walks the whole range
        eagain_s = _time(eagain)
    keep = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE
    ok_s = _time(lambda: (gmem.set_memory_attributes2(0, size, PRIVATE, keep),
                          gmem.set_memory_attributes2(0, size, 0, keep)))
    # Split and merge: convert one page in every 2 MiB folio, then convert it back.
    n2m = size // (2 << 20)

    def split_all() -> None:
        for i in range(n2m):
            gmem.set_memory_attributes2(i * (2 << 20) + PS, PS, PRIVATE, keep)

    def merge_all() -> None:
        for i in range(n2m):
            gmem.set_memory_attributes2(i * (2 << 20) + PS, PS, 0, keep)

    t = time.perf_counter()
    split_all()
    split_s = time.perf_counter() - t
    t = time.perf_counter()
    merge_all()
    merge_s = time.perf_counter() - t
    stats = gmem.inode.cache.stats
    return {"bytes": size, "eagain_check_s": eagain_s, "round_trip_preserve_s": ok_s,
            "folios_2m": n2m, "split_per_folio_s": split_s / n2m, "merge_per_folio_s": merge_s / n2m,
            "splits": stats.splits, "merges": stats.merges}


def bench_resident(size: int) -> dict[str, Any]:
    """Resident memory of the model against the guest memory actually allocated."""
    kvm = guestmem.open("model")
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(1 << 40, 0)  # a 1 TiB guest, sparse
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, 1 << 40, 0, gmem, 0)
    vm.set_memory_attributes(GPA, 1 << 40, PRIVATE)
    rss0 = _rss_bytes()
    vcpu = vm.create_vcpu(0)
    vcpu.load(Program([Write(GPA, size, 0x33)]))
    vcpu.run()
    rss1 = _rss_bytes()
    return {"guest_bytes": 1 << 40, "touched_bytes": size, "pool_resident_bytes": kvm.pool.resident_bytes(),
            "process_rss_growth_bytes": rss1 - rss0,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# --- RangeMap at scale (issue 10, goal 6) ----------------------------------------------------------

RANGEMAP_SET_GOAL_US = 3.0  # per random single-page set at 1M ranges


def bench_rangemap(sizes: list[int], ops: int = 2000, repeat: int = 7,
                   small: tuple[int, ...] = (1, 10, 100)) -> dict[str, Any]:
    """Random single-page ``set``, point ``get``, one-piece ``segments`` and ``all_equal`` on a
    RangeMap holding ``n`` ranges, for the ``small`` sizes most of the model's maps have (1-100:
    attributes, SPTEs, page cache, RMP, frames) and the large ``sizes``.

    The map holds ``[4i, 4i+3) = 1 + i % 3``; each set op splits one random range with a new value
    and the next restores it (a merge), so the map keeps ``n`` ranges and both paths are timed;
    ``segments`` is iterated to the end.  Each of ``repeat`` batches of ``ops`` ops is timed alone
    (CPU time of this process, per call from Python) and reported with its spread.  Both
    implementations run when the compiled layout is built (``implementation`` is the one maps use:
    at every size; the Python layouts — flat up to ``2 * _LOAD`` ranges, chunked above — are
    measured too, for comparison and as the fallback's figure); the goal is judged on the one in use.
    """
    import random

    from guestmem import ranges
    from guestmem.ranges import RangeMap

    impls = ["python"] if ranges._native is None else ["c-extension", "python"]
    built = ranges._native
    rows: list[dict[str, Any]] = []
    for impl in impls:
        ranges._native = built if impl == "c-extension" else None
        try:
            for n in [*small, *sizes]:
                m: RangeMap[int] = RangeMap(0)
                for i in range(n):
                    m.set(4 * i, 4 * i + 3, 1 + i % 3)
                rnd = random.Random(n)
                set_us, get_us, seg_us, eq_us = [], [], [], []
                for _ in range(repeat):
                    picks = [rnd.randrange(n) for _ in range(ops)]
                    t = time.process_time()
                    for i in picks:
                        p = 4 * i + 1
                        m.set(p, p + 1, 7)
                        m.set(p, p + 1, 1 + i % 3)
                    set_us.append((time.process_time() - t) / (2 * ops) * 1e6)
                    t = time.process_time()
                    for i in picks:
                        m.get(4 * i + 1)
                    get_us.append((time.process_time() - t) / ops * 1e6)
                    t = time.process_time()
                    for i in picks:
                        for _piece in m.segments(4 * i + 1, 4 * i + 2):
                            pass
                    seg_us.append((time.process_time() - t) / ops * 1e6)
                    t = time.process_time()
                    for i in picks:
                        m.all_equal(4 * i + 1, 4 * i + 2, 1)
                    eq_us.append((time.process_time() - t) / ops * 1e6)
                assert len(m) == n
                rows.append({"ranges": n, "name": impl, "set_us": bench_vmm.spread(set_us),
                             "get_us": bench_vmm.spread(get_us), "segments_us": bench_vmm.spread(seg_us),
                             "all_equal_us": bench_vmm.spread(eq_us)})
                del m
                gc.collect()
        finally:
            ranges._native = built
    res: dict[str, Any] = {"implementation": ranges.IMPLEMENTATION, "goal_set_us_at_1m": RANGEMAP_SET_GOAL_US,
                           "ops_per_batch": ops, "batches": repeat, "sizes": rows}
    at_1m = [r for r in rows if r["ranges"] == 1_000_000 and r["name"] == ranges.IMPLEMENTATION]
    if at_1m:
        res["meets_goal"] = at_1m[0]["set_us"]["median"] <= RANGEMAP_SET_GOAL_US
    return res

def bench_explore(seconds: float) -> list[dict[str, Any]]:
    """Interleaving-explorer throughput: schedules per second for DFS (bound 2, exhaustive or
    until ``seconds``) and PCT (depth 3, for ``seconds``) on a 2-thread and a 3-thread race.
    Each schedule rebuilds the model, runs every thread step by step and checks the invariants
    after every step, so this is the cost of one checked interleaving."""
    from guestmem.explore import races
    from guestmem.explore import strategies as st

    rows = []
    for rid in ("fault-vs-attr:sw", "overlapping-conversions:sw"):
        race = races.BY_ID[rid]
        dfs = st.explore_dfs(race, None, 2, st.Budget(None, seconds))
        pct = st.explore_pct(race, None, 0, 3, st.Budget(None, seconds))
        for rep in (dfs, pct):
            rows.append({"race": rid, "strategy": rep.strategy, "schedules": rep.schedules,
                         "seconds": rep.seconds, "schedules_per_s": rep.schedules / rep.seconds,
                         "exhaustive": rep.exhausted})
    return rows



def _benches(quick: bool) -> dict[str, Callable[[], Any]]:
    """Every figure ``guestmem bench`` knows, by name, sized for ``quick`` or full runs."""
    sizes = [GiB, 16 * GiB, 256 * GiB, 1 << 40] if not quick else [GiB, 1 << 40]
    MiB = 1 << 20
    return {
        "scaling": lambda: bench_scaling(sizes),
        "model_vs_kernel": lambda: bench_model_vs_kernel(64 << 20, (4 if quick else 16) << 20),
        "conversion_throughput": lambda: bench_conversion_throughput((16 if quick else 64) << 20),
        "xts_engine": lambda: bench_xts((16 if quick else 64) << 20),
        "private_write_peak_rss": lambda: bench_write_peak_rss((256 << 20) if quick else GiB),
        "eagain_split_merge": lambda: bench_eagain_and_split((64 if quick else 256) << 20),
        "resident": lambda: bench_resident(64 << 20),
        "rangemap": lambda: bench_rangemap([10_000, 200_000, 1_000_000]),
        "explore": lambda: bench_explore(2.0 if quick else 10.0),
        # Issue 10: per-unit CPU of a realistic CoCo guest's memory lifecycle.
        "fault_and_convert": lambda: bench_vmm.bench_fault_and_convert(
            [8 * MiB, 32 * MiB] if quick else [32 * MiB, 64 * MiB, 128 * MiB, 256 * MiB],
            [GiB, 4 * GiB] if quick else [GiB, 4 * GiB, 64 * GiB], window=512 if quick else 2048,
            repeat=3, fragmented=(1 << 16,) if quick else (1 << 16, 1 << 20)),
        "conversion_storm": lambda: bench_vmm.bench_conversion_storm(
            [8 * MiB, 32 * MiB] if quick else [8 * MiB, 32 * MiB, 128 * MiB, 512 * MiB],
            repeat=1 if quick else 2),
        "trace_cost": lambda: bench_vmm.bench_trace_cost((4 if quick else 16) * MiB,
                                                         repeat=2 if quick else 3),
        "ioctl": lambda: bench_vmm.bench_ioctl(n=20_000 if quick else 200_000, repeat=3 if quick else 5),
        # Issue 14: the model's x86-64 vCPU (guest MIPS, per-exit and per-fault costs) beside the op vCPU.
        "x86_cpu": lambda: _bench_x86((4 if quick else 16) << 20, repeat=2 if quick else 3),
        # Issue 14: the C guest on the model's x86 CPU vs the op interpreter vs the kernel backend.
        "c_guest": lambda: bench_cguest.bench_c_guest(data_pages=8 if quick else 16,
                                                      repeat=2 if quick else 3),
    }


def _bench_x86(size: int, repeat: int) -> Any:
    from guestmem import bench_x86  # imports unicorn: only when this bench runs

    return bench_x86.bench_x86_cpu(size, repeat)


BENCH_NAMES = ("scaling", "model_vs_kernel", "conversion_throughput", "xts_engine", "private_write_peak_rss",
               "eagain_split_merge", "resident", "rangemap", "explore", "fault_and_convert",
               "conversion_storm", "trace_cost", "ioctl", "x86_cpu", "c_guest")


def run_all(quick: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Run every bench (or the ``only`` ones) in this process; figures keyed by bench name."""
    benches = _benches(quick)
    t = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "kernel": os.uname().release},
    }
    for name in only or BENCH_NAMES:
        result[name] = benches[name]()
        gc.collect()
    result["total_s"] = time.perf_counter() - t
    # Which compiled accelerators ran (``GUESTMEM_PURE=1`` runs the Python paths instead).
    result["implementations"] = native.implementations()
    return result

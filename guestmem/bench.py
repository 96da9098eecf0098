"""``guestmem bench``: what the model's operations cost, measured in one run, written as JSON.

Every figure here is a measurement taken in the same process run, so ratios between them (model
vs kernel, conversion vs memcpy) are meaningful on the machine that ran it.  Nothing is asserted:
the numbers are for people, and for the targets the issues state (converting all of a 1 TiB
guest < 50 ms, pre-faulting 1 GiB at 2 MiB < 100 ms, touching 64 MiB within 5x of the kernel).
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
from guestmem import bench_vmm
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

def bench_conversion_throughput(size: int) -> dict[str, Any]:
    """Round-trip conversion of ``size`` bytes of allocated memory, per flavour and content mode,
    beside a numpy copy of the same size measured in the same run."""
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    memcpy_s = _time(lambda: np.copyto(dst, src))
    rows = []
    modes = {"unspecified": 0, "zero": u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO,
             "preserve": u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE}
    for flavour, vm_type in (("sw-protected", u.KVM_X86_SW_PROTECTED_VM), ("snp", u.KVM_X86_SNP_VM),
                             ("tdx", u.KVM_X86_TDX_VM)):
        for mode_name, mode in modes.items():
            for direction in ("to_shared", "to_private"):
                kvm = guestmem.open("model", attributes="gmem")
                vm = kvm.create_vm(vm_type)
                gmem = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
                host = gmem.mmap()
                host.fill(0, size, 0x11)  # allocate every page
                target = PRIVATE if direction == "to_private" else 0
                if direction == "to_shared":
                    gmem.set_memory_attributes2(0, size, PRIVATE, 0)
                if flavour != "sw-protected" and not (direction == "to_private" and mode_name == "preserve"):
                    vm.launch_finalize()
                t = time.perf_counter()
                try:
                    gmem.set_memory_attributes2(0, size, target, mode)
                    wall: float | None = time.perf_counter() - t
                    err = None
                except KvmError as e:
                    wall, err = None, e.errname
                rows.append({"flavour": flavour, "mode": mode_name, "direction": direction,
                             "wall_s": wall, "gib_per_s": (size / GiB / wall) if wall else None,
                             "error": err})
                host.close()
                gmem.close()
                vm.close()
                kvm.close()
    return {"bytes": size, "memcpy_s": memcpy_s, "memcpy_gib_per_s": size / GiB / memcpy_s,
            "conversions": rows}


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


def _benches(quick: bool) -> dict[str, Callable[[], Any]]:
    """Every figure ``guestmem bench`` knows, by name, sized for ``quick`` or full runs."""
    sizes = [GiB, 16 * GiB, 256 * GiB, 1 << 40] if not quick else [GiB, 1 << 40]
    MiB = 1 << 20
    return {
        "scaling": lambda: bench_scaling(sizes),
        "model_vs_kernel": lambda: bench_model_vs_kernel(64 << 20, (4 if quick else 16) << 20),
        "conversion_throughput": lambda: bench_conversion_throughput((16 if quick else 64) << 20),
        "eagain_split_merge": lambda: bench_eagain_and_split((64 if quick else 256) << 20),
        "resident": lambda: bench_resident(64 << 20),
        # Issue 10: per-unit CPU of a realistic CoCo guest's memory lifecycle.
        "fault_and_convert": lambda: bench_vmm.bench_fault_and_convert(
            [8 * MiB, 32 * MiB] if quick else [32 * MiB, 64 * MiB, 128 * MiB, 256 * MiB],
            [GiB, 4 * GiB] if quick else [GiB, 4 * GiB, 64 * GiB], window=512 if quick else 2048,
            repeat=2 if quick else 3),
        "conversion_storm": lambda: bench_vmm.bench_conversion_storm(
            [8 * MiB, 32 * MiB] if quick else [8 * MiB, 32 * MiB, 128 * MiB, 512 * MiB],
            repeat=1 if quick else 2),
        "trace_cost": lambda: bench_vmm.bench_trace_cost((4 if quick else 16) * MiB,
                                                         repeat=2 if quick else 3),
        "ioctl": lambda: bench_vmm.bench_ioctl(n=20_000 if quick else 200_000, repeat=3 if quick else 5),
    }


BENCH_NAMES = ("scaling", "model_vs_kernel", "conversion_throughput", "eagain_split_merge", "resident",
               "fault_and_convert", "conversion_storm", "trace_cost", "ioctl")


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
    return result

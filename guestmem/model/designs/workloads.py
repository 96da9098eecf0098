"""The guest workloads ``guestmem compare`` runs, and the one loop that runs any of them on any design.

A workload is a guest program (:mod:`guestmem.guest.ops`) plus what the host side does when the
guest hands it control; the VMM's answer to a conversion request is the design's
(:mod:`guestmem.model.designs.harness`).  The guest program is the same for every design, so what
the guest sees must be the same too: :func:`run` returns the guest-visible trace (hypercall
returns, sync points, assertion failures, halt, bytes written and verified) and a digest of guest
memory as the guest reads it at the end, beside the measurements.  Every program ends with the
guest verifying all the memory it still owns against what it wrote (a :class:`Plan`).

Workloads are made of phases:

* ``boot``: the launch makes a 2 MiB firmware image private and measured (confidential flavours),
  then the guest accepts the rest of RAM 2 MiB at a time (``MAP_GPA_RANGE`` to private, accept)
  and writes it;
* ``io``: I/O through an 8-page bounce buffer that moves through RAM: share it, write a request,
  the device answers, read the answer, take the pages back private and reuse them.  The device
  completes late: it writes a status word into the buffer after the guest took it back (a stray
  host write — what ``F_SEAL_AUTO_ALLOCATE`` was for);
* ``balloon``: the guest gives the host four 2 MiB regions and sixteen 16 KiB pieces, which the
  host punches out, then takes half back and uses it again.

``boot`` is the first phase alone; ``bounce-io`` and ``balloon`` follow a boot; ``all`` (what
``guestmem compare`` runs by default) is the three in one guest.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guestmem import uapi as u
from guestmem.api import ExitGuestAssert, ExitHalt, ExitHypercall, ExitMemoryFault, ExitSync, iter_exits
from guestmem.guest.ops import Accept, MapGpaRange, Op, Program, Sync, Verify, Write
from guestmem.model.designs.directmap import DirectMapRmp
from guestmem.model.kvm.fault import page_fault
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.designs.harness import Design
    from guestmem.model.kvm.system import ModelKvm
    from guestmem.model.kvm.vm import ModelVm

PS = u.PAGE_SIZE
HUGE = u.HPAGE_2M
GPA = 1 << 32
ENC, DEC = u.KVM_MAP_GPA_RANGE_ENCRYPTED, u.KVM_MAP_GPA_RANGE_DECRYPTED
FLAVOURS = {"snp": u.KVM_X86_SNP_VM, "sw": u.KVM_X86_SW_PROTECTED_VM}
DEFAULT_RAM = 32 << 20
MIN_RAM = 18 << 20  # nine 2 MiB regions: the image's and eight for the balloon
IMAGE = 0x4B
BUF_PAGES = 8
SYNC_INFLATE = 1
SYNC_IO = 100
PHASES: dict[str, tuple[str, ...]] = {
    "boot": ("boot",),
    "bounce-io": ("boot", "io"),
    "balloon": ("boot", "balloon"),
    "all": ("boot", "io", "balloon"),
}
SUMMARIES = {
    "boot": "launch a measured 2 MiB image, then accept all of RAM 2 MiB at a time",
    "bounce-io": "boot, then I/O through an 8-page bounce buffer moving through RAM (the device "
                 "completes late)",
    "balloon": "boot, then a balloon punches four 2 MiB regions and sixteen 16 KiB pieces, gives half back",
    "all": "boot, bounce-buffer I/O and a balloon in one guest",
}


def pattern(i: int) -> int:
    """A nonzero byte per index, different for neighbours."""
    return 1 + (i * 37) % 254


class Plan:
    """Guest memory as the guest program expects it: one byte per page range (None = not owned)."""

    def __init__(self) -> None:
        self.expect: RangeMap[int | None] = RangeMap(None)

    def write(self, off: int, size: int, byte: int) -> None:
        self.expect.set(off // PS, (off + size) // PS, byte)

    def drop(self, off: int, size: int) -> None:
        self.expect.set(off // PS, (off + size) // PS, None)

    def live(self) -> list[tuple[int, int]]:
        return [(s * PS, (e - s) * PS) for s, e, v in self.expect.items() if v is not None]

    def verify_ops(self) -> list[Op]:
        return [Verify(GPA + s * PS, (e - s) * PS, v, "private")
                for s, e, v in self.expect.items() if v is not None]


@dataclass
class Recorder:
    """What a run observes: the guest-visible trace and the host-side samples."""

    design: Design
    kvm: ModelKvm
    trace: list[tuple[Any, ...]] = field(default_factory=list)
    double_peak: int = 0
    stray_frames: int = 0  # frames allocated by the device's stray writes
    stray_refused: int = 0  # stray writes the host could not make (SIGBUS / ENOENT)
    implicit: int = 0  # conversions asked for by memory-fault exits
    device_errors: int = 0  # requests the device read wrong

    check_steps: bool = False  # check the model's invariants at every sample (tests)

    def sample(self) -> None:
        self.double_peak = max(self.double_peak, self.design.backed_twice())
        if self.check_steps:
            self.design.vm.check_invariants()

    def stray_write(self, off: int, data: bytes) -> None:
        before = self.kvm.pool.allocated
        if not self.design.host_write(off, data):
            self.stray_refused += 1
        self.stray_frames += self.kvm.pool.allocated - before
        self.sample()


class Workload:
    """The guest program and the host's side of it, over ``ram`` bytes of guest RAM at :data:`GPA`."""

    def __init__(self, name: str, ram: int, *, encrypted: bool, rounds: int = 8) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(PHASES)}")
        if ram < MIN_RAM or ram % HUGE:
            raise ValueError(f"guest RAM must be a multiple of 2 MiB and at least {MIN_RAM >> 20} MiB, "
                             f"not {ram:#x}")
        if rounds <= 0:
            raise ValueError("rounds must be positive")
        self.name, self.ram, self.encrypted, self.rounds = name, ram, encrypted, rounds
        self.phases = PHASES[name]
        self.image = HUGE if encrypted else 0  # only a confidential launch has a measured image
        # Bounce buffers live in even 2 MiB regions; the balloon gives back four odd regions whole
        # (never split by I/O) and four 16 KiB pieces in each of four even ones.
        self.regions = regions = ram // HUGE
        odd, even = list(range(1, regions, 2)), list(range(2, regions, 2))
        whole = [odd[k * len(odd) // 4] * HUGE for k in range(4)]
        pieces = [(even[k * len(even) // 4] * HUGE + p * PS, 4 * PS)
                  for k in range(4) for p in (64, 128, 320, 448)]
        self.inflate = sorted([(w, HUGE) for w in whole] + pieces)
        self.deflate = [(w, HUGE) for w in whole[::2]] + [p for k, p in enumerate(pieces) if k % 8 < 4]
        self.plan = Plan()
        self._program = Program(self._ops())

    # --- the guest ------------------------------------------------------------------------------
    def buffer(self, i: int) -> int:
        """I/O round ``i``'s buffer: 16 KiB into an even 2 MiB region, the next one each round."""
        return (2 * i) % (self.regions - self.regions % 2) * HUGE + 4 * PS

    def _ops(self) -> list[Op]:
        plan, ops = self.plan, []
        if self.image:
            plan.write(0, self.image, IMAGE)
            ops.append(Verify(GPA, self.image, IMAGE, "private"))
        for k, off in enumerate(range(self.image, self.ram, HUGE)):
            ops += [MapGpaRange(GPA + off, HUGE // PS, ENC), Accept(GPA + off, HUGE),
                    Write(GPA + off, HUGE, pattern(k), "private")]
            plan.write(off, HUGE, pattern(k))
        if "io" in self.phases:
            size = BUF_PAGES * PS
            for i in range(self.rounds):
                b = self.buffer(i)
                request, answer, own = pattern(3 * i), pattern(3 * i + 1), pattern(3 * i + 2)
                ops += [MapGpaRange(GPA + b, BUF_PAGES, DEC), Write(GPA + b, size, request, "shared"),
                        Sync(SYNC_IO + i), Verify(GPA + b, size, answer, "shared"),
                        MapGpaRange(GPA + b, BUF_PAGES, ENC), Accept(GPA + b, size),
                        Write(GPA + b, size, own, "private"), Verify(GPA + b, size, own, "private")]
                plan.write(b, size, own)
        if "balloon" in self.phases:
            ops.append(Sync(SYNC_INFLATE))
            for off, size in self.inflate:
                plan.drop(off, size)
            for k, (off, size) in enumerate(self.deflate):
                ops += [Accept(GPA + off, size), Write(GPA + off, size, pattern(100 + k), "private")]
                plan.write(off, size, pattern(100 + k))
        return ops + plan.verify_ops()

    def program(self) -> Program:
        return self._program

    def live(self) -> list[tuple[int, int]]:
        """``(offset, size)`` ranges the guest still owns at the end."""
        return self.plan.live()

    # --- the host ---------------------------------------------------------------------------------
    def stage(self, d: Design) -> None:
        """Before launch: the measured image."""
        if self.image:
            d.stage_image(0, bytes([IMAGE]) * self.image)

    def on_sync(self, value: int, d: Design, rec: Recorder) -> None:
        if value == SYNC_INFLATE:
            for off, size in self.inflate:
                d.discard(off, size)
            return
        i = value - SYNC_IO
        off, size = self.buffer(i), BUF_PAGES * PS
        if d.host_read(off, size) != bytes([pattern(3 * i)]) * size:
            rec.device_errors += 1
        d.host_write(off, bytes([pattern(3 * i + 1)]) * size)
        rec.sample()

    def after_convert(self, off: int, size: int, private: bool, d: Design, rec: Recorder) -> None:
        """The device's status write lands after the guest took its bounce buffer back."""
        if private and size == BUF_PAGES * PS and "io" in self.phases:
            rec.stray_write(off, b"\x01" * 64)


def guest_view(vm: ModelVm, ranges: list[tuple[int, int]]) -> str:
    """SHA-256 of guest memory over ``ranges`` as the guest reads it (private pages decrypted)."""
    h = hashlib.sha256()
    pool = vm.system.pool
    for off, size in ranges:
        gfn, end = (GPA + off) // PS, (GPA + off + size) // PS
        while gfn < end:
            private = vm.mem_is_private(gfn)
            want = private if vm.arch.hw_access_kind else None
            with vm.mmu_lock():
                runs = vm.mmu.translate(0, gfn, end, want, False)
            if not runs:
                res = page_fault(vm, gfn, end, "private" if private else "shared", False)
                if not isinstance(res, int):
                    raise RuntimeError(f"the guest cannot read gfn {gfn:#x}: {res}")
                continue
            for s, e, pfn, priv in runs:
                h.update(vm.arch.guest_read(pool, pfn, 0, (e - s) * PS, priv).tobytes())
                gfn = e
    return h.hexdigest()


@dataclass
class RunResult:
    """One design under one workload: the measurements and what the guest saw."""

    metrics: dict[str, Any]
    trace: list[tuple[Any, ...]]
    digest: str


def run(design_cls: type[Design], workload: str = "all", *, ram: int = DEFAULT_RAM, flavour: str = "snp",
        rounds: int = 8, check: bool = True, check_steps: bool = False,
        model: dict[str, Any] | None = None) -> RunResult:
    """Run ``workload`` on a fresh model host under ``design_cls``; measure it.

    ``check`` checks the model's invariants at the end, ``check_steps`` after every VMM step too.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    encrypted = flavour != "sw"
    wl = Workload(workload, ram, encrypted=encrypted, rounds=rounds)
    start = time.perf_counter()
    kvm = design_cls.open_kvm(**(model or {}))
    if FLAVOURS[flavour] == u.KVM_X86_SNP_VM:
        kvm.rmp = DirectMapRmp()  # type: ignore[attr-defined]
    vm = kvm.create_vm(FLAVOURS[flavour])
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, args=(1 << u.KVM_HC_MAP_GPA_RANGE,))
    d = design_cls(kvm, vm, GPA, ram)
    d.setup()
    rec = Recorder(d, kvm, check_steps=check_steps)
    d.on_step = rec.sample
    wl.stage(d)
    if encrypted:
        vm.launch_finalize()
    vcpu = vm.create_vcpu(0)
    vcpu.load(wl.program())
    for ex in iter_exits(vcpu):
        if isinstance(ex, ExitHypercall):
            off, size = ex.gpa - GPA, ex.npages * PS
            d.convert(off, size, ex.to_private)
            ex.ret = 0
            rec.trace.append(("map_gpa_range", off, ex.npages, ex.to_private, ex.ret))
            wl.after_convert(off, size, ex.to_private, d, rec)
        elif isinstance(ex, ExitMemoryFault):
            d.convert(ex.gpa - GPA, ex.size, ex.private)  # KVM and the VMM's business, not the guest's
            rec.implicit += 1
        elif isinstance(ex, ExitSync):
            rec.trace.append(("sync", ex.value))
            wl.on_sync(ex.value, d, rec)
        elif isinstance(ex, ExitHalt | ExitGuestAssert):
            rec.trace.append((ex.name, str(ex)) if isinstance(ex, ExitGuestAssert) else ("halt",))
        else:
            raise RuntimeError(f"{design_cls.key}: unexpected exit {ex}")
        rec.sample()
    wall = time.perf_counter() - start
    rec.trace.append(("bytes", vcpu.stats["bytes_written"], vcpu.stats["bytes_verified"]))
    metrics = measure(design_cls, kvm, vm, rec, wall)
    digest = guest_view(vm, wl.live())
    if check:
        vm.check_invariants()
    metrics.update(workload=workload, flavour=flavour, ram_bytes=ram, guest_digest=digest)
    vcpu.close()
    d.close()
    vm.close()
    kvm.close()
    kvm.pool.close()
    return RunResult(metrics, rec.trace, digest)


def measure(design_cls: type[Design], kvm: ModelKvm, vm: ModelVm, rec: Recorder, wall: float
            ) -> dict[str, Any]:
    """The numbers ``guestmem compare`` reports, read from the model's own counters."""
    levels = vm.mmu.count()
    rmp = getattr(kvm, "rmp", None)
    return {
        "design": design_cls.key,
        "label": design_cls.label,
        "peak_frames": kvm.pool.stats.peak_allocated,
        "final_frames": kvm.pool.allocated,
        "double_frames_peak": rec.double_peak,
        "double_frames_final": rec.design.backed_twice(),
        "invalidations": kvm.stats["invalidations"],
        "conversions": kvm.stats["conversions"],
        "zaps": vm.mmu.stats["zaps"],
        "zapped_pages": vm.mmu.stats["zapped_pages"],
        "hugepage_mappings": levels["2M"] + levels["1G"],
        "directmap_splits": rmp.directmap_splits if rmp is not None else 0,
        "directmap_restores": rmp.directmap_restores if rmp is not None else 0,
        "stale_pages": kvm.stats["stale_pages"],
        "stray_write_frames": rec.stray_frames,
        "stray_writes_refused": rec.stray_refused,
        "implicit_conversions": rec.implicit,
        "device_errors": rec.device_errors,
        "wall_s": wall,
    }

"""The kernel half of ``guestmem demo``: guest_memfd as real guest RAM on this host, step by step.

A DEFAULT VM gets a guest_memfd (``MMAP | INIT_SHARED``) bound as guest RAM at GPA 4 GiB; a guest
program writes patterns across all of it; the host checks them through its own mmap of the same
file; the host punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``); the guest re-faults the hole
and reads zeros, while the memory around it keeps its data; finally a deliberately wrong check shows
how a guest assertion is reported.  Each step is timed (wall clock) and printed as it finishes.
:func:`run_kernel_demo` returns the steps so a larger showcase can reuse them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from guestmem import uapi as u
from guestmem.api import Exit, ExitGuestAssert, ExitSync
from guestmem.errors import KvmError
from guestmem.guest.ops import Program, Sync, Verify, Write

MIB = 1 << 20
DEFAULT_SIZE = 64 * MIB
DEFAULT_GPA = 4 << 30
PATTERNS = (0xA1, 0xB2, 0xC3, 0xD4)


class DemoFailure(RuntimeError):
    """A demo step did not see what it expected."""


def _expect_sync(ex: Exit, value: int) -> None:
    if not isinstance(ex, ExitSync) or ex.value != value:
        raise DemoFailure(f"expected Sync({value}), the vCPU exited with {ex!r}")


def run_kernel_demo(console: Console, *, size: int = DEFAULT_SIZE, gpa: int = DEFAULT_GPA,
                    path: str = "/dev/kvm") -> dict[str, Any]:
    """Run the demo against the KVM at ``path``; returns ``{"available", "ok", "steps", ...}``."""
    from guestmem.linux import open_kernel

    if size < 4 * MIB or size % (4 * MIB):
        raise ValueError("size must be a positive multiple of 4 MiB")
    result: dict[str, Any] = {"backend": "kernel", "device": path, "size": size, "gpa": gpa, "steps": []}
    try:
        kvm = open_kernel(path)
    except KvmError as err:
        console.print(f"[yellow]kernel demo skipped:[/] {path} cannot be opened "
                      f"({err.errname}: {err.message}); this host has no usable KVM, "
                      "so there is nothing real to show.")
        result.update(available=False, ok=None, reason=f"{err.errname}: {err.message}")
        return result
    result["available"] = True
    steps: list[dict[str, Any]] = result["steps"]

    def step(title: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        detail = fn()
        seconds = time.perf_counter() - start
        steps.append({"step": title, "seconds": seconds, "detail": detail})
        console.print(f"  [green]✓[/] {title:<56} [cyan]{seconds * 1e3:9.1f} ms[/]")
        console.print(f"      [dim]{detail}[/]", highlight=False)

    quarter = size // 4
    hole_len = min(2 * MIB, quarter)
    hole_off = quarter - hole_len // 2  # straddles the first two stripes
    flags = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
    program = Program([
        *(Write(gpa + i * quarter, quarter, p) for i, p in enumerate(PATTERNS)),
        Sync(1),
        *(Verify(gpa + i * quarter, quarter, p) for i, p in enumerate(PATTERNS)),
        Sync(2),
        Verify(gpa + hole_off, hole_len, 0),
        Verify(gpa + hole_off - u.PAGE_SIZE, u.PAGE_SIZE, PATTERNS[0]),
        Verify(gpa + hole_off + hole_len, u.PAGE_SIZE, PATTERNS[1]),
        Sync(3),
        Verify(gpa + hole_off, hole_len, PATTERNS[0]),  # wrong on purpose: the hole reads zero
    ])
    ctx: dict[str, Any] = {}
    console.print(f"[bold]kernel backend[/] ({path}): guest_memfd of {size // MIB} MiB as guest RAM at "
                  f"GPA {gpa:#x}")
    try:
        def create() -> str:
            ctx["vm"] = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
            return "KVM_CREATE_VM(DEFAULT)"

        def gmem() -> str:
            ctx["gmem"] = ctx["vm"].create_guest_memfd(size, flags)
            ctx["map"] = ctx["gmem"].mmap()
            return f"KVM_CREATE_GUEST_MEMFD(flags=MMAP|INIT_SHARED) + mmap at {ctx['map'].addr:#x}"

        def bind() -> str:
            ctx["vm"].set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, gpa, size, ctx["map"].addr,
                                              ctx["gmem"], 0)
            return "slot 0, KVM_MEM_GUEST_MEMFD, userspace_addr = the guest_memfd mmap"

        def load() -> str:
            ctx["vcpu"] = ctx["vm"].create_vcpu(0)
            ctx["vcpu"].load(program)
            return f"{len(ctx['vcpu'].compiled.code)} bytes of x86-64 code, long mode"

        def guest_write() -> str:
            _expect_sync(ctx["vcpu"].run(), 1)
            return f"rep stosq: {len(PATTERNS)} stripes of {quarter // MIB} MiB"

        def host_check() -> str:
            buf = np.empty(size, dtype=np.uint8)
            ctx["map"].readinto(0, buf)
            for i, p in enumerate(PATTERNS):
                stripe = buf[i * quarter : (i + 1) * quarter]
                if not (stripe == p).all():
                    raise DemoFailure(f"host sees {stripe[stripe != p][0]:#x} in stripe {i}, not {p:#x}")
            return "process_vm_readv of the whole mmap, compared with numpy"

        def guest_verify() -> str:
            _expect_sync(ctx["vcpu"].run(), 2)
            return "repe scasq over every byte"

        def punch() -> str:
            ctx["gmem"].punch_hole(hole_off, hole_len)
            return f"fallocate(PUNCH_HOLE|KEEP_SIZE, {hole_off:#x}, {hole_len:#x})"

        def host_hole() -> str:
            raw = ctx["map"].read(hole_off - u.PAGE_SIZE, hole_len + 2 * u.PAGE_SIZE)
            data = np.frombuffer(raw, np.uint8)
            inner = data[u.PAGE_SIZE : -u.PAGE_SIZE]
            if inner.any() or data[0] != PATTERNS[0] or data[-1] != PATTERNS[1]:
                raise DemoFailure("the host does not see zeros in the hole with data around it")
            return "zeros in the hole, patterns on both sides"

        def guest_hole() -> str:
            _expect_sync(ctx["vcpu"].run(), 3)
            return "guest re-faults the hole and reads zeros; neighbours intact"

        def guest_assert() -> str:
            ex = ctx["vcpu"].run()
            if not isinstance(ex, ExitGuestAssert) or ex.gpa != gpa + hole_off or ex.found != 0:
                raise DemoFailure(f"expected a guest assertion at {gpa + hole_off:#x}, got {ex!r}")
            return f"ExitGuestAssert at gpa {ex.gpa:#x}: expected {ex.expected:#04x}, found {ex.found:#04x}"

        step("create a DEFAULT VM", create)
        step(f"create a {size // MIB} MiB guest_memfd and mmap it", gmem)
        step(f"bind it as guest RAM at GPA {gpa:#x}", bind)
        step("create a vCPU, compile and load the guest program", load)
        step(f"guest writes {size // MIB} MiB", guest_write)
        step("host checks every byte through its mmap", host_check)
        step(f"guest verifies {size // MIB} MiB", guest_verify)
        step(f"host punches a {hole_len // 1024} KiB hole", punch)
        step("host reads the hole through its mmap", host_hole)
        step("guest verifies zeros in the hole", guest_hole)
        step("guest checks the hole for the old pattern (must fail)", guest_assert)
        result["ok"] = True
    except (DemoFailure, KvmError) as err:
        console.print(f"  [red]✗ {err}[/]")
        result.update(ok=False, error=str(err))
    finally:
        for name in ("map", "vm", "gmem"):
            if name in ctx:
                ctx[name].close()
        kvm.close()
    if steps:
        table = Table(title="kernel demo: wall time per step")
        table.add_column("step")
        table.add_column("ms", justify="right")
        for s in steps:
            table.add_row(s["step"], f"{s['seconds'] * 1e3:.1f}")
        table.add_row("[bold]total[/]", f"[bold]{sum(s['seconds'] for s in steps) * 1e3:.1f}[/]")
        console.print(table)
    return result

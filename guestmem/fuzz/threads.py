"""The concurrent driver: vCPU threads write and verify while other threads convert, punch,
allocate, pin (and punch under a pin) and read from the host, with the invariants checked
alongside.

The promises checked (issue 9):

* *no lost write where PRESERVE promises it*: each vCPU thread owns a region it writes and then
  verifies; the converter threads flip the attributes of those regions only with
  ``KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE``, and nothing else touches them, so every Verify
  must pass;
* *no crash*: every exception other than ``KvmError``/``GuestAccessFault`` in any thread is an
  error (a ``LockOrderError`` from :mod:`guestmem.sync` is the lock-order report);
* *no deadlock*: every thread must finish within a timeout after the run's end;
* the invariants: ``vm.check_invariants(quiescent=False)`` runs in its own thread throughout, and
  the full check (quiescent) at the end.

The model runs with per-guest_memfd attributes (RFC v5, where content modes exist) and a
software-protected VM, whose flavour supports PRESERVE in both directions.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import guestmem
from guestmem import uapi as u
from guestmem.api import ExitGuestAssert, ExitHalt, ExitMemoryFault
from guestmem.errors import KvmError
from guestmem.guest.ops import Program, Verify, Write

PS = u.PAGE_SIZE
GPA = 1 << 32
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


@dataclass
class ThreadReport:
    """What a concurrent run did and what went wrong."""

    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)       # crashes, lock-order reports
    lost_writes: list[str] = field(default_factory=list)  # a Verify PRESERVE should have passed
    invariant_errors: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)        # threads alive after the timeout

    @property
    def ok(self) -> bool:
        return not (self.errors or self.lost_writes or self.invariant_errors or self.stuck)

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items()))
        return (f"threads: {ops}; {len(self.errors)} errors, {len(self.lost_writes)} lost writes, "
                f"{len(self.invariant_errors)} invariant violations, {len(self.stuck)} stuck")


def run_threads(seconds: float = 2.0, seed: int = 0, *, vcpus: int = 2, region_pages: int = 4,
                chaos_pages: int = 32, timeout: float = 20.0, pins: bool = True,
                **model_options: Any) -> ThreadReport:
    """Run the concurrent workload for ``seconds``; see the module docstring.  ``pins=False``
    leaves out pinning (and punching under a pin)."""
    opts = {"attributes": "gmem", "inplace_revision": "v5", **model_options}
    kvm = guestmem.open("model", **opts)
    vm = kvm.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    owned = vcpus * region_pages
    npages = owned + chaos_pages
    gmem = vm.create_guest_memfd(npages * PS, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    mapping = gmem.mmap()
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, GPA, npages * PS, mapping.addr, gmem, 0)
    rep = ThreadReport()
    lock = threading.Lock()
    stop = threading.Event()

    def note(kind: str) -> None:
        with lock:
            rep.ops[kind] += 1

    def crashed(name: str, e: BaseException) -> None:
        """An exception the interface may not raise; the thread records it and goes on."""
        with lock:
            if len(rep.errors) < 50:
                rep.errors.append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")

    def guarded(name: str, body: Any) -> Any:
        def run() -> None:
            try:
                body(random.Random(f"{seed}:{name}"))
            except Exception as e:  # any escape is an error: the body catches what is allowed
                with lock:
                    rep.errors.append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
        return threading.Thread(target=run, name=f"fuzz-{name}", daemon=True)

    def convert(off: int, size: int, private: bool) -> None:
        """PRESERVE conversion, retried while a pin makes it EAGAIN."""
        for _ in range(100):
            try:
                gmem.set_memory_attributes2(off, size, PRIVATE if private else 0, PRESERVE)
                note("convert")
                return
            except KvmError as e:
                if e.errno != 11:  # EAGAIN: a pin; anything else is unexpected here
                    raise
                time.sleep(0.0005)
        raise TimeoutError(f"conversion of [{off:#x}, +{size:#x}) stayed EAGAIN")

    def vcpu_body(i: int) -> Any:
        base = i * region_pages * PS
        size = region_pages * PS

        def body(rng: random.Random) -> None:
            c = vm.create_vcpu(i)
            while not stop.is_set():
                pat = rng.randrange(1, 256)
                c.load(Program([Write(GPA + base, size, pat), Verify(GPA + base, size, pat)]))
                for _ in range(1000):
                    ex = c.run()
                    if isinstance(ex, ExitHalt):
                        note("vcpu.program")
                        break
                    if isinstance(ex, ExitMemoryFault):
                        note("vcpu.fault")
                        off = ex.gpa - GPA
                        convert(off - off % PS, max(PS, ex.size), ex.private)
                        continue
                    if isinstance(ex, ExitGuestAssert):
                        with lock:
                            rep.lost_writes.append(f"vcpu {i}: {ex}")
                        return
                    raise AssertionError(f"unexpected exit {ex!r}")
        return body

    def converter(rng: random.Random) -> None:
        while not stop.is_set():
            i = rng.randrange(vcpus)
            first = rng.randrange(region_pages)
            n = rng.randint(1, region_pages - first)
            convert((i * region_pages + first) * PS, n * PS, rng.random() < 0.5)

    def chaos(rng: random.Random) -> None:
        """Allocate, punch, convert (any mode), pin and punch under the pin, in the chaos region."""
        while not stop.is_set():
            first = owned + rng.randrange(chaos_pages)
            n = rng.randint(1, owned + chaos_pages - first)
            off, size = first * PS, n * PS
            what = rng.choice(["allocate", "punch", "convert"] + (["pin"] if pins else []))
            try:
                if what == "allocate":
                    gmem.allocate(off, size)
                elif what == "punch":
                    gmem.punch_hole(off, size)
                elif what == "convert":
                    gmem.set_memory_attributes2(off, size, rng.choice([0, PRIVATE]),
                                                rng.choice([0, u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO,
                                                            PRESERVE]))
                else:
                    with mapping.pin(off, PS):
                        gmem.punch_hole(off, PS)
                        mapping.read(off, 16)
                note(f"chaos.{what}")
            except KvmError:  # includes GuestAccessFault: a private page, EAGAIN under a pin
                note(f"chaos.{what}.refused")
            except Exception as e:
                crashed(f"chaos.{what}", e)

    def host_reader(rng: random.Random) -> None:
        while not stop.is_set():
            off = rng.randrange(owned + chaos_pages) * PS
            try:
                mapping.read(off, rng.choice([16, PS]))
                note("host.read")
            except KvmError:
                note("host.read.refused")
            except Exception as e:
                crashed("host.read", e)

    def checker(rng: random.Random) -> None:
        while not stop.is_set():
            try:
                vm.check_invariants(quiescent=False)
                note("check")
            except AssertionError as e:
                with lock:
                    rep.invariant_errors.append(str(e))
                return

    threads = [guarded(f"vcpu{i}", vcpu_body(i)) for i in range(vcpus)]
    threads += [guarded("converter", converter), guarded("chaos", chaos),
                guarded("host_reader", host_reader), guarded("checker", checker)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            rep.stuck.append(t.name)
    if not rep.stuck:
        try:
            vm.check_invariants()
        except AssertionError as e:
            rep.invariant_errors.append(f"at the end: {e}")
    return rep

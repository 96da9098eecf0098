"""A catalogue of host behaviours, recorded from the real kernel and replayed on the model's twin.

Why this exists: the conformance suite checks what its authors thought of; this checks the model
against *what the kernel did*, for hundreds of small cases generated combinatorially (guest_memfd
creation flags x sizes, fallocate modes x ranges, mmap arguments, memslot binding geometry, file
operations, pre-fault, guest accesses, capabilities).  Each behaviour is a small function over
:mod:`guestmem.api` that returns its outcome as plain JSON (``"ok"``, an errno name, ``"SIGBUS"``,
values read back, the exits a guest gave).  ``record`` runs the catalogue on the kernel backend and
writes ``tests/conformance/host_behaviours.json`` (with the host's uname and profile);
``replay`` runs it on a model configured like that host (``like`` the recorded profile) and sorts
every behaviour into *agree*, *departure* (the host differs from upstream, documented in
:func:`departure_for` with the upstream line) or *disagree*.

Run it as ``python3 -m guestmem.conformance_record record`` (needs ``/dev/kvm``) and
``python3 -m guestmem.conformance_record replay``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from guestmem import uapi as u
from guestmem.api import (
    Exit,
    ExitGuestAssert,
    ExitHalt,
    ExitMemoryFault,
    ExitMmio,
    ExitSync,
    Kvm,
)
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.guest.ops import Op, Program, Sync, Touch, Verify, Write

PS = u.PAGE_SIZE
MIB = 1 << 20
SZ_2M = 2 * MIB
GIB4 = 1 << 32
INT64_MAX = (1 << 63) - 1
GMEM = u.KVM_MEM_GUEST_MEMFD
MMAP = u.GUEST_MEMFD_FLAG_MMAP
SHARED = u.GUEST_MEMFD_FLAG_INIT_SHARED
DEFAULT_PATH = os.path.join("tests", "conformance", "host_behaviours.json")

Outcome = Any  # JSON: "ok", an errno name, "SIGBUS", a list or dict of such


@dataclass(frozen=True)
class Behaviour:
    """One recorded behaviour: ``name`` is unique and says what is done; ``run`` does it."""

    name: str
    area: str
    run: Callable[[Kvm], Outcome]


@dataclass(frozen=True)
class Departure:
    """A behaviour where this host differs from upstream, so the twin (which follows upstream)
    is expected to differ too: why, and the upstream line that shows what upstream does."""

    reason: str
    upstream: str


def errno_name(err: int | None) -> str:
    if err == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(err or 0, str(err))


def outcome(fn: Callable[[], Outcome]) -> Outcome:
    """``fn()``'s result (``"ok"`` for None), or what it raised, by name."""
    try:
        value = fn()
    except GuestAccessFault:
        return "SIGBUS"
    except KvmError as err:
        return errno_name(err.errno)
    except (TypeError, OverflowError) as err:
        return type(err).__name__
    return "ok" if value is None else value


# --- the catalogue ----------------------------------------------------------------------------------

GMEM_FLAGS = [0, MMAP, SHARED, MMAP | SHARED, 1 << 2, 1 << 8, 1 << 63, (1 << 64) - 1]
GMEM_SIZES = [0, 1, PS - 1, PS, PS + 1, 2 * PS, SZ_2M, 1 << 30, 1 << 40, INT64_MAX - PS + 1,
              1 << 63, (1 << 64) - PS]


def _create_gmem(flags: int, size: int) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm:
            def go() -> Outcome:
                with vm.create_guest_memfd(size, flags) as g:
                    st_size, blksize, _ = g.stat()
                    return {"size": st_size, "blksize": blksize, "flags": int(g.flags)}
            return outcome(go)
    return run


FALLOC_MODES = [0, u.FALLOC_FL_KEEP_SIZE, u.FALLOC_FL_PUNCH_HOLE,
                u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE, u.FALLOC_FL_NO_HIDE_STALE,
                u.FALLOC_FL_COLLAPSE_RANGE, u.FALLOC_FL_ZERO_RANGE,
                u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_ZERO_RANGE, u.FALLOC_FL_INSERT_RANGE,
                u.FALLOC_FL_UNSHARE_RANGE, u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_UNSHARE_RANGE,
                u.FALLOC_FL_WRITE_ZEROES, 0x100, -1]
FALLOC_RANGES = [(0, PS), (0, SZ_2M), (PS, 2 * PS), (1, PS), (0, 1), (0, 0), (0, -PS), (-PS, PS),
                 (SZ_2M, PS), (SZ_2M - PS, 2 * PS), (4 * SZ_2M, PS), (0, INT64_MAX - PS + 1),
                 (INT64_MAX - PS + 1, PS)]


def _fallocate(gmem_flags: int, mode: int, offset: int, length: int) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, gmem_flags) as g:
            return outcome(lambda: g.fallocate(mode, offset, length))
    return run


def _byte_hex(m: Any, offset: int) -> str:
    return str(m.read(offset, 1).hex())


def _fallocate_then_read(gmem_flags: int, steps: list[tuple[int, int, int]], probe: list[int]
                         ) -> Callable[[Kvm], Outcome]:
    """Write a pattern through the mapping, run fallocate steps, read bytes back: what survives."""
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, gmem_flags) as g, g.mmap() as m:
            m.fill(0, SZ_2M, 0x5A)
            done = [outcome(partial(g.fallocate, *step)) for step in steps]
            return {"steps": done, "read": [outcome(partial(_byte_hex, m, o)) for o in probe]}
    return run


MMAP_LENGTHS: list[int | None] = [None, 0, PS, SZ_2M, 2 * SZ_2M, 1 << 47]
MMAP_OFFSETS = [0, PS, 1, SZ_2M, -PS]


def _mmap(gmem_flags: int, length: int | None, offset: int, shared: bool) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, gmem_flags) as g:
            def go() -> Outcome:
                with g.mmap(length, offset, shared=shared) as m:
                    last = m.length - 1
                    return {"length": m.length, "first": outcome(lambda: m.read(0, 1).hex()),
                            "last": outcome(lambda: m.read(last, 1).hex())}
            return outcome(go)
    return run


def _mapping_op(gmem_flags: int, what: str) -> Callable[[Kvm], Outcome]:
    """Host access through a guest_memfd mapping: write/read back, fill, pin, discard, beyond EOF."""
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, gmem_flags) as g, \
                g.mmap(2 * SZ_2M) as m:
            if what == "write-read":
                return [outcome(lambda: m.write(PS + 3, b"abc")), outcome(lambda: m.read(PS, 8).hex())]
            if what == "fill-read":
                return [outcome(lambda: m.fill(0, SZ_2M, 0x33)), outcome(lambda: m.read(SZ_2M - 2, 2).hex())]
            if what == "beyond-eof":
                return [outcome(lambda: m.read(SZ_2M, 1).hex()), outcome(lambda: m.write(SZ_2M + 5, b"x"))]
            if what == "straddle-eof":
                return outcome(lambda: m.read(SZ_2M - 2, 4).hex())
            if what == "discard":
                m.fill(0, 2 * PS, 0x77)
                return [outcome(lambda: m.discard(0, PS)), outcome(lambda: m.read(0, 1).hex()),
                        outcome(lambda: m.read(PS, 1).hex())]
            if what == "discard-unaligned":
                return [outcome(lambda: m.discard(1, PS)), outcome(lambda: m.discard(0, 0))]
            if what == "punch-then-read":
                m.fill(0, 2 * PS, 0x77)
                return [outcome(lambda: g.punch_hole(PS, PS)), outcome(lambda: m.read(0, 1).hex()),
                        outcome(lambda: m.read(PS, 1).hex())]
            if what == "pin":
                def pin() -> Outcome:
                    with m.pin(0, PS):
                        return outcome(lambda: m.read(0, 1).hex())
                return [outcome(pin), outcome(lambda: m.pin(1, PS).__enter__())]
            raise ValueError(what)
    return run


def _file_op(gmem_flags: int, what: str, arg: Any) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, gmem_flags) as g:
            if what == "read":
                length, offset = arg
                return outcome(lambda: g.read(length, offset))
            if what == "write":
                data, offset = arg
                return outcome(lambda: g.write(data, offset))
            if what == "truncate":
                return [outcome(lambda: g.truncate(arg)), g.stat()[0]]
            if what == "stat":
                st_size, blksize, _ = g.stat()
                return [st_size, blksize]
            if what == "closed":
                g.close()
                return [outcome(lambda: g.fallocate(u.FALLOC_FL_KEEP_SIZE, 0, PS)),
                        outcome(lambda: g.mmap(PS)), outcome(lambda: g.stat())]
            raise ValueError(what)
    return run


def _lifetime(what: str) -> Callable[[Kvm], Outcome]:
    """What outlives what: a guest_memfd after its VM fd, a mapping after its fd, a slot's binding
    after the file is gone."""
    def run(kvm: Kvm) -> Outcome:
        vm = kvm.create_vm()
        g = vm.create_guest_memfd(SZ_2M, MMAP | SHARED)
        with ExitStack() as st:
            st.callback(vm.close)
            st.callback(g.close)
            if what == "vm-closed-first":
                vm.close()
                return [outcome(lambda: g.fallocate(u.FALLOC_FL_KEEP_SIZE, 0, PS)),
                        outcome(lambda: g.stat()[0]), outcome(lambda: g.mmap(PS).close()),
                        outcome(lambda: vm.create_guest_memfd(PS, 0)),
                        outcome(lambda: vm.check_extension(u.KVM_CAP_GUEST_MEMFD))]
            if what == "mapping-outlives-fd":
                m = st.enter_context(g.mmap())
                m.fill(0, PS, 0x66)
                g.close()
                return [outcome(lambda: m.read(0, 2).hex()), outcome(lambda: m.write(PS, b"z")),
                        outcome(lambda: m.read(PS, 1).hex()), outcome(lambda: m.discard(0, PS)),
                        outcome(lambda: m.read(0, 1).hex())]
            if what == "mapping-closed":
                m = g.mmap()
                m.close()
                return [outcome(lambda: m.read(0, 1)), outcome(lambda: m.write(0, b"x")),
                        outcome(lambda: m.close())]
            if what == "slot-after-fd-closed":
                vm.set_user_memory_region2(1, GMEM, GIB4, SZ_2M, 0, g, 0)
                g.close()
                other = st.enter_context(vm.create_guest_memfd(SZ_2M, 0))
                return [outcome(lambda: vm.set_user_memory_region2(2, GMEM, 2 * GIB4, SZ_2M, 0, other, 0)),
                        outcome(lambda: vm.set_user_memory_region2(1, 0, GIB4, 0, 0)),
                        outcome(lambda: vm.set_user_memory_region2(1, GMEM, GIB4, SZ_2M, 0, other, SZ_2M))]
            if what == "closed-twice":
                g.close()
                return [outcome(lambda: g.close()), outcome(lambda: g.read(1)),
                        outcome(lambda: g.punch_hole(0, PS))]
            raise ValueError(what)
    return run


# Memslot geometry: guest_memfd_offset x memory_size for a 2 MiB guest_memfd.
BIND_OFFSETS = [0, PS, 1, SZ_2M - PS, SZ_2M, SZ_2M + PS, INT64_MAX - PS + 1, 1 << 63, (1 << 64) - PS]
BIND_SIZES = [PS, SZ_2M, SZ_2M + PS, 2 * SZ_2M, 0, 4 * PS]


def _bind(gmem_flags: int, offset: int, size: int, hva: str) -> Callable[[Kvm], Outcome]:
    """One KVM_SET_USER_MEMORY_REGION2 binding a 2 MiB guest_memfd; userspace_addr is 0, anonymous
    memory, or the guest_memfd's own mapping."""
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, gmem_flags) as g, ExitStack() as st:
            addr = 0
            if hva == "anon":
                addr = st.enter_context(kvm.mmap_anonymous(max(size, PS))).addr
            elif hva == "gmem":
                addr = st.enter_context(g.mmap(max(size, PS))).addr
            return outcome(lambda: vm.set_user_memory_region2(1, GMEM, GIB4, size, addr, g, offset))
    return run


MEMSLOT_FLAGS = [0, u.KVM_MEM_LOG_DIRTY_PAGES, u.KVM_MEM_READONLY, GMEM, GMEM | u.KVM_MEM_LOG_DIRTY_PAGES,
                 GMEM | u.KVM_MEM_READONLY, 1 << 3, 1 << 15, 1 << 16, 1 << 31]


def _memslot_flags(flags: int, v2: bool) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, 0) as g, kvm.mmap_anonymous(SZ_2M) as m:
            if v2:
                return outcome(lambda: vm.set_user_memory_region2(1, flags, GIB4, SZ_2M, m.addr, g, 0))
            return outcome(lambda: vm.set_user_memory_region(1, flags, GIB4, SZ_2M, m.addr))
    return run


def _memslot_scenario(what: str) -> Callable[[Kvm], Outcome]:
    """Sequences of memslot calls: overlaps, rebinding, modification of guest_memfd slots, fds."""
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(4 * SZ_2M, 0) as g, ExitStack() as st:
            def bind(slot: int, gpa: int, size: int, off: int, fd: Any = None, flags: int = GMEM) -> Outcome:
                return outcome(lambda: vm.set_user_memory_region2(slot, flags, gpa, size, 0,
                                                                  g if fd is None else fd, off))
            if what == "file-overlap":
                return [bind(1, GIB4, SZ_2M, 0), bind(2, 2 * GIB4, SZ_2M, SZ_2M - PS)]
            if what == "file-overlap-same-range":
                return [bind(1, GIB4, SZ_2M, 0), bind(2, 2 * GIB4, SZ_2M, 0)]
            if what == "file-overlap-one-page":
                return [bind(1, GIB4, SZ_2M, SZ_2M), bind(2, 2 * GIB4, PS, 2 * SZ_2M - PS)]
            if what == "file-adjacent":
                return [bind(1, GIB4, SZ_2M, 0), bind(2, 2 * GIB4, SZ_2M, SZ_2M)]
            if what == "gpa-overlap":
                return [bind(1, GIB4, SZ_2M, 0), bind(2, GIB4 + PS, SZ_2M, SZ_2M)]
            if what == "gpa-and-file-overlap":
                return [bind(1, GIB4, SZ_2M, 0), bind(2, GIB4, SZ_2M, 0)]
            if what == "rebind-after-delete":
                return [bind(1, GIB4, SZ_2M, 0), bind(1, GIB4, 0, 0, flags=0), bind(2, 2 * GIB4, SZ_2M, 0)]
            if what == "modify-gmem-slot":
                return [bind(1, GIB4, SZ_2M, 0), bind(1, GIB4, SZ_2M, 0),
                        bind(1, GIB4 + SZ_2M, SZ_2M, 0), bind(1, GIB4, SZ_2M, 0, flags=0)]
            if what == "delete-twice":
                return [bind(1, GIB4, SZ_2M, 0), bind(1, GIB4, 0, 0, flags=0), bind(1, GIB4, 0, 0, flags=0)]
            if what == "delete-absent":
                return bind(5, GIB4, 0, 0, flags=0)
            if what == "bind-closed-fd":
                other = vm.create_guest_memfd(SZ_2M, 0)
                fd = other.fd
                other.close()
                return bind(1, GIB4, SZ_2M, 0, fd=fd)
            if what == "bind-memfd":
                f = kvm.memfd_create(SZ_2M)
                st.callback(f.close)
                return bind(1, GIB4, SZ_2M, 0, fd=f.fd)
            if what == "bind-vm-fd":
                return bind(1, GIB4, SZ_2M, 0, fd=vm.fd)
            if what == "bind-kvm-fd":
                return bind(1, GIB4, SZ_2M, 0, fd=kvm.fd)
            if what == "bind-huge-fd":
                return bind(1, GIB4, SZ_2M, 0, fd=0x7FFF_FFFF)
            if what == "bind-other-vm":
                other_vm = st.enter_context(kvm.create_vm())
                og = st.enter_context(other_vm.create_guest_memfd(SZ_2M, 0))
                return bind(1, GIB4, SZ_2M, 0, fd=og)
            if what == "gmem-closed-after-bind":
                r = [bind(1, GIB4, SZ_2M, 0)]
                g.close()
                return [*r, bind(1, GIB4, 0, 0, flags=0), bind(2, 2 * GIB4, SZ_2M, 0)]
            if what == "v1-after-gmem-slot":
                with kvm.mmap_anonymous(SZ_2M) as m:
                    return [bind(1, GIB4, SZ_2M, 0),
                            outcome(lambda: vm.set_user_memory_region(2, 0, 2 * GIB4, SZ_2M, m.addr)),
                            outcome(lambda: vm.set_user_memory_region(2, 0, GIB4, SZ_2M, m.addr))]
            if what == "move-plain-slot":
                with kvm.mmap_anonymous(SZ_2M) as m:
                    return [outcome(lambda: vm.set_user_memory_region(2, 0, GIB4, SZ_2M, m.addr)),
                            outcome(lambda: vm.set_user_memory_region(2, 0, 2 * GIB4, SZ_2M, m.addr)),
                            outcome(lambda: vm.set_user_memory_region(2, u.KVM_MEM_LOG_DIRTY_PAGES,
                                                                      2 * GIB4, SZ_2M, m.addr)),
                            outcome(lambda: vm.set_user_memory_region(2, 0, 2 * GIB4, PS, m.addr)),
                            outcome(lambda: vm.set_user_memory_region(2, u.KVM_MEM_READONLY,
                                                                      2 * GIB4, SZ_2M, m.addr))]
            raise ValueError(what)
    return run


SLOT_IDS = [0, 1, 509, 32763, 32764, 32767, 32768, 1 << 16, (1 << 16) | 1, (1 << 32) - 1]
GPAS = [0, PS, 1, (1 << 48) - SZ_2M, (1 << 48), (1 << 52) - SZ_2M, (1 << 52), (1 << 64) - SZ_2M]
HVAS = [0, 1, PS, (1 << 47) - SZ_2M - PS, (1 << 47) - SZ_2M, (1 << 47), (1 << 64) - PS]


def _memslot_geometry(slot: int, gpa: int, hva: int | None, size: int, gmem: bool
                      ) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, vm.create_guest_memfd(SZ_2M, 0) as g, kvm.mmap_anonymous(SZ_2M) as m:
            addr = m.addr if hva is None else hva
            if gmem:
                return outcome(lambda: vm.set_user_memory_region2(slot, GMEM, gpa, size, addr, g, 0))
            return outcome(lambda: vm.set_user_memory_region(slot, 0, gpa, size, addr))
    return run


def _pre_fault(setup: str, gpa: int, size: int, flags: int = 0) -> Callable[[Kvm], Outcome]:
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, kvm.mmap_anonymous(SZ_2M) as m, \
                vm.create_guest_memfd(SZ_2M, MMAP | SHARED) as g:
            if setup in ("anon", "deleted"):
                vm.set_user_memory_region(1, 0, GIB4, SZ_2M, m.addr)
            if setup == "deleted":
                vm.set_user_memory_region(1, 0, GIB4, 0, 0)
            if setup == "gmem":
                vm.set_user_memory_region2(1, GMEM, GIB4, SZ_2M, m.addr, g, 0)
            vcpu = vm.create_vcpu(0)
            try:
                return outcome(lambda: vcpu.pre_fault_memory(gpa, size, flags))
            finally:
                vcpu.close()
    return run


def _guest_exits(vcpu: Any, limit: int = 64, device_byte: int = 0,
                 on_sync: Callable[[], None] | None = None) -> list[Outcome]:
    """Run until Halt; every exit by name and fields (MMIO reads answered with ``device_byte``,
    ``on_sync`` called at each Sync)."""
    out: list[Outcome] = []
    for _ in range(limit):
        try:
            ex: Exit = vcpu.run()
        except KvmError as err:
            out.append(["KVM_RUN", errno_name(err.errno)])
            return out
        if isinstance(ex, ExitMmio):
            if not ex.is_write:
                ex.data = bytes([device_byte]) * ex.len
            out.append(["mmio", ex.phys_addr, ex.len, ex.is_write, bytes(ex.data[: ex.len]).hex()])
        elif isinstance(ex, ExitSync):
            out.append(["sync", ex.value])
            if on_sync is not None:
                on_sync()
        elif isinstance(ex, ExitGuestAssert):
            out.append(["assert", ex.gpa, ex.expected, ex.found])
            return out
        elif isinstance(ex, ExitMemoryFault):
            out.append(["memory_fault", ex.gpa, ex.size, ex.flags, errno_name(ex.errno)])
            return out
        elif isinstance(ex, ExitHalt):
            out.append(["halt"])
            return out
        else:
            out.append([ex.name])
            return out
    out.append(["limit"])
    return out


HostAction = Callable[[dict[str, Any]], Outcome]


def _head(m: Any) -> str:
    """The first 4 bytes and the first byte of the second page of a mapping, as hex."""
    return str(m.read(0, 4).hex() + ".." + m.read(PS, 1).hex())


def _guest(layout: str, ops: list[Op], device_byte: int = 0,
           on_sync: HostAction | None = None) -> Callable[[Kvm], Outcome]:
    """A guest program over one memslot at 4 GiB (2 MiB), laid out as ``layout`` says; the outcome
    is its exits and what the host then reads through each mapping.  ``on_sync`` runs at every
    ``Sync`` exit with the host's objects (``anon``, ``gmem``, ``file``, ``vm``)."""
    def run(kvm: Kvm) -> Outcome:
        with kvm.create_vm() as vm, kvm.mmap_anonymous(SZ_2M) as anon, ExitStack() as st:
            host: dict[str, Any] = {"anon": anon}
            objects: dict[str, Any] = {}
            if layout == "anon":
                vm.set_user_memory_region(1, 0, GIB4, SZ_2M, anon.addr)
            elif layout == "unmapped-hva":  # a user address nothing is mapped at
                vm.set_user_memory_region(1, 0, GIB4, SZ_2M, UNMAPPED_HVA)
            elif layout == "anon-readonly":
                anon.fill(0, SZ_2M, 0x11)
                vm.set_user_memory_region(1, u.KVM_MEM_READONLY, GIB4, SZ_2M, anon.addr)
            else:
                flags = {"gmem-mapped": MMAP | SHARED, "gmem-anon-hva": MMAP | SHARED,
                         "gmem-zero-hva": MMAP | SHARED, "gmem-noshared": MMAP,
                         "gmem-plain": 0}[layout]
                g = st.enter_context(vm.create_guest_memfd(SZ_2M, flags))
                addr = anon.addr
                if layout == "gmem-mapped":
                    gm = st.enter_context(g.mmap())
                    host["gmem"] = gm
                    addr = gm.addr
                elif layout == "gmem-zero-hva":
                    addr = 0
                elif flags & SHARED:
                    host["gmem"] = st.enter_context(g.mmap())
                vm.set_user_memory_region2(1, GMEM, GIB4, SZ_2M, addr, g, 0)
                objects["file"] = g
            objects.update(host, vm=vm)
            vcpu = vm.create_vcpu(0)
            if hasattr(vcpu, "run_timeout"):
                vcpu.run_timeout = 60.0
            vcpu.load(Program(ops))
            actions: list[Outcome] = []
            action = None if on_sync is None else (lambda: actions.append(on_sync(objects)))
            exits = _guest_exits(vcpu, device_byte=device_byte, on_sync=action)
            vcpu.close()
            seen = {name: outcome(partial(_head, m)) for name, m in sorted(host.items())}
            result: dict[str, Any] = {"exits": exits, "host": seen}
            if on_sync is not None:
                result["actions"] = actions
            return result
    return run


MMIO_GPA = 0x8000_0000
UNMAPPED_HVA = 0x7000_0000_0000  # below TASK_SIZE, far from where mmap places anything here


def catalogue() -> list[Behaviour]:
    """Every behaviour, in a stable order (names are unique)."""
    out: list[Behaviour] = []

    def add(name: str, area: str, run: Callable[[Kvm], Outcome]) -> None:
        out.append(Behaviour(name, area, run))

    # Capabilities, on /dev/kvm and on a DEFAULT VM (the model's values come from its switches).
    from guestmem.host_probe import COMPARED_CAPS, _cap

    for cap in (*COMPARED_CAPS, 4096, 1000, 1 << 32, (1 << 64) - 1):  # and numbers no cap has
        def on_system(k: Kvm, c: int = cap) -> Outcome:
            return outcome(lambda: k.check_extension(c))
        add(f"caps/system/{_cap(cap)}", "caps", on_system)

        def on_vm(k: Kvm, c: int = cap) -> Outcome:
            with k.create_vm() as vm:
                return outcome(lambda: vm.check_extension(c))
        add(f"caps/vm/{_cap(cap)}", "caps", on_vm)
    add("caps/api_version", "caps", lambda k: k.api_version())

    # VM types and vCPU ids.
    for t in [*sorted(u.VM_TYPE_NAMES), 6, 7, 31, 32, 1 << 32, (1 << 64) - 1]:
        def create(k: Kvm, t: int = t) -> Outcome:
            return outcome(lambda: k.create_vm(t).close())
        add(f"vm/create/type={u.VM_TYPE_NAMES.get(t, hex(t))}", "vm", create)
    for vid in [0, 1, 1023, 1024, 4095, 4096, 1 << 32, (1 << 64) - 1]:
        def vcpu(k: Kvm, vid: int = vid) -> Outcome:
            with k.create_vm() as vm:
                return outcome(lambda: vm.create_vcpu(vid).close())
        add(f"vcpu/create/id={vid:#x}", "vm", vcpu)

    def vcpu_twice(k: Kvm) -> Outcome:
        with k.create_vm() as vm:
            a = vm.create_vcpu(3)
            try:
                return outcome(lambda: vm.create_vcpu(3))
            finally:
                a.close()
    add("vcpu/create/duplicate-id", "vm", vcpu_twice)
    for cap, flags, args in [(u.KVM_CAP_EXIT_HYPERCALL, 0, (1 << u.KVM_HC_MAP_GPA_RANGE,)),
                             (u.KVM_CAP_EXIT_HYPERCALL, 0, (0,)), (u.KVM_CAP_EXIT_HYPERCALL, 0, (1,)),
                             (u.KVM_CAP_EXIT_HYPERCALL, 0, ((1 << 64) - 1,)),
                             (u.KVM_CAP_EXIT_HYPERCALL, 1, (1 << u.KVM_HC_MAP_GPA_RANGE,)),
                             (u.KVM_CAP_GUEST_MEMFD, 0, ()), (0, 0, ()), (99999, 0, ())]:
        def enable(k: Kvm, cap: int = cap, flags: int = flags, args: tuple[int, ...] = args) -> Outcome:
            with k.create_vm() as vm:
                return outcome(lambda: vm.enable_cap(cap, flags, args))
        add(f"vm/enable_cap/cap={cap}/flags={flags}/args={[hex(a) for a in args]}", "vm", enable)

    # Host memory.
    for size in [0, 1, PS, SZ_2M, 1 << 47, (1 << 64) - PS]:
        def anon(k: Kvm, size: int = size) -> Outcome:
            def go() -> Outcome:
                with k.mmap_anonymous(size) as m:
                    return m.length
            return outcome(go)
        add(f"host/mmap_anonymous/size={size:#x}", "host", anon)
    for size in [0, PS, SZ_2M, -1, -PS]:
        def memfd(k: Kvm, size: int = size) -> Outcome:
            def go() -> Outcome:
                k.memfd_create(size).close()
            return outcome(go)
        add(f"host/memfd_create/size={size}", "host", memfd)

    # guest_memfd creation: flags x sizes.
    for flags in GMEM_FLAGS:
        for size in GMEM_SIZES:
            add(f"gmem/create/flags={flags:#x}/size={size:#x}", "gmem-create", _create_gmem(flags, size))

    # fallocate: modes x ranges (on a 2 MiB guest_memfd without flags), and what survives.
    for mode in FALLOC_MODES:
        for offset, length in FALLOC_RANGES:
            add(f"fallocate/mode={mode:#x}/offset={offset:#x}/length={length:#x}", "fallocate",
                _fallocate(0, mode, offset, length))
    keep, punch = u.FALLOC_FL_KEEP_SIZE, u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE
    for steps, name in [([(punch, 0, PS)], "punch-first"), ([(punch, PS, PS)], "punch-second"),
                        ([(punch, 0, SZ_2M)], "punch-all"), ([(keep, 0, SZ_2M)], "allocate-all"),
                        ([(punch, 0, PS), (keep, 0, PS)], "punch-then-allocate"),
                        ([(punch, SZ_2M, PS)], "punch-past-end")]:
        add(f"fallocate/survives/{name}", "fallocate",
            _fallocate_then_read(MMAP | SHARED, steps, [0, PS, SZ_2M - 1]))

    # mmap of a guest_memfd: flags x length x offset x MAP_SHARED/PRIVATE, with host reads.
    for flags in [0, MMAP, MMAP | SHARED]:
        for map_length in MMAP_LENGTHS:
            for map_offset in MMAP_OFFSETS:
                for shared in (True, False):
                    if not shared and (map_length, map_offset) != (None, 0):
                        continue
                    add(f"mmap/flags={flags:#x}/length={map_length}/offset={map_offset:#x}/"
                        f"{'shared' if shared else 'private'}", "mmap",
                        _mmap(flags, map_length, map_offset, shared))
        for what in ["write-read", "fill-read", "beyond-eof", "straddle-eof", "discard", "discard-unaligned",
                     "punch-then-read", "pin"]:
            if flags & MMAP:
                add(f"mapping/flags={flags:#x}/{what}", "mmap", _mapping_op(flags, what))

    # File operations the interface has.
    for flags in [0, MMAP | SHARED]:
        reads: list[tuple[int, int | None]] = [(0, None), (1, None), (PS, None), (1, 0), (1, PS), (1, -1),
                                                (1, 1 << 62)]
        for read_length, file_offset in reads:
            add(f"file/flags={flags:#x}/read/length={read_length}/offset={file_offset}", "file",
                _file_op(flags, "read", (read_length, file_offset)))
        writes: list[tuple[bytes, int | None]] = [(b"", None), (b"x", None), (b"x", 0), (b"x", -1),
                                                  (b"x" * PS, PS)]
        for data, file_offset in writes:
            add(f"file/flags={flags:#x}/write/length={len(data)}/offset={file_offset}", "file",
                _file_op(flags, "write", (data, file_offset)))
        for size in [0, PS, SZ_2M, 2 * SZ_2M, -1]:
            add(f"file/flags={flags:#x}/truncate/size={size}", "file", _file_op(flags, "truncate", size))
        add(f"file/flags={flags:#x}/stat", "file", _file_op(flags, "stat", None))
        add(f"file/flags={flags:#x}/closed", "file", _file_op(flags, "closed", None))

    for what in ["vm-closed-first", "mapping-outlives-fd", "mapping-closed", "slot-after-fd-closed",
                 "closed-twice"]:
        add(f"lifetime/{what}", "file", _lifetime(what))
    # fallocate on a mappable guest_memfd too (the same checks must not depend on the flags).
    for mode in FALLOC_MODES[:4]:
        for offset, length in FALLOC_RANGES:
            add(f"fallocate/flags=0x3/mode={mode:#x}/offset={offset:#x}/length={length:#x}", "fallocate",
                _fallocate(MMAP | SHARED, mode, offset, length))

    # Memslot binding geometry, flags, sequences, slot ids, addresses.
    for flags in [0, MMAP | SHARED]:
        for offset in BIND_OFFSETS:
            for size in BIND_SIZES:
                add(f"bind/flags={flags:#x}/offset={offset:#x}/size={size:#x}", "memslot",
                    _bind(flags, offset, size, "zero"))
    for flags in [0, MMAP | SHARED]:
        for hva in ["anon", "gmem"]:
            if hva == "gmem" and not flags & MMAP:
                continue
            add(f"bind/flags={flags:#x}/hva={hva}", "memslot", _bind(flags, 0, SZ_2M, hva))
    for flags in MEMSLOT_FLAGS:
        for v2 in (False, True):
            add(f"memslot/flags={flags:#x}/{'v2' if v2 else 'v1'}", "memslot", _memslot_flags(flags, v2))
    for what in ["file-overlap", "file-overlap-same-range", "file-overlap-one-page", "file-adjacent",
                 "gpa-overlap", "gpa-and-file-overlap", "rebind-after-delete", "modify-gmem-slot",
                 "delete-twice", "delete-absent", "bind-closed-fd", "bind-memfd", "bind-vm-fd",
                 "bind-kvm-fd", "bind-huge-fd", "bind-other-vm", "gmem-closed-after-bind",
                 "v1-after-gmem-slot", "move-plain-slot"]:
        add(f"memslot/{what}", "memslot", _memslot_scenario(what))
    for slot in SLOT_IDS:
        for gmem in (False, True):
            add(f"memslot/slot={slot:#x}/{'gmem' if gmem else 'anon'}", "memslot",
                _memslot_geometry(slot, GIB4, None, SZ_2M, gmem))
    for gpa in GPAS:
        for gmem in (False, True):
            add(f"memslot/gpa={gpa:#x}/{'gmem' if gmem else 'anon'}", "memslot",
                _memslot_geometry(1, gpa, None, SZ_2M, gmem))
    for hva_value in HVAS:
        for gmem in (False, True):
            add(f"memslot/hva={hva_value:#x}/{'gmem' if gmem else 'anon'}", "memslot",
                _memslot_geometry(1, GIB4, hva_value, SZ_2M, gmem))
    for size in [1, PS + 1, (1 << 31) * PS, ((1 << 31) - 1) * PS, 1 << 63]:
        add(f"memslot/size={size:#x}", "memslot", _memslot_geometry(1, 0, 0, size, False))

    # KVM_PRE_FAULT_MEMORY.
    for setup in ["none", "anon", "deleted", "gmem"]:
        for gpa, size, flags in [(GIB4, PS, 0), (GIB4, SZ_2M, 0), (0, PS, 0), (GIB4 + 1, PS, 0),
                                 (GIB4, 1, 0), (GIB4, 0, 0), (GIB4, PS, 1), ((1 << 64) - PS, 2 * PS, 0)]:
            add(f"pre_fault/{setup}/gpa={gpa:#x}/size={size:#x}/flags={flags}", "pre-fault",
                _pre_fault(setup, gpa, size, flags))

    # Memory attributes (per-VM and per-guest_memfd ioctls).
    for address, size, attrs, flags in [(0, PS, 0, 0), (GIB4, SZ_2M, u.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),
                                        (0, 0, 0, 0), (1, PS, 0, 0), (0, PS, 0, 1), (0, PS, 1 << 63, 0)]:
        def attributes(k: Kvm, a: int = address, s: int = size, at: int = attrs, f: int = flags) -> Outcome:
            with k.create_vm() as vm:
                return outcome(lambda: vm.set_memory_attributes(a, s, at, f))
        add(f"attributes/vm/address={address:#x}/size={size:#x}/attrs={attrs:#x}/flags={flags}",
            "attributes", attributes)
    for offset, size, attrs in [(0, PS, 0), (0, PS, u.KVM_MEMORY_ATTRIBUTE_PRIVATE), (1, PS, 0)]:
        def attributes2(k: Kvm, o: int = offset, s: int = size, at: int = attrs) -> Outcome:
            with k.create_vm() as vm, vm.create_guest_memfd(SZ_2M, MMAP | SHARED) as g:
                return outcome(lambda: g.set_memory_attributes2(o, s, at))
        add(f"attributes/gmem/offset={offset:#x}/size={size:#x}/attrs={attrs:#x}", "attributes", attributes2)

    # Guest accesses through each kind of memslot, and MMIO.
    G = GIB4
    programs: list[tuple[str, list[Op], int]] = [
        ("write-verify", [Write(G, 2 * PS, 0xA5), Sync(1), Verify(G, 2 * PS, 0xA5)], 0),
        ("verify-zero", [Verify(G, 2 * PS, 0)], 0),
        ("touch", [Touch(G, 4 * PS, 0x3C)], 0),
        ("write-tail", [Write(G + 5, 11, 0x7E), Verify(G, 5, 0), Verify(G + 5, 11, 0x7E)], 0),
        ("verify-mismatch", [Write(G, PS, 0x10), Verify(G, PS, 0x11)], 0),
        ("write-past-slot", [Write(G + SZ_2M - 8, 16, 0x42)], 0),
        # A qword half in the slot, half in MMIO; verified with the device answering the pattern,
        # then another byte (the MMIO half mismatches), and with the memory half mismatching.
        ("write-straddle-slot-end", [Write(G + SZ_2M - 4, 12, 0x42)], 0),
        ("verify-straddle-match", [Write(G + SZ_2M - 4, 4, 0x42), Verify(G + SZ_2M - 4, 12, 0x42)], 0x42),
        ("verify-straddle-mmio-mismatch", [Write(G + SZ_2M - 4, 4, 0x42), Verify(G + SZ_2M - 4, 12, 0x42)],
         0x41),
        ("verify-straddle-memory-mismatch", [Verify(G + SZ_2M - 4, 12, 0x42)], 0x42),
    ]
    for layout in ["anon", "anon-readonly", "unmapped-hva", "gmem-mapped", "gmem-anon-hva", "gmem-zero-hva",
                   "gmem-noshared", "gmem-plain"]:
        for name, ops, device in programs:
            add(f"guest/{layout}/{name}", "guest", _guest(layout, ops, device))
    def punch_page1(o: dict[str, Any]) -> Outcome:
        return outcome(lambda: o["file"].punch_hole(PS, PS))

    def host_fill(o: dict[str, Any]) -> Outcome:
        return outcome(lambda: o.get("gmem", o["anon"]).fill(0, 2 * PS, 0x99))

    def delete_slot(o: dict[str, Any]) -> Outcome:
        return outcome(lambda: o["vm"].set_user_memory_region2(1, 0, G, 0, 0))

    for layout in ["gmem-mapped", "gmem-plain", "anon"]:
        with_actions: list[tuple[str, list[Op], HostAction]] = [
            ("punch-then-verify",
             [Write(G, 2 * PS, 0x21), Sync(1), Verify(G, PS, 0x21), Verify(G + PS, PS, 0)], punch_page1),
            ("host-fill-then-verify", [Sync(1), Verify(G, 2 * PS, 0x99)], host_fill),
            ("slot-deleted-then-write", [Write(G, 8, 0x21), Sync(1), Write(G, 8, 0x22)], delete_slot),
        ]
        for name, ops, action in with_actions:
            if layout == "anon" and action is punch_page1:
                continue
            add(f"guest/{layout}/{name}", "guest", _guest(layout, ops, 0, action))
    mmio_programs: list[tuple[str, list[Op], int]] = [
        ("write-1", [Write(MMIO_GPA, 1, 0x42)], 0), ("write-19", [Write(MMIO_GPA, 19, 0x42)], 0),
        ("write-page-cross", [Write(MMIO_GPA + PS - 6, 12, 0x42)], 0),
        ("touch", [Touch(MMIO_GPA, 3 * PS, 0x42)], 0),
        ("verify-match", [Verify(MMIO_GPA, 11, 0x42)], 0x42),
        ("verify-mismatch", [Verify(MMIO_GPA, 16, 0x42)], 0x41),
        ("verify-page-cross", [Verify(MMIO_GPA + PS - 4, 9, 0x42)], 0x42),
    ]
    for name, ops, device in mmio_programs:
        add(f"guest/mmio/{name}", "guest", _guest("anon", ops, device))
    from guestmem.conformance_calls import behaviours as new_call_behaviours

    for name, area, run in new_call_behaviours():
        add(name, area, run)
    names = [b.name for b in out]
    assert len(names) == len(set(names)), "behaviour names must be unique"
    return out


# Behaviours the catalogue names that this interface still cannot express, and why.  The
# seven groups listed here before the file, raw-ioctl and mm calls existed are now recorded by
# guestmem/conformance_calls.py (file2/, ioctl/, mmap2/, mprotect/, madvise/, numa/, fork/,
# dirty_log/).
INEXPRESSIBLE: dict[str, str] = {
    "fork: KVM ioctls from the child on the parent's VM/vCPU fds (EIO: kvm->mm != current->mm)":
        "ForkedChild acts on memory only (read/write/fill through the parent's mappings); it has no "
        "fd calls, so the child's view of the VM fd cannot be asked for",
    "madvise FREE, MERGEABLE/UNMERGEABLE, COLD, PAGEOUT, WIPEONFORK, DONTDUMP, GUARD_* ... and "
    "mprotect PROT_SEM/GROWSDOWN/GROWSUP":
        "both backends refuse these with EINVAL before any syscall (guestmem/mman.py MADV_SUPPORTED, "
        "check_prot: the model has no reclaim, KSM or core dumps to give them a meaning); the madvise/ "
        "and mprotect/ behaviours with them record that refusal, not the kernel's answer",
}


# --- departures: where this host is not upstream --------------------------------------------------

_EMULATOR_HVA = Departure(
    "this host (kvm_pvm) runs every guest instruction in KVM's emulator, which reads and writes "
    "guest memory through the memslot's userspace_addr even for a gmem-only (MMAP) guest_memfd "
    "slot; upstream maps such a slot's gfns from the guest_memfd itself",
    "arch/x86/kvm/mmu/mmu.c:4644-4645 (__kvm_mmu_faultin_pfn: `if (fault->is_private || "
    "kvm_memslot_is_gmem_only(fault->slot)) return kvm_mmu_faultin_pfn_gmem(vcpu, fault);`)")


# Guest programs over gmem-only slots whose userspace_addr is not the guest_memfd's own mapping:
# anonymous memory (the host's guest writes land there), 0 (the host's emulator finds no page and
# exits with MMIO for every access), or a guest_memfd without INIT_SHARED (whose pages the host
# cannot map, so the emulator again goes to the anonymous userspace_addr).
_EMULATOR_HVA_LAYOUTS = ("guest/gmem-anon-hva/", "guest/gmem-zero-hva/", "guest/gmem-noshared/")


_UNMAPPED_HVA = Departure(
    "this host's emulator treats a guest access whose memslot userspace_addr has nothing mapped as "
    "MMIO (it exits to userspace); upstream's fault path cannot get a pfn for the address and "
    "KVM_RUN fails with EFAULT",
    "arch/x86/kvm/mmu/mmu.c:3553-3573 (kvm_handle_error_pfn: anything but a signal, a read-only "
    "or a poisoned pfn is `return -EFAULT;`)")


def departure_for(name: str) -> Departure | None:
    """The documented departure that explains a disagreement on ``name``, if there is one."""
    if name.startswith(_EMULATOR_HVA_LAYOUTS):
        return _EMULATOR_HVA
    if name.startswith("guest/unmapped-hva/"):
        return _UNMAPPED_HVA
    return None


# --- record and replay ----------------------------------------------------------------------------


def run_catalogue(kvm_factory: Callable[[], Kvm], only: str | None = None
                  ) -> Iterator[tuple[Behaviour, Outcome]]:
    """Each behaviour on a fresh system from ``kvm_factory`` (so fd numbers and state never leak
    from one behaviour into the next)."""
    for b in catalogue():
        if only and only not in b.name:
            continue
        with kvm_factory() as kvm:
            yield b, outcome(partial(b.run, kvm))  # a failing setup step is an outcome too


def record(path: str = "/dev/kvm") -> dict[str, Any]:
    """Run the catalogue on the kernel backend; the corpus as JSON."""
    import guestmem
    from guestmem.host_probe import probe_host

    profile = probe_host(path)
    behaviours = {b.name: {"area": b.area, "outcome": o}
                  for b, o in run_catalogue(lambda: guestmem.open("kernel", path=path))}
    return {"uname": " ".join(os.uname()), "profile": profile.to_json(),
            "behaviours": behaviours, "inexpressible": INEXPRESSIBLE}


def _norm(value: Outcome) -> Outcome:
    return json.loads(json.dumps(value))


def twin_options_from_corpus(corpus: dict[str, Any]) -> dict[str, Any]:
    """The model switches for the host the corpus was recorded on (from its stored profile)."""
    p = corpus["profile"]
    names = {n: t for t, n in u.VM_TYPE_NAMES.items()}
    return {"kernel": p["kernel"], "memory_attributes": p["memory_attributes"], "tdp_mmu": p["tdp"],
            "smm": p["smm"], "vm_types": tuple(names[n] for n in p["vm_types"]),
            "phys_bits": p["phys_bits"], "max_vcpus": p["max_vcpus"]}


def replay(corpus: dict[str, Any], kvm_factory: Callable[[], Kvm] | None = None) -> dict[str, Any]:
    """Run the catalogue on the twin (or ``kvm_factory``'s backend) and sort every recorded
    behaviour: agree, departure (documented), disagree; behaviours missing on either side are
    listed as unrecorded or stale."""
    import guestmem

    if kvm_factory is None:
        options = twin_options_from_corpus(corpus)
        def kvm_factory() -> Kvm:
            return guestmem.open("model", **options)
    recorded: dict[str, Any] = corpus["behaviours"]
    result: dict[str, Any] = {"agree": [], "departure": [], "disagree": [], "unrecorded": []}
    seen = set()
    for b, got in run_catalogue(kvm_factory):
        seen.add(b.name)
        if b.name not in recorded:
            result["unrecorded"].append(b.name)
            continue
        want = recorded[b.name]["outcome"]
        if _norm(got) == want:
            result["agree"].append(b.name)
            continue
        entry = {"name": b.name, "host": want, "twin": _norm(got)}
        dep = departure_for(b.name)
        if dep is not None:
            entry.update(reason=dep.reason, upstream=dep.upstream)
            result["departure"].append(entry)
        else:
            result["disagree"].append(entry)
    result["stale"] = sorted(set(recorded) - seen)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m guestmem.conformance_record",
                                     description="record host behaviours from /dev/kvm; "
                                                 "replay them on the twin")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="run the catalogue on the kernel backend and write the corpus")
    rec.add_argument("-o", "--output", default=DEFAULT_PATH)
    rec.add_argument("--device", default="/dev/kvm")
    rep = sub.add_parser("replay", help="replay the corpus on the model's twin of the recorded host")
    rep.add_argument("-i", "--input", default=DEFAULT_PATH)
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--backend", choices=("twin", "kernel"), default="twin",
                     help="replay on the model's twin of the recorded host (default), or on /dev/kvm "
                          "to see whether the recording still holds there")
    args = parser.parse_args(argv)
    if args.cmd == "record":
        corpus = record(args.device)
        with open(args.output, "w") as f:
            json.dump(corpus, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"recorded {len(corpus['behaviours'])} behaviours to {args.output}")
        return 0
    with open(args.input) as f:
        corpus = json.load(f)
    import guestmem

    result = replay(corpus, (lambda: guestmem.open("kernel")) if args.backend == "kernel" else None)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for entry in result["disagree"]:
            print(f"DISAGREE {entry['name']}: host {entry['host']!r} twin {entry['twin']!r}")
        for entry in result["departure"]:
            print(f"departure {entry['name']}: host {entry['host']!r} twin {entry['twin']!r}")
        print(f"{len(corpus['behaviours'])} recorded: {len(result['agree'])} agree, "
              f"{len(result['departure'])} documented departures, {len(result['disagree'])} disagree; "
              f"{len(result['unrecorded'])} unrecorded, {len(result['stale'])} stale; "
              f"{len(INEXPRESSIBLE)} not expressible through the interface")
    return 0 if not result["disagree"] else 1


if __name__ == "__main__":
    sys.exit(main())

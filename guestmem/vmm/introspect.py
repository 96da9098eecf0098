"""Optional looks behind the interface: residency and mapping levels, where a backend can tell.

The interface says what a VMM may *do*; it does not say how much memory that costs or how the
guest's pages are mapped.  Those answers differ by backend, so they come through this one small,
optional hook and nothing else in the VMM depends on them:

* a backend object may offer ``kvm.introspection()`` returning an :class:`Introspection`; that is
  used first;
* the kernel backend's mappings are real, so ``mincore(2)`` tells which pages of a mapping are
  resident (a guest_memfd mmap included); mapping levels are not visible from userspace;
* the model is read through its documented objects (``vm.mmu.sptes``, the page caches, the frame
  pool) by :class:`ModelIntrospection`, read-only and without importing the model.

Every method may return None ("cannot tell"); callers fall back to the VMM's own bookkeeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any, Protocol

from guestmem import uapi as u
from guestmem.api import GuestMemfd, Kvm, Mapping, Vm

PAGE = u.PAGE_SIZE
Runs = list[tuple[int, int]]


class Introspection(Protocol):
    def populated(self, obj: GuestMemfd | Mapping, start: int, end: int) -> Runs | None:
        """Runs ``(s, e)`` of page indices in ``[start, end)`` of a file or mapping that hold a page."""
        ...

    def mapping_levels(self, vm: Vm, start: int, end: int) -> list[tuple[int, int, int, bool]] | None:
        """Guest mappings over gfns ``[start, end)``: runs ``(s, e, order, private)`` (order 0/9/18)."""
        ...

    def frames(self) -> tuple[int, int] | None:
        """``(allocated, peak_allocated)`` host frames, where the backend counts them."""
        ...


class ModelIntrospection:
    """Reads the model's state through its public attributes, duck-typed (no model import)."""

    def __init__(self, kvm: Any) -> None:
        self._kvm = kvm

    def populated(self, obj: GuestMemfd | Mapping, start: int, end: int) -> Runs | None:
        cache, base = self._cache_of(obj)
        if cache is None:
            return None
        out: Runs = []
        for s, e, pfn, _ in cache.lookup_range(start + base, end + base):
            if pfn is not None:
                out.append((s - base, e - base))
        return out

    @staticmethod
    def _cache_of(obj: object) -> tuple[Any, int]:
        inode = getattr(obj, "inode", None)
        if inode is not None:  # a guest_memfd file
            return getattr(inode, "cache", None), 0
        file = getattr(obj, "file", None)
        if file is None:
            return None, 0
        base = int(getattr(obj, "pgoff", 0))
        inner = getattr(file, "inode", None)
        return getattr(inner if inner is not None else file, "cache", None), base

    def mapping_levels(self, vm: Vm, start: int, end: int) -> list[tuple[int, int, int, bool]] | None:
        mmu = getattr(vm, "mmu", None)
        sptes = getattr(mmu, "sptes", None)
        if not sptes:
            return None
        return [(s, e, sp.order, sp.private) for s, e, sp in sptes[0].segments(start, end) if sp is not None]

    def frame_counter(self) -> Callable[[], tuple[int, int] | None]:
        """:meth:`frames` as the cheapest callable that answers it: the pool's own O(1) counter
        where it has one (the model's pool lives as long as its ``Kvm``), looked up once."""
        allocation = getattr(getattr(self._kvm, "pool", None), "allocation", None)
        return allocation if callable(allocation) else self.frames

    def frames(self) -> tuple[int, int] | None:
        pool = getattr(self._kvm, "pool", None)
        allocation = getattr(pool, "allocation", None)
        if allocation is not None:  # O(1), no snapshot of every counter
            return allocation()
        stats = getattr(pool, "stats", None)
        if stats is None:
            return None
        return int(stats.allocated), int(stats.peak_allocated)


class MincoreIntrospection:
    """Residency of real mappings via ``mincore(2)`` (kernel backend)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._mincore = libc.mincore
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        self._mincore.restype = ctypes.c_int

    def populated(self, obj: GuestMemfd | Mapping, start: int, end: int) -> Runs | None:
        addr = getattr(obj, "addr", None)
        length = getattr(obj, "length", None)
        if addr is None or length is None or getattr(obj, "closed", False):
            return None  # a guest_memfd without a mapping: not observable
        end = min(end, (length + PAGE - 1) // PAGE)
        if end <= start:
            return []
        n = end - start
        vec = (ctypes.c_ubyte * n)()
        if self._mincore(addr + start * PAGE, n * PAGE, vec) != 0:
            return None
        out: Runs = []
        run_start: int | None = None
        for i in range(n):
            if vec[i] & 1:
                if run_start is None:
                    run_start = i
            elif run_start is not None:
                out.append((start + run_start, start + i))
                run_start = None
        if run_start is not None:
            out.append((start + run_start, end))
        return out

    def mapping_levels(self, vm: Vm, start: int, end: int) -> list[tuple[int, int, int, bool]] | None:
        return None

    def frames(self) -> tuple[int, int] | None:
        return None


def introspection_for(kvm: Kvm) -> Introspection | None:
    """The best available introspection for ``kvm``'s backend, or None."""
    hook = getattr(kvm, "introspection", None)
    if callable(hook):
        got = hook()
        if got is not None:
            return got
    if kvm.backend == "kernel":
        return MincoreIntrospection()
    if hasattr(kvm, "pool"):
        return ModelIntrospection(kvm)
    return None

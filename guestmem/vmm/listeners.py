"""Conversion listeners, and a simulated IOMMU (VFIO) that is one.

A listener hears about every change of a RAM range between shared and private, in the order a
device that does DMA needs: **before** a range goes private (so it can stop DMA and drop its
mappings and pins -- with in-place conversion a pinned page makes the conversion fail with
EAGAIN) and **after** a range becomes shared (so it can map it).  This is QEMU's
RamDiscardListener contract (``notify_discard`` / ``notify_populate``) and Cloud Hypervisor's
VFIO fix (map only shared pages, unmap before to-private).

:class:`SimulatedIommu` models a VFIO container in two modes:

``coordinated``
    maps only shared pages, 4 KiB-granular as VFIO type1 must be (an unmap may not split a
    mapping, so a partial unmap re-maps the rest), pinning them through ``Mapping.pin``; conversion
    stays cheap and discard stays allowed.
``legacy``
    pins all guest RAM at attach, as VFIO did before coordinated discard; it cannot follow
    conversions, so it disables discard (the "double allocation" complaint).

Devices DMA through :meth:`SimulatedIommu.dma_write` / :meth:`dma_read`; a DMA to a page the
IOMMU does not map is an IOMMU fault (:class:`IommuFault`), never a silent write to private memory.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from guestmem import uapi as u
from guestmem.api import Mapping
from guestmem.ranges import RangeMap

PAGE = u.PAGE_SIZE
IommuMode = Literal["coordinated", "legacy"]
IOMMU_MODES = ("none", "coordinated", "legacy")


class ListenerHost(Protocol):
    """What a listener may ask the VMM: where shared memory lives, and what is shared now."""

    def shared_view(self, gpa: int, size: int) -> list[tuple[Mapping, int, int, int]]:
        """RAM pieces of ``[gpa, gpa+size)`` as ``(mapping, offset, gpa, size)``; holes left out."""
        ...

    def shared_runs(self) -> list[tuple[int, int]]:
        """All RAM currently shared, as ``(gpa, size)``."""
        ...

    def ram_runs(self) -> list[tuple[int, int]]:
        """All RAM, as ``(gpa, size)``."""
        ...


class ConversionListener(Protocol):
    name: str

    def attach(self, host: ListenerHost) -> None:
        """Start listening; replay the current state (map what is shared now)."""
        ...

    def before_to_private(self, gpa: int, size: int) -> None:
        """``[gpa, gpa+size)`` is about to become private: stop using it."""
        ...

    def after_to_shared(self, gpa: int, size: int) -> None:
        """``[gpa, gpa+size)`` has become shared."""
        ...

    def mapped(self, gpa: int, size: int) -> int:
        """Bytes of ``[gpa, gpa+size)`` this listener still maps (must be 0 before to-private)."""
        ...

    def discard_blocker(self) -> str | None:
        """A reason discard must stay disabled while this listener is attached, or None."""
        ...

    def detach(self) -> None: ...

    def stats(self) -> dict[str, int | str]: ...


class IommuFault(RuntimeError):
    """A device DMA'd to a guest page the IOMMU does not map (e.g. a private page)."""

    def __init__(self, gpa: int, size: int, write: bool) -> None:
        super().__init__(f"IOMMU fault: DMA {'write' if write else 'read'} of {size:#x} bytes at gpa "
                         f"{gpa:#x} hits an unmapped (private or discarded) page")
        self.gpa = gpa
        self.size = size


@dataclass
class _Pinned:
    """One IOMMU mapping: gfns ``[start, end)`` and the pin holding its pages."""

    start: int
    end: int
    pins: list[AbstractContextManager[None]]


class SimulatedIommu:
    """A VFIO container that maps guest RAM for device DMA (see the module docstring)."""

    def __init__(self, mode: IommuMode = "coordinated", *, pin: bool = True) -> None:
        self.name = f"iommu-{mode}"
        self.mode = mode
        self.pin = pin
        self._host: ListenerHost | None = None
        self._lock = threading.RLock()
        self._iova: RangeMap[bool] = RangeMap(False)  # gfn -> mapped
        self._maps: dict[int, _Pinned] = {}  # start gfn -> mapping
        self.counters = {"map_calls": 0, "unmap_calls": 0, "mapped_pages": 0, "peak_mapped_pages": 0,
                         "dma_faults": 0, "dma_bytes": 0}

    # --- ConversionListener -----------------------------------------------------------------------
    def attach(self, host: ListenerHost) -> None:
        self._host = host
        runs = host.ram_runs() if self.mode == "legacy" else host.shared_runs()
        for gpa, size in runs:
            self._map(gpa, size)

    def before_to_private(self, gpa: int, size: int) -> None:
        if self.mode == "coordinated":
            self._unmap(gpa, size)

    def after_to_shared(self, gpa: int, size: int) -> None:
        if self.mode == "coordinated":
            self._map(gpa, size)

    def mapped(self, gpa: int, size: int) -> int:
        with self._lock:
            return self._iova.count(gpa // PAGE, (gpa + size) // PAGE, bool) * PAGE

    def discard_blocker(self) -> str | None:
        if self.mode == "legacy":
            return "a legacy IOMMU (VFIO without coordinated discard) pins all guest RAM"
        return None

    def detach(self) -> None:
        with self._lock:
            for m in list(self._maps.values()):
                self._release(m)
            self._maps.clear()
            self._iova.clear()
            self.counters["mapped_pages"] = 0

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            return {"mode": self.mode, **self.counters}

    # --- DMA ---------------------------------------------------------------------------------------
    def dma_write(self, gpa: int, data: bytes) -> None:
        for mapping, off, _, n in self._dma_view(gpa, len(data), True):
            mapping.write(off, data[:n])
            data = data[n:]

    def dma_fill(self, gpa: int, size: int, byte: int) -> None:
        for mapping, off, _, n in self._dma_view(gpa, size, True):
            mapping.fill(off, n, byte)

    def dma_read(self, gpa: int, size: int) -> bytes:
        return b"".join(m.read(off, n) for m, off, _, n in self._dma_view(gpa, size, False))

    def _dma_view(self, gpa: int, size: int, write: bool) -> list[tuple[Mapping, int, int, int]]:
        assert self._host is not None, "IOMMU not attached"
        with self._lock:
            if size <= 0 or not self._iova.all_equal(gpa // PAGE, (gpa + size + PAGE - 1) // PAGE, True):
                self.counters["dma_faults"] += 1
                raise IommuFault(gpa, size, write)
            self.counters["dma_bytes"] += size
        return self._host.shared_view(gpa, size)

    # --- mapping bookkeeping -------------------------------------------------------------------------
    def _map(self, gpa: int, size: int) -> None:
        assert self._host is not None
        with self._lock:
            s, e = gpa // PAGE, (gpa + size) // PAGE
            for a, b, mapped in list(self._iova.segments(s, e)):
                if not mapped:
                    self._map_new(a, b)

    def _map_new(self, s: int, e: int) -> None:
        """Map (and pin) gfns ``[s, e)``: one IOMMU mapping per RAM piece."""
        assert self._host is not None
        for mapping, off, vgpa, n in self._host.shared_view(s * PAGE, (e - s) * PAGE):
            pins: list[AbstractContextManager[None]] = []
            if self.pin:
                cm = mapping.pin(off, n)
                cm.__enter__()
                pins.append(cm)
            self._store(vgpa // PAGE, (vgpa + n) // PAGE, pins)

    def _store(self, s: int, e: int, pins: list[AbstractContextManager[None]]) -> None:
        self._maps[s] = _Pinned(s, e, pins)
        self._iova.set(s, e, True)
        self.counters["map_calls"] += 1
        self.counters["mapped_pages"] += e - s
        self.counters["peak_mapped_pages"] = max(self.counters["peak_mapped_pages"],
                                                 self.counters["mapped_pages"])

    def _unmap(self, gpa: int, size: int) -> None:
        with self._lock:
            s, e = gpa // PAGE, (gpa + size) // PAGE
            hit = [m for m in self._maps.values() if m.start < e and m.end > s]
            for m in hit:
                # VFIO unmaps at the granularity it mapped: drop the whole mapping, map back the rest.
                self._release(m)
                del self._maps[m.start]
                self._iova.set(m.start, m.end, False)
                self.counters["unmap_calls"] += 1
                self.counters["mapped_pages"] -= m.end - m.start
                for a, b in ((m.start, max(m.start, s)), (min(m.end, e), m.end)):
                    if a < b:
                        self._map_new(a, b)

    @staticmethod
    def _release(m: _Pinned) -> None:
        for cm in m.pins:
            cm.__exit__(None, None, None)
        m.pins = []

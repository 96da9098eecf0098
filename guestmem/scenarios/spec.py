"""What a scenario file says, as typed data (the parser fills these; the builder reads them).

A scenario is a named, parameterised run of a confidential VM's memory lifecycle: the VM
(flavours to try, vCPUs, memory, VMM policy), the guest physical layout (regions), named guest
ranges, and phases.  A phase is a list of steps every participating vCPU runs concurrently --
guest operations (write, verify, convert, accept) and host operations at sync points
(host-write, host-verify, host-discard, host-convert, host-prefault) -- plus setup steps the host
runs once before the vCPUs start the phase.  Phases are separated by barriers.

Every object carries the locations of its fields so that errors found later (when ``--memory``
makes a range impossible, say) still name the file, line and field.

The file format, in brief (sizes: ``"64M"``, ``"2M+4K"``, ``"50%-1M"``, ``"rest"``, ``0x1000``)::

    [scenario]        name, description, flavours (tried in order), vcpus, memory | memory_per_vcpu,
                      cpu (ops|x86), timeout, requires (private-memory, hypercall-exit, pre-fault,
                      guest-memfd), slices (the range the per-vCPU "slice" divides; default "ram")
    [vmm]             backing (auto|separate|inplace|shared-only|anonymous), discard_shared,
                      discard_private, preallocate_private, shared_backing (anon|prealloc|hugetlb),
                      prefault (off|private|all), content (auto|preserve|zero|unspecified),
                      iommu (none|coordinated|legacy), slack, enforce_bound
    [[region]]        name, gpa (or "next": right after the previous one), size (of memory)
    [range.NAME]      within ("ram", "slice", "{item}" or a range) + offset + size, or gpa + size
    [guest]           image ("c-guest"), data, bounce (range names), rounds, payload, seed: a built
                      guest runs instead of phases (needs cpu = "x86" and one vCPU)
    [[phase]]         name, vcpus ("all" or ids), repeat, foreach (range names for "{item}"),
                      when (always|private|shared-only)
    [[phase.setup]]   host, once: convert (range, to, prefault), discard (range, side), prefault,
                      write / verify (range, pattern), policy (discard_*, preallocate_private,
                      prefault)
    [[phase.step]]    per vCPU: write / verify (range, pattern, access), convert (range, to,
                      page_size, chunk, pages = all|odd|even, expect = ok|error), accept (range,
                      chunk, via = hypercall|fault|lazy|none, pattern), host-write (range, pattern,
                      via = cpu|dma, expect = ok|fault), host-verify, host-discard (range, side),
                      host-convert (range, to, prefault), host-prefault (range); any step: when

Patterns are bytes or sums of a byte, ``vcpu`` and ``iter`` (``"0x40+vcpu"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guestmem.scenarios.errors import ScenarioError
from guestmem.scenarios.sizes import SizeExpr


@dataclass(frozen=True)
class Loc:
    """Where a field was written."""

    file: str | None
    line: int | None
    field: str

    def error(self, message: str) -> ScenarioError:
        return ScenarioError(message, file=self.file, line=self.line, field=self.field)


@dataclass(frozen=True)
class Pattern:
    """A byte pattern: a constant plus optional multiples of the vCPU id and iteration index."""

    text: str
    constant: int
    per_vcpu: int = 0
    per_iter: int = 0

    def value(self, vcpu: int, iteration: int) -> int:
        return (self.constant + self.per_vcpu * vcpu + self.per_iter * iteration) & 0xFF


@dataclass(frozen=True)
class RegionDef:
    name: str
    gpa: int | None  # None = right after the previous region
    size: SizeExpr
    locs: dict[str, Loc]


@dataclass(frozen=True)
class RangeDef:
    """A named guest range: ``size`` bytes at ``offset`` into ``within`` (RAM, the vCPU's slice,
    the current ``{item}`` of a foreach, or another range), or an absolute ``gpa`` span (which may
    cross regions and holes)."""

    name: str
    within: str | None
    gpa: int | None
    offset: SizeExpr
    size: SizeExpr
    locs: dict[str, Loc]


@dataclass(frozen=True)
class Step:
    op: str
    args: dict[str, Any]
    when: str
    loc: Loc
    locs: dict[str, Loc]


@dataclass(frozen=True)
class Phase:
    name: str
    vcpus: tuple[int, ...] | None  # None = all
    repeat: int
    foreach: tuple[str, ...]
    when: str
    setup: tuple[Step, ...]
    steps: tuple[Step, ...]
    loc: Loc


@dataclass(frozen=True)
class VmmSettings:
    backing: str = "auto"
    discard_shared: bool = True
    discard_private: bool = True
    preallocate_private: bool = False
    shared_backing: str = "anon"
    prefault: str = "off"
    content: str = "auto"
    iommu: str = "none"
    slack: SizeExpr = field(default_factory=lambda: SizeExpr("2M", absolute=2 << 20))
    enforce_bound: bool = True
    locs: dict[str, Loc] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestDef:
    """``[guest]``: a built guest image runs instead of phases (``image = "c-guest"``, the only one
    today): its private data pages are the range ``data`` (one piece of RAM), its bounce page the
    first page of the range ``bounce``; ``rounds`` device round trips of ``payload`` bytes."""

    image: str
    data: str
    bounce: str
    rounds: int
    payload: int
    seed: int
    locs: dict[str, Loc]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    file: str | None
    flavours: tuple[str, ...]
    vcpus: int
    memory: SizeExpr | None
    memory_per_vcpu: SizeExpr | None
    timeout_s: float
    requires: tuple[str, ...]
    vmm: VmmSettings
    regions: tuple[RegionDef, ...]
    ranges: dict[str, RangeDef]
    phases: tuple[Phase, ...]
    locs: dict[str, Loc]
    slices: str = "ram"  # the range the per-vCPU slices divide
    # [model]: switches for the model backend (guestmem/model/options.py), already validated.
    model: dict[str, Any] = field(default_factory=dict)
    # The guest CPU: "ops" (the model interprets the op language) or "x86" (guest code runs on the
    # model's x86-64 CPU); the kernel backend always runs x86 code.
    cpu: str = "ops"
    guest: GuestDef | None = None  # [guest]: an image instead of phases

    def loc(self, key: str) -> Loc:
        return self.locs.get(key, Loc(self.file, None, key))

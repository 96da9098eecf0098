"""Turn a scenario plus ``--memory``/``--vcpus`` into concrete numbers, before touching a backend.

Everything that can be wrong with the input once the sizes are known is found here: memory that is
not a whole number of 2 MiB pages, regions that overlap or do not add up, a vCPU slice under
2 MiB, a range that no longer fits its base.  Each error names the scenario field (or the command
line option) responsible.  Ranges resolve to lists of guest physical pieces: RAM-relative ranges
skip the holes between regions; absolute ranges are used as written (they may span holes, which
is how firmware-style requests over the PCI hole are expressed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guestmem import uapi as u
from guestmem.scenarios.errors import ScenarioError
from guestmem.scenarios.parse import ITEM
from guestmem.scenarios.sizes import SizeError, fmt_size
from guestmem.scenarios.spec import Scenario
from guestmem.vmm.layout import Layout, LayoutError, RegionSpec

PAGE = u.PAGE_SIZE
HUGE = u.HPAGE_2M
DEFAULT_MEMORY = 64 << 20
MAX_MEMORY = 1 << 40
MAX_GPA = 1 << 52  # x86-64's largest physical address width: no guest address reaches it
DEFAULT_GPA = 1 << 32

Pieces = list[tuple[int, int]]


def _cli_error(option: str, message: str) -> ScenarioError:
    return ScenarioError(message, field=option)


@dataclass
class Plan:
    scenario: Scenario
    vcpus: int
    memory: int
    layout: Layout
    slice_size: int
    _cache: dict[tuple[str, int | None, str | None], Pieces] = field(default_factory=dict)

    def pieces(self, name: str, vcpu: int | None, item: str | None = None) -> Pieces:
        """The guest physical pieces of range ``name`` (for ``vcpu`` where it is per vCPU, and
        for the foreach ``item`` where it lies in ``{item}``)."""
        key = (name, vcpu, item)
        if key not in self._cache:
            self._cache[key] = self._resolve(name, vcpu, item)
        return self._cache[key]

    def _resolve(self, name: str, vcpu: int | None, item: str | None) -> Pieces:
        lay = self.layout
        if name == ITEM:
            assert item is not None, "{item} outside a foreach"
            return self.pieces(item, vcpu, None)
        if name == "ram":
            return lay.ram_to_gpa(0, lay.ram_bytes)
        if name == "slice":
            assert vcpu is not None, "slice needs a vCPU"
            return _sub(self.pieces(self.scenario.slices, None), vcpu * self.slice_size, self.slice_size)
        rd = self.scenario.ranges[name]
        if rd.gpa is not None:
            size = rd.size.absolute
            if rd.gpa % PAGE or size % PAGE or size <= 0:
                raise rd.locs["size" if rd.gpa % PAGE == 0 else "gpa"].error(
                    f"range {name!r}: gpa {rd.gpa:#x} and size {size:#x} must be page aligned, size > 0")
            if rd.gpa + size > MAX_GPA:
                raise rd.locs["size"].error(f"range {name!r}: ends above {MAX_GPA:#x}, the largest guest "
                                            "physical address (52 bits)")
            return [(rd.gpa, size)]
        assert rd.within is not None
        base = self.pieces(rd.within, vcpu, item)
        whole = sum(n for _, n in base)
        try:
            off = rd.offset.evaluate(whole)
            size = rd.size.evaluate(whole, off)
        except SizeError as exc:
            raise rd.locs["size"].error(str(exc)) from None
        if off % PAGE:
            raise rd.locs["offset"].error(f"range {name!r}: offset {off:#x} is not page aligned")
        if size <= 0 or size % PAGE:
            raise rd.locs["size"].error(f"range {name!r}: size {size:#x} must be a positive multiple of 4K")
        if off + size > whole:
            raise rd.locs["size"].error(
                f"range {name!r}: offset {fmt_size(off)} + size {fmt_size(size)} does not fit in "
                f"{rd.within!r} ({fmt_size(whole)} with {self.vcpus} vCPU(s) and {fmt_size(self.memory)} "
                "of memory)")
        return _sub(base, off, size)

    def check_all(self) -> None:
        """Resolve every named range for every vCPU and every foreach item it can meet (raising
        on the first that does not fit)."""
        items: set[str] = {i for ph in self.scenario.phases for i in ph.foreach}
        for name in self.scenario.ranges:
            for v in range(self.vcpus):
                if _in_item(name, self.scenario):
                    for it in sorted(items):
                        self.pieces(name, v, it)
                else:
                    self.pieces(name, v)


def make_plan(scn: Scenario, *, vcpus: int | None = None, memory: int | None = None) -> Plan:
    if vcpus is not None and not 1 <= vcpus <= 256:
        raise _cli_error("--vcpus", f"must be 1..256, got {vcpus}")
    nv = vcpus if vcpus is not None else scn.vcpus
    if memory is not None:
        mem, where = memory, "--memory"
    elif scn.memory is not None:
        mem, where = scn.memory.absolute, "scenario.memory"
    elif scn.memory_per_vcpu is not None:
        mem, where = scn.memory_per_vcpu.absolute * nv, "scenario.memory_per_vcpu"
    else:
        mem, where = DEFAULT_MEMORY, "--memory"

    def mem_error(message: str) -> ScenarioError:
        if where.startswith("scenario."):
            return scn.loc(where.split(".", 1)[1]).error(message)
        return _cli_error(where, message)

    if mem <= 0 or mem % HUGE:
        raise mem_error(f"{fmt_size(mem)} is impossible: memory must be a positive multiple of 2M")
    if mem > MAX_MEMORY:
        raise mem_error(f"{fmt_size(mem)} is more than the {fmt_size(MAX_MEMORY)} a scenario may use")
    regions = _regions(scn, mem)
    try:
        layout = Layout(regions)
    except LayoutError as exc:
        loc = scn.regions[-1].locs["gpa"] if scn.regions else scn.loc("memory")
        raise loc.error(str(exc)) from None
    plan = Plan(scn, nv, mem, layout, 0)
    arena = sum(n for _, n in plan.pieces(scn.slices, None)) if scn.slices != "ram" else mem
    plan.slice_size = arena // nv // HUGE * HUGE
    if plan.slice_size < HUGE:
        what = "memory" if scn.slices == "ram" else f"range {scn.slices!r} ({fmt_size(arena)})"
        raise mem_error(f"{fmt_size(mem)} is too small for {nv} vCPUs: each vCPU's slice of {what} must "
                        "be at least 2M")
    plan.check_all()
    return plan


def _regions(scn: Scenario, mem: int) -> list[RegionSpec]:
    if not scn.regions:
        return [RegionSpec("ram", DEFAULT_GPA, mem)]
    out: list[RegionSpec] = []
    used = 0
    for rd in scn.regions:
        gpa = rd.gpa if rd.gpa is not None else out[-1].end
        try:
            size = rd.size.evaluate(mem, used)
        except SizeError:
            size = -1
        if size <= 0 and rd.size.relative:
            raise rd.locs["size"].error(f"region {rd.name!r}: {rd.size.text!r} leaves nothing: memory is "
                                        f"{fmt_size(mem)} and the regions before it take {fmt_size(used)}")
        if size <= 0 or size % PAGE:
            raise rd.locs["size"].error(f"region {rd.name!r}: size {fmt_size(size)} must be a positive "
                                        f"multiple of 4K (memory is {fmt_size(mem)})")
        if gpa + size > MAX_GPA:
            raise rd.locs["gpa" if rd.gpa is not None else "size"].error(
                f"region {rd.name!r}: [{gpa:#x}, {gpa + size:#x}) ends above {MAX_GPA:#x}, the largest "
                "guest physical address (52 bits)")
        used += size
        out.append(RegionSpec(rd.name, gpa, size))
    if used != mem:
        raise scn.regions[-1].locs["size"].error(
            f"regions add up to {fmt_size(used)} but memory is {fmt_size(mem)} (use \"rest\" for the last)")
    return out


def _in_item(name: str, scn: Scenario) -> bool:
    while name in scn.ranges:
        within = scn.ranges[name].within
        if within == ITEM:
            return True
        if within is None:
            return False
        name = within
    return False


def _sub(base: Pieces, off: int, size: int) -> Pieces:
    """``[off, off+size)`` of the concatenation of ``base``, as pieces."""
    out: Pieces = []
    pos = 0
    for g, n in base:
        a, b = max(off, pos), min(off + size, pos + n)
        if a < b:
            out.append((g + a - pos, b - a))
        pos += n
    return out

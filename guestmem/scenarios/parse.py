"""Read a scenario TOML file into :class:`~guestmem.scenarios.spec.Scenario`, or say exactly what
is wrong with it and where.

Unknown keys are errors (a typo must not silently change a run); every value is type- and
range-checked here, and every range a step names must exist.  What can only be checked once
``--memory``/``--vcpus`` are known (sizes that no longer fit) is checked by
:mod:`guestmem.scenarios.plan`, with the locations recorded here.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from guestmem.scenarios.errors import ScenarioError
from guestmem.scenarios.locate import Locator, field_name
from guestmem.scenarios.locate import Path as KeyPath
from guestmem.scenarios.sizes import SizeError, SizeExpr, parse_size
from guestmem.scenarios.spec import (
    GuestDef,
    Loc,
    Pattern,
    Phase,
    RangeDef,
    RegionDef,
    Scenario,
    Step,
    VmmSettings,
)
from guestmem.vmm.backing import STRATEGY_NAMES
from guestmem.vmm.convert import CONTENT_MODES, PREFAULT_MODES
from guestmem.vmm.flavours import FLAVOURS
from guestmem.vmm.listeners import IOMMU_MODES
from guestmem.vmm.policy import SHARED_BACKINGS

MAX_FILE_BYTES = 1 << 20  # a scenario is a page or two of TOML; read no more than this
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: finite, and small enough for every wait primitive
BUILTIN_RANGES = ("ram", "slice")
ITEM = "{item}"
REQUIREMENTS = ("private-memory", "hypercall-exit", "pre-fault", "guest-memfd")
WHEN = ("always", "private", "shared-only")
CPUS = ("ops", "x86")
GUEST_IMAGES = ("c-guest",)
# How a guest accepts memory: an explicit MAP_GPA_RANGE per chunk (what guests normally do), by
# touching it (an implicit conversion: needs a flavour whose hardware tags private accesses), "lazy"
# (touch where the flavour can, else the hypercall), or "none" (the host already converted it).
ACCEPT_VIA = ("hypercall", "fault", "lazy", "none")
PAGE_SIZES = {"4K": 4 << 10, "2M": 2 << 20, "1G": 1 << 30}

# Per op: allowed keys -> default (REQUIRED = must be given).
REQUIRED = object()
_R = {"range": REQUIRED}
GUEST_OPS: dict[str, dict[str, object]] = {
    "write": {**_R, "pattern": REQUIRED, "access": "auto"},
    "verify": {**_R, "pattern": REQUIRED, "access": "auto"},
    "convert": {**_R, "to": REQUIRED, "page_size": "4K", "chunk": None, "pages": "all", "expect": "ok"},
    "accept": {**_R, "chunk": "2M", "via": "hypercall", "pattern": None, "touch": True},
    "host-write": {**_R, "pattern": REQUIRED, "via": "cpu", "expect": "ok"},
    "host-verify": {**_R, "pattern": REQUIRED, "via": "cpu"},
    "host-discard": {**_R, "side": "both"},
    "host-convert": {**_R, "to": REQUIRED, "prefault": False},
    "host-prefault": {**_R},
}
SETUP_OPS: dict[str, dict[str, object]] = {
    "convert": {**_R, "to": REQUIRED, "prefault": False},
    "discard": {**_R, "side": "both"},
    "prefault": {**_R},
    "write": {**_R, "pattern": REQUIRED},
    "verify": {**_R, "pattern": REQUIRED},
    "policy": {"discard_shared": None, "discard_private": None, "preallocate_private": None,
               "prefault": None},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "access": ("auto", "private", "shared"),
    "to": ("private", "shared"),
    "page_size": tuple(PAGE_SIZES),
    "pages": ("all", "odd", "even"),
    "side": ("both", "shared", "private"),
}


class _Ctx:
    """Parsing context: the file name and the line locator."""

    def __init__(self, file: str | None, text: str) -> None:
        self.file = file
        self.locator = Locator(text)

    def loc(self, path: KeyPath) -> Loc:
        return Loc(self.file, self.locator.line(path), field_name(path))

    def error(self, path: KeyPath, message: str) -> ScenarioError:
        return self.loc(path).error(message)

    def table(self, value: object, path: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {type(value).__name__}")
        return value

    def keys(self, table: dict[str, Any], path: KeyPath, allowed: set[str] | dict[str, object]) -> None:
        for key in table:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error((*path, key), f"unknown key {key!r}; known keys: {known}")

    def get(self, table: dict[str, Any], path: KeyPath, key: str, kind: type | tuple[type, ...],
            default: object = REQUIRED) -> Any:
        if key not in table:
            if default is REQUIRED:
                raise self.error(path, f"missing required key {key!r}")
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error((*path, key), f"expected {_kind_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error((*path, key), f"expected {_kind_names(kinds)}, got {type(value).__name__} "
                             f"{value!r}")
        return value

    def choice(self, table: dict[str, Any], path: KeyPath, key: str, choices: tuple[str, ...],
               default: object = REQUIRED) -> str:
        value = self.get(table, path, key, str, default)
        if value not in choices and value is not default:
            raise self.error((*path, key), f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    def size(self, table: dict[str, Any], path: KeyPath, key: str, default: object = REQUIRED
             ) -> SizeExpr:
        value = self.get(table, path, key, (int, str), default)
        if isinstance(value, SizeExpr):
            return value
        try:
            return parse_size(value)
        except SizeError as exc:
            raise self.error((*path, key), str(exc)) from None


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", float: "a number",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_PATTERN_TERM = re.compile(r"^(?:(\d+)\s*\*\s*)?(vcpu|iter)$|^(0x[0-9a-fA-F]+|\d+)$")


def parse_pattern(value: object, loc: Loc) -> Pattern:
    """``0x11``, ``"0x40+vcpu"``, ``"iter"``, ``"0x10+2*iter+vcpu"`` -> :class:`Pattern`."""
    if isinstance(value, bool):
        raise loc.error("a pattern is a byte (0..255) or an expression like \"0x40+vcpu\"")
    if isinstance(value, int):
        if not 0 <= value <= 0xFF:
            raise loc.error(f"a pattern must be a byte (0..255), got {value}")
        return Pattern(str(value), value)
    if not isinstance(value, str):
        raise loc.error(f"a pattern is a byte or an expression string, got {type(value).__name__}")
    if len(value) > 100:
        raise loc.error(f"pattern {value[:20]!r}...: a pattern expression is at most 100 characters")
    const = per_vcpu = per_iter = 0
    for term in value.replace(" ", "").split("+"):
        m = _PATTERN_TERM.match(term)
        if not m:
            raise loc.error(f"cannot read pattern {value!r}: terms are bytes (0x11), 'vcpu', 'iter' "
                            "or N*vcpu / N*iter, joined by '+'")
        if m.group(3):
            const += int(m.group(3), 0)
        elif m.group(2) == "vcpu":
            per_vcpu += int(m.group(1) or 1)
        else:
            per_iter += int(m.group(1) or 1)
    if const > 0xFF:
        raise loc.error(f"pattern {value!r}: the constant part {const:#x} is not a byte")
    return Pattern(value, const, per_vcpu, per_iter)


def load_text(text: str, file: str | None = None) -> Scenario:
    """Parse scenario text (``file`` is only used in error messages).

    TOML nested thousands deep (``x = [[[[...``) makes ``tomllib`` recurse until Python gives up;
    that is input too deep to be a scenario, not a crash."""
    if len(text) > MAX_FILE_BYTES:
        raise ScenarioError(f"more than {MAX_FILE_BYTES >> 10} KiB: too large to be a scenario", file=file)
    if "\0" in text:
        raise ScenarioError("contains NUL bytes: not a text file", file=file)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else None
        raise ScenarioError(f"not valid TOML: {re.sub(r' [(]at line.*', '', msg)}", file=file,
                            line=line) from None
    except RecursionError:
        raise ScenarioError("nested too deeply to be a scenario", file=file) from None
    except ValueError as exc:  # e.g. an integer literal past Python's digit limit
        raise ScenarioError(f"not valid TOML: {exc}", file=file) from None
    try:
        return _Parser(_Ctx(file, text)).scenario(doc)
    except RecursionError:
        raise ScenarioError("nested too deeply to be a scenario", file=file) from None


def load_file(path: str | Path) -> Scenario:
    """Read a scenario file: a regular file (not a FIFO, device or directory, which could block or
    never end), at most :data:`MAX_FILE_BYTES`, UTF-8."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file: {exc.strerror}", file=str(p)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ScenarioError(f"{kind}: give a scenario .toml file or a shipped name", file=str(p))
        if st.st_size > MAX_FILE_BYTES:
            raise ScenarioError(f"{st.st_size} bytes: a scenario file is at most {MAX_FILE_BYTES >> 10} KiB",
                                file=str(p))
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file: {exc.strerror}", file=str(p)) from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioError("not a UTF-8 text file", file=str(p)) from None
    return load_text(text, str(p))


class _Parser:
    def __init__(self, ctx: _Ctx) -> None:
        self.c = ctx

    def scenario(self, doc: dict[str, Any]) -> Scenario:
        c = self.c
        c.keys(doc, (), {"scenario", "vmm", "model", "region", "range", "phase", "guest"})
        head = c.table(c.get(doc, (), "scenario", dict), ("scenario",))
        p: KeyPath = ("scenario",)
        c.keys(head, p, {"name", "description", "flavours", "vcpus", "memory", "memory_per_vcpu", "timeout",
                         "requires", "slices", "cpu"})
        name = c.get(head, p, "name", str)
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise c.error((*p, "name"), f"{name!r}: use lower-case letters, digits and dashes")
        description = c.get(head, p, "description", str)
        flavours = tuple(self._str_list(head, p, "flavours", ["sw-protected"]))
        if not flavours:
            raise c.error((*p, "flavours"), "name at least one flavour")
        for i, f in enumerate(flavours):
            if f not in FLAVOURS:
                raise c.error((*p, "flavours"), f"flavour #{i + 1} {f!r} is unknown; choose from "
                              f"{', '.join(FLAVOURS)}")
        vcpus = c.get(head, p, "vcpus", int, 1)
        if not 1 <= vcpus <= 256:
            raise c.error((*p, "vcpus"), f"vcpus must be 1..256, got {vcpus}")
        memory = c.size(head, p, "memory", None) if "memory" in head else None
        per_vcpu = c.size(head, p, "memory_per_vcpu", None) if "memory_per_vcpu" in head else None
        if memory is not None and per_vcpu is not None:
            raise c.error((*p, "memory_per_vcpu"), "give memory or memory_per_vcpu, not both")
        for key, sz in (("memory", memory), ("memory_per_vcpu", per_vcpu)):
            if sz is not None and sz.relative:
                raise c.error((*p, key), f"{sz.text!r}: memory must be an absolute size")
        timeout = c.get(head, p, "timeout", (int, float), 600)
        if not 0 < timeout <= MAX_TIMEOUT_S:  # also false for nan
            raise c.error((*p, "timeout"), f"timeout must be more than 0 and at most {MAX_TIMEOUT_S} "
                          f"seconds (a week), got {timeout}")
        requires = tuple(self._str_list(head, p, "requires", []))
        for r in requires:
            if r not in REQUIREMENTS:
                raise c.error((*p, "requires"),
                              f"unknown requirement {r!r}; known: {', '.join(REQUIREMENTS)}")
        vmm = self._vmm(c.table(doc.get("vmm", {}), ("vmm",)))
        regions = self._regions(doc.get("region", []))
        ranges = self._ranges(c.table(doc.get("range", {}), ("range",)))
        cpu = c.choice(head, p, "cpu", CPUS, "ops")
        guest = self._guest(c.table(doc["guest"], ("guest",)), ranges) if "guest" in doc else None
        phases_raw = doc.get("phase", [])
        if guest is not None:
            if "phase" in doc:
                raise c.error(("phase",), "a [guest] image runs instead of [[phase]]s: give one or the other")
            if cpu != "x86":
                raise c.error((*p, "cpu"), "a [guest] image is x86-64 code: set cpu = \"x86\"")
            if vcpus != 1:
                raise c.error((*p, "vcpus"), "a [guest] image runs on one vCPU")
        elif not isinstance(phases_raw, list) or not phases_raw:
            raise c.error(("phase",), "a scenario needs at least one [[phase]]")
        phases = tuple(self._phase(ph, i, ranges) for i, ph in enumerate(phases_raw))
        slices = c.get(head, p, "slices", str, "ram")
        if slices != "ram" and (slices not in ranges or _depends_on(slices, ranges, "slice")
                                or _depends_on(slices, ranges, ITEM)):
            raise c.error((*p, "slices"), f"{slices!r} must name a range that is neither per vCPU nor "
                          f"per {ITEM} (or be \"ram\")")
        locs = {k: c.loc(("scenario", k)) for k in head}
        model = self._model(c.table(doc.get("model", {}), ("model",)))
        locs.update({f"model.{k}": c.loc(("model", k)) for k in model})
        return Scenario(name, description, c.file, flavours, vcpus, memory, per_vcpu, float(timeout),
                        requires, vmm, regions, ranges, phases, locs, slices, model, cpu, guest)

    def _guest(self, t: dict[str, Any], ranges: dict[str, RangeDef]) -> GuestDef:
        """``[guest]``: which image, and the ranges and numbers its launch parameters come from."""
        c, p = self.c, ("guest",)
        c.keys(t, p, {"image", "data", "bounce", "rounds", "payload", "seed"})
        image = c.choice(t, p, "image", GUEST_IMAGES)
        names = {}
        for key in ("data", "bounce"):
            name = c.get(t, p, key, str)
            if name not in ranges or _depends_on(name, ranges, "slice") or _depends_on(name, ranges, ITEM):
                raise c.error((*p, key), f"{name!r} must name a [range] that is neither per vCPU nor "
                              f"per {ITEM}")
            names[key] = name
        limits = {"rounds": (0, 1 << 20, 2), "payload": (1, 4096 - 16, 256), "seed": (0, (1 << 64) - 1, 1)}
        nums = {}
        for key, (lo, hi, default) in limits.items():
            value = c.get(t, p, key, int, default)
            if not lo <= value <= hi:
                raise c.error((*p, key), f"{key} must be {lo}..{hi}, got {value}")
            nums[key] = value
        return GuestDef(image, names["data"], names["bounce"], nums["rounds"], nums["payload"], nums["seed"],
                        {k: c.loc((*p, k)) for k in t})

    def _model(self, t: dict[str, Any]) -> dict[str, Any]:
        """``[model]``: the model's switches, each checked as ``guestmem.open("model", ...)`` would
        (name, type, allowed values); VM types may be given by name (``"sw-protected"``)."""
        from guestmem.model.options import ModelOptions

        c, p = self.c, ("model",)
        c.keys(t, p, set(ModelOptions.__dataclass_fields__))
        out: dict[str, Any] = {}
        for key, value in t.items():
            try:
                if key == "vm_types" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                    value = ModelOptions.parse_text(key, ",".join(value))
                out[key] = ModelOptions.check(key, value)
            except (TypeError, ValueError) as exc:
                raise c.error((*p, key), str(exc)) from None
        return out

    def _str_list(self, table: dict[str, Any], path: KeyPath, key: str, default: list[str]) -> list[str]:
        value = self.c.get(table, path, key, list, default)
        if not all(isinstance(v, str) for v in value):
            raise self.c.error((*path, key), "expected an array of strings")
        return list(value)

    def _vmm(self, t: dict[str, Any]) -> VmmSettings:
        c, p = self.c, ("vmm",)
        d = VmmSettings()
        c.keys(t, p, {"backing", "discard_shared", "discard_private", "preallocate_private", "shared_backing",
                      "prefault", "content", "iommu", "slack", "enforce_bound"})
        slack = c.size(t, p, "slack", d.slack)
        if slack.relative:
            raise c.error((*p, "slack"), "slack must be an absolute size")
        return VmmSettings(
            backing=c.choice(t, p, "backing", STRATEGY_NAMES, d.backing),
            discard_shared=c.get(t, p, "discard_shared", bool, d.discard_shared),
            discard_private=c.get(t, p, "discard_private", bool, d.discard_private),
            preallocate_private=c.get(t, p, "preallocate_private", bool, d.preallocate_private),
            shared_backing=c.choice(t, p, "shared_backing", SHARED_BACKINGS, d.shared_backing),
            prefault=c.choice(t, p, "prefault", PREFAULT_MODES, d.prefault),
            content=c.choice(t, p, "content", CONTENT_MODES, d.content),
            iommu=c.choice(t, p, "iommu", IOMMU_MODES, d.iommu),
            slack=slack,
            enforce_bound=c.get(t, p, "enforce_bound", bool, d.enforce_bound),
            locs={k: c.loc((*p, k)) for k in t},
        )

    def _regions(self, raw: object) -> tuple[RegionDef, ...]:
        c = self.c
        if not isinstance(raw, list):
            raise c.error(("region",), "use [[region]] tables")
        out = []
        names: set[str] = set()
        for i, r in enumerate(raw):
            p: KeyPath = ("region", i)
            t = c.table(r, p)
            c.keys(t, p, {"name", "gpa", "size"})
            name = c.get(t, p, "name", str, f"ram{i}")
            if name in names:
                raise c.error((*p, "name"), f"region name {name!r} used twice")
            names.add(name)
            where: int | None = None
            if t.get("gpa") == "next":
                if i == 0:
                    raise c.error((*p, "gpa"), "the first region needs an address, not \"next\"")
            else:
                gpa = c.size(t, p, "gpa")
                if gpa.relative:
                    raise c.error((*p, "gpa"), "a region's gpa must be an absolute address (or \"next\")")
                if gpa.absolute % (4 << 10):
                    raise c.error((*p, "gpa"), f"{gpa.absolute:#x} is not page aligned")
                where = gpa.absolute
            out.append(RegionDef(name, where, c.size(t, p, "size"),
                                 {k: c.loc((*p, k)) for k in ("name", "gpa", "size")}))
        return tuple(out)

    def _ranges(self, t: dict[str, Any]) -> dict[str, RangeDef]:
        c = self.c
        out: dict[str, RangeDef] = {}
        for name, raw in t.items():
            p: KeyPath = ("range", name)
            if name in BUILTIN_RANGES or name == ITEM:
                raise c.error(p, f"{name!r} is a built-in range name")
            r = c.table(raw, p)
            c.keys(r, p, {"within", "offset", "size", "gpa"})
            locs = {k: c.loc((*p, k)) for k in ("within", "offset", "size", "gpa")}
            size = c.size(r, p, "size")
            if "gpa" in r:
                if "within" in r or "offset" in r:
                    raise c.error((*p, "gpa"), "an absolute range (gpa) takes no within/offset")
                gpa = c.size(r, p, "gpa")
                if gpa.relative or size.relative:
                    raise c.error((*p, "gpa" if gpa.relative else "size"),
                                  "an absolute range needs an absolute gpa and size")
                out[name] = RangeDef(name, None, gpa.absolute, SizeExpr("0"), size, locs)
            else:
                within = c.get(r, p, "within", str, "ram")
                out[name] = RangeDef(name, within, None, c.size(r, p, "offset", SizeExpr("0")), size, locs)
        for name, rd in out.items():
            if (rd.within is not None and rd.within not in out and rd.within not in BUILTIN_RANGES
                    and rd.within != ITEM):
                raise rd.locs["within"].error(f"unknown range {rd.within!r}")
            seen = [name]
            cur = rd
            while cur.within is not None and cur.within in out:
                if cur.within in seen:
                    raise rd.locs["within"].error(f"ranges form a cycle: {' -> '.join([*seen, cur.within])}")
                seen.append(cur.within)
                cur = out[cur.within]
        return out

    def _phase(self, raw: object, i: int, ranges: dict[str, RangeDef]) -> Phase:
        c = self.c
        p: KeyPath = ("phase", i)
        t = c.table(raw, p)
        c.keys(t, p, {"name", "vcpus", "repeat", "foreach", "when", "setup", "step"})
        name = c.get(t, p, "name", str, f"phase {i + 1}")
        vcpus_raw = c.get(t, p, "vcpus", (str, list), "all")
        vcpus: tuple[int, ...] | None
        if isinstance(vcpus_raw, str):
            if vcpus_raw != "all":
                raise c.error((*p, "vcpus"), "vcpus is \"all\" or an array of vCPU ids")
            vcpus = None
        else:
            if not vcpus_raw or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                        for v in vcpus_raw):
                raise c.error((*p, "vcpus"), "vcpus is \"all\" or a non-empty array of vCPU ids")
            vcpus = tuple(sorted(set(vcpus_raw)))
        repeat = c.get(t, p, "repeat", int, 1)
        if not 1 <= repeat <= 100_000:
            raise c.error((*p, "repeat"), f"repeat must be 1..100000, got {repeat}")
        foreach = tuple(self._str_list(t, p, "foreach", []))
        for item in foreach:
            if item not in ranges and item not in BUILTIN_RANGES:
                raise c.error((*p, "foreach"), f"unknown range {item!r} in foreach")
            if _depends_on(item, ranges, ITEM):
                raise c.error((*p, "foreach"), f"range {item!r} lies in {ITEM} itself")
        when = c.choice(t, p, "when", WHEN, "always")
        setup = tuple(self._steps(t.get("setup", []), (*p, "setup"), SETUP_OPS, ranges, foreach, setup=True))
        steps = tuple(self._steps(t.get("step", []), (*p, "step"), GUEST_OPS, ranges, foreach, setup=False))
        if not steps and not setup:
            raise c.error(p, "a phase needs at least one [[phase.step]] or [[phase.setup]]")
        return Phase(name, vcpus, repeat, foreach, when, setup, steps, c.loc(p))

    def _steps(self, raw: object, path: KeyPath, ops: dict[str, dict[str, object]],
               ranges: dict[str, RangeDef], foreach: tuple[str, ...], *, setup: bool) -> list[Step]:
        c = self.c
        if not isinstance(raw, list):
            raise c.error(path, f"use [[{'.'.join(str(x) for x in path if isinstance(x, str))}]] tables")
        out = []
        for j, s in enumerate(raw):
            p: KeyPath = (*path, j)
            t = c.table(s, p)
            op = c.get(t, p, "op", str)
            if op not in ops:
                raise c.error((*p, "op"), f"unknown op {op!r}; {'setup' if setup else 'step'} ops are "
                              f"{', '.join(ops)}")
            schema = ops[op]
            c.keys(t, p, {*schema, "op", "when"})
            when = c.choice(t, p, "when", WHEN, "always")
            args: dict[str, Any] = {}
            for key, default in schema.items():
                args[key] = self._arg(t, p, key, default, ranges, foreach, setup)
            out.append(Step(op, args, when, c.loc(p), {k: c.loc((*p, k)) for k in t}))
        return out

    def _arg(self, t: dict[str, Any], p: KeyPath, key: str, default: object, ranges: dict[str, RangeDef],
             foreach: tuple[str, ...], setup: bool) -> Any:
        c = self.c
        if key not in t and default is REQUIRED:
            raise c.error(p, f"missing required key {key!r}")
        if key == "range":
            name = c.get(t, p, key, str)
            if name == ITEM:
                if not foreach:
                    raise c.error((*p, key), f"{ITEM} names the current item, but the phase has no foreach")
            elif name not in ranges and name not in BUILTIN_RANGES:
                raise c.error((*p, key), f"unknown range {name!r}; defined: "
                              f"{', '.join([*BUILTIN_RANGES, *ranges]) or 'none'}")
            elif _depends_on(name, ranges, ITEM) and not foreach:
                raise c.error((*p, key), f"range {name!r} lies in {ITEM}, but the phase has no foreach")
            if setup:
                for item in (*foreach, name):
                    if item != ITEM and _depends_on(item, ranges, "slice"):
                        raise c.error((*p, key), f"range {item!r} is per vCPU (it lies in 'slice'); a "
                                      "setup step runs once, on the host, outside any vCPU")
            return name
        if key == "pattern":
            if key not in t:
                return None
            return parse_pattern(t[key], c.loc((*p, key)))
        if key == "chunk":
            if key not in t and default is None:
                return None
            sz = c.size(t, p, key, parse_size(default) if isinstance(default, str) else default)
            if sz.relative or sz.absolute <= 0 or sz.absolute % (4 << 10):
                raise c.error((*p, key), f"chunk must be a positive multiple of 4K, got {sz.text!r}")
            return sz.absolute
        if key == "via":
            choices = ACCEPT_VIA if t.get("op") == "accept" else ("cpu", "dma")
            return c.choice(t, p, key, choices, default)
        if key == "expect":
            choices = ("ok", "fault") if t.get("op") == "host-write" else ("ok", "error")
            value = c.choice(t, p, key, choices, default)
            if value == "fault" and t.get("via") != "dma":
                raise c.error((*p, key), "expect = \"fault\" (an IOMMU fault) needs via = \"dma\"")
            return value
        if key == "touch":  # accept: write a zero after accepting (false: accept only)
            return c.get(t, p, key, bool, default)
        if key in ("discard_shared", "discard_private", "preallocate_private"):
            return c.get(t, p, key, bool, None)
        if key == "prefault":
            if t.get("op") == "policy":
                return c.choice(t, p, key, PREFAULT_MODES, None) if key in t else None
            return c.get(t, p, key, bool, default)
        if key in CHOICES:
            return c.choice(t, p, key, CHOICES[key], default)
        raise AssertionError(key)  # pragma: no cover - every schema key is handled above


def _depends_on(name: str, ranges: dict[str, RangeDef], base: str) -> bool:
    """Whether range ``name`` lies (transitively) in ``base`` ("slice" or "{item}")."""
    while True:
        if name == base:
            return True
        rd = ranges.get(name)
        if rd is None or rd.within is None:
            return False
        name = rd.within


"""Differential fuzzing: the same random steps on the kernel backend and on the model configured
like this host, compared step by step.

Every step is one line of Python; it runs in two namespaces, one whose ``kvm`` is
``guestmem.open("kernel")`` and one whose ``kvm`` is the model opened with the host's shape
(:func:`host_options`: the switches of ``guestmem.open("model", like="host")`` — the host's
release, VM types, paging, SMM, memory attributes and vCPU limit — with per-VM attributes).  A
step *differs* when one side accepts and the other refuses, when they refuse with different
exception classes or errnos, when a host read returns different bytes, or when a vCPU exits
differently; each difference is a finding, shrunk and printed as a script that runs the lines on
both backends.  The model side is still judged as in model mode (crashes and invariants), so a
sequence that only the model survives is also caught.

The steps are restricted to what the kernel can run here and run cheaply: DEFAULT VMs, small
guest_memfds (at most 4 MiB) and mappings, memslots, fallocate, host access and pins, vCPUs with
one- or two-op programs of at most a page (guest code runs in the host's instruction emulator),
and no model-only calls (launch, memory failure, fork, in-place conversion).  Differences this
host is known to have from upstream, which the model does not follow, are listed in
:data:`KNOWN_DEPARTURES` and not reported.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable
from typing import Any

import guestmem
from guestmem.errors import KvmError
from guestmem.fuzz.machine import Finding, Session, Step, StepGen, _exc_text, _model_location, base_namespace
from guestmem.fuzz.runner import Report, fuzz

# Step kinds whose results this host answers differently from upstream (and so from the model),
# with the reason; a difference in one of these is not a finding.
# (KVM_SET_MEMORY_ATTRIBUTES used to be one: the twin's memory_attributes switch now matches it.)
KNOWN_DEPARTURES: dict[str, str] = {}


def unavailable(path: str = "/dev/kvm") -> str | None:
    """Why the kernel backend cannot run here, or None."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable"
    try:
        guestmem.open("kernel", path=path).close()
    except (KvmError, OSError) as e:
        return str(e)
    return None


def host_options(path: str = "/dev/kvm") -> dict[str, Any]:
    """Model switches that make the model look like this host's KVM, as far as they go: the twin's
    (guestmem/host_probe.py: release, memory attributes, paging, SMM, VM types, MAXPHYADDR, vCPU
    limit), with per-VM attributes."""
    from guestmem.host_probe import probe_host, twin_options

    opts: dict[str, Any] = dict(twin_options(probe_host(path)).options)
    opts["attributes"] = "vm"
    return opts


def _summary(value: Any) -> Any:
    """What of a step's value is compared across backends: bytes, and a vCPU exit's kind and the
    fields that do not depend on host addresses."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, guestmem.api.Exit):
        fields = {k: v for k, v in vars(value).items()
                  if k in ("gpa", "size", "flags", "expected", "found", "len", "is_write", "value")}
        return (type(value).__name__, tuple(sorted(fields.items())))
    return None


class DiffSession(Session):
    """A model session (judged as usual) and a kernel namespace running the same lines."""

    def __init__(self, opts: dict[str, Any], *, path: str = "/dev/kvm") -> None:
        super().__init__(opts, check_state=False)
        self.path = path
        self.kns: dict[str, Any] = base_namespace()
        self.kns["kvm"] = guestmem.open("kernel", path=path)

    def _judge(self, step: Step, exp: Any, exc: BaseException | None, index: int) -> Finding | None:
        """Only differences are findings here (model mode judges the model against the oracle);
        a model crash still is one (Session.run reports it before judging)."""
        return None

    def _run(self, step: Step) -> Finding | None:
        if any(n not in self.ns for n in step.uses) or any(n not in self.kns for n in step.uses):
            return None
        self.ns.pop("_", None)
        self.kns.pop("_", None)
        target = step.code.split(" = ", 1)[0] if " = " in step.code.split("(", 1)[0] else None
        f = super()._run(step)
        model_out = self.outcomes[-1] if self.outcomes and len(self.outcomes) == len(self.ran) else None
        if f is not None and f.category == "crash":
            return f
        try:
            exec(compile(step.code, "<step>", "exec"), self.kns)
            kernel_out = None
        except (KvmError, TypeError, OverflowError) as e:
            kernel_out = _exc_text(e)
        except Exception as e:  # anything else is the kernel backend crashing
            where = _model_location(e.__traceback__)
            return Finding("crash", ("crash", "kernel", type(e).__name__, where),
                           f"kernel backend: {type(e).__name__}: {e} (at {where})", len(self.ran) - 1)
        index = len(self.ran) - 1
        if step.kind in KNOWN_DEPARTURES:
            # Keep the namespaces in step: a name one side bound and the other did not is dropped.
            if target and (target in self.ns) != (target in self.kns):
                self.ns.pop(target, None)
                self.kns.pop(target, None)
            return f
        if _cls(model_out) != _cls(kernel_out):
            cause = self.last_expect.cause()
            if cause.startswith(("integer-rule", "closed-object")):
                # One cause (the rule, on whichever side lacks it), whatever each side answered.
                key: tuple[str, ...] = ("differs", step.kind, cause.split(" (", 1)[0])
            else:
                key = ("differs", step.kind, _cls(model_out), _cls(kernel_out))
            return Finding("differs", key, f"model: {model_out or 'ok'}, kernel: {kernel_out or 'ok'}"
                           f"{f' ({cause})' if cause != '-' else ''}", index)
        for name in ("_", target):
            if name and name in self.ns and name in self.kns:
                a, b = _summary(self.ns[name]), _summary(self.kns[name])
                if a != b:
                    return Finding("differs", ("differs", step.kind, "value"),
                                   f"model: {_short(a)}, kernel: {_short(b)}", index)
        return f


def _cls(out: str | None) -> str:
    """An outcome as compared: ok, the KvmError's errno, or the exception class (a TypeError's
    message is Python's, not the interface's)."""
    if out is None:
        return "ok"
    return out if out.startswith(("KvmError", "GuestAccessFault")) else out.split("(", 1)[0]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 160 else text[:160] + "..."


class KernelStepGen(StepGen):
    """Only what the host runs, and cheaply (see the module docstring)."""

    def next(self, s: Session) -> Step:
        vms, gmems, maps, vcpus = s.names("vm"), s.names("g"), s.names("m"), s.names("c")
        table: list[tuple[float, Callable[[Session], Step | None]]] = [
            (3 if len(vms) < 2 else 0.2, self.create_vm),
            (5 if vms and len(gmems) < 4 else 0, self.create_gmem),
            (2 if len(maps) < 4 else 0, self.mmap_anon),
            (3 if gmems and len(maps) < 5 else 0, self.gmem_mmap),
            (8 if vms else 0, self.memslot),
            (1 if vms else 0, self.vm_attrs),
            (5 if gmems else 0, self.fallocate),
            (1 if gmems else 0, self.gmem_refused_io),
            (6 if maps else 0, self.map_access),
            (1 if maps else 0, self.pin),
            (1 if s.names("p") else 0, self.unpin),
            (2 if vms and len(vcpus) < 2 else 0, self.create_vcpu),
            (3 if vcpus else 0, self.load),
            (3 if vcpus else 0, self.run_vcpu),
            (1 if vcpus else 0, self.pre_fault),
            (1 if vms else 0, self.enable_cap),
            (1, self.check_extension),
            (1, self.close),
        ]
        for _ in range(50):
            fn = self.rng.choices([f for _, f in table], [w for w, _ in table])[0]
            try:
                st = fn(s)
            except (TypeError, ValueError, OverflowError, AttributeError, IndexError):
                self.skipped += 1
                continue
            if st is None or not self._cheap(st):
                continue
            return st
        return Step("kvm.check_extension(u.KVM_CAP_GUEST_MEMFD)", "kvm.check_extension", ("kvm",))

    def create_vm(self, s: Session) -> Step:
        if self.rng.random() < 0.8:  # mostly the type the host has, so the rest can happen
            return Step(f"{s.fresh('vm')} = kvm.create_vm(0x0)", "kvm.create_vm", ("kvm",))
        return super().create_vm(s)

    @staticmethod
    def _cheap(st: Step) -> bool:
        code = st.code
        return st.kind != "vm.create_guest_memfd" or "0x40000000" not in code  # no 1 GiB files


def fuzz_kernel(seconds: float, seed: int = 0, *, max_steps: int = 12, shrink_budget: float = 5.0,
                path: str = "/dev/kvm", max_sequences: int | None = None) -> Report:
    """The differential run; the report's reproducers open the kernel backend."""
    opts = host_options(path)

    def gen_factory(rng: random.Random) -> StepGen:
        g = KernelStepGen(rng)
        g.budget.hostile = 0.08
        g.budget.max_ops = 2          # guest code runs in the host's instruction emulator
        g.budget.hypercalls = False   # this host's emulator never exits for MAP_GPA_RANGE
        return g

    def session_factory(_drawn: dict[str, Any]) -> Session:
        gc.collect()  # close the previous sequence's kernel fds (their finalizers) first
        return DiffSession(opts, path=path)

    rep = fuzz(seconds, seed, max_steps=max_steps, shrink_budget=shrink_budget,
               gen_factory=gen_factory, session_factory=session_factory, max_sequences=max_sequences,
               fatal=("crash", "invariant", "differs"), backend="kernel")
    return rep

"""The hostile stateful fuzzer's core: a session that runs one API call per step and judges it.

A *step* is one line of Python against the public interface (``g1 = vm0.create_guest_memfd(0x4000,
0x1)``), executed with ``exec`` in the session's namespace, so the log of a run *is* its
reproducer.  Each step carries its expectation (:mod:`guestmem.fuzz.oracle`), evaluated against
the session's state when the step runs (so a shrunk sequence is judged afresh), and the names it
needs (a step whose names a shrunk sequence lost is skipped).

After every step the session checks, in order:

1. the exception, if any, is one the interface may raise (``KvmError``/``GuestAccessFault``, and
   ``TypeError``/``OverflowError`` only where the integer rule prescribes them): else a *crash*;
2. a step the oracle says is bad was refused, with the prescribed exception class (and errno where
   the spec is unambiguous): else *accepted-bad* or *wrong-refusal*;
3. a refused step left the whole observable state (:mod:`guestmem.fuzz.snapshot`) unchanged: else
   *state-changed*;
4. ``check_invariants()`` holds on every live VM: else *invariant*.

:class:`StepGen` draws steps from a seeded ``random.Random`` over everything a user can reach:
every VM type, guest_memfd with every flag, memslots (create, move, flags-only, delete; v1 and v2;
hostile slot ids and address spaces), per-VM and per-gmem attributes with every content mode,
allocate/punch/fallocate modes, the refused file ops, host mappings (read/write/fill/discard, pins
held across steps and punched under), vCPUs running small guest programs whose exits are resolved
(memory faults converted, hypercalls answered), pre-fault, enable_cap, the launch flow, memory
failure, fork, and closes of every object.
"""

from __future__ import annotations

import errno
import random
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import guestmem
from guestmem import uapi as u
from guestmem.errors import KvmError
from guestmem.fuzz import oracle as o
from guestmem.fuzz.calls import FileCallsMixin
from guestmem.fuzz.oracle import Arg, Expect, expect_for, hostile_int, make_arg
from guestmem.fuzz.snapshot import diff, snapshot
from guestmem.guest.ops import Accept, Halt, MapGpaRange, Program, Sync, Touch, Verify, Write

PS = u.PAGE_SIZE
KVM_MAX_VCPU_IDS = 4096  # x86: kvm_vm_ioctl_create_vcpu refuses id >= this (not >= max vCPUs)
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ZERO = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_ZERO
PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_MODE_PRESERVE

IMPORTS = ("from contextlib import ExitStack\n\n"
           "import guestmem\n"
           "import guestmem.uapi as u\n"
           "from guestmem.guest.ops import Accept, Halt, MapGpaRange, Program, Sync, Touch, Verify, Write\n")


def base_namespace() -> dict[str, Any]:
    """What every step's line may name besides the objects it made: the reproducer's imports."""
    return {"ExitStack": ExitStack, "guestmem": guestmem, "u": u, "Program": Program, "Write": Write,
            "Touch": Touch, "Verify": Verify, "MapGpaRange": MapGpaRange, "Accept": Accept, "Sync": Sync,
            "Halt": Halt}


ExpectFn = Callable[["Session"], Expect]


@dataclass
class Step:
    """One API call: its source line, a kind (for counting), the names it needs, its oracle."""

    code: str
    kind: str
    uses: tuple[str, ...]
    expect: ExpectFn | None = None
    # A refused call must change nothing; KVM_RUN is not atomic (the guest made progress, or
    # KVM_BUG_ON marked the VM bugged, before the error), so it is exempt.  Neither is a host
    # access through a mapping that faults part way: like a CPU copy that takes SIGBUS, the pages
    # before the fault were faulted in (and written), in the kernel as in the model.
    atomic: bool = True


@dataclass
class Finding:
    """One broken promise: a category, a key (distinct cause), a message, and where."""

    category: str  # crash | hang | invariant | accepted-bad | wrong-refusal | state-changed
    key: tuple[str, ...]
    message: str
    step: int  # index of the failing step in the steps that ran


def _model_location(tb: Any) -> str:
    """The innermost frame inside guestmem (not the fuzzer): where a crash happened."""
    where = "?"
    for fr in traceback.extract_tb(tb):
        if "/guestmem/" in fr.filename and "/guestmem/fuzz/" not in fr.filename:
            where = f"{fr.filename.split('/guestmem/', 1)[1]}:{fr.lineno}"
    return where


class StepTimeout(BaseException):
    """Raised into a step that outlived the watchdog.  A BaseException, so that no ``except
    Exception`` in the code under test can swallow it and keep spinning."""


# Steps take micro- to milliseconds; one that runs this long is spinning (a vCPU that never stops
# re-faulting, a lock that is never released), and without a bound the whole run would hang.
DEFAULT_STEP_TIMEOUT = 30.0


@contextmanager
def step_watchdog(seconds: float) -> Iterator[None]:
    """Interrupt the body with :class:`StepTimeout` after ``seconds`` of wall time (SIGALRM).

    Only the main thread can take signals, so elsewhere (the threaded driver) and with
    ``seconds <= 0`` this does nothing."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise StepTimeout(f"step still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Session:
    """One system under test, a namespace of named objects, and the judge of every step."""

    def __init__(self, opts: dict[str, Any], *, check_state: bool = True,
                 check_invariants: bool = True, step_timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        self.opts = dict(opts)
        self.step_timeout = step_timeout
        self.ns: dict[str, Any] = base_namespace()
        self.ns["kvm"] = guestmem.open("model", **self.opts)
        self.kvm = self.ns["kvm"]
        self.check_state = check_state
        self.check_inv = check_invariants
        self.counter = 0
        self.ran: list[Step] = []
        self.last_finding: Finding | None = None
        self.last_expect: Expect = Expect()
        # Objects made by an accepted bad call (a 16 EiB mapping, a slot at a negative gpa): what
        # happens to them later is a consequence of that finding, so only invariants are judged.
        self.tainted: set[str] = set()
        self.outcomes: list[str | None] = []  # per step that ran: None (accepted) or the exception

    # --- names -----------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def names(self, prefix: str) -> list[str]:
        return [k for k in self.ns if k.startswith(prefix) and k[len(prefix):].isdigit()]

    def name_of(self, obj: object) -> str | None:
        for k, v in self.ns.items():
            if v is obj and k != "kvm":
                return k
        return None

    def views(self) -> tuple[Any, ...]:
        """The session's file objects with their own open file description (reopens)."""
        return tuple(v for v in self.ns.values() if getattr(v, "_own_desc", None) is not None)

    def is_closed(self, name: str) -> bool:
        """Whether the object is closed, as the interface sees it (fd gone / mapping unmapped)."""
        obj = self.ns.get(name)
        if obj is None:
            return False
        if name == "kvm":
            return bool(obj.closed)
        if hasattr(obj, "closed") and isinstance(obj.closed, bool) and not hasattr(obj, "inode"):
            return bool(obj.closed)  # mapping, vCPU
        return getattr(obj, "fd", 0) < 0

    # --- running -------------------------------------------------------------------------------------
    def run(self, step: Step) -> Finding | None:
        """Execute one step and judge it; returns the first broken promise, or None."""
        f = self._run(step)
        if f is not None:
            self.last_finding = f
        return f

    def _run(self, step: Step) -> Finding | None:
        if any(n not in self.ns for n in step.uses):
            return None  # a shrunk sequence lost the object this step needs
        index = len(self.ran)
        self.ran.append(step)
        tainted = any(n in self.tainted for n in step.uses)
        exp = step.expect(self) if step.expect is not None else Expect()
        self.last_expect = exp
        before = snapshot(self.kvm, self.views()) if self.check_state else None
        exc: BaseException | None = None
        try:
            with step_watchdog(self.step_timeout):
                exec(compile(step.code, "<step>", "exec"), self.ns)
        except StepTimeout as e:
            # The state is not trustworthy after an interrupted step (a lock may be held): fatal.
            self.outcomes.append(_exc_text(e))
            where = _model_location(e.__traceback__)
            return Finding("hang", ("hang", step.kind, where, exp.cause()),
                           f"{e} (interrupted at {where})", index)
        except (KvmError, TypeError, OverflowError) as e:
            exc = e
        except Exception as e:
            self.outcomes.append(_exc_text(e))
            where = _model_location(e.__traceback__)
            if tainted:
                self._taint(step)
                return self.invariants(index) if self.check_inv else None
            return Finding("crash", ("crash", type(e).__name__, where, exp.cause()),
                           f"{type(e).__name__}: {e} (at {where})", index)
        self.outcomes.append(None if exc is None else _exc_text(exc))
        f = self._judge(step, exp, exc, index)
        if f is not None and f.category == "accepted-bad":
            self._taint(step)
        if tainted:
            self._taint(step)
            f = None
        if f is not None:
            return f
        if exc is not None and before is not None and step.atomic and not tainted:
            after = snapshot(self.kvm, self.views())
            if after != before:
                parts = diff(before, after)
                return Finding("state-changed", ("state-changed", step.kind, exp.cause(),
                                                 ",".join(parts)),
                               f"refused with {_exc_text(exc)} but changed: {', '.join(parts)}", index)
        if self.check_inv:
            return self.invariants(index)
        return None

    def _taint(self, step: Step) -> None:
        bound = step.code.split(" = ", 1)[0] if " = " in step.code.split("(", 1)[0] else None
        if bound is not None and bound.isidentifier():
            self.tainted.add(bound)

    def _judge(self, step: Step, exp: Expect, exc: BaseException | None, index: int) -> Finding | None:
        cause = exp.cause()
        if exc is not None and type(exc) in (TypeError, OverflowError) and exp.must not in (
                "TypeError", "OverflowError", "refused"):
            where = _model_location(exc.__traceback__)
            return Finding("crash", ("crash", type(exc).__name__, where, cause),
                           f"{type(exc).__name__}: {exc} (at {where}) for arguments the rule accepts",
                           index)
        if exp.must is None:
            return None
        if exc is None:
            return Finding("accepted-bad", ("accepted-bad", step.kind, cause),
                           f"accepted a bad input ({exp.why}); expected {_exp_text(exp)}", index)
        got = type(exc).__name__ if not isinstance(exc, KvmError) else "KvmError"
        if exp.must == "refused":
            return None
        if got != exp.must or (exp.errno is not None and getattr(exc, "errno", None) != exp.errno):
            detail = () if cause.startswith(("integer-rule", "closed-object")) else (_exc_key(exc),)
            return Finding("wrong-refusal", ("wrong-refusal", step.kind, cause, *detail),
                           f"expected {_exp_text(exp)} ({exp.why}), got {_exc_text(exc)}", index)
        return None

    def invariants(self, index: int) -> Finding | None:
        for vm in list(getattr(self.kvm, "vms", ())):
            try:
                vm.check_invariants()
            except AssertionError as e:
                msg = str(e)
                key = msg.split(":", 1)[0]
                return Finding("invariant", ("invariant", key), msg, index)
            except Exception as e:
                where = _model_location(e.__traceback__)
                return Finding("crash", ("crash", type(e).__name__, where),
                               f"check_invariants raised {type(e).__name__}: {e} (at {where})", index)
        return None


def _exc_text(e: BaseException) -> str:
    if isinstance(e, KvmError):
        return f"{type(e).__name__}({e.errname})"
    return f"{type(e).__name__}({e})"


def _exc_key(e: BaseException) -> str:
    if isinstance(e, KvmError):
        return f"{type(e).__name__}({e.errname})"
    return type(e).__name__


def _exp_text(e: Expect) -> str:
    if e.must == "KvmError" and e.errno is not None:
        return f"KvmError({errno.errorcode.get(e.errno, e.errno)})"
    return e.must or "anything"


# --- the step generator ----------------------------------------------------------------------------


def draw_options(rng: random.Random) -> dict[str, Any]:
    """Model switches for one sequence: every combination is reachable."""
    opts: dict[str, Any] = {}
    if rng.random() < 0.5:
        opts["attributes"] = "gmem"
        opts["inplace_revision"] = rng.choice(["v5", "v8"])
    order = rng.choices([0, 9, 18], [6, 3, 1])[0]
    if order:
        opts["gmem_folio_order"] = order
    if rng.random() < 0.2:
        opts["anon_folio_order"] = 9
    if rng.random() < 0.2:
        opts["tdp_mmu"] = False
    if rng.random() < 0.2:
        opts["smm"] = True
    kernel = rng.choices(["7.2", "6.18", "6.8"], [6, 2, 2])[0]
    if kernel != "7.2":
        opts["kernel"] = kernel
    if rng.random() < 0.15:
        opts["memory_attributes"] = False
    if rng.random() < 0.3:
        opts["numa_nodes"] = rng.choice([2, 4])
    return opts


@dataclass
class _Budget:
    vms: int = 3
    gmems: int = 6
    maps: int = 6
    vcpus: int = 4
    hostile: float = 0.12  # chance that any one argument is hostile
    max_ops: int = 5  # guest program length
    hypercalls: bool = True  # MapGpaRange and Accept in guest programs


@dataclass
class StepGen(FileCallsMixin):
    """Draws the next step for a session from a seeded random source."""

    rng: random.Random
    budget: _Budget = field(default_factory=_Budget)
    skipped: int = 0  # draws abandoned because the state held garbage an accepted bad call left

    # --- argument drawing --------------------------------------------------------------------------
    def arg(self, good: int, ctype: tuple[int, bool], code: str | None = None) -> Arg:
        """``good`` (written as ``code`` if given), or with the budget's probability a hostile value."""
        if self.rng.random() < self.budget.hostile:
            return hostile_int(self.rng, ctype)
        return make_arg(good, code, ctype)

    def hva_expr(self, s: Session, hva: int) -> tuple[str | None, tuple[str, ...]]:
        """A host address written relative to the mapping that holds it (``m3.addr + 0x1000``), so
        the same line means the same memory on another backend, whose addresses differ."""
        m = s.kvm.process.mapping_at(hva) if 0 <= hva < 1 << 64 else None
        name = s.name_of(m) if m is not None else None
        if name is None or not name.startswith("m"):
            return None, ()
        d = hva - m.addr
        return (f"{name}.addr + {d:#x}" if d else f"{name}.addr"), (name,)

    def pick(self, names: list[str]) -> str | None:
        return self.rng.choice(names) if names else None

    def pages(self, hi: int = 16) -> int:
        return self.rng.randint(1, hi) * PS

    # --- main --------------------------------------------------------------------------------------
    def next(self, s: Session) -> Step:
        vms, gmems, maps = s.names("vm"), s.names("g"), s.names("m")
        vcpus = s.names("c")
        table: list[tuple[float, Callable[[Session], Step | None]]] = [
            (3 if len(vms) < self.budget.vms else 0.2, self.create_vm),
            (6 if vms else 0, self.create_gmem),
            (3, self.mmap_anon),
            (3 if gmems else 0, self.gmem_mmap),
            (10 if vms else 0, self.memslot),
            (6 if vms else 0, self.vm_attrs),
            (6 if gmems else 0, self.gmem_attrs2),
            (6 if gmems else 0, self.fallocate),
            (1 if gmems else 0, self.gmem_refused_io),
            (6 if maps else 0, self.map_access),
            (3 if maps else 0, self.pin),
            (3 if s.names("p") else 0, self.unpin),
            (3 if vms and len(vcpus) < self.budget.vcpus else 0.1, self.create_vcpu),
            (6 if vcpus else 0, self.load),
            (10 if vcpus else 0, self.run_vcpu),
            (10 if s.names("x") else 0, self.resolve),
            (2 if vcpus else 0, self.pre_fault),
            (2 if vms else 0, self.enable_cap),
            (2 if vms else 0, self.launch),
            (2 if gmems else 0, self.memory_failure),
            (0.5, self.fork),
            (1 if s.names("ch") else 0, self.child_access),
            (2, self.close),
            (1, self.check_extension),
            (2, self.memfd_create),
            (5 if gmems or s.names("f") else 0, self.file_call),
            (2, self.raw_ioctl),
            (3, self.kvm_mmap),
            (6 if maps else 0, self.mm_call),
            (1, self.set_mempolicy),
            (1 if maps else 0, self.mmap_fixed),
            (0.3, self.kvm_fork),
            (2 if maps and s.names("ch") else 0, self.child_call),
            (0.3, self.numa_nodes),
            (2 if vms else 0, self.get_dirty_log),
        ]
        table = [(w, f) for w, f in table if w > 0]  # hypothesis' Random may pick weight-0 items
        for _ in range(50):
            fn = self.rng.choices([f for _, f in table], [w for w, _ in table])[0]
            try:
                st = fn(s)
            except (TypeError, ValueError, OverflowError, AttributeError, IndexError):
                # The state holds something an accepted bad call left (a float userspace_addr, a
                # slot of 0 pages): that call was the finding; draw another step.
                self.skipped += 1
                continue
            if st is not None:
                return st
        return Step("kvm.check_extension(u.KVM_CAP_GUEST_MEMFD)", "kvm.check_extension", ("kvm",))

    # --- system ----------------------------------------------------------------------------------
    def create_vm(self, s: Session) -> Step:
        t = self.rng.choice([0, 0, 1, 1, 4, 4, 5, 5, 2, 3, 6])
        a = self.arg(t, o.ULONG)
        name = s.fresh("vm")
        types = s.kvm.options.built_vm_types

        def exp(ss: Session) -> Expect:
            e = expect_for({"vm_type": a}, ss.is_closed("kvm"))
            if a.good and a.conv not in types:
                e.bad("VM type not supported", errno.EINVAL)
            return e
        return Step(f"{name} = kvm.create_vm({a.code})", "kvm.create_vm", ("kvm",), exp)

    def mmap_anon(self, s: Session) -> Step:
        a = self.arg(self.rng.choice([self.pages(), 2 << 20, 4 << 20]), o.SIZE_T)

        def exp(ss: Session) -> Expect:
            e = expect_for({"size": a}, ss.is_closed("kvm"))
            if a.good and a.conv == 0:
                e.bad("zero length mmap", errno.EINVAL)
            if a.good and a.conv > 1 << 47:
                e.bad("mmap length beyond the user address space", errno.ENOMEM)
            return e
        return Step(f"{s.fresh('m')} = kvm.mmap_anonymous({a.code})", "kvm.mmap_anonymous", ("kvm",), exp)

    def check_extension(self, s: Session) -> Step:
        cap = self.rng.choice([u.KVM_CAP_GUEST_MEMFD_FLAGS, u.KVM_CAP_MEMORY_ATTRIBUTES,
                               u.KVM_CAP_VM_TYPES, u.KVM_CAP_PRE_FAULT_MEMORY, 0, 9999])
        target = self.pick(s.names("vm")) if self.rng.random() < 0.6 else "kvm"
        target = target or "kvm"
        a = self.arg(cap, o.ULONG)

        def exp(ss: Session) -> Expect:
            return expect_for({"cap": a}, ss.is_closed(target))
        return Step(f"{target}.check_extension({a.code})", f"{'vm' if target != 'kvm' else 'kvm'}"
                    ".check_extension", (target,), exp)

    def fork(self, s: Session) -> Step:
        return Step(f"{s.fresh('ch')} = kvm.process.fork()", "process.fork", ("kvm",))

    def child_access(self, s: Session) -> Step | None:
        ch = self.pick(s.names("ch"))
        assert ch is not None
        maps = s.ns[ch].mappings()
        if not maps:
            return None
        i = self.rng.randrange(len(maps))
        m = maps[i]
        if self.rng.random() < 0.3:
            return Step(f"{ch}.mappings()[{i}].close()", "child.munmap", (ch,))
        off = self.rng.randrange(0, max(1, m.length // PS)) * PS
        return Step(f"{ch}.mappings()[{i}].read({off:#x}, 0x10)", "child.read", (ch,),
                    lambda ss: Expect())

    # --- guest_memfd ---------------------------------------------------------------------------------
    def create_gmem(self, s: Session) -> Step:
        vm = self.pick(s.names("vm"))
        assert vm is not None
        order = s.kvm.options.gmem_folio_order
        release_flags = s.kvm.options.release.gmem_flags
        sizes = [self.pages(), 16 * PS, 2 << 20, 4 << 20] + ([1 << 30] if order == 18 else [])
        size = self.rng.choice(sizes)
        flags = self.rng.choice([0, 1, 3, 3, 2, 4, 1 << 63])
        a_size, a_flags = self.arg(size, o.U64), self.arg(flags, o.U64)
        name = s.fresh("g")

        def exp(ss: Session) -> Expect:
            e = expect_for({"size": a_size, "flags": a_flags}, ss.is_closed(vm))
            if a_flags.good and a_flags.conv & ~release_flags:
                e.bad("unknown guest_memfd flag", errno.EINVAL)
            if a_size.good:
                sz = o.convert(a_size.conv, o.S64)  # i_size is a loff_t
                if sz <= 0 or sz % PS:
                    e.bad("size not a positive multiple of the page size", errno.EINVAL)
            return e
        return Step(f"{name} = {vm}.create_guest_memfd({a_size.code}, {a_flags.code})",
                    "vm.create_guest_memfd", (vm,), exp)

    def _gmem_range(self, s: Session, g: str) -> tuple[int, int]:
        size = s.ns[g].size
        npages = max(1, min(size, 1 << 40) // PS)
        if npages > 64 and self.rng.random() < 0.5:
            # around a hugepage boundary, or the end
            b = self.rng.choice([512, npages - 1, npages // 2]) if npages > 512 else npages // 2
            start = max(0, min(npages - 1, b - self.rng.randint(0, 3)))
        else:
            start = self.rng.randrange(npages)
        n = self.rng.randint(1, min(npages - start, self.rng.choice([1, 4, 16, 600])))
        return start * PS, n * PS

    def fallocate(self, s: Session) -> Step:
        g = self.pick(s.names("g"))
        assert g is not None
        off, ln = self._gmem_range(s, g)
        which = self.rng.choice(["allocate", "punch_hole", "allocate", "punch_hole", "fallocate"])
        a_off, a_len = self.arg(off, o.S64), self.arg(ln, o.S64)
        if which == "fallocate":
            mode = self.rng.choice([0, 1, 3, 2, 0x11, 0x13, 0x81, 0x41, 1 << 31])
            a_mode = self.arg(mode, o.S32)
            code = f"{g}.fallocate({a_mode.code}, {a_off.code}, {a_len.code})"
            args = {"mode": a_mode, "offset": a_off, "len": a_len}
        else:
            a_mode = make_arg(3 if which == "punch_hole" else 1, None, o.S32)
            code = f"{g}.{which}({a_off.code}, {a_len.code})"
            args = {"offset": a_off, "len": a_len}

        def exp(ss: Session) -> Expect:
            e = expect_for(args, ss.is_closed(g))
            if a_off.good and a_len.good and a_mode.good:
                if a_off.conv < 0 or a_len.conv <= 0:
                    e.bad("negative offset or non-positive length (vfs_fallocate)", errno.EINVAL)
                elif a_off.conv + a_len.conv >= 1 << 63:
                    e.bad("offset + len overflows loff_t", errno.EFBIG)
                if not a_mode.conv & u.FALLOC_FL_KEEP_SIZE:
                    e.bad("guest_memfd requires FALLOC_FL_KEEP_SIZE", errno.EOPNOTSUPP)
                if a_mode.conv & ~(u.FALLOC_FL_KEEP_SIZE | u.FALLOC_FL_PUNCH_HOLE):
                    e.bad("unsupported fallocate mode", errno.EOPNOTSUPP)
                if a_off.conv % PS or a_len.conv % PS:
                    e.bad("unaligned fallocate", errno.EINVAL)
            return e
        return Step(code, f"gmem.{which}", (g,), exp)

    def gmem_refused_io(self, s: Session) -> Step:
        g = self.pick(s.names("g"))
        assert g is not None
        code, why = self.rng.choice([
            (f"{g}.read(0x1000)", "guest_memfd has no read"),
            (f"{g}.read(0x1000, 0x0)", "guest_memfd has no pread"),
            (f"{g}.write(b'x' * 16)", "guest_memfd has no write"),
            (f"{g}.write(b'x', 0x0)", "guest_memfd has no pwrite"),
            (f"{g}.truncate({s.ns[g].size * 2:#x})", "guest_memfd size is immutable"),
        ])

        negative = "truncate" in code and s.ns[g].size * 2 >= 1 << 63

        def exp(ss: Session) -> Expect:
            if negative:  # do_sys_ftruncate: a negative length is EINVAL before the fd is looked up
                return Expect("KvmError", errno.EINVAL, "negative truncate length")
            e = expect_for({}, ss.is_closed(g))
            e.bad(why)
            return e
        return Step(code, f"gmem.{code.split('.', 1)[1].split('(')[0]}", (g,), exp)

    def gmem_mmap(self, s: Session) -> Step:
        g = self.pick(s.names("g"))
        assert g is not None
        size = s.ns[g].size
        choice = self.rng.random()
        if choice < 0.5:
            code, args = f"{s.fresh('m')} = {g}.mmap()", {}
            a_off = make_arg(0, None, o.S64)
            a_len = make_arg(size, None, o.SIZE_T)
        else:
            off, ln = self._gmem_range(s, g)
            a_len, a_off = self.arg(ln, o.SIZE_T), self.arg(off, o.S64)
            code = f"{s.fresh('m')} = {g}.mmap({a_len.code}, {a_off.code})"
            args = {"length": a_len, "offset": a_off}
        flags = s.ns[g].flags

        def exp(ss: Session) -> Expect:
            e = expect_for(args, ss.is_closed(g))
            if a_len.value is None:  # length None: the whole file (a default), not a bad int
                a_len.cls, a_len.conv = "ok", s.ns[g].size
                e = expect_for(args, ss.is_closed(g))
            if a_len.good and a_off.good:
                if a_off.conv % PS and e.must in (None, "KvmError"):
                    # ksys_mmap_pgoff checks the offset before it looks the fd up
                    return Expect("KvmError", errno.EINVAL, "mmap offset unaligned")
                if a_len.conv == 0:
                    e.bad("mmap of zero length", errno.EINVAL)
                if a_off.conv < 0:
                    e.bad("negative mmap offset (EINVAL or EOVERFLOW)")
                if a_len.conv > 1 << 47:
                    e.bad("mmap length beyond the user address space", errno.ENOMEM)
                elif a_len.conv > 1 << 46:
                    return e  # may or may not fit in what is left of the address space
                if not flags & u.GUEST_MEMFD_FLAG_MMAP:
                    e.bad("guest_memfd without MMAP", errno.ENODEV)
            return e
        return Step(code, "gmem.mmap", (g,), exp)

    def memory_failure(self, s: Session) -> Step:
        g = self.pick(s.names("g"))
        assert g is not None
        off, _ = self._gmem_range(s, g)
        a = self.arg(off, o.S64)

        def exp(ss: Session) -> Expect:
            return expect_for({"offset": a}, ss.is_closed(g))
        return Step(f"{g}.memory_failure({a.code})", "gmem.memory_failure", (g,), exp)

    # --- memslots -------------------------------------------------------------------------------------
    def _slot_of(self, s: Session, vm: str) -> Any | None:
        slots = [sl for ms in s.ns[vm].memslots for sl in ms]
        return self.rng.choice(slots) if slots else None

    def memslot(self, s: Session) -> Step | None:
        vm = self.pick(s.names("vm"))
        assert vm is not None
        obj = s.ns[vm]
        r = self.rng.random()
        old = self._slot_of(s, vm)
        gmem_name = None
        off = 0
        if old is not None and r < 0.3:
            # move, flags-only or delete an existing slot
            slot_id = old.id | (old.as_id << 16)
            npages = old.npages
            what = self.rng.choice(["move", "flags", "delete", "delete"])
            size = 0 if what == "delete" else npages * PS
            gpa = old.base_gfn * PS
            if what == "move":
                gpa = self.rng.choice([gpa + npages * PS, 1 << 32, gpa + (2 << 20), 0])
            flags = (old.flags & 0xFFFF) ^ (u.KVM_MEM_LOG_DIRTY_PAGES if what == "flags" else 0)
            hva = old.userspace_addr
            if old.gmem_file is not None:
                gmem_name = s.name_of(old.gmem_file)
                off = old.gmem_pgoff * PS
        else:
            slot_id = self.rng.choice([0, 1, 2, 3, 7, 1 << 16 | 1, u.KVM_USER_MEM_SLOTS - 1])
            use_gmem = s.names("g") and self.rng.random() < 0.7
            gpa = self.rng.choice([0, 1 << 32, (1 << 32) + (2 << 20), 1 << 20, 0xC000_0000])
            m = self.pick(s.names("m"))
            if use_gmem:
                gmem_name = self.pick(s.names("g"))
                assert gmem_name is not None
                gsize = s.ns[gmem_name].size
                size = self.rng.choice([gsize, min(gsize, self.pages())])
                off = self.rng.choice([0, 0, max(0, gsize - size)])
                flags = u.KVM_MEM_GUEST_MEMFD
            else:
                size = self.pages()
                flags = self.rng.choice([0, 0, u.KVM_MEM_READONLY, u.KVM_MEM_LOG_DIRTY_PAGES])
            if m is not None and self.rng.random() < 0.85:
                mo = s.ns[m]
                hva = mo.addr
                size = min(size, max(PS, (mo.length // PS) * PS)) if not use_gmem else size
            else:
                hva = 0 if use_gmem else 0x7000_0000_0000
        v1 = gmem_name is None and self.rng.random() < 0.2
        a_slot, a_flags = self.arg(slot_id, o.U32), self.arg(flags, o.U32)
        hva_code, hva_uses = self.hva_expr(s, hva)
        a_gpa, a_size = self.arg(gpa, o.U64), self.arg(size, o.U64)
        a_hva = self.arg(hva, o.U64, hva_code)
        if a_hva.code != hva_code:
            hva_uses = ()
        a_off = self.arg(off, o.U64)
        args = {"slot": a_slot, "flags": a_flags, "guest_phys_addr": a_gpa, "memory_size": a_size,
                "userspace_addr": a_hva}
        if v1:
            code = (f"{vm}.set_user_memory_region({a_slot.code}, {a_flags.code}, {a_gpa.code}, "
                    f"{a_size.code}, {a_hva.code})")
            uses: tuple[str, ...] = (vm, *hva_uses)
        else:
            gm = gmem_name if gmem_name is not None else "None"
            if gmem_name is not None and self.rng.random() < 0.1:
                gm = f"{gmem_name}.fd"
            args["guest_memfd_offset"] = a_off
            code = (f"{vm}.set_user_memory_region2({a_slot.code}, {a_flags.code}, {a_gpa.code}, "
                    f"{a_size.code}, {a_hva.code}, {gm}, {a_off.code})")
            uses = (vm, *hva_uses) + ((gmem_name,) if gmem_name else ())
        nr_as = obj.nr_as

        def exp(ss: Session) -> Expect:
            e = expect_for(args, ss.is_closed(vm))
            if not all(a.good for a in args.values()):
                return e
            fl, sid = a_flags.conv, a_slot.conv
            if v1 and fl & ~(u.KVM_MEM_LOG_DIRTY_PAGES | u.KVM_MEM_READONLY):
                e.bad("flag not valid for KVM_SET_USER_MEMORY_REGION", errno.EINVAL)
            if fl & ~(u.KVM_MEM_LOG_DIRTY_PAGES | u.KVM_MEM_READONLY | u.KVM_MEM_GUEST_MEMFD):
                e.bad("unknown memslot flag", errno.EINVAL)
            if a_size.conv % PS:
                e.bad("memory_size unaligned", errno.EINVAL)
            if a_gpa.conv % PS:
                e.bad("guest_phys_addr unaligned", errno.EINVAL)
            if a_hva.conv % PS:
                e.bad("userspace_addr unaligned", errno.EINVAL)
            if fl & u.KVM_MEM_GUEST_MEMFD and not v1 and a_off.conv % PS:
                e.bad("guest_memfd_offset unaligned", errno.EINVAL)
            if (sid & 0xFFFF) >= u.KVM_USER_MEM_SLOTS or (sid >> 16) >= nr_as:
                e.bad("slot id or address space out of range", errno.EINVAL)
            if a_size.conv and a_gpa.conv + a_size.conv > 1 << 64:
                e.bad("guest physical range wraps", errno.EINVAL)
            if a_size.conv == 0 and (sid >> 16) < nr_as and ss.ns[vm].memslots[sid >> 16].get(
                    sid & 0xFFFF) is None and (sid & 0xFFFF) < u.KVM_USER_MEM_SLOTS:
                e.bad("deleting a memslot that does not exist", errno.EINVAL)
            return e
        return Step(code, "vm.set_user_memory_region" + ("" if v1 else "2"), uses, exp)

    # --- attributes -----------------------------------------------------------------------------------
    def _gpa_in_slot(self, s: Session, vm: str) -> tuple[int, int]:
        sl = self._slot_of(s, vm)
        if sl is None or sl.npages <= 0:
            return self.rng.choice([0, 1 << 32]), self.pages()
        start = self.rng.randrange(sl.npages)
        n = self.rng.randint(1, min(sl.npages - start, self.rng.choice([1, 4, 16, 600])))
        return (sl.base_gfn + start) * PS, n * PS

    def vm_attrs(self, s: Session) -> Step:
        vm = self.pick(s.names("vm"))
        assert vm is not None
        gpa, size = self._gpa_in_slot(s, vm)
        attrs = self.rng.choice([PRIVATE, PRIVATE, 0, 0, 1, 1 << 63])
        flags = 0 if self.rng.random() < 0.9 else 1
        a = {"address": self.arg(gpa, o.U64), "size": self.arg(size, o.U64),
             "attributes": self.arg(attrs, o.U64), "flags": self.arg(flags, o.U64)}
        supported = s.ns[vm].supported_mem_attributes()
        gmem_mode = s.kvm.options.gmem_attributes
        mem_attrs = s.kvm.options.memory_attributes

        def exp(ss: Session) -> Expect:
            e = expect_for(a, ss.is_closed(vm))
            if not all(x.good for x in a.values()):
                return e
            if gmem_mode or not mem_attrs:  # the ioctl is gone (ENOTTY) before any argument is looked at
                e.bad("per-VM attributes disabled", errno.ENOTTY)
                return e
            if a["flags"].conv:
                e.bad("flags must be 0", errno.EINVAL)
            if a["size"].conv == 0:
                e.bad("size is 0", errno.EINVAL)
            if a["address"].conv % PS or a["size"].conv % PS:
                e.bad("unaligned", errno.EINVAL)
            if a["address"].conv + a["size"].conv > 1 << 64:
                e.bad("range wraps", errno.EINVAL)
            if a["attributes"].conv & ~supported:
                e.bad("unsupported attributes", errno.EINVAL)
            return e
        code = (f"{vm}.set_memory_attributes({a['address'].code}, {a['size'].code}, "
                f"{a['attributes'].code}, {a['flags'].code})")
        return Step(code, "vm.set_memory_attributes", (vm,), exp)

    def gmem_attrs2(self, s: Session) -> Step:
        g = self.pick(s.names("g"))
        assert g is not None
        off, ln = self._gmem_range(s, g)
        attrs = self.rng.choice([PRIVATE, PRIVATE, 0, 0, 1])
        flags = self.rng.choice([0, 0, ZERO, PRESERVE, PRESERVE, ZERO | PRESERVE, 4])
        a = {"offset": self.arg(off, o.U64), "size": self.arg(ln, o.U64),
             "attributes": self.arg(attrs, o.U64), "flags": self.arg(flags, o.U64)}
        reserved = "" if self.rng.random() < 0.9 else ", reserved=(0, 1)"
        opts = s.kvm.options
        gsize = s.ns[g].size

        def exp(ss: Session) -> Expect:
            e = expect_for(a, ss.is_closed(g))
            if not all(x.good for x in a.values()):
                return e
            if not opts.gmem_attributes:
                e.bad("no per-guest_memfd attributes", errno.ENOTTY)
                return e
            fl = a["flags"].conv
            if opts.inplace_revision == "v5":
                if fl & ~(ZERO | PRESERVE) or (fl & ZERO and fl & PRESERVE):
                    e.bad("unknown or conflicting content-mode flags", errno.EINVAL)
            elif fl:
                e.bad("flags must be 0 (v8)", errno.EINVAL)
            if reserved:
                e.bad("reserved fields must be 0", errno.EINVAL)
            if a["attributes"].conv & ~PRIVATE:
                e.bad("unsupported attributes", errno.EINVAL)
            sz, of = a["size"].conv, a["offset"].conv
            if sz == 0:
                e.bad("size is 0", errno.EINVAL)
            if of % PS or sz % PS:
                e.bad("unaligned", errno.EINVAL)
            if of + sz > gsize:
                e.bad("range beyond the guest_memfd", errno.EINVAL)
            return e
        code = (f"{g}.set_memory_attributes2({a['offset'].code}, {a['size'].code}, "
                f"{a['attributes'].code}, {a['flags'].code}{reserved})")
        return Step(code, "gmem.set_memory_attributes2", (g,), exp)

    # --- host mappings --------------------------------------------------------------------------------
    def map_access(self, s: Session) -> Step:
        m = self.pick(s.names("m"))
        assert m is not None
        length = s.ns[m].length
        npages = max(1, length // PS)
        start = self.rng.randrange(npages) * PS + (self.rng.choice([0, 0, 0, 17]))
        n = self.rng.choice([1, 16, PS, 2 * PS])
        what = self.rng.choice(["read", "write", "fill", "discard", "read"])
        a_off, a_len = self.arg(start, o.SIZE_T), self.arg(n, o.SIZE_T)
        if what == "read":  # the value is kept in ``_`` (the differential mode compares contents)
            code = f"_ = {m}.read({a_off.code}, {a_len.code})"
        elif what == "write":
            code = f"{m}.write({a_off.code}, bytes([{self.rng.randrange(256)}]) * {n})"
            a_len = make_arg(n, None, o.SIZE_T)
        elif what == "fill":
            code = f"{m}.fill({a_off.code}, {a_len.code}, {self.rng.randrange(256)})"
        else:
            a_off = self.arg(start - start % PS, o.SIZE_T)
            a_len = self.arg(self.rng.randint(1, 4) * PS, o.SIZE_T)
            code = f"{m}.discard({a_off.code}, {a_len.code})"
        args = {"offset": a_off, "length": a_len}

        def exp(ss: Session) -> Expect:
            e = expect_for(args, ss.is_closed(m))
            if e.must is None and a_off.good and a_len.good:
                off, n = a_off.conv, a_len.conv
                if what == "discard":
                    # madvise: the start must be aligned, the length is rounded up to pages, and
                    # the mapping covers whole pages.
                    whole = -(-length // PS) * PS
                    if off % PS:
                        e.bad("discard start unaligned", errno.EINVAL)
                    elif -(-n // PS) * PS >= 1 << 64:
                        e.bad("discard length wraps when page-aligned (madvise)", errno.EINVAL)
                    elif n and off + -(-n // PS) * PS > whole:
                        e.bad("discard range reaches past the mapping", errno.ENOMEM)
                elif off > length or n > length - off:
                    e.must, e.why = "refused", "access outside the mapping"
            return e
        return Step(code, f"mapping.{what}", (m,), exp, atomic=what == "discard")

    def pin(self, s: Session) -> Step:
        m = self.pick(s.names("m"))
        assert m is not None
        length = s.ns[m].length
        start = self.rng.randrange(max(1, length // PS)) * PS
        n = min(self.rng.choice([1, 1, 4]) * PS, max(PS, length - start))
        a_off, a_len = self.arg(start, o.SIZE_T), self.arg(n, o.SIZE_T)
        p = s.fresh("p")
        # A pin is a context manager held across steps: entered here, exited by unpin.
        code = f"{p} = ExitStack(); {p}.enter_context({m}.pin({a_off.code}, {a_len.code}))"

        def exp(ss: Session) -> Expect:
            e = expect_for({"offset": a_off, "length": a_len}, ss.is_closed(m))
            if e.must is None and a_off.good and a_len.good:
                if a_off.conv % PS or a_len.conv % PS or a_len.conv == 0:
                    e.bad("pin range unaligned or empty", errno.EINVAL)
                elif a_off.conv > length or a_len.conv > length - a_off.conv:
                    e.must, e.why = "refused", "pin outside the mapping"
            return e
        return Step(code, "mapping.pin", (m,), exp, atomic=False)  # GUP faults pages in first

    def unpin(self, s: Session) -> Step:
        p = self.pick(s.names("p"))
        assert p is not None
        # ExitStack.close() releases the pin if it was taken and does nothing if pin() refused.
        return Step(f"{p}.close(); del {p}", "mapping.unpin", (p,))

    # --- vCPUs -------------------------------------------------------------------------------------
    def create_vcpu(self, s: Session) -> Step | None:
        vm = self.pick(s.names("vm"))
        if vm is None:
            return None
        vid = self.rng.choice([0, 1, 2, 0, 1023, 1024, -1])
        a = self.arg(vid, o.ULONG)
        c = s.fresh("c")

        def exp(ss: Session) -> Expect:
            e = expect_for({"vcpu_id": a}, ss.is_closed(vm))
            if a.good and a.conv >= KVM_MAX_VCPU_IDS:
                e.bad("vcpu id >= KVM_MAX_VCPU_IDS", errno.EINVAL)
            if a.good and a.conv in ss.ns[vm].vcpus:
                e.bad("vcpu id exists", errno.EEXIST)
            return e
        return Step(f"{c} = {vm}.create_vcpu({a.code})", "vm.create_vcpu", (vm,), exp)

    def _vm_of_vcpu(self, s: Session, c: str) -> Any:
        return s.ns[c].vm

    def load(self, s: Session) -> Step:
        c = self.pick(s.names("c"))
        assert c is not None
        vm = self._vm_of_vcpu(s, c)
        ops = []
        tdx = vm.vm_type == u.KVM_X86_TDX_VM
        for _ in range(self.rng.randint(1, self.budget.max_ops)):
            sl = self._slot_of_obj(vm)
            if sl is None or sl.npages <= 0:
                gpa, size = self.rng.choice([0, 1 << 32]), self.pages(2)
            else:
                start = self.rng.randrange(sl.npages)
                gpa = ((sl.base_gfn + start) * PS) % (1 << 64)  # a slot may sit at a hostile gpa
                size = self.rng.randint(1, min(sl.npages - start, 4)) * PS
            if self.rng.random() < 0.2:
                size = self.rng.randint(1, 200)
            acc = self.rng.choice(["auto", "auto", "private", "shared"])
            if tdx and acc == "shared" and self.rng.random() < 0.5:
                gpa |= 1 << 51
            pat = self.rng.randrange(256)
            kind = self.rng.random()
            if not self.budget.hypercalls and 0.6 <= kind < 0.9:
                kind = 0.95
            if kind < 0.3:
                ops.append(f"Write({gpa:#x}, {size:#x}, {pat:#x}, {acc!r})")
            elif kind < 0.45:
                ops.append(f"Touch({gpa:#x}, {size:#x}, {pat:#x}, 4096, {acc!r})")
            elif kind < 0.6:
                ops.append(f"Verify({gpa:#x}, {size:#x}, {pat:#x}, {acc!r})")
            elif kind < 0.8:
                attrs = self.rng.choice([u.KVM_MAP_GPA_RANGE_ENCRYPTED, 0, 0x11, 0x3])
                npages = self.rng.choice([size // PS or 1, 0, 1 << 52])
                ops.append(f"MapGpaRange({gpa:#x}, {npages:#x}, {attrs:#x}, None)")
            elif kind < 0.9:
                ops.append(f"Accept({gpa:#x}, {max(PS, size - size % PS):#x})")
            else:
                ops.append(f"Sync({self.rng.randrange(8)})")
        code = f"{c}.load(Program([{', '.join(ops)}]))"

        def exp(ss: Session) -> Expect:
            return expect_for({}, ss.is_closed(c))
        return Step(code, "vcpu.load", (c,), exp)

    def _slot_of_obj(self, vm: Any) -> Any | None:
        slots = [sl for ms in vm.memslots for sl in ms]
        return self.rng.choice(slots) if slots else None

    def run_vcpu(self, s: Session) -> Step:
        c = self.pick(s.names("c"))
        assert c is not None
        x = f"x{c[1:]}"

        def exp(ss: Session) -> Expect:
            return expect_for({}, ss.is_closed(c))
        return Step(f"{x} = {c}.run()", "vcpu.run", (c,), exp, atomic=False)

    def resolve(self, s: Session) -> Step | None:
        """Answer the last exit of a vCPU as a VMM would: convert on a memory fault, set the
        hypercall's return value (converting first), or nothing for other exits."""
        x = self.pick(s.names("x"))
        assert x is not None
        ex = s.ns[x]
        c = f"c{x[1:]}"
        if c not in s.ns:
            return None
        vm = s.ns[c].vm
        vmn = s.name_of(vm)
        if isinstance(ex, guestmem.api.ExitHypercall):
            if self.rng.random() < 0.7 and vmn is not None:
                conv = self._convert_code(s, vm, vmn, ex.gpa, ex.npages * PS, ex.to_private)
                if conv:
                    return Step(conv[0], conv[1], conv[2])
            ret = self.rng.choice([0, 0, -u.KVM_EINVAL if hasattr(u, "KVM_EINVAL") else -22])
            return Step(f"{x}.ret = {ret}", "exit.ret", (x,))
        if isinstance(ex, guestmem.api.ExitMemoryFault) and vmn is not None:
            conv = self._convert_code(s, vm, vmn, ex.gpa, ex.size, ex.private)
            if conv:
                return Step(conv[0], conv[1], conv[2])
        return None

    def _convert_code(self, s: Session, vm: Any, vmn: str, gpa: int, size: int, to_private: bool
                      ) -> tuple[str, str, tuple[str, ...]] | None:
        attr = PRIVATE if to_private else 0
        if not 0 < size < 1 << 64 or gpa + size > 1 << 64:
            return None  # a VMM answers such a request with an error; it does not forward it
        if not s.kvm.options.gmem_attributes:
            return (f"{vmn}.set_memory_attributes({gpa:#x}, {size:#x}, {attr:#x})",
                    "vm.set_memory_attributes", (vmn,))
        sl = vm.memslots[0].lookup(gpa // PS)
        if sl is None or sl.gmem_file is None:
            return None
        g = s.name_of(sl.gmem_file)
        if g is None:
            return None
        off = (sl.gmem_pgoff + gpa // PS - sl.base_gfn) * PS
        size = min(size, (sl.end_gfn - gpa // PS) * PS)
        mode = self.rng.choice([0, ZERO, PRESERVE]) if s.kvm.options.content_modes else 0
        return (f"{g}.set_memory_attributes2({off:#x}, {size:#x}, {attr:#x}, {mode:#x})",
                "gmem.set_memory_attributes2", (g,))

    def pre_fault(self, s: Session) -> Step:
        c = self.pick(s.names("c"))
        assert c is not None
        vm = self._vm_of_vcpu(s, c)
        vmn = s.name_of(vm) or ""
        gpa, size = self._gpa_in_slot(s, vmn) if vmn else (0, PS)
        a = {"gpa": self.arg(gpa, o.U64), "size": self.arg(size, o.U64),
             "flags": self.arg(0 if self.rng.random() < 0.9 else 1, o.U64)}
        pre_fault_ioctl = s.kvm.options.release.pre_fault_ioctl

        def exp(ss: Session) -> Expect:
            e = expect_for(a, ss.is_closed(c))
            if e.must is None and getattr(getattr(ss.ns.get(c), "vm", None), "bugged", False):
                return Expect("KvmError", errno.EIO, "the VM is bugged (checked first)")
            if all(x.good for x in a.values()):
                if not pre_fault_ioctl:
                    e.bad("no KVM_PRE_FAULT_MEMORY before 6.10 (x86's default: EINVAL)", errno.EINVAL)
                if a["flags"].conv:
                    e.bad("flags must be 0", errno.EINVAL)
                if a["gpa"].conv % PS or a["size"].conv % PS or a["size"].conv == 0:
                    e.bad("unaligned or empty range", errno.EINVAL)
                if a["gpa"].conv + a["size"].conv > 1 << 64:
                    e.bad("range wraps", errno.EINVAL)
            return e
        code = f"{c}.pre_fault_memory({a['gpa'].code}, {a['size'].code}, {a['flags'].code})"
        return Step(code, "vcpu.pre_fault_memory", (c,), exp)

    def enable_cap(self, s: Session) -> Step:
        vm = self.pick(s.names("vm"))
        assert vm is not None
        cap = self.rng.choice([u.KVM_CAP_EXIT_HYPERCALL] * 4 + [u.KVM_CAP_GUEST_MEMFD, 12345])
        mask = self.rng.choice([1 << u.KVM_HC_MAP_GPA_RANGE] * 4 + [0, 1, 1 << 63])
        flags = 0 if self.rng.random() < 0.85 else self.rng.choice([1, 1 << 31])
        a_cap, a_flags, a_mask = self.arg(cap, o.U32), self.arg(flags, o.U32), self.arg(mask, o.U64)

        def exp(ss: Session) -> Expect:
            e = expect_for({"cap": a_cap, "flags": a_flags, "args[0]": a_mask}, ss.is_closed(vm))
            if a_cap.good and a_flags.good and a_mask.good:
                if a_flags.conv:
                    e.bad("x86 kvm_vm_ioctl_enable_cap: flags must be 0", errno.EINVAL)
                if a_cap.conv == u.KVM_CAP_EXIT_HYPERCALL and a_mask.conv & ~(1 << u.KVM_HC_MAP_GPA_RANGE):
                    e.bad("unsupported hypercall exit mask", errno.EINVAL)
            return e
        code = f"{vm}.enable_cap({a_cap.code}, {a_flags.code}, args=({a_mask.code},))"
        return Step(code, "vm.enable_cap", (vm,), exp)

    def launch(self, s: Session) -> Step:
        vm = self.pick(s.names("vm"))
        assert vm is not None
        if self.rng.random() < 0.25:
            return Step(f"{vm}.launch_finalize()", "vm.launch_finalize", (vm,),
                        lambda ss: expect_for({}, ss.is_closed(vm)))
        gpa, size = self._gpa_in_slot(s, vm)
        size = min(size, 16 * PS)
        src = "None" if self.rng.random() < 0.5 else f"bytes([{self.rng.randrange(256)}]) * {size:#x}"
        a_gpa, a_size = self.arg(gpa, o.U64), self.arg(size, o.U64)
        has_launch = s.ns[vm].vm_type in (u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM)

        def exp(ss: Session) -> Expect:
            e = expect_for({"gpa": a_gpa, "size": a_size}, ss.is_closed(vm))
            if not has_launch:
                return e  # ENOTTY comes first; any refusal will do
            if a_gpa.good and a_size.good and (a_gpa.conv % PS or a_size.conv % PS or a_size.conv == 0):
                e.bad("launch range unaligned or empty", errno.EINVAL)
            return e
        return Step(f"{vm}.launch_update({a_gpa.code}, {a_size.code}, {src})", "vm.launch_update",
                    (vm,), exp)

    # --- closing ------------------------------------------------------------------------------------
    def close(self, s: Session) -> Step | None:
        pool = s.names("g") * 3 + s.names("m") * 3 + s.names("c") * 2 + s.names("vm") + ["kvm"] * 0
        if self.rng.random() < 0.02:
            pool = ["kvm"]
        if not pool:
            return None
        n = self.rng.choice(pool)
        kind = {"g": "gmem", "m": "mapping", "c": "vcpu", "v": "vm", "k": "kvm"}[n[0]]
        return Step(f"{n}.close()", f"{kind}.close", (n,))

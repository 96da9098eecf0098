"""The hostile stateful fuzzer in the suite: a hypothesis state machine over the model's interface,
plus the checks that the fuzzer itself works (it finds an injected bug, its reproducer reproduces
it, its oracle follows the integer rule, its snapshot sees a change).

The state machine draws the model's switches once, then each rule draws one step of
:class:`guestmem.fuzz.machine.StepGen` (every VM type, every call, good and hostile arguments)
and :class:`~guestmem.fuzz.machine.Session` judges it: no crash, no accepted bad input, no refused
call that changed state, every invariant on every live VM.  A finding fails the test with a shrunk
standalone reproducer in the message.  Hypothesis' own shrinking is off (the fuzzer shrinks over
API lines, which is faster and gives the script), so a failing example costs a bounded time.
"""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import guestmem
from guestmem.fuzz import oracle as o
from guestmem.fuzz.machine import Session, Step, StepGen, draw_options
from guestmem.fuzz.reproducer import render
from guestmem.fuzz.runner import fuzz, shrink
from guestmem.fuzz.snapshot import diff, snapshot
from guestmem.model.kvm.guest_memfd import GmemFile


class HostileModel(RuleBasedStateMachine):
    """Every rule is one hostile step against the model; see the module docstring."""

    @initialize(r=st.randoms(use_true_random=False))
    def open_system(self, r: random.Random) -> None:
        self.opts = draw_options(r)
        self.session = Session(self.opts)
        self.gen = StepGen(r)

    def _step(self, r: random.Random, method: str | None = None) -> None:
        self.gen.rng = r
        step = getattr(self.gen, method)(self.session) if method else self.gen.next(self.session)
        if step is None:
            return
        f = self.session.run(step)
        if f is not None:
            ran = list(self.session.ran[: f.step + 1])
            small, sess = shrink(self.opts, ran, f.key, budget_s=3.0)
            text = render(self.opts, sess.ran, sess.outcomes, sess.last_finding or f)
            raise AssertionError(f"{f.category}: {f.message}\n\n{text}")

    @rule(r=st.randoms(use_true_random=False))
    def any_call(self, r: random.Random) -> None:
        self._step(r)

    @rule(r=st.randoms(use_true_random=False))
    def memslot(self, r: random.Random) -> None:
        self._step(r, "memslot") if self.session.names("vm") else None

    @rule(r=st.randoms(use_true_random=False))
    def guest(self, r: random.Random) -> None:
        if self.session.names("c"):
            self._step(r, self.gen.rng.choice(["load", "run_vcpu"]))

    @rule(r=st.randoms(use_true_random=False))
    def convert(self, r: random.Random) -> None:
        if self.session.names("g"):
            self._step(r, "gmem_attrs2")



HostileModel.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, database=None, derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate])


def test_hostile_state_machine() -> None:
    HostileModel.TestCase().runTest()


# --- the fuzzer's own machinery ------------------------------------------------------------------


def test_oracle_integer_rule() -> None:
    assert o.classify(True, o.U64)[0] == "type"
    assert o.classify(1.0, o.U64)[0] == "type"
    assert o.classify(None, o.S64)[0] == "type"
    assert o.classify(1 << 64, o.U64)[0] == "overflow"
    assert o.classify(-(1 << 63) - 1, o.U64)[0] == "overflow"
    assert o.classify(-4096, o.U64) == ("ok", (1 << 64) - 4096)
    assert o.classify((1 << 64) - 1, o.S64) == ("ok", -1)
    assert o.classify(1 << 31, o.S32) == ("ok", -(1 << 31))
    e = o.expect_for({"size": o.make_arg(1.5, None, o.U64), "n": o.make_arg(1 << 70, None, o.U64)},
                     closed=True)
    assert (e.must, e.cause()) == ("TypeError", "integer-rule: TypeError")
    e = o.expect_for({"n": o.make_arg(5, None, o.U64)}, closed=True)
    e.bad("unaligned", errno.EINVAL)
    assert (e.must, e.errno) == ("KvmError", errno.EBADF)  # EBADF before the kernel's own rules
    e = o.expect_for({"n": o.make_arg(5, None, o.U64)}, closed=False)
    e.bad("a", errno.EINVAL)
    e.bad("b", errno.EOPNOTSUPP)
    assert (e.must, e.errno) == ("KvmError", None)  # two rules, two errnos: order undecided


def test_snapshot_sees_a_change_and_only_a_change() -> None:
    kvm = guestmem.open("model")
    vm = kvm.create_vm(1)
    g = vm.create_guest_memfd(16 << 12, 0)
    a = snapshot(kvm)
    with pytest.raises(guestmem.KvmError):
        g.allocate(0x800, 0x1000)
    assert snapshot(kvm) == a
    g.allocate(0, 0x2000)
    b = snapshot(kvm)
    assert b != a and any(p.startswith("files") for p in diff(a, b))


def _inject_punch_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model bug the fuzzer must find: punching an odd number of whole pages crashes."""
    real = GmemFile.punch_hole

    def punch(self: GmemFile, offset: int, length: int) -> None:
        if isinstance(length, int) and length > 0 and length % 4096 == 0 and (length // 4096) % 2:
            raise ZeroDivisionError("injected")
        real(self, offset, length)
    monkeypatch.setattr(GmemFile, "punch_hole", punch)


def test_fuzzer_finds_an_injected_bug_and_its_reproducer_reproduces(monkeypatch: pytest.MonkeyPatch) -> None:
    _inject_punch_bug(monkeypatch)
    rep = fuzz(60, seed=7, max_sequences=60, shrink_budget=3.0,
               shrink_only=lambda key: key[:2] == ("crash", "ZeroDivisionError"))
    hits = [r for r in rep.findings if r.finding.key[:2] == ("crash", "ZeroDivisionError")]
    assert hits, rep.summary()
    rec = hits[0]
    assert len(rec.steps) <= rec.shrunk_from
    assert "guestmem.open('model'" in rec.reproducer
    assert ".punch_hole(" in rec.reproducer.rstrip().splitlines()[-1]
    with pytest.raises(ZeroDivisionError):
        exec(compile(rec.reproducer, "<reproducer>", "exec"), {})


def test_refused_call_that_changes_state_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    vm_cls = type(guestmem.open("model").create_vm(0))
    real = vm_cls.enable_cap

    def enable_cap(self: object, cap: int, flags: int = 0, args: tuple[int, ...] = ()) -> None:
        """Injected bug: the flags check comes after the change."""
        real(self, cap, 0, args)
        if flags:
            raise guestmem.KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "injected: after the change")
    monkeypatch.setattr(vm_cls, "enable_cap", enable_cap)
    s = Session({})
    for code, kind in [("vm1 = kvm.create_vm(0)", "kvm.create_vm"),
                       ("vm1.enable_cap(201, 1, args=(4096,))", "vm.enable_cap")]:
        f = s.run(Step(code, kind, ("kvm",) if kind.startswith("kvm") else ("vm1",)))
    assert f is not None and f.category == "state-changed" and "hc_mask" in f.message


def test_same_seed_same_run() -> None:
    """``--seed`` reproduces: the same sequences, steps and findings (only timings differ)."""
    a = fuzz(60, seed=5, max_sequences=6, shrink_budget=0.0)
    b = fuzz(60, seed=5, max_sequences=6, shrink_budget=0.0)
    assert (a.steps, dict(a.kinds)) == (b.steps, dict(b.kinds))
    assert {k: r.count for k, r in a.records.items()} == {k: r.count for k, r in b.records.items()}

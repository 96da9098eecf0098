"""What must happen for an argument the fuzzer chose: the integer rule and the upstream rules.

The fuzzer draws every integer argument either as a plausible value or as a hostile one; this
module says, for a drawn value, what the interface owes the caller (the lead's integer rule,
issue 9 item 5):

* a non-``int`` (float, str, None, bytes, list; ``bool`` too) -> ``TypeError``;
* an ``int`` outside ``[-2**(w-1), 2**w)`` for a field of width ``w`` -> ``OverflowError``;
* otherwise the value is converted to the field's C type (two's complement) and the kernel's own
  rules decide, giving a ``KvmError``.

Both of the first two happen before any state changes, and before the kernel looks at the
object (an argument that cannot be converted never reaches the syscall), so they take precedence
over ``EBADF`` on a closed object.  The kernel rules kept here are only the unambiguous ones from
``upstream-spec.md`` (unknown flag bits, reserved fields, misalignment, zero sizes, wraps,
out-of-range slots, closed objects); anything else the fuzzer only checks for "refused without a
state change" and "no crash".
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field

# (width, signed) of the C types the interface's integers land in.
U64 = (64, False)
S64 = (64, True)   # loff_t, __s64
U32 = (32, False)
S32 = (32, True)   # int (fallocate's mode)
ULONG = (64, False)
SIZE_T = (64, False)

# Hostile non-integers: each must raise TypeError.  ``True`` is an int subclass but not an integer
# argument by the rule.
NON_INTS: tuple[str, ...] = ("1.0", "'4096'", "None", "True", "b'\\x00'", "[0]", "4096.0")


@dataclass
class Arg:
    """One drawn argument: its literal source text, its Python value, and what the rule says."""

    code: str
    value: object
    cls: str  # "ok" (converted value in .conv), "type", "overflow"
    conv: int = 0

    @property
    def good(self) -> bool:
        return self.cls == "ok"


def convert(value: int, ctype: tuple[int, bool]) -> int:
    """Two's-complement conversion of an in-range ``int`` to the field's C type."""
    w, signed = ctype
    v = value % (1 << w)
    if signed and v >= 1 << (w - 1):
        v -= 1 << w
    return v


def classify(value: object, ctype: tuple[int, bool]) -> tuple[str, int]:
    """The integer rule for ``value`` in a field of type ``ctype``: (class, converted value)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "type", 0
    w, _ = ctype
    if not -(1 << (w - 1)) <= value < 1 << w:
        return "overflow", 0
    return "ok", convert(value, ctype)


def lit(v: int) -> str:
    """Source text for an integer: hex for the addresses and sizes a reader scans."""
    return f"{v:#x}" if v >= 0 else f"-{-v:#x}"


def make_arg(value: object, code: str | None, ctype: tuple[int, bool]) -> Arg:
    cls, conv = classify(value, ctype)
    return Arg(code if code is not None else (lit(value) if isinstance(value, int) and
                                               not isinstance(value, bool) else repr(value)),
               value, cls, conv)


def hostile_int(rng: random.Random, ctype: tuple[int, bool]) -> Arg:
    """A hostile argument for a field of type ``ctype``: a wrong type, an unrepresentable int, or
    a representable but extreme one (negative, top of range, unaligned)."""
    w = ctype[0]
    r = rng.random()
    if r < 0.25:
        code = rng.choice(NON_INTS)
        return make_arg(eval(code), code, ctype)  # the fixed literals above, nothing else
    if r < 0.45:
        v = rng.choice([1 << w, (1 << w) + 4096, -(1 << (w - 1)) - 1, 1 << 100, -(1 << 70)])
        return make_arg(v, None, ctype)
    v = rng.choice([-1, -4096, 1 << (w - 1), (1 << (w - 1)) - 4096, (1 << w) - 4096, (1 << w) - 1,
                    1, 0x800, 0xFFF, 0, 1 << 47, 1 << 52])
    return make_arg(v, None, ctype)


@dataclass
class Expect:
    """What a call owes the caller.

    ``must`` is the exception class name the call must raise ("TypeError", "OverflowError",
    "KvmError") or None when success is allowed; ``errno`` pins the errno when the spec is
    unambiguous; ``why`` says which rule applies (it names the finding).
    """

    must: str | None = None
    errno: int | None = None
    why: str = ""
    kvm_reasons: list[str] = field(default_factory=list)
    converted: bool = False  # an argument's C value differs from the Python int (two's complement)

    def cause(self) -> str:
        """The distinct cause a finding about this call is filed under."""
        if self.must == "TypeError":
            return "integer-rule: TypeError"
        if self.must == "OverflowError":
            return "integer-rule: OverflowError"
        if self.why == "closed object":
            return "closed-object: EBADF"
        if self.converted and self.must == "KvmError":
            return f"integer-rule: two's complement ({self.why})"
        return self.why or "-"

    def bad(self, reason: str, err: int | None = None) -> None:
        """Record a kernel rule the arguments break (the call must fail with a KvmError)."""
        self.kvm_reasons.append(reason)
        if self.must in ("TypeError", "OverflowError") or self.why == "closed object":
            return  # decided before the kernel looks at the arguments
        if self.must is None:
            self.must, self.why = "KvmError", reason
            self.errno = err
        elif self.must == "KvmError" and self.errno != err:
            self.errno = None  # two rules, different errnos: upstream's order decides; don't pin


def expect_for(args: dict[str, Arg], closed: bool) -> Expect:
    """The expectation from argument conversion and the object's state, before the kernel's own
    argument rules (which the caller adds with :meth:`Expect.bad`)."""
    # Arguments are converted one by one in the order of the signature (``args`` is built in
    # that order): the first that cannot be converted decides which exception it is.
    for name, a in args.items():
        if a.cls == "type":
            return Expect("TypeError", None, f"non-integer {name}")
        if a.cls == "overflow":
            return Expect("OverflowError", None, f"{name} does not fit its field")
    converted = any(a.conv != a.value for a in args.values())
    if closed:
        return Expect("KvmError", errno.EBADF, "closed object", converted=converted)
    return Expect(converted=converted)

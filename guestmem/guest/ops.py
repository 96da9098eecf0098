"""The guest-program op language.

A guest program is a sequence of ops over guest physical addresses.  It is deliberately small: it
says what a confidential guest does to its memory (write and verify byte patterns, access memory as
private or shared, ask the host to convert a range with the map-GPA-range hypercall, accept pages,
hand control to the host, stop), and nothing about how.  The model's vCPU interprets it directly;
``guestmem.guest.x86`` compiles it to machine code for a real vCPU.

Access kinds: ``"auto"`` lets the VM decide (a software-protected VM derives private/shared from the
gfn's attribute, as upstream does); ``"private"``/``"shared"`` are explicit, as an SNP guest's C-bit
or a TDX guest's shared GPA bit makes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

Access = Literal["auto", "private", "shared"]
_ACCESS = ("auto", "private", "shared")


def _check_range(op: str, gpa: int, size: int) -> None:
    if gpa < 0 or size <= 0:
        raise ValueError(f"{op}: gpa must be >= 0 and size > 0 (got gpa={gpa:#x}, size={size})")


@dataclass(frozen=True)
class Write:
    """Write ``pattern`` (a byte) over ``[gpa, gpa+size)``."""

    gpa: int
    size: int
    pattern: int
    access: Access = "auto"

    def __post_init__(self) -> None:
        _check_range("Write", self.gpa, self.size)
        if not 0 <= self.pattern <= 0xFF:
            raise ValueError(f"Write: pattern must be a byte, got {self.pattern}")
        if self.access not in _ACCESS:
            raise ValueError(f"Write: access must be one of {_ACCESS}")


@dataclass(frozen=True)
class Verify:
    """Check that every byte of ``[gpa, gpa+size)`` equals ``pattern``; on the first mismatch the
    vCPU exits with ``ExitGuestAssert(gpa, expected, found)``."""

    gpa: int
    size: int
    pattern: int
    access: Access = "auto"

    def __post_init__(self) -> None:
        _check_range("Verify", self.gpa, self.size)
        if not 0 <= self.pattern <= 0xFF:
            raise ValueError(f"Verify: pattern must be a byte, got {self.pattern}")
        if self.access not in _ACCESS:
            raise ValueError(f"Verify: access must be one of {_ACCESS}")


@dataclass(frozen=True)
class Touch:
    """Store ``pattern`` at one byte every ``stride`` bytes of ``[gpa, gpa+size)`` (by default the
    first byte of every page): what a guest does to fault memory in, without writing all of it."""

    gpa: int
    size: int
    pattern: int
    stride: int = 4096
    access: Access = "auto"

    def __post_init__(self) -> None:
        _check_range("Touch", self.gpa, self.size)
        if not 0 <= self.pattern <= 0xFF:
            raise ValueError(f"Touch: pattern must be a byte, got {self.pattern}")
        if self.stride <= 0 or self.stride > 1 << 31:
            raise ValueError("Touch: stride must be in (0, 2**31]")
        if self.access not in _ACCESS:
            raise ValueError(f"Touch: access must be one of {_ACCESS}")


@dataclass(frozen=True)
class MapGpaRange:
    """``KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)``: ask the host to convert.  The guest checks the
    hypercall's return against ``expect_ret`` (None = don't check) and asserts on a mismatch."""

    gpa: int
    npages: int
    attrs: int
    expect_ret: int | None = 0


@dataclass(frozen=True)
class Accept:
    """Accept/validate ``[gpa, gpa+size)`` as private (TDX TDG.MEM.PAGE.ACCEPT / SNP PVALIDATE).
    A no-op on flavours without acceptance."""

    gpa: int
    size: int


@dataclass(frozen=True)
class Sync:
    """Hand control to the host: the vCPU exits with ``ExitSync(value)``; the next run continues."""

    value: int = 0


@dataclass(frozen=True)
class Halt:
    """Stop: the vCPU exits with ``ExitHalt``; further runs halt again."""


Op = Write | Touch | Verify | MapGpaRange | Accept | Sync | Halt


class Program:
    """An immutable sequence of ops; a program implicitly ends with ``Halt``."""

    __slots__ = ("ops",)

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        ops = tuple(ops)
        for op in ops:
            if not isinstance(op, Write | Touch | Verify | MapGpaRange | Accept | Sync | Halt):
                raise TypeError(f"not a guest op: {op!r}")
        if not ops or not isinstance(ops[-1], Halt):
            ops = (*ops, Halt())
        self.ops: tuple[Op, ...] = ops

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, i: int) -> Op:
        return self.ops[i]

    def __add__(self, other: Program) -> Program:
        return Program([*self.ops[:-1], *other.ops])

    def __repr__(self) -> str:
        return f"Program({list(self.ops)!r})"

"""A guest image: machine code built outside guestmem (e.g. a freestanding C guest), loaded as is.

Why this exists: a :class:`~guestmem.guest.ops.Program` says *what* a guest does to its memory and
each backend decides how to run it.  A real guest (issue #14) is the other way round: its bytes are
fixed by a compiler and linker, and a backend only has to put them at the right guest physical
address, point ``rip`` at the entry and ``rsp`` at a stack, and run them on an x86 CPU (a real vCPU
on the kernel backend, the model's x86 CPU with ``cpu="x86"`` on the model).  Both backends'
``Vcpu.load()`` accept either.

**Where images go.**  Every backend that runs x86 code keeps a *loader window* (the kernel
backend's :mod:`guestmem.linux.loader`: a memslot at GPA ``0xff000000``, 16 MiB, with the identity
map, GDT and TSS in its first 2 MiB+).  Images live in its top 4 MiB,
``[IMAGE_AREA_GPA, IMAGE_AREA_END)`` = ``[0xffc00000, 0x100000000)``: a linked image names a
``load_gpa`` there (page-aligned, and the whole image, ``.bss`` included, must fit below
``IMAGE_AREA_END``); a position-independent image (``load_gpa=None``) is placed by the loader at
``IMAGE_AREA_GPA``.  One image is loaded per VM at a time (the area is shared by its vCPUs).

**Starting state** (the guest-side contract of issue #14): 64-bit long mode, ring 0, interrupts
off, identity-mapped with 2 MiB pages by the loader's tables, ``rip = base + entry``,
``rsp = base + stack_top`` (or the loader's own stack when ``stack_top`` is None), ``rflags = 2``,
the other general-purpose registers zero, and ``[base + len(code), base + size)`` zero-filled
(the ``.bss``) at every load.

Validation happens in ``__post_init__``: a wrong type raises ``TypeError`` and a value that cannot
be placed (misaligned, empty, oversized, entry or stack outside the image) raises ``ValueError``;
neither touches any VM, because an image is checked before any backend sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

PAGE_SIZE = 4096
IMAGE_AREA_GPA = 0xFFC0_0000  # top 4 MiB of the loader window [0xff000000, 0x100000000)
IMAGE_AREA_END = 0x1_0000_0000
IMAGE_MAX_SIZE = IMAGE_AREA_END - IMAGE_AREA_GPA
STACK_ALIGN = 16


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"GuestImage: {name} must be an int, not {type(value).__name__}")
    return int(value)


@dataclass(frozen=True)
class GuestImage:
    """A flat binary image and how to start it.

    ``code``: the bytes, byte 0 at the load address (``bytes``; a ``bytearray``/``memoryview`` is
    copied).  ``load_gpa``: the GPA the image was linked for (page-aligned, inside the image area),
    or None if it is position-independent.  ``entry``: offset of the first instruction.
    ``bss_size``: zero-filled bytes after ``code``.  ``stack_top``: offset of the initial ``rsp``
    (16-byte aligned, within ``(0, size]``), or None for the loader's stack.  ``name``: for
    messages and reports.
    """

    code: bytes
    load_gpa: int | None
    entry: int = 0
    bss_size: int = 0
    stack_top: int | None = None
    name: str = "image"

    def __post_init__(self) -> None:
        code = self.code
        if isinstance(code, bytearray | memoryview):
            object.__setattr__(self, "code", bytes(code))
        elif not isinstance(code, bytes):
            raise TypeError(f"GuestImage: code must be bytes, not {type(code).__name__}")
        if self.load_gpa is not None:
            object.__setattr__(self, "load_gpa", _int(self.load_gpa, "load_gpa"))
        object.__setattr__(self, "entry", _int(self.entry, "entry"))
        object.__setattr__(self, "bss_size", _int(self.bss_size, "bss_size"))
        if self.stack_top is not None:
            object.__setattr__(self, "stack_top", _int(self.stack_top, "stack_top"))
        if not isinstance(self.name, str):
            raise TypeError(f"GuestImage: name must be a str, not {type(self.name).__name__}")
        self._check_values()

    def _check_values(self) -> None:
        n = len(self.code)
        if n == 0:
            raise ValueError(f"GuestImage {self.name!r}: the image is empty")
        if self.bss_size < 0:
            raise ValueError(f"GuestImage {self.name!r}: bss_size must be >= 0, got {self.bss_size}")
        size = n + self.bss_size
        if size > IMAGE_MAX_SIZE:
            raise ValueError(f"GuestImage {self.name!r}: {size:#x} bytes (code and bss) exceed the image "
                             f"area's {IMAGE_MAX_SIZE:#x}")
        if not 0 <= self.entry < n:
            raise ValueError(f"GuestImage {self.name!r}: entry {self.entry:#x} is outside the code "
                             f"[0, {n:#x})")
        if self.stack_top is not None:
            if not 0 < self.stack_top <= size:
                raise ValueError(f"GuestImage {self.name!r}: stack_top {self.stack_top:#x} is outside the "
                                 f"image (0, {size:#x}]")
            if self.stack_top % STACK_ALIGN:
                raise ValueError(f"GuestImage {self.name!r}: stack_top {self.stack_top:#x} is not "
                                 f"{STACK_ALIGN}-byte aligned")
        if self.load_gpa is not None:
            gpa = self.load_gpa
            if gpa % PAGE_SIZE:
                raise ValueError(f"GuestImage {self.name!r}: load_gpa {gpa:#x} is not page-aligned")
            if gpa < IMAGE_AREA_GPA or gpa + size > IMAGE_AREA_END:
                raise ValueError(f"GuestImage {self.name!r}: [{gpa:#x}, {gpa + size:#x}) is outside the "
                                 f"image area [{IMAGE_AREA_GPA:#x}, {IMAGE_AREA_END:#x})")

    @property
    def size(self) -> int:
        """Bytes the image occupies once loaded: code plus ``.bss``."""
        return len(self.code) + self.bss_size

    @property
    def base(self) -> int:
        """The GPA of byte 0 once loaded (the link address, or the area's start if position-independent)."""
        return IMAGE_AREA_GPA if self.load_gpa is None else self.load_gpa

    @property
    def entry_gpa(self) -> int:
        return self.base + self.entry

    @property
    def stack_gpa(self) -> int | None:
        """The initial ``rsp``, or None for the loader's stack."""
        return None if self.stack_top is None else self.base + self.stack_top

    def memory(self) -> bytes:
        """What the loader writes at :attr:`base`: the code followed by the zeroed ``.bss``."""
        return self.code + bytes(self.bss_size)

    def __repr__(self) -> str:
        where = "pic" if self.load_gpa is None else f"load_gpa={self.load_gpa:#x}"
        stack = "loader" if self.stack_top is None else f"{self.stack_top:#x}"
        return (f"GuestImage({self.name!r}, {len(self.code)} bytes + {self.bss_size} bss, {where}, "
                f"entry={self.entry:#x}, stack_top={stack})")

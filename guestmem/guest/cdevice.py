"""The host side of the C guest's protocol (``c/proto.h``): its console, its virtual device, its result.

Why this exists: the C guest talks to its host only through ``out`` instructions, so whatever runs
it -- a test's own run loop, the VMM layer of a scenario, the bench -- needs the same small piece
that turns those exits into effects: console bytes into text, a device doorbell into a response
written into the (shared) bounce page, the result doorbell into a verdict.  Guest memory is reached
through two callables, so the same code serves the raw interface (a ``Mapping``) and the VMM layer
(``Machine.host_read``/``host_write``).

The device: the request at the bounce page is ``REQ_MAGIC, round, length, 0`` (u32 each) and
``length`` payload bytes; the response, written in place, is ``RSP_MAGIC, round, length, sum of the
payload bytes (mod 2**32)`` and the payload with every byte XOR ``RESPONSE_XOR``.  A malformed
request is answered with nothing and recorded as an error (the guest then fails its check).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from guestmem.api import Exit, ExitIo, ExitSync
from guestmem.guest import cbuild as cb

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, bytes], None]


@dataclass
class CGuestHost:
    """Handles the C guest's exits; ``handle`` says whether an exit was the guest's protocol."""

    read: ReadFn
    write: WriteFn
    console: bytearray = field(default_factory=bytearray)
    phases: list[int] = field(default_factory=list)
    rounds: int = 0
    result: int | None = None
    errors: list[str] = field(default_factory=list)
    on_phase: Callable[[int], None] | None = None

    def handle(self, ex: Exit) -> bool:
        """React to ``ex`` if it is one of the guest's doorbells (True), else leave it (False)."""
        if isinstance(ex, ExitSync):
            self.phases.append(ex.value)
            if self.on_phase is not None:
                self.on_phase(ex.value)
            return True
        if not isinstance(ex, ExitIo) or ex.direction != 1:  # KVM_EXIT_IO_OUT
            return False
        if ex.port == cb.PORT_CONSOLE:
            self.console += ex.data
            return True
        if ex.port == cb.PORT_DEVICE and len(ex.data) == 4:
            self._device(int.from_bytes(ex.data, "little") << 12)
            return True
        if ex.port == cb.PORT_RESULT and len(ex.data) == 4:
            self.result = int.from_bytes(ex.data, "little")
            return True
        return False

    def _device(self, gpa: int) -> None:
        magic, rnd, length, _ = struct.unpack("<4I", self.read(gpa, cb.REQ_HEADER))
        if magic != cb.REQ_MAGIC or length > cb.PAGE - cb.REQ_HEADER:
            self.errors.append(f"device: malformed request at {gpa:#x} (magic {magic:#x}, length {length})")
            return
        payload = self.read(gpa + cb.REQ_HEADER, length)
        answer = bytes(b ^ cb.RESPONSE_XOR for b in payload)
        self.write(gpa, struct.pack("<4I", cb.RSP_MAGIC, rnd, length, sum(payload) & 0xFFFF_FFFF) + answer)
        self.rounds += 1

    @property
    def flavour(self) -> str | None:
        """The flavour the guest detected, once it reported its result."""
        return None if self.result is None else cb.FLAVOUR_NAMES.get(self.result & 0xFF, "?")

    @property
    def checks(self) -> int:
        return 0 if self.result is None else self.result >> 8

    @property
    def text(self) -> str:
        return self.console.decode("ascii", "replace")

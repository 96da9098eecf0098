"""fork(2) at the interface, on the model: a child process that acts through its own mappings.

The child is a :class:`guestmem.model.process.Process` forked from the system's: the same fds,
the same mappings at the same addresses.  It names memory as the parent does, by the parent's
:class:`~guestmem.api.Mapping` objects; each call acts on the child's mapping at that address
(MAP_SHARED: the same pages; MAP_PRIVATE: the child's copies), as the kernel backend's child
process acts on its copy of the address space.
"""

from __future__ import annotations

import itertools
import weakref

from guestmem.args import u64
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.model.process import ModelMapping, Process
from guestmem.uapi import PAGE_SIZE as PS

_pids = itertools.count(10_000)


def _exit_later(child: Process, parent: Process) -> None:
    for m in list(child._owned):
        parent.defer_release(m)


class ModelChild:
    """Implements :class:`guestmem.api.ForkedChild` for the model."""

    def __init__(self, process: Process, parent: Process) -> None:
        self.process = process
        self.pid = next(_pids)
        self.exited = False
        # A child nobody holds any more exits: its mappings are closed the next time the parent
        # enters the model (deferred, as every release in the model is).
        weakref.finalize(self, _exit_later, process, parent)

    def _mapping(self, op: str, mapping: object, offset: object, length: int = 1
                 ) -> tuple[ModelMapping, int]:
        addr = getattr(mapping, "addr", None)
        if not isinstance(addr, int):
            raise TypeError(f"{op}: expected a Mapping, not {type(mapping).__name__}")
        if self.exited:
            raise KvmError(3, op, "the child has exited")  # ESRCH
        off = u64(offset, "offset")
        hit = self.process.resolve(addr + off)
        if hit is None:
            raise GuestAccessFault(op, off, "SIGSEGV: not mapped in the child")
        m, sub = hit
        base = addr + off
        for page in range((base // PS + 1) * PS, base + length, PS):  # a hole inside (MADV_DONTFORK)
            if self.process.resolve(page) is None:
                raise GuestAccessFault(op, page - addr, "SIGSEGV: not mapped in the child")
        while m.parent is not None:  # name the same object the parent's call would reach
            sub += m.addr - m.parent.addr
            m = m.parent
        return m, sub

    def read(self, mapping: object, offset: int, length: int) -> bytes:
        m, sub = self._mapping("child.read", mapping, offset, length)
        return m.read(sub, length)

    def write(self, mapping: object, offset: int, data: bytes) -> None:
        m, sub = self._mapping("child.write", mapping, offset, len(data))
        m.write(sub, data)

    def fill(self, mapping: object, offset: int, length: int, byte: int) -> None:
        m, sub = self._mapping("child.fill", mapping, offset, length)
        m.fill(sub, length, byte)

    def exit(self) -> None:
        """The child exits: its mappings go (its copies are freed, shared pages stay)."""
        if not self.exited:
            self.exited = True
            self.process.exit()

    def __enter__(self) -> ModelChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()

"""fork(2) at the interface, on the kernel backend: a real child process driven through a pipe.

``os.fork`` gives the child a copy of this process: the same fds and the same mappings at the
same addresses, MAP_SHARED ones sharing pages with the parent and MAP_PRIVATE ones copy-on-write,
exactly as the kernel does it.  The child then serves a small fixed set of requests (read, write
and fill through its copy of a mapping the parent names) sent as pickled tuples on a pipe, and
answers with the result or the error.  It never returns into the parent's code: it ends with
``os._exit``, whatever happens.

Restrictions (to keep it simple and robust): the child only touches memory (no ioctls, no new
mappings); only mappings that existed at the fork are known to it; call it from one thread.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import weakref
from typing import Any

from guestmem.args import u64
from guestmem.errors import GuestAccessFault, KvmError
from guestmem.linux import memory


def _send(fd: int, obj: object) -> None:
    data = pickle.dumps(obj)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _recv(fd: int) -> Any:
    def exact(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = os.read(fd, n - len(out))
            if not chunk:
                raise EOFError("the child went away")
            out += chunk
        return bytes(out)

    (size,) = struct.unpack("<Q", exact(8))
    return pickle.loads(exact(size))


def _serve(cmd_r: int, res_w: int) -> None:
    """The child's loop (never returns)."""
    status = 0
    memory.IN_FORKED_CHILD = True
    try:
        by_addr = {m.addr: m for m in list(memory._LIVE) if not m.closed and m.parent is None}
        while True:
            req = _recv(cmd_r)
            if req[0] == "exit":
                break
            op, addr, offset, args = req
            m = by_addr.get(addr)
            try:
                if m is None:
                    raise GuestAccessFault(f"child.{op}", offset, "SIGSEGV: not mapped in the child")
                result = getattr(m, op)(offset, *args)
                _send(res_w, ("ok", result))
            except KvmError as err:
                kind = "fault" if isinstance(err, GuestAccessFault) else "error"
                _send(res_w, (kind, err.errno, err.operation, err.message,
                              getattr(err, "offset", None)))
            except (TypeError, ValueError) as err:
                _send(res_w, ("type", type(err).__name__, str(err), None, None))
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _reap(pid: int, cmd_w: int, res_r: int) -> None:
    with contextlib.suppress(OSError):
        _send(cmd_w, ("exit",))
    for fd in (cmd_w, res_r):
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


class KernelChild:
    """Implements :class:`guestmem.api.ForkedChild` with a real forked process."""

    def __init__(self) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve requests, then _exit (never returns)
            os.close(cmd_w)
            os.close(res_r)
            _serve(cmd_r, res_w)
        os.close(cmd_r)
        os.close(res_w)
        self.pid = pid
        self._cmd, self._res = cmd_w, res_r
        self._finalizer = weakref.finalize(self, _reap, pid, cmd_w, res_r)

    @property
    def exited(self) -> bool:
        return not self._finalizer.alive

    def _call(self, op: str, mapping: object, offset: object, *args: object) -> Any:
        addr = getattr(mapping, "addr", None)
        if not isinstance(addr, int):
            raise TypeError(f"child.{op}: expected a Mapping, not {type(mapping).__name__}")
        off = u64(offset, "offset")
        if self.exited:
            raise KvmError(3, f"child.{op}", "the child has exited")  # ESRCH
        _send(self._cmd, (op, addr, off, args))
        kind, *rest = _recv(self._res)
        if kind == "ok":
            return rest[0]
        if kind == "fault":
            raise GuestAccessFault(rest[1], rest[3], rest[2])
        if kind == "error":
            raise KvmError(rest[0], rest[1], rest[2])
        raise (TypeError if rest[0] == "TypeError" else ValueError)(rest[1])

    def read(self, mapping: object, offset: int, length: int) -> bytes:
        return self._call("read", mapping, offset, length)

    def write(self, mapping: object, offset: int, data: bytes) -> None:
        self._call("write", mapping, offset, bytes(data))

    def fill(self, mapping: object, offset: int, length: int, byte: int) -> None:
        self._call("fill", mapping, offset, length, byte)

    def exit(self) -> None:
        self._finalizer()

    def __enter__(self) -> KernelChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()

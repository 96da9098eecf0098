"""Random sequences of file calls and generic ioctls, run side by side on the model and on this
host's kernel: every result and every errno must agree, and so must every file's state after each
step.  Where the hand-written tests pick the cases, this picks many, hostile ones included.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from typing import Any

import pytest

import guestmem
import guestmem.fileabi as fa
import guestmem.uapi as u
from guestmem.api import FileStat
from guestmem.errors import KvmError

PAGE = u.PAGE_SIZE
SIZE = 16 * PAGE
STEPS = 800

pytestmark = pytest.mark.kernel

OFFSETS = [0, 1, 7, PAGE - 1, PAGE, 3 * PAGE + 5, SIZE - 1, SIZE, SIZE + 1, 20 * PAGE, -1, -PAGE,
           (1 << 40) + 3, fa.MAX_LFS_FILESIZE, fa.MAX_LFS_FILESIZE - 4, -(1 << 63)]
COUNTS = [0, 1, 5, PAGE, 2 * PAGE + 3, SIZE, 1 << 40, (1 << 63) + 1, (1 << 64) - 1]
FLAG_BITS = [0, fa.O_NONBLOCK, fa.O_APPEND, fa.O_DIRECT, fa.O_NOATIME, fa.FASYNC, 0o100, 3,
             0xFFFF_FFFF, 1 << 40]
FCNTL_CMDS = [fa.F_GETFD, fa.F_SETFD, fa.F_GETFL, fa.F_SETFL, fa.F_ADD_SEALS, fa.F_GET_SEALS,
              9999, 1 << 31, 0xFFFF_FFFF, fa.F_LINUX_SPECIFIC_BASE + 20]
REOPEN = [0, 1, 2, 3, fa.O_RDWR | fa.O_DIRECT, fa.O_RDWR | fa.O_APPEND | fa.O_NONBLOCK,
          fa.O_RDWR | fa.O_CLOEXEC, fa.O_RDWR | 0o100]
IOCTLS: list[tuple[int, Any]] = [
    (fa.FIONBIO, (1).to_bytes(4, "little")), (fa.FIONBIO, bytes(4)), (fa.FIOCLEX, 0), (fa.FIONCLEX, 0),
    (fa.FIGETBSZ, bytes(8)), (fa.FIONREAD, bytes(4)), (fa.FIOQSIZE, bytes(8)), (fa.FIOASYNC, bytes(4)),
    (fa.FIONBIO, 0), (u._io(0xFF), 0), ((ord("Z") << 8) | 1, 0),
    (u.KVM_CHECK_EXTENSION, u.KVM_CAP_GUEST_MEMFD),
    (u.KVM_SET_MEMORY_ATTRIBUTES2, bytes(128)),
]


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        value = fn()
    except KvmError as err:
        return "errno", errno.errorcode.get(err.errno or 0, err.errno)
    except (TypeError, ValueError, OverflowError) as err:
        return "raise", type(err).__name__
    if isinstance(value, FileStat):
        value = (value.st_mode, value.st_size, value.st_blocks, value.st_blksize, value.st_nlink)
    elif hasattr(value, "fd") and hasattr(value, "close"):
        value = "file"
    return "ok", value


def _state(f: Any) -> tuple[tuple[str, Any], ...]:
    return (_outcome(f.fstat), _outcome(lambda: f.fcntl(fa.F_GETFL)),
            _outcome(lambda: f.fcntl(fa.F_GETFD)), _outcome(lambda: f.read(64, 0)))


class Side:
    """One backend's files, kept in step with the other side's."""

    def __init__(self, name: str) -> None:
        self.kvm = guestmem.open(name)
        self.vm = self.kvm.create_vm(u.KVM_X86_DEFAULT_VM)
        self.files: list[Any] = [self.vm.create_guest_memfd(SIZE, 0), self.kvm.memfd_create(SIZE),
                                 self.kvm.memfd_create(SIZE, fa.MFD_ALLOW_SEALING)]

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.vm.close()
        self.kvm.close()


def _step(rng: random.Random) -> tuple[str, int, tuple[Any, ...]]:
    """One random call: (method, index of the file, arguments); a second file is an index too."""
    op = rng.choice(["fcntl", "lseek", "read", "write", "fstat", "fstatfs", "fsync", "fdatasync",
                     "fchmod", "sendfile", "dup", "reopen", "close", "ioctl", "read", "write",
                     "lseek", "lseek", "sendfile"])
    i = rng.choice([1, 1, 2, 2, rng.randrange(8)])  # the memfds answer the most
    if op == "fcntl":
        cmd = rng.choice(FCNTL_CMDS)
        arg = rng.choice(FLAG_BITS) | rng.choice([0, fa.O_NONBLOCK])
        if cmd in (fa.F_ADD_SEALS, fa.F_SETFD):
            arg = rng.choice([0, 1, fa.F_SEAL_WRITE, fa.F_SEAL_GROW, fa.F_SEAL_GROW, fa.F_SEAL_EXEC,
                              fa.F_SEAL_FUTURE_WRITE, 0x1000, 0xFF])
        return op, i, (cmd, arg)
    if op == "lseek":
        return op, i, (rng.choice(OFFSETS), rng.choice([0, 1, 2, 3, 4, 3, 4, 5, 0xFFFF_FFFF]))
    if op == "read":
        return op, i, (rng.choice(COUNTS[:7]), rng.choice([None, None, *OFFSETS]))
    if op == "write":
        data = bytes([rng.randrange(256)]) * rng.choice([0, 1, 3, PAGE, PAGE + 7])
        return op, i, (data, rng.choice([None, None, "end-1", "end-100", *OFFSETS[:12]]))
    if op == "fchmod":
        return op, i, (rng.choice([0o600, 0o7777, 0o170644, 0, 1 << 31]),)
    if op == "sendfile":
        return op, i, (rng.randrange(8), rng.choice([None, *OFFSETS]), rng.choice(COUNTS))
    if op == "reopen":
        return op, i, (rng.choice(REOPEN),)
    if op == "ioctl":
        return op, i, rng.choice(IOCTLS)
    return op, i, ()


def _same_inode(a: Any, b: Any) -> bool:
    try:
        return bool(a.fstat().st_ino == b.fstat().st_ino)
    except KvmError:
        return False


def _call(side: Side, op: str, i: int, args: tuple[Any, ...]) -> Any:
    f = side.files[i]
    call_args = list(args)
    if op == "sendfile":
        call_args[0] = src = side.files[args[0] % len(side.files)]
        if args[2] > 1 << 20 and _same_inode(f, src):
            call_args[2] = 1 << 20  # a copy within one file may keep growing it: keep RAM bounded
    if op == "write" and isinstance(args[1], str):  # just before the end: crosses it
        call_args[1] = max(f.fstat().st_size - int(args[1][4:]), 0) if f.fcntl(fa.F_GETFD) >= 0 else 0
    value = getattr(f, op)(*call_args)
    if op in ("dup", "reopen"):
        side.files.append(value)
    return value


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_file_calls_agree_with_the_kernel(seed: int) -> None:
    try:
        kernel = Side("kernel")
    except (KvmError, OSError) as err:
        pytest.skip(f"kernel backend unavailable: {err}")
    model = Side("model")
    rng = random.Random(seed)
    try:
        for step in range(STEPS):
            op, i, args = _step(rng)
            i %= len(model.files)
            results = []
            skipped = False
            for side in (model, kernel):
                try:
                    results.append(_outcome(lambda s=side, o=op, n=i, a=args: _call(s, o, n, a)))
                except NotImplementedError:
                    skipped = True  # the model does not implement it: do not ask the kernel either
                    break
            if skipped:
                continue
            assert results[0] == results[1], f"seed {seed} step {step}: {op}{args} on file {i}"
            for fm, fk in zip(model.files, kernel.files, strict=True):
                assert _state(fm) == _state(fk), f"seed {seed} step {step} after {op}{args}"
    finally:
        model.close()
        kernel.close()

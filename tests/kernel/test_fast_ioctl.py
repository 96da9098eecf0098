"""The non-blocking ioctl fast path answers exactly as the ordinary ctypes path, built or not."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import guestmem.uapi as u
from guestmem.errors import KvmError
from guestmem.linux import _sys, open_kernel

pytestmark = pytest.mark.kernel


@pytest.fixture
def kvm_fd():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"/dev/kvm: {exc}")
    yield fd
    os.close(fd)


def test_fast_and_ctypes_paths_agree(kvm_fd: int) -> None:
    for cap in (u.KVM_CAP_USER_MEMORY, u.KVM_CAP_GUEST_MEMFD, 0, 1 << 40):
        want = _sys.ioctl(kvm_fd, u.KVM_CHECK_EXTENSION, cap)
        assert _sys.ioctl_int(kvm_fd, u.KVM_CHECK_EXTENSION, cap) == want
        assert _sys._ioctl_int_ctypes(kvm_fd, u.KVM_CHECK_EXTENSION, cap) == want
        assert _sys.ioctl_fast(kvm_fd, u.KVM_CHECK_EXTENSION, cap) == want


def test_errors_carry_the_kernel_errno(kvm_fd: int) -> None:
    bad = os.dup(kvm_fd)
    os.close(bad)
    assert _sys.ioctl_int(bad, u.KVM_CHECK_EXTENSION, 0) == -errno.EBADF
    assert _sys._ioctl_int_ctypes(bad, u.KVM_CHECK_EXTENSION, 0) == -errno.EBADF
    with pytest.raises(KvmError) as e:
        _sys.ioctl_fast(bad, u.KVM_CHECK_EXTENSION, 0, "KVM_CHECK_EXTENSION")
    assert e.value.errno == errno.EBADF and "KVM_CHECK_EXTENSION" in str(e.value)
    assert _sys.FAST_PATH in ("c-extension", "ctypes")


# --- methods issued from C (IntIoctlMethod) answer exactly as the Python methods they replace -------

_U64 = (1 << 64) - 1
_HOSTILE = (u.KVM_CAP_USER_MEMORY, u.KVM_CAP_GUEST_MEMFD, 0, 1 << 40, _U64, -1, 1 << 64, -(1 << 70),
            True, 1.0, "1", None)


def _outcome(fn, *args, **kw) -> tuple[str, object]:
    """What ``fn(*args, **kw)`` did: its value, or its exception's type, errno and text."""
    try:
        return "ok", fn(*args, **kw)
    except Exception as exc:
        return type(exc).__name__, (getattr(exc, "errno", None), str(exc))


def _python_method(obj: object, name: str):
    """The Python method behind ``type(obj).name`` (itself when the extension is not built)."""
    attr = type(obj).__dict__[name]
    return getattr(attr, "__wrapped__", attr)


def _compare(obj: object) -> None:
    fast, slow = obj.check_extension, _python_method(obj, "check_extension")  # type: ignore[attr-defined]
    for cap in _HOSTILE:
        assert _outcome(fast, cap) == _outcome(slow, obj, cap), cap
    assert _outcome(fast, cap=5) == _outcome(slow, obj, cap=5)
    assert _outcome(fast) == _outcome(slow, obj)
    assert _outcome(fast, 1, 2) == _outcome(slow, obj, 1, 2)


def test_c_methods_match_their_python_methods_open_closed_and_revoked() -> None:
    """Every argument (in range, out of range, wrong type, keywords, wrong count) on an open
    object, a closed one (EBADF from the object) and one whose fd was closed under it (EBADF from
    the kernel): the same value or the same exception, errno and message."""
    try:
        kvm = open_kernel()
    except KvmError as exc:
        pytest.skip(f"/dev/kvm: {exc}")
    vm = kvm.create_vm()
    if _sys.FAST_PATH == "c-extension":
        assert type(type(kvm).__dict__["check_extension"]).__name__ == "IntIoctlMethod"
        assert type(type(vm).__dict__["check_extension"]).__name__ == "IntIoctlMethod"
    _compare(kvm)
    _compare(vm)
    api = _python_method(kvm, "api_version")
    assert _outcome(kvm.api_version) == _outcome(api, kvm) == ("ok", u.KVM_API_VERSION)
    assert _outcome(kvm.api_version, 0) == _outcome(api, kvm, 0)
    vm.close()
    _compare(vm)
    kvm.close()
    _compare(kvm)
    assert _outcome(kvm.api_version)[1][0] == errno.EBADF
    revoked = open_kernel()
    os.close(revoked.fd)
    _compare(revoked)
    assert _outcome(revoked.api_version) == _outcome(api, revoked)
    assert _outcome(revoked.check_extension, 0)[1][0] == errno.EBADF
    revoked._finalizer.detach()  # its fd number is closed already (and may be reused)


@pytest.mark.skipif(_sys.FAST_PATH != "c-extension", reason="the C extension is not built")
def test_int_ioctl_method_defers_every_uncommon_call_to_python(kvm_fd: int) -> None:
    """Only ``_open is True``, an int ``fd`` and one exact int in [0, 2**64) run in C."""
    calls: list[tuple[object, ...]] = []

    def fallback(self: object, *args: object, **kw: object) -> int:
        calls.append(args + tuple(kw.items()))
        return -7

    class Obj:
        check = _sys.int_ioctl_method(u.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION")(fallback)

        def __init__(self, fd: object, is_open: object) -> None:
            self.fd, self._open = fd, is_open

    want = _sys.ioctl(kvm_fd, u.KVM_CHECK_EXTENSION, u.KVM_CAP_USER_MEMORY)
    assert Obj(kvm_fd, True).check(u.KVM_CAP_USER_MEMORY) == want and calls == []
    deferred = [Obj(kvm_fd, 1).check(1), Obj(kvm_fd, False).check(1), Obj(str(kvm_fd), True).check(1),
                Obj(-1, True).check(1), Obj(kvm_fd, True).check(-1), Obj(kvm_fd, True).check(1 << 64),
                Obj(kvm_fd, True).check(True), Obj(kvm_fd, True).check(cap=1), Obj(kvm_fd, True).check()]
    assert deferred == [-7] * 9 and len(calls) == 9
    o = Obj(kvm_fd, True)
    del o._open
    assert o.check(1) == -7
    bad = os.dup(kvm_fd)
    os.close(bad)
    with pytest.raises(KvmError) as e:
        Obj(bad, True).check(0)
    assert e.value.errno == errno.EBADF and e.value.operation == "KVM_CHECK_EXTENSION"
    assert Obj.check.__wrapped__ is fallback and Obj.__dict__["check"].__name__ == "fallback"


def test_the_ctypes_fallback_still_answers() -> None:
    """With the extension unimportable the backend's methods are the plain Python ones and work."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing")
    code = (
        "import sys, errno\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'guestmem.linux._fastioctl': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import guestmem.uapi as u\n"
        "from guestmem.linux import _sys, open_kernel\n"
        "from guestmem.errors import KvmError\n"
        "assert _sys.FAST_PATH == 'ctypes', _sys.FAST_PATH\n"
        "kvm = open_kernel()\n"
        "assert type(type(kvm).__dict__['check_extension']).__name__ == 'function'\n"
        "assert kvm.check_extension(u.KVM_CAP_USER_MEMORY) == 1 and kvm.api_version() == 12\n"
        "vm = kvm.create_vm()\n"
        "assert vm.check_extension(u.KVM_CAP_USER_MEMORY) == 1\n"
        "kvm.close()\n"
        "try:\n"
        "    kvm.check_extension(1)\n"
        "except KvmError as e:\n"
        "    assert e.errno == errno.EBADF\n"
        "else:\n"
        "    raise AssertionError('closed /dev/kvm answered')\n"
        "print('ok')\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

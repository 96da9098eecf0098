"""The non-blocking ioctl fast path answers exactly as the ordinary ctypes path, built or not."""

from __future__ import annotations

import errno
import os

import pytest

import guestmem.uapi as u
from guestmem.errors import KvmError
from guestmem.linux import _sys

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

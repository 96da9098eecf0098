"""Fixtures for tests against the real ``/dev/kvm`` (the kernel backend).

Every test here asserts the errno the running kernel gives.  Without a usable ``/dev/kvm`` the
``kvm`` fixture skips with the reason; a test that needs a capability the host lacks skips naming it
(:func:`require_cap`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import guestmem.uapi as u
from guestmem.errors import KvmError
from guestmem.linux import KernelKvm, KernelVm, open_kernel

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests here that need /dev/kvm (those using the ``kvm`` fixture) as ``kernel``."""
    for item in items:
        needs_kvm = {"kvm", "hypercall_probe"} & set(getattr(item, "fixturenames", ()))
        if needs_kvm and _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.kernel)


def _open_or_skip() -> KernelKvm:
    try:
        k = open_kernel()
    except KvmError as err:
        pytest.skip(f"/dev/kvm cannot be opened ({err.errname}: {err.message})")
    try:
        version = k.api_version()
    except KvmError as err:
        k.close()
        pytest.skip(f"/dev/kvm is not a usable KVM (KVM_GET_API_VERSION: {err.errname})")
    if version != u.KVM_API_VERSION:
        k.close()
        pytest.skip(f"/dev/kvm speaks KVM API {version}, not {u.KVM_API_VERSION}")
    return k


@pytest.fixture
def kvm() -> Iterator[KernelKvm]:
    k = _open_or_skip()
    yield k
    k.close()


@pytest.fixture
def vm(kvm: KernelKvm) -> Iterator[KernelVm]:
    v = kvm.create_vm(u.KVM_X86_DEFAULT_VM)
    yield v
    v.close()


@pytest.fixture(scope="session")
def hypercall_probe() -> dict[str, Any]:
    """Whether a guest's KVM_HC_MAP_GPA_RANGE reaches userspace on this host (probed once)."""
    from guestmem.linux.caps import _probe_hypercall

    k = _open_or_skip()
    with k:
        return _probe_hypercall(k)

"""Shared pytest configuration: the ``backend`` fixture every conformance test runs under.

``backend`` is parametrized over ``"model"`` and ``"kernel"`` and yields an open
:class:`guestmem.api.Kvm`, closed after the test.  The helpers the conformance tests use with it
(``require_vm_type``, ``require_cap``, ``check``, ...) live in ``tests/conformance/support.py``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import pytest

import guestmem
from guestmem.api import Kvm

KVM_DEVICE = "/dev/kvm"


def _import_backend(module: str, entry: str) -> str | None:
    """Import a backend package and its entry point; return a skip reason if they do not exist yet.

    "Not importable" means the package (or its entry point, e.g. while it is still an empty
    namespace package) is missing.  An ImportError raised *inside* an existing backend (a missing
    dependency, a typo) is not a reason to skip: it propagates and fails the test.
    """
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return f"{module} is not importable yet"
        raise
    if not hasattr(mod, entry):
        return f"{module}.{entry} does not exist yet"
    return None


def _kernel_unavailable() -> str | None:
    reason = _import_backend("guestmem.linux", "open_kernel")
    if reason:
        return f"kernel backend unavailable: {reason}"
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"kernel backend unavailable: cannot open {KVM_DEVICE}: {exc.strerror}"
    os.close(fd)
    return None


def _model_unavailable() -> str | None:
    # Temporary scaffolding: the model (guestmem.model) is being written right now.  Once it has
    # landed this skip must go away -- the model is always available, it needs no host support.
    reason = _import_backend("guestmem.model", "open_model")
    return f"model backend unavailable: {reason}" if reason else None


@pytest.fixture(params=["model", "model-x86", pytest.param("kernel", marks=pytest.mark.kernel)])
def backend(request: pytest.FixtureRequest) -> Iterator[Kvm]:
    """An open ``Kvm`` of the parametrized backend; closed after the test.  ``model-x86`` is the
    model with its x86-64 vCPU (``cpu="x86"``): the compiled guest programs the kernel backend
    runs, executed on Unicorn through the model's MMU."""
    name: str = request.param
    reason = _model_unavailable() if name.startswith("model") else _kernel_unavailable()
    if reason:
        pytest.skip(reason)
    kvm = guestmem.open("model", cpu="x86") if name == "model-x86" else guestmem.open(name)
    try:
        yield kvm
    finally:
        kvm.close()

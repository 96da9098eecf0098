"""The optional compiled pieces, found in one place, and the one switch that turns them all off.

Every compiled module in guestmem is an *accelerator*: a C specialisation of a Python path that
stays the reference.  A machine without a compiler (``pip install .`` builds them as optional
extensions) runs the Python paths and loses nothing but speed.  ``GUESTMEM_PURE=1`` in the
environment makes this process ignore every compiled piece, so the Python paths can be run, and
compared with the compiled ones, on a machine that has both.  ``guestmem bench`` reports
:func:`implementations` so a figure always says which code produced it.

A module asks for its accelerator with :func:`load` at import time; the answer is the imported
module, or ``None`` when it was not built or the switch is on.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: ``GUESTMEM_PURE=1``: use no compiled piece in this process.
PURE = os.environ.get("GUESTMEM_PURE", "") not in ("", "0")

_loaded: dict[str, str] = {}


def load(name: str) -> ModuleType | None:
    """Import ``guestmem.<name>`` (a compiled module), or ``None`` if it is absent or
    ``GUESTMEM_PURE`` is set.  What was decided is remembered for :func:`implementations`."""
    if PURE:
        _loaded[name] = "python (GUESTMEM_PURE)"
        return None
    try:
        mod = importlib.import_module(f"guestmem.{name}")
    except ImportError:
        _loaded[name] = "python (not built)"
        return None
    _loaded[name] = "c-extension"
    return mod


def implementations() -> dict[str, str]:
    """Which implementation each accelerator asked for so far in this process is using."""
    return dict(_loaded)

"""The RangeMap layout switch both RangeMap test modules use: maps made inside ``layout(impl,
load)`` take the compiled layout (``"c-extension"``, skipped when it is not built) or the Python
one, with chunks of ``load``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from guestmem import ranges

BUILT = ranges._CORE  # the compiled core, or None (ranges._native is what tests switch)


@contextlib.contextmanager
def layout(impl: str, load: int = 512) -> Iterator[None]:
    """Large maps made inside use ``impl`` and chunks of ``load``."""
    if impl == "c-extension" and BUILT is None:
        pytest.skip("guestmem._rangemap is not built (no C compiler at install time)")
    saved = ranges._native, ranges._LOAD
    ranges._native, ranges._LOAD = (BUILT if impl == "c-extension" else None), load
    try:
        yield
    finally:
        ranges._native, ranges._LOAD = saved

"""Build hook for the optional compiled pieces: ``guestmem.linux._fastioctl`` (the kernel
backend's sub-microsecond ioctls), ``guestmem._rangemap`` (the core of large RangeMaps) and
``guestmem.model._fastconv`` (the model's one-page conversion steps).

Everything else is in pyproject.toml.  Every extension is ``optional``: on a machine without a C
compiler ``pip install .`` still succeeds, the kernel backend uses its ctypes path, RangeMap its
Python chunked layout and the model its Python conversion paths (``guestmem bench`` says which ones ran).
"""

from setuptools import Extension, setup

CAPI = "guestmem/_rangemap_capi.h"  # the RangeMap C API the model's accelerators use

setup(ext_modules=[
    Extension("guestmem.linux._fastioctl", ["guestmem/linux/_fastioctl.c"], optional=True),
    Extension("guestmem._rangemap", ["guestmem/_rangemap.c"], depends=[CAPI], optional=True),
    Extension("guestmem.model._fastconv", ["guestmem/model/_fastconv.c"], depends=[CAPI], optional=True),
    Extension("guestmem.model.kvm._fastfault", ["guestmem/model/kvm/_fastfault.c"], depends=[CAPI],
              optional=True),
])

"""Build hook for the two optional compiled pieces: ``guestmem.linux._fastioctl`` (the kernel
backend's sub-microsecond ioctls) and ``guestmem._rangemap`` (the core of large RangeMaps).

Everything else is in pyproject.toml.  Both extensions are ``optional``: on a machine without a C
compiler ``pip install .`` still succeeds, the kernel backend uses its ctypes path and RangeMap its
Python chunked layout (``guestmem bench`` says which ones ran).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("guestmem.linux._fastioctl", ["guestmem/linux/_fastioctl.c"], optional=True),
    Extension("guestmem._rangemap", ["guestmem/_rangemap.c"], optional=True),
    Extension("guestmem.model.kvm._fastfault", ["guestmem/model/kvm/_fastfault.c"], optional=True),
])

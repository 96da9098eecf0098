"""Build hook for the one optional compiled piece, ``guestmem.linux._fastioctl``.

Everything else is in pyproject.toml.  The extension is ``optional``: on a machine without a C
compiler ``pip install .`` still succeeds and the kernel backend uses its ctypes path
(``guestmem bench`` says which one ran).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("guestmem.linux._fastioctl", ["guestmem/linux/_fastioctl.c"], optional=True)])

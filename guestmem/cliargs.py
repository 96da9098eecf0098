"""Command-line values checked where argparse reads them, so that bad input never reaches work.

Every ``guestmem`` subcommand promises that input which cannot work exits 2 with one line saying
what to do, before anything slow or large starts.  The argparse ``type=`` callables here do the
checking: whole numbers that must lie in a range (``--size``, ``--ram``, ``--vcpus``), sizes with
units (``--memory``, ``--max-resident``), seconds that must be finite and bounded (``--timeout``:
``inf``, ``nan`` and ``1e308`` would otherwise reach ``threading``'s wait and overflow or never
end), and output files whose directory must exist and be writable (checked at parse time, i.e.
before a benchmark or a run, not after it).  An argparse ``type`` raising
``ArgumentTypeError`` becomes ``guestmem <cmd>: error: argument --x: <message>`` and exit 2.

It also holds the memory guard's arithmetic: what the host has (``MemAvailable``), what this
process holds (its resident set), and the estimate a command compares against them.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from guestmem.report.atomic import OutputError, check_writable
from guestmem.scenarios.parse import MAX_TIMEOUT_S as MAX_SECONDS
from guestmem.scenarios.sizes import SizeError, fmt_size, parse_size

MIN_SECONDS = 0.001  # less cannot even start a vCPU: a typo, not a wish
MiB = 1 << 20
# What an idle guestmem process already holds (interpreter, numpy, rich); measured ~60 MiB, doubled.
BASE_RESIDENT = 128 * MiB


def int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """A whole number in ``[lo, hi]`` (``what`` names the unit in messages, e.g. "MiB")."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number of {what}: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be {lo}..{hi} {what}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """Positive, finite seconds, at most :data:`MAX_SECONDS`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not MIN_SECONDS <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be {MIN_SECONDS}..{MAX_SECONDS} seconds (a week), "
                                         f"got {text!r}")
    return value


def byte_size(lo: int, hi: int) -> Callable[[str], int]:
    """An absolute size with an optional unit (``64M``, ``1G``, ``0x1000``), in ``[lo, hi]`` bytes."""

    def parse(text: str) -> int:
        try:
            size = parse_size(text)
        except SizeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if size.relative:
            raise argparse.ArgumentTypeError(f"{text!r} must be an absolute size like 64M")
        if not lo <= size.absolute <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} must be {fmt_size(lo)}..{fmt_size(hi)}")
        return size.absolute

    return parse


def output_file(text: str) -> str:
    """A file this process can create or replace: its directory exists and is writable, and it is
    not itself a directory.  Checked when the arguments are read, so no work is wasted."""
    if not text:
        raise argparse.ArgumentTypeError("an empty file name")
    try:
        check_writable(text)
    except OutputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# --- the memory guard ---------------------------------------------------------------------------------

MAX_RESIDENT_HELP = ("refuse (or stop) a run that may hold more than SIZE resident, e.g. 8G "
                     "(default: this host's MemAvailable)")


def add_max_resident(parser: argparse.ArgumentParser) -> None:
    """The ``--max-resident SIZE`` override of the memory guard, the same on every command."""
    parser.add_argument("--max-resident", type=byte_size(16 * MiB, 1 << 50), metavar="SIZE",
                        help=MAX_RESIDENT_HELP)


def mem_available() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``), 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def resident_limit(override: int | None) -> int | None:
    """The resident bound for a run: ``--max-resident`` if given, else what this process holds now
    plus what the host has available (None if neither is known)."""
    if override is not None:
        return override
    avail = mem_available()
    return None if avail is None else avail + resident_bytes()


def check_fits(estimate: int, override: int | None, what: str) -> str | None:
    """None if ``estimate`` bytes fit the bound; else the one-line reason (naming the override)."""
    limit = resident_limit(override)
    if limit is None or estimate <= limit:
        return None
    source = "--max-resident" if override is not None else "this host's MemAvailable + what guestmem holds"
    return (f"{what} may need up to {human(estimate)} resident, more than the {human(limit)} allowed "
            f"({source}); use less memory, or --max-resident SIZE to allow more")


def human(n: int) -> str:
    """Bytes for a message: ``1.5 GiB``, ``300 MiB``."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{-(-n // MiB)} MiB"


# --- figures -------------------------------------------------------------------------------------------

FIGURE_FORMATS = ("png", "svg", "pdf")
MIN_INCHES, MAX_INCHES = 1.0, 100.0
MIN_DPI, MAX_DPI = 30, 1200
# Agg holds the whole picture as RGBA in memory: 100 Mpx is 400 MB, more than any slide needs.
MAX_PIXELS = 100_000_000


def figure_size(text: str) -> tuple[float, float]:
    """``WxH`` in inches (``12x6.75``, a 16:9 slide), each finite and in [1, 100]."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        w, h = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in inches like 12x6.75 (width x height): "
                                         f"{text!r}") from None
    if not all(math.isfinite(v) and MIN_INCHES <= v <= MAX_INCHES for v in (w, h)):
        raise argparse.ArgumentTypeError(f"width and height must be {MIN_INCHES:g}..{MAX_INCHES:g} inches, "
                                         f"got {text!r}")
    return w, h


def dpi(text: str) -> int:
    """Dots per inch for PNG output, a whole number in [30, 1200]."""
    return int_in(MIN_DPI, MAX_DPI, "dots per inch")(text)


def figure_format(text: str) -> str:
    """``png``, ``svg`` or ``pdf`` (any case)."""
    value = text.strip().lower()
    if value not in FIGURE_FORMATS:
        raise argparse.ArgumentTypeError(f"unknown figure format {text!r}; choose one of "
                                         f"{', '.join(FIGURE_FORMATS)}")
    return value


def check_pixels(size: tuple[float, float] | None, dots: int | None) -> str | None:
    """None if a figure of ``size`` inches at ``dots`` per inch is small enough to draw; else why not."""
    if size is None or dots is None:
        return None
    pixels = size[0] * dots * size[1] * dots
    if pixels > MAX_PIXELS:
        return (f"--size {size[0]:g}x{size[1]:g} at --dpi {dots} is {pixels / 1e6:.0f} million pixels, more "
                f"than {MAX_PIXELS // 1_000_000} million; use a smaller size or DPI")
    return None


def format_for(path: str, fmt: str | None) -> str:
    """The figure format for ``path``: ``fmt`` if given, else its extension (``ValueError`` if it
    has none of png, svg, pdf)."""
    if fmt:
        return fmt
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FIGURE_FORMATS:
        raise ValueError(f"{path}: cannot tell the figure format from the name; end it in .png, .svg "
                         "or .pdf, or give --format")
    return ext

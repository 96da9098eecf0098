"""Build guestmem's freestanding C guest (``guestmem/guest/c/``) into a :class:`GuestImage`.

Why this exists: issue #14 wants a real guest -- compiled code that detects its flavour, builds its
own page tables, accepts its memory lazily, and shares a bounce buffer with a device -- on the
model's x86 CPU and on the kernel backend alike.  The sources ship in the package; this module
compiles them with the system gcc (``-ffreestanding -nostdlib -fno-pic -mno-red-zone -static``, the
link script ``guest.ld``) once per source hash into the per-user cache (``$GUESTMEM_CACHE``, else
``$XDG_CACHE_HOME/guestmem``, else ``~/.cache/guestmem``), and reads the one loadable segment of the
ELF file itself (no objcopy needed).  Without gcc, :class:`CGuestBuildError` names what is missing.

``-mcmodel=large``: the image is linked at 0xffc00000 (the loader window's image area, just below
4 GiB), which neither the small code model (symbols below 2 GiB) nor the kernel one (top 2 GiB of
the address space) can reach with 32-bit absolute relocations.

The host protocol (ports, phases, checks, the device's request and response) is ``c/proto.h``;
its numbers are mirrored here and a test checks that the two agree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from guestmem.guest.image import GuestImage

SOURCE_DIR = Path(__file__).with_name("c")
SOURCES = ("guest.c", "arch.h", "proto.h", "guest.ld")
CFLAGS = (
    "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
    "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-no-pie", "-static",
    "-mno-red-zone", "-mcmodel=large", "-mgeneral-regs-only",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fcf-protection=none", "-fno-tree-loop-distribute-patterns",
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack",
)

# --- protocol (c/proto.h) ---------------------------------------------------------------------------
PORT_CONSOLE = 0xE9
PORT_SYNC = 0x5EC0
PORT_ASSERT = 0x5EC1
PORT_DEVICE = 0x5EC2
PORT_RESULT = 0x5EC3
FLAVOUR_PLAIN, FLAVOUR_SNP, FLAVOUR_TDX = 0, 1, 2
FLAVOUR_NAMES = {FLAVOUR_PLAIN: "plain", FLAVOUR_SNP: "snp", FLAVOUR_TDX: "tdx"}
PHASE_PAGING, PHASE_ACCEPTED, PHASE_SHARED, PHASE_DEVICE, PHASE_PRIVATE = 1, 2, 3, 4, 5
PHASE_NAMES = {PHASE_PAGING: "paging", PHASE_ACCEPTED: "accepted", PHASE_SHARED: "shared",
               PHASE_DEVICE: "device", PHASE_PRIVATE: "private"}
CHECK_NAMES = {1: "PVALIDATE", 2: "TDG.MEM.PAGE.ACCEPT", 3: "page-state change", 4: "MapGPA",
               5: "device response", 6: "private data", 7: "TDG.VP.INFO", 8: "parameters",
               9: "page-table pool"}
REQ_MAGIC = 0x51455247
RSP_MAGIC = 0x50535247
REQ_HEADER = 16
RESPONSE_XOR = 0x5A
PARAMS_MAGIC = 0x3152415047434D47
PARAMS_FIELDS = ("magic", "data_gpa", "data_pages", "bounce_gpa", "rounds", "payload", "seed")
MAX_DATA_PAGES = 4096
PAGE = 4096


class CGuestBuildError(RuntimeError):
    """The C guest cannot be built here (no gcc, or gcc refused); the message says what is missing."""


@dataclass(frozen=True)
class CGuestParams:
    """The launch parameters the host patches into the image (``struct guest_params``)."""

    data_gpa: int = 1 << 32
    data_pages: int = 16
    bounce_gpa: int = (1 << 32) + 64 * PAGE
    rounds: int = 2
    payload: int = 256
    seed: int = 1

    def __post_init__(self) -> None:
        for name in PARAMS_FIELDS[1:]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"CGuestParams: {name} must be an int, not {type(value).__name__}")
            if not 0 <= value < 1 << 64:
                raise ValueError(f"CGuestParams: {name} must fit in a u64, got {value}")
        if self.data_gpa % PAGE or self.bounce_gpa % PAGE:
            raise ValueError("CGuestParams: data_gpa and bounce_gpa must be page-aligned")
        if not 1 <= self.data_pages <= MAX_DATA_PAGES:
            raise ValueError(f"CGuestParams: data_pages must be 1..{MAX_DATA_PAGES}, got {self.data_pages}")
        if not 1 <= self.payload <= PAGE - REQ_HEADER:
            raise ValueError(f"CGuestParams: payload must be 1..{PAGE - REQ_HEADER}, got {self.payload}")
        if self.data_gpa <= self.bounce_gpa < self.data_gpa + self.data_pages * PAGE:
            raise ValueError("CGuestParams: the bounce page lies inside the data pages")

    def pack(self) -> bytes:
        return struct.pack("<7Q", PARAMS_MAGIC, *(getattr(self, f) for f in PARAMS_FIELDS[1:]))


@dataclass(frozen=True)
class CGuest:
    """The built C guest: its image with the build's default parameters, and where they live."""

    image: GuestImage
    params_offset: int
    elf: Path

    def with_params(self, params: CGuestParams) -> GuestImage:
        """The image with ``params`` patched in (a new, validated :class:`GuestImage`)."""
        if not isinstance(params, CGuestParams):
            raise TypeError(f"params must be CGuestParams, not {type(params).__name__}")
        code = bytearray(self.image.code)
        blob = params.pack()
        code[self.params_offset : self.params_offset + len(blob)] = blob
        img = self.image
        return GuestImage(bytes(code), img.load_gpa, img.entry, img.bss_size, img.stack_top, img.name)


def cache_dir() -> Path:
    base = os.environ.get("GUESTMEM_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guestmem"


def compiler() -> str:
    """The C compiler to use (``$CC``, else ``gcc``), or :class:`CGuestBuildError` naming what is missing."""
    cc = os.environ.get("CC", "gcc")
    path = shutil.which(cc)
    if path is None:
        raise CGuestBuildError(f"the C guest needs a C compiler: {cc!r} is not on PATH (install gcc, "
                               "e.g. `apt-get install gcc`, or set CC)")
    return path


def _digest(cc: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS).encode() + cc.encode())
    return h.hexdigest()[:16]


def build_elf() -> Path:
    """Compile the guest (once per source hash and compiler) and return the ELF file's path."""
    cc = compiler()
    d = cache_dir()
    elf = d / f"c-guest-{_digest(cc)}.elf"
    if elf.exists():
        return elf
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        out = Path(tmp) / "guest.elf"
        cmd = [cc, *CFLAGS, "-T", str(SOURCE_DIR / "guest.ld"), "-o", str(out), str(SOURCE_DIR / "guest.c")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CGuestBuildError(f"the C guest could not be compiled: {exc}") from None
        if proc.returncode != 0:
            raise CGuestBuildError(f"the C guest could not be compiled ({cc} exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-2000:]}")
        os.replace(out, elf)  # atomic: a concurrent builder's identical file is as good
    return elf


def image_from_elf(data: bytes, name: str = "c-guest") -> tuple[GuestImage, int]:
    """The :class:`GuestImage` of a static ELF64 x86-64 executable with one or more PT_LOAD segments,
    and the offset of the launch parameters (the symbol ``params``) in it."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIQQQIHHH", data, 16)
    if e_type != 2 or e_machine != 62:
        raise ValueError(f"not an x86-64 executable (e_type {e_type}, e_machine {e_machine})")
    segments = []
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1 and p_memsz:
            segments.append((p_vaddr, p_offset, p_filesz, p_memsz))
    if not segments:
        raise ValueError("no loadable segment")
    segments.sort()
    base = segments[0][0]
    end = max(v + m for v, _, _, m in segments)
    file_end = max(v + f for v, _, f, _ in segments)
    flat = bytearray(file_end - base)
    for vaddr, offset, filesz, _ in segments:
        flat[vaddr - base : vaddr - base + filesz] = data[offset : offset + filesz]
    at = _symbol(data, "params") - base
    if not 0 <= at <= len(flat) - 8 * len(PARAMS_FIELDS) or \
            struct.unpack_from("<Q", flat, at)[0] != PARAMS_MAGIC:
        raise ValueError("the launch parameters (symbol 'params') are missing or lack their magic")
    image = GuestImage(bytes(flat), base, entry=e_entry - base, bss_size=end - file_end,
                       stack_top=(end - base) & ~0xF, name=name)
    return image, at


def _symbol(data: bytes, wanted: str) -> int:
    """The value of symbol ``wanted`` from the ELF file's ``.symtab``."""
    e_shoff, = struct.unpack_from("<Q", data, 40)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        offset, size, entsize = sh[4], sh[5], sh[9]
        for pos in range(offset, offset + size, entsize):
            st_name, _, _, _, st_value, _ = struct.unpack_from("<IBBHQQ", data, pos)
            end = data.index(b"\0", str_off + st_name)
            if data[str_off + st_name : end].decode() == wanted:
                return int(st_value)
    raise ValueError(f"symbol {wanted!r} not found")


@lru_cache(maxsize=1)
def _built(elf: Path) -> CGuest:
    image, at = image_from_elf(elf.read_bytes())
    return CGuest(image, at, elf)


def build() -> CGuest:
    """The C guest, built if needed (raises :class:`CGuestBuildError` when it cannot be)."""
    return _built(build_elf())


def c_guest_image(params: CGuestParams | None = None) -> GuestImage:
    """The C guest's image with ``params`` (the defaults if None)."""
    return build().with_params(params or CGuestParams())

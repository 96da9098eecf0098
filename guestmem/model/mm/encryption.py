"""The memory-encryption engine of the encrypted flavours (SEV-SNP-like, TDX-like).

Real engines (AMD SME/SEV, Intel MKTME/TDX) encrypt each cache line on its way to DRAM with a key
chosen per guest, tweaked by the physical address, so the same plaintext at two addresses looks
different and moving ciphertext between frames garbles it.  The model does the same per 4 KiB
page with AES-XTS (the cipher those engines use), keyed per VM, with the page's physical address
as the tweak.  Frames hold what DRAM would hold; only an access made with the guest's key (a
private guest access) sees plaintext.

Two implementations give bit-identical ciphertext (tests prove it against ``cryptography``'s own
XTS, one data unit per page):

- ``native``: a few lines of C, compiled with gcc on first use (:mod:`guestmem.model.mm._xts_native`),
  that loop over pages inside one OpenSSL EVP XTS context of the system's libcrypto, setting the
  tweak per page.  It is the honest answer to "one cipher object per page costs more than the
  cipher": the loop runs in C.
- ``numpy``: the pure-Python fallback.  XTS per page is C_j = E_K1(P_j ^ T_j) ^ T_j with
  T_0 = E_K2(tweak) and T_{j+1} = T_j·α in GF(2^128), so a batch of pages needs one AES-ECB call
  under K2 for all first tweaks, a tweak table built with vectorised numpy (by doubling: the
  blocks [n, 2n) are the blocks [0, n) times α^n), and one AES-ECB call under K1 between two XORs.

Work goes in chunks of :data:`CHUNK_PAGES` so that no temporary grows with the range: encrypting
a whole guest in place needs a few MiB beside it, not a second guest.  ``GUESTMEM_XTS=numpy`` (or
``native``) forces an implementation; :func:`backend` says which one is in use.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from guestmem.uapi import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from guestmem.model.mm.frames import FramePool

CHUNK_PAGES = 256  # 1 MiB: big enough to amortise per-call costs, small beside any guest
BLOCKS = PAGE_SIZE // 16  # AES blocks per data unit
U64 = np.dtype("<u8")


_UNLOADED = object()
_native: object | None = _UNLOADED


def _load_native() -> object | None:
    """The compiled per-page loop, loaded (and built, the first time on this machine) on first
    use, unless disabled or unavailable; then the numpy path runs."""
    global _native
    if _native is _UNLOADED:
        choice = os.environ.get("GUESTMEM_XTS", "")
        if choice == "numpy":
            _native = None
        else:
            from guestmem.model.mm import _xts_native

            _native = _xts_native.load()
            if _native is None and choice == "native":
                raise RuntimeError(f"GUESTMEM_XTS=native but the native XTS loop is unavailable: "
                                   f"{_xts_native.why}")
    return _native


def backend() -> str:
    """Which implementation new engines use: "native" (the C loop) or "numpy" (the fallback)."""
    return "native" if _load_native() is not None else "numpy"


def _mul_alpha_pow(lo: np.ndarray, hi: np.ndarray, k: int, lo_out: np.ndarray, hi_out: np.ndarray,
                   h: np.ndarray, tmp: np.ndarray) -> None:
    """``out = in · α^k`` in GF(2^128) (XTS's polynomial x^128 + x^7 + x^2 + x + 1) for 128-bit
    little-endian values held as separate low and high uint64 planes; ``k`` is 1..57 or 64.
    ``h`` and ``tmp`` are scratch of the same shape; ``out`` may be ``in`` (the high word of
    the result is written first, and the input's high word is saved in ``h``)."""
    if k == 64:  # x^128 ≡ x^7 + x^2 + x + 1: the high word folds back, 71 bits wide
        np.copyto(h, hi)
        np.copyto(hi_out, lo)
        for r in (63, 62, 57):
            np.right_shift(h, np.uint64(r), out=tmp)
            hi_out ^= tmp
        np.copyto(lo_out, h)
    else:
        assert 1 <= k <= 57
        ks, rs = np.uint64(k), np.uint64(64 - k)
        np.right_shift(hi, rs, out=h)  # the k bits shifted out: < 2^k, so h·0x87 fits in 64 bits
        np.left_shift(hi, ks, out=hi_out)
        np.right_shift(lo, rs, out=tmp)
        hi_out |= tmp
        np.left_shift(lo, ks, out=lo_out)
        lo_out ^= h
    for r in (1, 2, 7):
        np.left_shift(h, np.uint64(r), out=tmp)
        lo_out ^= tmp


class _Workspace:
    """Scratch arrays for one chunk of the numpy path, kept between calls: fresh multi-MiB arrays
    would cost a page fault per 4 KiB on every chunk, more than the arithmetic."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.lo = np.empty((BLOCKS, k), dtype=U64)
        self.hi = np.empty_like(self.lo)
        self.h = np.empty((BLOCKS // 2, k), dtype=U64)
        self.tmp = np.empty_like(self.h)
        self.table = np.empty(k * BLOCKS * 2, dtype=U64)
        self.x = np.empty_like(self.table)
        self.y = np.empty(k * PAGE_SIZE + 16, dtype=np.uint8)  # cryptography wants a block more


_workspace = threading.local()
_ONE_PAGE_FILLS: dict[int, np.ndarray] = {}  # byte -> one read-only page full of it


def _get_workspace(k: int) -> _Workspace:
    ws: _Workspace | None = getattr(_workspace, "ws", None)
    if ws is None or ws.k < k:
        ws = _workspace.ws = _Workspace(max(k, min(CHUNK_PAGES, 64)))
    return ws


def tweak_table(first_tweaks: np.ndarray, ws: _Workspace | None = None) -> np.ndarray:
    """Every block's tweak T_j = T_0·α^j (j < 256) of each page, from the pages' T_0 (k, 2), as
    (k, 256, 2) uint64.  Built by doubling in planar (block, page) layout, where every slice is
    contiguous, then interleaved once."""
    k = first_tweaks.shape[0]
    ws = ws if ws is not None else _Workspace(k)
    # Contiguous planes of this chunk's width (a last, partial chunk uses the front of the scratch).
    lo, hi = (a.reshape(-1)[: BLOCKS * k].reshape(BLOCKS, k) for a in (ws.lo, ws.hi))
    h, tmp = (a.reshape(-1)[: BLOCKS // 2 * k].reshape(BLOCKS // 2, k) for a in (ws.h, ws.tmp))
    lo[0], hi[0] = first_tweaks[:, 0], first_tweaks[:, 1]
    n = 1
    while n < BLOCKS:
        sh, st = h[:n], tmp[:n]
        if n <= 32:
            _mul_alpha_pow(lo[:n], hi[:n], n, lo[n : 2 * n], hi[n : 2 * n], sh, st)
        else:  # α^64 once, or α^128 as α^64 twice
            _mul_alpha_pow(lo[:n], hi[:n], 64, lo[n : 2 * n], hi[n : 2 * n], sh, st)
            if n == 128:
                _mul_alpha_pow(lo[n:], hi[n:], 64, lo[n:], hi[n:], sh, st)
        n *= 2
    t = ws.table[: k * BLOCKS * 2].reshape(k, BLOCKS, 2)
    t[:, :, 0] = lo.T
    t[:, :, 1] = hi.T
    return t


class EncryptionEngine:
    """AES-XTS-256 over 4 KiB data units; tweak = the page's physical address."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else os.urandom(64)
        if len(self.key) != 64 or self.key[:32] == self.key[32:]:
            raise ValueError("an AES-XTS-256 key is 64 bytes whose halves differ")
        self.pages_encrypted = 0
        self.pages_decrypted = 0
        self.backend = backend()
        self._native: dict[bool, object] = {}
        self._ecb: dict[str, object] = {}
        # The cipher contexts are reused and the native loop runs without the GIL: one user at a
        # time (a vCPU's access and a conversion's content mode may come from different threads).
        self._lock = threading.Lock()
        self.zeros = EncryptedZeros(self)

    def defer_zeros(self, pool: FramePool, pfn: int, npages: int) -> None:
        """Frames ``[pfn, pfn + npages)`` hold encrypted zero pages (a TDX ACCEPT), written when
        first reached (:meth:`FramePool.defer`); counted in ``pages_encrypted`` now, as written."""
        pool.defer(pfn, npages, self.zeros)
        self.pages_encrypted += npages

    # --- the interface ----------------------------------------------------------------------------
    def encrypt(self, pfn: int, plaintext: np.ndarray) -> np.ndarray:
        """Ciphertext of whole pages starting at frame ``pfn`` (``plaintext`` is page-multiple)."""
        flat = self._flat(plaintext)
        out = np.empty_like(flat)
        self.encrypt_into(pfn, flat, out)
        return out

    def decrypt(self, pfn: int, ciphertext: np.ndarray) -> np.ndarray:
        flat = self._flat(ciphertext)
        out = np.empty_like(flat)
        self.decrypt_into(pfn, flat, out)
        return out

    def encrypt_into(self, pfn: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Encrypt whole pages from ``src`` into ``dst`` (contiguous uint8; ``src is dst`` is fine,
        which is how frames are encrypted in place without a copy of the range)."""
        self._apply(pfn, src, dst, encrypt=True)

    def decrypt_into(self, pfn: int, src: np.ndarray, dst: np.ndarray) -> None:
        self._apply(pfn, src, dst, encrypt=False)

    def fill_encrypt(self, pfn: int, dst: np.ndarray, byte: int, *, count: bool = True) -> None:
        """``dst`` (whole pages from ``pfn``) = the encryption of pages full of ``byte``: a guest's
        page-aligned store of a pattern, without a plaintext copy of the range.  ``count=False``:
        not counted in ``pages_encrypted`` (pages counted when their encryption was deferred)."""
        n = dst.size // PAGE_SIZE
        if n == 1:  # one page (a TDX accept, a 4 KiB store): a kept page of the byte, never written
            page = _ONE_PAGE_FILLS.get(byte)
            if page is None:
                page = np.full(PAGE_SIZE, byte, dtype=np.uint8)
                page.flags.writeable = False
                _ONE_PAGE_FILLS[byte] = page
            self._apply(pfn, page, dst, encrypt=True, count=count)
            return
        plain = np.full(min(n, CHUNK_PAGES) * PAGE_SIZE, byte, dtype=np.uint8)
        for i in range(0, n, CHUNK_PAGES):
            m = min(CHUNK_PAGES, n - i)
            self._apply(pfn + i, plain[: m * PAGE_SIZE], dst[i * PAGE_SIZE : (i + m) * PAGE_SIZE],
                        encrypt=True, count=count)

    # --- implementation ---------------------------------------------------------------------------
    @staticmethod
    def _flat(data: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        assert flat.size % PAGE_SIZE == 0, "encryption works on whole pages"
        return flat

    def _apply(self, pfn: int, src: np.ndarray, dst: np.ndarray, *, encrypt: bool,
               count: bool = True) -> None:
        src = self._flat(src)
        assert dst.dtype == np.uint8 and dst.flags.c_contiguous and dst.size == src.size
        dst = dst.reshape(-1)
        n = src.size // PAGE_SIZE
        with self._lock:
            self._run(pfn, src, dst, n, encrypt)
        if not count:
            return
        if encrypt:
            self.pages_encrypted += n
        else:
            self.pages_decrypted += n

    def _run(self, pfn: int, src: np.ndarray, dst: np.ndarray, n: int, encrypt: bool) -> None:
        if not n:
            return
        lib = _load_native() if self.backend == "native" else None
        if lib is not None:
            ctx = self._native.get(encrypt)
            if ctx is None:
                ctx = self._native[encrypt] = lib.context(self.key, encrypt)  # type: ignore[attr-defined]
            ctx.pages(pfn, src, dst, n)  # type: ignore[attr-defined]
            return
        for i in range(0, n, CHUNK_PAGES):
            m = min(CHUNK_PAGES, n - i)
            sl = slice(i * PAGE_SIZE, (i + m) * PAGE_SIZE)
            self._numpy_chunk(pfn + i, src[sl], dst[sl], encrypt)

    def _cipher(self, name: str) -> object:
        """One ECB context per use, kept: ECB carries no state between block-aligned updates."""
        c = self._ecb.get(name)
        if c is None:
            half = self.key[:32] if name != "tweak" else self.key[32:]
            cipher = Cipher(algorithms.AES(half), modes.ECB())
            c = self._ecb[name] = cipher.decryptor() if name == "dec" else cipher.encryptor()
        return c

    def _numpy_chunk(self, pfn: int, src: np.ndarray, dst: np.ndarray, encrypt: bool) -> None:
        m = src.size // PAGE_SIZE
        idx = np.arange(pfn, pfn + m, dtype=U64)
        tw = np.empty((m, 2), dtype=U64)
        tw[:, 0] = idx << np.uint64(PAGE_SHIFT)
        tw[:, 1] = idx >> np.uint64(64 - PAGE_SHIFT)
        t0 = np.frombuffer(self._cipher("tweak").update(tw.tobytes()), dtype=U64).reshape(m, 2)  # type: ignore[attr-defined]
        ws = _get_workspace(m)
        t = tweak_table(t0, ws).reshape(-1)
        x = np.bitwise_xor(src.view(U64), t, out=ws.x[: t.size])
        got = self._cipher("enc" if encrypt else "dec").update_into(x.view(np.uint8), ws.y)  # type: ignore[attr-defined]
        assert got == x.size * 8
        np.bitwise_xor(ws.y[:got].view(U64), t, out=dst.view(U64))


class EncryptedZeros:
    """The filler of frames an engine's zero pages were deferred to: writes them on first access
    (uncounted: :meth:`EncryptionEngine.defer_zeros` counted them)."""

    __slots__ = ("engine",)

    def __init__(self, engine: EncryptionEngine) -> None:
        self.engine = engine

    def materialize(self, pfn: int, dst: np.ndarray) -> None:
        self.engine.fill_encrypt(pfn, dst, 0, count=False)

    def __repr__(self) -> str:
        return f"EncryptedZeros(engine at {id(self.engine):#x})"


def scramble(frames: np.ndarray) -> None:
    """Overwrite ``frames`` (contiguous uint8) with bytes nobody can predict: the software VM's
    UNSPECIFIED content mode, which exists so that relying on it shows up in tests.  AES-CTR under
    a throwaway key over the old contents is as unpredictable as ``os.urandom`` and runs at
    cipher speed; it goes through a chunk-sized buffer (cryptography wants room for a block more)."""
    size = frames.size
    ctr = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    step = CHUNK_PAGES * PAGE_SIZE
    buf = np.empty(min(size, step) + 16, dtype=np.uint8)
    for off in range(0, size, step):
        part = frames[off : off + step]
        got = ctr.update_into(part, buf)
        part[:] = buf[:got]

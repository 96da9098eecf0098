"""The memory-encryption engine of the encrypted flavours (SEV-SNP-like, TDX-like).

Real engines (AMD SME/SEV, Intel MKTME/TDX) encrypt each cache line on its way to DRAM with a key
chosen per guest, tweaked by the physical address, so the same plaintext at two addresses looks
different and moving ciphertext between frames garbles it.  The model does the same per 4 KiB
page with AES-XTS (the cipher those engines use), keyed per VM, with the page's physical address
as the tweak.  Frames hold what DRAM would hold; only an access made with the guest's key (a
private guest access) sees plaintext.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from guestmem.uapi import PAGE_SHIFT, PAGE_SIZE


class EncryptionEngine:
    """AES-XTS-256 over 4 KiB data units; tweak = the page's physical address."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else os.urandom(64)
        if len(self.key) != 64 or self.key[:32] == self.key[32:]:
            raise ValueError("an AES-XTS-256 key is 64 bytes whose halves differ")
        self.pages_encrypted = 0
        self.pages_decrypted = 0

    def _cipher(self, pfn: int) -> Cipher:
        tweak = (pfn << PAGE_SHIFT).to_bytes(16, "little")
        return Cipher(algorithms.AES(self.key), modes.XTS(tweak))

    def encrypt(self, pfn: int, plaintext: np.ndarray) -> np.ndarray:
        """Ciphertext of whole pages starting at frame ``pfn`` (``plaintext`` is page-multiple)."""
        return self._apply(pfn, plaintext, encrypt=True)

    def decrypt(self, pfn: int, ciphertext: np.ndarray) -> np.ndarray:
        return self._apply(pfn, ciphertext, encrypt=False)

    def _apply(self, pfn: int, data: np.ndarray, *, encrypt: bool) -> np.ndarray:
        flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        n = flat.size // PAGE_SIZE
        assert n * PAGE_SIZE == flat.size, "encryption works on whole pages"
        out = np.empty_like(flat)
        for i in range(n):
            c = self._cipher(pfn + i)
            ctx = c.encryptor() if encrypt else c.decryptor()
            page = flat[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes()
            out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = np.frombuffer(ctx.update(page) + ctx.finalize(),
                                                                     dtype=np.uint8)
        if encrypt:
            self.pages_encrypted += n
        else:
            self.pages_decrypted += n
        return out

"""The memory-encryption engine: both implementations are bit-identical to ``cryptography``'s XTS.

The engine's ciphertext is observable (frames hold it; tests and recorded digests see it), so a
faster implementation must produce exactly what one ``cryptography`` XTS object per page produced:
AES-XTS-256, one data unit per 4 KiB page, tweak = the page's physical address (little-endian).
"""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import guestmem
import guestmem.uapi as u
from guestmem.api import ExitGuestAssert, ExitHalt
from guestmem.guest.ops import Accept, Program, Verify, Write
from guestmem.model.mm import _xts_native
from guestmem.model.mm import encryption as enc
from guestmem.uapi import PAGE_SIZE as PS

GPA = 1 << 32
BACKENDS = ["numpy"] + (["native"] if enc.backend() == "native" else [])


def reference(key: bytes, pfn: int, data: bytes, encrypt: bool) -> bytes:
    """One cryptography XTS object per page: what the engine has always computed."""
    out = bytearray()
    for i in range(len(data) // PS):
        c = Cipher(algorithms.AES(key), modes.XTS(((pfn + i) * PS).to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i * PS : (i + 1) * PS]) + ctx.finalize()
    return bytes(out)


def engine(key: bytes, backend: str) -> enc.EncryptionEngine:
    e = enc.EncryptionEngine(key)
    e.backend = backend
    return e


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=64, max_size=64),
       pfn=st.one_of(st.integers(0, 1 << 24), st.integers(0, (1 << 64) - 8)),
       npages=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_matches_cryptography_xts(backend: str, key: bytes, pfn: int, npages: int, seed: int) -> None:
    assume(key[:32] != key[32:])
    data = np.random.default_rng(seed).integers(0, 256, npages * PS, dtype=np.uint8)
    e = engine(key, backend)
    ct = e.encrypt(pfn, data)
    assert ct.tobytes() == reference(key, pfn, data.tobytes(), True)
    assert e.decrypt(pfn, ct).tobytes() == data.tobytes()
    assert e.decrypt(pfn, data).tobytes() == reference(key, pfn, data.tobytes(), False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_pages_in_place_and_across_chunks(backend: str) -> None:
    """More pages than a chunk, encrypted in place (src is dst), and a 64-bit carry in the tweak."""
    key = os.urandom(64)
    n = enc.CHUNK_PAGES + 3
    data = np.frombuffer(os.urandom(n * PS), dtype=np.uint8)
    for pfn in (5, (1 << 52) - 7):
        e = engine(key, backend)
        buf = data.copy()
        e.encrypt_into(pfn, buf, buf)
        assert buf.tobytes() == reference(key, pfn, data.tobytes(), True)
        e.decrypt_into(pfn, buf, buf)
        assert buf.tobytes() == data.tobytes()
        assert e.pages_encrypted == e.pages_decrypted == n


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_encrypt_is_encrypt_of_a_filled_range(backend: str) -> None:
    key = os.urandom(64)
    e = engine(key, backend)
    n = enc.CHUNK_PAGES + 2
    dst = np.empty(n * PS, dtype=np.uint8)
    e.fill_encrypt(77, dst, 0xA5)
    assert dst.tobytes() == reference(key, 77, bytes([0xA5]) * (n * PS), True)


def test_tweak_table_doubles_by_alpha() -> None:
    """T_{j+1} = T_j·α: shift the 128-bit little-endian value left, fold the carry as 0x87."""
    rng = np.random.default_rng(1)
    t0 = rng.integers(0, 2**64, (5, 2), dtype=np.uint64)
    t = enc.tweak_table(t0)
    for p in range(5):
        v = int(t0[p, 0]) | int(t0[p, 1]) << 64
        for j in range(enc.BLOCKS):
            assert int(t[p, j, 0]) | int(t[p, j, 1]) << 64 == v
            v = (v << 1) ^ (0x87 if v >> 127 else 0)
            v &= (1 << 128) - 1


def test_backend_is_named() -> None:
    assert enc.backend() in ("native", "numpy")
    if enc.backend() == "numpy" and os.environ.get("GUESTMEM_XTS") != "numpy":
        assert _xts_native.why  # the fallback says why the native loop is not in use


@pytest.mark.parametrize("flavour", [u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM])
@pytest.mark.parametrize("start,size", [(0, 3 * PS), (10, 5), (PS - 7, 20), (100, 2 * PS), (PS, PS + 1)])
def test_private_writes_patch_partial_pages(flavour: int, start: int, size: int) -> None:
    """A private store covering pages in part re-encrypts only what it changes: the bytes around
    it keep what the guest wrote before, and the host sees ciphertext, never the pattern."""
    kvm = guestmem.open("model")
    vm = kvm.create_vm(flavour)
    n = 4 * PS
    gmem = vm.create_guest_memfd(n, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, n, 0, gmem, 0)
    vm.set_memory_attributes(GPA, n, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.launch_finalize()
    vcpu = vm.create_vcpu(0)
    end = start + size
    ops = [Accept(GPA, n), Write(GPA, n, 0x11), Write(GPA + start, size, 0x22),
           Verify(GPA + start, size, 0x22)]
    if start:
        ops.append(Verify(GPA, start, 0x11))
    if end < n:
        ops.append(Verify(GPA + end, n - end, 0x11))
    vcpu.load(Program(ops))
    assert isinstance(vcpu.run(), ExitHalt)
    vm.check_invariants()
    pfn = vm.mmu.translate(0, GPA // PS, GPA // PS + 1, True, False)[0][2]
    plain = bytearray([0x11]) * PS
    plain[min(start, PS) : min(end, PS)] = bytes([0x22]) * (min(end, PS) - min(start, PS))
    assert kvm.pool.view(pfn, 1).tobytes() != bytes(plain)  # DRAM holds ciphertext


def test_native_loop_builds_into_a_fresh_cache(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fresh machine does on first use: compile the loop with gcc into an empty cache."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler: the numpy path is used")
    monkeypatch.setenv("GUESTMEM_CACHE", str(tmp_path))
    so = _xts_native._build()
    assert so.exists() and so.parent.parent == tmp_path
    assert _xts_native._build() == so  # built once, then reused


@pytest.mark.parametrize("flavour", [u.KVM_X86_SW_PROTECTED_VM, u.KVM_X86_SNP_VM])
def test_verify_reports_first_mismatch_past_the_first_chunk(flavour: int) -> None:
    """Guest reads are checked a chunk at a time; the first wrong byte is still the one reported."""
    kvm = guestmem.open("model")
    vm = kvm.create_vm(flavour)
    n = 3 << 20
    gmem = vm.create_guest_memfd(n, 0)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, n, 0, gmem, 0)
    vm.set_memory_attributes(GPA, n, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    accept = []
    if flavour != u.KVM_X86_SW_PROTECTED_VM:
        vm.launch_finalize()
        accept = [Accept(GPA, n)]
    vcpu = vm.create_vcpu(0)
    bad = (1 << 20) + 5000
    vcpu.load(Program([*accept, Write(GPA, n, 0x11), Write(GPA + bad, 3, 0x22),
                       Write(GPA + bad + 9000, 1, 0x33), Verify(GPA, n, 0x11)]))
    ex = vcpu.run()
    assert isinstance(ex, ExitGuestAssert)
    assert (ex.gpa, ex.expected, ex.found) == (GPA + bad, 0x11, 0x22)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_engine_used_from_two_threads(backend: str) -> None:
    """A vCPU's access and a conversion may use a VM's engine from different threads at once."""
    key = os.urandom(64)
    e = engine(key, backend)
    data = np.frombuffer(os.urandom(256 * PS), dtype=np.uint8)
    want = {pfn: reference(key, pfn, data.tobytes(), True) for pfn in (3, 1000)}
    got: dict[int, list[bytes]] = {3: [], 1000: []}

    def work(pfn: int) -> None:
        for _ in range(30):
            got[pfn].append(e.encrypt(pfn, data).tobytes())

    threads = [threading.Thread(target=work, args=(pfn,)) for pfn in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g == want[pfn] for pfn, gs in got.items() for g in gs)

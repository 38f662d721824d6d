"""The client's fused kernels (``hecommon.he.kernels``, issue 17) against the numpy path they replace:
the same ciphertexts, messages and noise bit for bit, at the extremes of every input range, with
any thread count."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hecommon.errors import DecryptionError
from hecommon.he import kernels
from hecommon.he import params as P
from hecommon.he.bits import PackedRows
from hecommon.he.encrypt import ClientA, EncryptedPartial, EncryptedResult, _encrypt_with, decrypt
from hecommon.he.keys import SecretKey
from hecommon.he.ring import centered, negacyclic_reference
from hecommon.he.sampling import (
    centered_binomial,
    expand_a,
    noise_planes,
    noise_stream,
    plane_binomial,
    sample_noise,
)

pytest.importorskip("numba")
PSETS = list(P.REGISTRY.values())
#: The widths ``hecommon.he._packing`` writes its loops out for (it imports numba: skipped above).
PACKING_WIDTHS = sorted(__import__("hecommon.he._packing", fromlist=["WIDTHS"]).WIDTHS)


def _paths(monkeypatch, fn):
    """``fn()`` through the numpy path, then through the kernels."""
    monkeypatch.setenv("HELORA_KERNELS", "numpy")
    assert not kernels.enabled()
    reference = fn()
    monkeypatch.setenv("HELORA_KERNELS", "numba")
    assert kernels.enabled()
    return reference, fn()


def _extreme_messages(ps: P.ParamSet, t: int, d: int, rng) -> np.ndarray:
    m = rng.integers(-ps.max_message, ps.max_message + 1, size=(t, d))
    m[0, :] = ps.max_message
    m[-1, :] = -ps.max_message
    return m


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", [("N", 70), (5, 33), (1, 1)])
def test_kernel_encryption_equals_the_numpy_path(ps, shape, rng, monkeypatch):
    """Same secret, seed, messages and noise: the same ``b``, whatever the block cut (70 and 33
    rows are not multiples of the block), with a ``start`` inside the layer, and for token windows
    that start inside the ring (``col0``)."""
    t = ps.n if shape[0] == "N" else shape[0]
    d = shape[1]
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    m = _extreme_messages(ps, t, d, rng)
    noise = sample_noise(ps, (d, ps.n))
    noise[0, :] = ps.noise_eta  # the sampler's extremes
    noise[-1, :] = -ps.noise_eta
    seed = os.urandom(16)
    for start in (0, 41):
        reference, fast = _paths(monkeypatch, lambda start=start: _encrypt_with(s, m, seed, noise, start=start).b)
        np.testing.assert_array_equal(fast, reference)
    for col0 in {ps.n // 2 - t // 2 - 1, ps.n - t} if t < ps.n else ():  # windows inside the ring: across its halves, at its end
        reference, fast = _paths(monkeypatch, lambda col0=col0: _encrypt_with(s, m, seed, noise, col0=col0).b)
        np.testing.assert_array_equal(fast, reference)


def test_messages_wider_than_an_int64_product_encrypt_as_the_numpy_path(rng, monkeypatch):
    """A parameter set may take messages up to 2^(msg_bits-1) with msg_bits up to log q − 8: at 40
    bits, m·(Δ mod p) passes 2^63. The numpy path reduces m mod p first; so must the kernel."""
    ps = P.ParamSet("n4096-wide-messages", 4096, P.get("n4096-q108").primes, msg_bits=40)
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    m = _extreme_messages(ps, 64, 9, rng)
    noise, seed = sample_noise(ps, (9, ps.n)), os.urandom(16)
    reference, fast = _paths(monkeypatch, lambda: _encrypt_with(s, m, seed, noise).b)
    np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.uint64])
def test_messages_of_any_integer_dtype_encrypt_as_int64(dtype, rng, monkeypatch):
    """Quantized values come as uint8 (or uint16); both paths encrypt any integer dtype to the
    ciphertexts of the same values as int64 (uint64 included: numpy would take its products with
    int64 to float64, inexact at ``Δ·m``'s size)."""
    ps = P.DEFAULT
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    info = np.iinfo(dtype)
    top = min(info.max, ps.max_message)
    m = rng.integers(max(info.min, -ps.max_message), top + 1, size=(ps.n, 40), dtype=np.int64).astype(dtype)
    m[0] = top  # Δ·m mod p near 2^56: inexact through float64
    noise, seed = sample_noise(ps, (40, ps.n)), os.urandom(16)
    for mode in ("numpy", "numba"):
        monkeypatch.setenv("HELORA_KERNELS", mode)
        wide = _encrypt_with(s, m.astype(np.int64), seed, noise).b
        np.testing.assert_array_equal(_encrypt_with(s, m, seed, noise).b, wide)


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
def test_fresh_noise_drawn_per_block_decrypts_exactly(ps, rng, monkeypatch):
    """``encrypt``'s kernel path draws its noise block by block: the round trip stays exact."""
    monkeypatch.setenv("HELORA_KERNELS", "numba")
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    m = _extreme_messages(ps, 300, 67, rng)
    seed = os.urandom(16)
    ct = _encrypt_with(s, m, seed, None)
    np.testing.assert_array_equal(decrypt(s, EncryptedPartial(ps, expand_a(seed, ps, 67), ct.b, 300)), m)


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
@pytest.mark.parametrize(("tokens", "where"), [(1, "start"), (1, "end"), (7, "middle"), (300, "start"),
                                               (300, "end"), (128, "middle"), ("N", "start")])
def test_kernel_decryption_equals_the_numpy_path(ps, tokens, where, rng, monkeypatch):
    """Results with ``a`` (packed or not, at the extremes of its range) and, with two limbs, results
    decrypted from the layer's hint (residues at 0 and p-1), ``b`` packed or not, token windows at
    the ring's start, middle (across its halves) and end: the same messages. Packed rows of whole
    64-bit words (N values; 128 tokens) are unpacked from the message's words directly, also where
    they are not 8-byte aligned in memory (a decoded message's views), others through
    ``PackedRows``: the same messages."""
    t = ps.n if tokens == "N" else tokens
    col0 = {"start": 0, "middle": ps.n // 2 - 3, "end": ps.n - t}[where]
    d = 150  # more than two groups of messages placed together (encrypt.PLACE_ROWS), the last one short
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    top = 1 << ps.out_bits
    a = rng.integers(0, top, size=(d, ps.n), dtype=np.uint64)
    a[0, :3] = (0, top // 2 - 1, top // 2)  # the centered range's edges
    a[1, :] = top - 1
    b = rng.integers(0, top, size=(d, t), dtype=np.uint64)
    first = None
    packed = PackedRows.pack(a, ps.out_bits)
    shifted = PackedRows(ps.out_bits, ps.n, memoryview(b"\0" * 4 + bytes(packed.data))[4:].toreadonly())
    assert np.frombuffer(shifted.data, np.uint8).ctypes.data % 8  # not 8-byte aligned: still its words
    assert shifted.words() is not None and not shifted.words().flags.aligned
    for a_part in (a, packed, shifted):
        for b_part in (b, PackedRows.pack(b, ps.out_bits)):  # b packed as it comes over the wire
            result = EncryptedResult(ps, a_part, b_part, t, col0=col0)
            reference, fast = _paths(monkeypatch, lambda r=result: decrypt(s, r))
            np.testing.assert_array_equal(fast, reference)
            first = reference if first is None else first
            np.testing.assert_array_equal(reference, first)
    if ps.limbs == 2:
        hint = np.stack([rng.integers(0, p, size=(d, ps.n)) for p in ps.primes], axis=1).astype(np.uint32)
        hint[0, :, 0], hint[1, :, 0] = 0, np.array(ps.primes) - 1
        bh = rng.integers(0, 1 << ps.hint_out_bits, size=(d, t), dtype=np.uint64)
        for b_part in (bh, PackedRows.pack(bh, ps.hint_out_bits)):
            result = EncryptedResult(ps, None, b_part, t, col0=col0)
            reference, fast = _paths(monkeypatch, lambda r=result: decrypt(s, r, hint=hint))
            np.testing.assert_array_equal(fast, reference)


def test_decryptions_shared_spectrum_buffer_works_on_either_fft(rng, monkeypatch):
    """Decryption's two products per block go through one ``fft.Pair`` of two inputs (out of place
    on FFTW's plans; copies then transforms on numpy's): the same messages either way, full blocks
    and a short last one."""
    from hecommon.he import fft

    ps = P.DEFAULT
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    a = rng.integers(0, 1 << ps.out_bits, size=(70, ps.n), dtype=np.uint64)
    result = EncryptedResult(ps, PackedRows.pack(a, ps.out_bits), a[:, :300].copy(), 300)
    monkeypatch.setenv("HELORA_KERNELS", "numba")
    got = {}
    for backend in ("numpy", "fftw"):
        monkeypatch.setenv("HELORA_FFT", backend)
        if fft.backend() == backend:
            got[backend] = decrypt(s, result)
    monkeypatch.setenv("HELORA_KERNELS", "numpy")
    reference = decrypt(s, result)
    assert got and all(np.array_equal(m, reference) for m in got.values())


@pytest.mark.parametrize("mode", ["numpy", "numba"])
def test_decryption_into_a_view_writes_or_adds_its_columns(mode, rng, monkeypatch):
    """``decrypt(out=)`` writes the messages into a strided view of the caller's array (columns of
    a wider one) and leaves the rest alone; with ``add`` it adds them (pieces of one sum); an
    array of the wrong shape or dtype is refused. Results with ``a`` and from the hint."""
    monkeypatch.setenv("HELORA_KERNELS", mode)
    ps = P.DEFAULT
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    d, t = 150, 300  # several groups of placed rows (encrypt.PLACE_ROWS), cut across threads
    a = rng.integers(0, 1 << ps.out_bits, size=(d, ps.n), dtype=np.uint64)
    hint = np.stack([rng.integers(0, p, size=(d, ps.n)) for p in ps.primes], axis=1).astype(np.uint32)
    results = [(EncryptedResult(ps, a, rng.integers(0, 1 << ps.out_bits, size=(d, t), dtype=np.uint64), t), None),
               (EncryptedResult(ps, None, rng.integers(0, 1 << ps.hint_out_bits, size=(d, t), dtype=np.uint64), t,
                                col0=ps.n - t), hint)]
    for result, h in results:
        alone = decrypt(s, result, hint=h)
        wide = np.full((t, d + 10), 7, dtype=np.int64)
        assert decrypt(s, result, hint=h, out=wide[:, 5 : 5 + d]) is not None
        np.testing.assert_array_equal(wide[:, 5 : 5 + d], alone)
        assert (wide[:, :5] == 7).all() and (wide[:, 5 + d :] == 7).all()
        decrypt(s, result, hint=h, out=wide[:, 5 : 5 + d], add=True)
        np.testing.assert_array_equal(wide[:, 5 : 5 + d], 2 * alone)
        for bad in (np.zeros((t, d + 1), dtype=np.int64), np.zeros((t, d), dtype=np.int32)):
            with pytest.raises(ValueError, match="out must be"):
                decrypt(s, result, hint=h, out=bad)


def test_a_hint_with_residues_outside_their_modulus_is_refused(rng, monkeypatch):
    monkeypatch.setenv("HELORA_KERNELS", "numba")
    ps = P.DEFAULT
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    hint = np.zeros((3, ps.limbs, ps.n), dtype=np.uint32)
    hint[1, 0, 5] = ps.primes[0]
    result = EncryptedResult(ps, None, np.zeros((3, 4), dtype=np.uint64), 4)
    with pytest.raises(DecryptionError, match="outside their modulus"):
        decrypt(s, result, hint=hint)


@pytest.mark.parametrize("backend", ["fftw", "numpy"])
@pytest.mark.parametrize("n", [2048, 4096])
def test_folded_products_equal_the_schoolbook_product(n, backend, rng, monkeypatch):
    """The kernels' fold, the transform (FFTW or numpy: ``hecommon.he.fft``) and the untwist give
    ``a·s`` exactly for residues anywhere in [0, p), the centered extremes included (``ring``'s
    exactness bound, through the new path)."""
    from hecommon.he import fft
    from hecommon.he.ring import SmallSecretMultiplier

    monkeypatch.setenv("HELORA_FFT", backend)
    if fft.backend() != backend:
        pytest.skip("pyFFTW not installed")

    p = P.get("n2048-q54" if n == 2048 else "n4096-q108").primes[0]
    s = rng.integers(-1, 2, n)
    mul = SmallSecretMultiplier(s)
    res = rng.integers(0, p, size=(4, n)).astype(np.uint32)
    res[0], res[1], res[2, ::2], res[2, 1::2] = p - 1, (p - 1) // 2, (p - 1) // 2 + 1, 0
    buf = np.empty((4, n // 2), dtype=np.complex128)
    assert kernels.loops().fold_words(res, 0xFFFFFFFF, p, n, mul.twist, buf)
    mul.spectrum_product(buf)
    z = buf * mul.untwist
    got = np.rint(np.concatenate([z.real, z.imag], axis=1)).astype(np.int64)
    want = np.stack([negacyclic_reference(x, s) for x in centered(res, p)])
    np.testing.assert_array_equal(got, want)


def test_rejected_words_are_skipped_as_expand_a_skips_them(monkeypatch):
    """Keystream words at or above p (after the mask) are rejected in order, as ``expand_a`` does:
    a row of words crafted with rejections folds to the residues ``expand_a``'s rule keeps."""
    from hecommon.he.ring import SmallSecretMultiplier

    ps = P.DEFAULT
    p, n = ps.primes[0], ps.n
    mul = SmallSecretMultiplier(np.zeros(n, dtype=np.int64) + np.eye(1, n, 0, dtype=np.int64)[0])  # s = 1
    words = np.arange(n + 64, dtype=np.uint32)
    words[[3, 100, 2000]] = p + np.array([0, 5, 9], dtype=np.uint32)  # three rejections
    kept = words[words < p][:n]
    buf = np.empty((1, n // 2), dtype=np.complex128)
    assert kernels.loops().fold_words(words[None], 0xFFFFFFFF, p, n, mul.twist, buf)
    mul.spectrum_product(buf)
    z = buf * mul.untwist
    got = np.rint(np.concatenate([z.real, z.imag], axis=1)).astype(np.int64)[0]
    np.testing.assert_array_equal(got, centered(kept.astype(np.int64), p))  # a·1 = a
    short = np.full((1, n + 64), p, dtype=np.uint32)  # every word rejected: the row runs out
    assert not kernels.loops().fold_words(short, 0xFFFFFFFF, p, n, mul.twist, buf)


def test_rows_with_and_without_rejections_fold_to_expand_as_residues(rng):
    """Rows that take each of ``fold_words``' paths fold to the residues ``expand_a``'s rule keeps
    (masked words below p, in order, the first N): none rejected; one at the first word, at the
    last of the first N, at a run's end and start; a run of 64 and more rejected together; one
    in every run; rejections past the first N only. A row whose last needed word is its last
    folds; one word short, it runs out."""
    from hecommon.he.ring import SmallSecretMultiplier
    from hecommon.he.sampling import a_mask

    ps = P.DEFAULT
    p, n, width = ps.primes[0], ps.n, ps.n + 256
    mask = a_mask(p)
    mul = SmallSecretMultiplier(np.eye(1, n, 0, dtype=np.int64)[0])  # s = 1: the product is a
    base = rng.integers(0, p, size=width).astype(np.uint32) | np.uint32(1 << 27)  # above the mask: masked off
    patterns = [[], [0], [n - 1], [63, 64], [127], list(range(500, 600)), list(range(0, n, 64)), [n, n + 3],
                [7, *range(n + 1, width)]]  # the last: its N-th residue is word N, every word after it rejected
    words = np.stack([base] * len(patterns))
    for row, rejected in zip(words, patterns, strict=True):
        row[rejected] = p + np.arange(len(rejected), dtype=np.uint32) % (mask - p + 1)
    buf = np.empty((len(patterns), n // 2), dtype=np.complex128)
    assert kernels.loops().fold_words(words, mask, p, n, mul.twist, buf)
    mul.spectrum_product(buf)
    z = buf * mul.untwist
    got = np.rint(np.concatenate([z.real, z.imag], axis=1)).astype(np.int64)
    for row, folded in zip(words, got, strict=True):
        masked = (row & mask).astype(np.int64)
        np.testing.assert_array_equal(folded, centered(masked[masked < p][:n], p))
    exact = np.array(words[5:6, : n + 100])  # the run of 100 rejections: its last word is the N-th kept
    assert kernels.loops().fold_words(exact, mask, p, n, mul.twist, buf[:1])
    assert not kernels.loops().fold_words(exact[:, :-1], mask, p, n, mul.twist, buf[:1])
    late = np.array(words[8:9])
    late[0, n] = p  # word N rejected too: N-1 residues in the whole row
    assert not kernels.loops().fold_words(late, mask, p, n, mul.twist, buf[:1])
    clean = np.array(words[:1, : n - 1])  # fewer words than residues, none rejected: runs out, reads nothing past
    assert not kernels.loops().fold_words(clean, mask, p, n, mul.twist, buf[:1])


@pytest.mark.parametrize("eta", [4, 8, 12, 24, 64])
def test_kernel_noise_equals_the_numpy_sampler(eta, monkeypatch):
    stream = noise_stream(4000 * eta // 4).copy()
    stream[: eta // 4] = 0xFF  # every bit of the first sample set, and the second's low nibbles
    stream[eta // 4 : eta // 2] = 0x0F
    reference, fast = _paths(monkeypatch, lambda: centered_binomial(stream, 4000, eta))
    np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("eta", [4, 8, 12, 24, 32])
def test_kernel_plane_noise_equals_the_numpy_sampler(eta, monkeypatch):
    """``plane_binomial`` (``sample_noise``'s layout up to eta = 32) through the compiled loop: the
    numpy path's samples, the extremes ±eta included (every bit of one half set)."""
    rows, n = 7, 300
    stream = noise_stream(rows * n * eta // 4).copy()
    planes = noise_planes(stream, rows, n, eta)
    width = 8 * planes.itemsize
    low = 2**eta - 1
    for p in range(planes.shape[1]):  # sample (0, 0): its low eta bits set; sample (0, 1): its high eta
        planes[0, p, 0] = (low >> (p * width)) & (2**width - 1)
        planes[0, p, 1] = ((low << eta) >> (p * width)) & (2**width - 1)
    reference, fast = _paths(monkeypatch, lambda: plane_binomial(stream, rows, n, eta))
    np.testing.assert_array_equal(fast, reference)
    assert (reference[0, 0], reference[0, 1]) == (eta, -eta)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_thread_count_changes_nothing(threads, rng, monkeypatch):
    """Encryption (given the same randomness) and decryption are the same with any thread count."""
    ps = P.DEFAULT
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    m = rng.integers(-127, 128, size=(ps.n, 150))
    noise = sample_noise(ps, (150, ps.n))
    seed = os.urandom(16)
    monkeypatch.setenv("HELORA_THREADS", "1")
    one = _encrypt_with(s, m, seed, noise).b
    monkeypatch.setenv("HELORA_THREADS", threads)
    np.testing.assert_array_equal(_encrypt_with(s, m, seed, noise).b, one)
    a = rng.integers(0, 1 << ps.out_bits, size=(150, ps.n), dtype=np.uint64)
    result = EncryptedResult(ps, a, a[::-1].copy(), ps.n)
    monkeypatch.setenv("HELORA_THREADS", "1")
    first = decrypt(s, result)
    monkeypatch.setenv("HELORA_THREADS", threads)
    np.testing.assert_array_equal(decrypt(s, result), first)


@pytest.mark.parametrize("bits", [1, 7, 8, 27, 34, 38, 40, 45, 56])
def test_kernel_bit_packing_equals_the_numpy_paths(bits, rng, monkeypatch):
    """The compiled packer gives the numpy paths' bytes for every length (pieces in parallel
    included) and dtype, unpacks them back, and refuses a value that does not fit."""
    from hecommon.he.bits import pack_bits, unpack_bits

    monkeypatch.setenv("HELORA_THREADS", "2")
    for count in (0, 1, 63, 64, 65, 1000, 70_001, 1 << 17):
        v = rng.integers(0, 1 << bits, size=count, dtype=np.uint64)
        if count:
            v[0] = (1 << bits) - 1
        reference, fast = _paths(monkeypatch, lambda v=v: pack_bits(v, bits))
        assert fast == reference
        if bits <= 32:
            assert pack_bits(v.astype(np.uint32), bits) == reference
        np.testing.assert_array_equal(unpack_bits(fast, bits, count), v)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([1 << bits] * 70_001, dtype=np.uint64), bits)


@pytest.mark.parametrize("bits", PACKING_WIDTHS)
def test_written_out_packing_equals_the_generic_loops(bits, rng):
    """The loops written out for one width (``_packing``) give ``_fused``'s words and values for
    rows of whole groups of 64, with a last partial group, and on strided rows; every width the
    parameter sets use is one of them; a value that does not fit is refused in any group."""
    from hecommon.he import _fused, _packing
    from hecommon.he.params import REGISTRY

    assert {w for p in REGISTRY.values() for w in (*(q.bit_length() for q in p.primes), p.out_bits,
                                                   p.hint_out_bits)} <= _packing.WIDTHS
    pack, unpack = _packing.pack_loop(bits), _packing.unpack_loop(bits)
    assert pack is not _fused.pack_rows and unpack is not _fused.unpack_rows
    for n in (64, 2048, 2048 + 40, 7):
        v = rng.integers(0, 1 << bits, size=(5, 2, n), dtype=np.uint64)
        v[0, 1, :] = (1 << bits) - 1
        v[1, 1, :] = 0
        words, expected = (np.zeros((5, -(-n * bits // 64)), dtype=np.uint64) for _ in range(2))
        assert _fused.pack_rows(v[:, 1], bits, expected)
        assert pack(v[:, 1], bits, words)  # strided rows: one limb of (rows, L, n)
        np.testing.assert_array_equal(words, expected)
        if bits <= 32:  # encrypt's residues are uint32
            words[:] = 0
            assert pack(v[:, 1].astype(np.uint32), bits, words)
            np.testing.assert_array_equal(words, expected)
        narrow = np.zeros((5, n), dtype=np.uint32 if bits <= 32 else np.uint64)  # the narrowest that holds them
        readonly = expected.copy()
        readonly.flags.writeable = False  # a message's bytes
        unpack(readonly, bits, narrow)
        np.testing.assert_array_equal(narrow, v[:, 1])
        back = np.zeros((5, 2, n), dtype=np.uint64)
        unpack(words, bits, back[:, 0])
        np.testing.assert_array_equal(back[:, 0], v[:, 1])
        assert not back[:, 1].any()
        for r, c in ((0, 0), (4, n - 1), (2, n // 2)):
            bad = v[:, 1].copy()
            bad[r, c] = 1 << bits
            assert not pack(bad, bits, words)


def test_the_most_negative_int64_message_is_refused():
    """``np.abs`` of int64's minimum is itself (negative): a bound checked on ``|m|`` let it pass."""
    ps = P.DEFAULT
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    m = np.zeros((2, 3), dtype=np.int64)
    m[1, 2] = np.iinfo(np.int64).min
    with pytest.raises(ValueError, match="exceed"):
        _encrypt_with(s, m, os.urandom(16), None)


@pytest.mark.parametrize("bits", [27, 38])
@pytest.mark.parametrize("n", [2048, 40])
def test_strided_rows_pack_and_unpack_in_place(bits, n, rng, monkeypatch):
    """One limb of a (rows, L, N) array (strided rows) packs to the bytes of its contiguous copy,
    and ``unpack_bits_into`` fills such a view back, on both paths, with rows of whole 64-bit
    words (N = 2048) and rows that share words (40 values); a dtype too narrow is refused."""
    from hecommon.he.bits import pack_bits, unpack_bits_into

    monkeypatch.setenv("HELORA_THREADS", "2")
    dtype = np.uint32 if bits <= 32 else np.uint64
    arr = rng.integers(0, 1 << bits, size=(40, 2, n)).astype(dtype)
    for mode in ("numpy", "numba"):
        monkeypatch.setenv("HELORA_KERNELS", mode)
        data = pack_bits(arr[:, 1, :], bits)
        assert data == pack_bits(np.ascontiguousarray(arr[:, 1, :]), bits)
        back = np.zeros_like(arr)
        unpack_bits_into(data, bits, back[:, 1, :])
        np.testing.assert_array_equal(back[:, 1, :], arr[:, 1, :])
        assert not back[:, 0, :].any()
    with pytest.raises(ValueError, match="at least"):
        unpack_bits_into(data, bits, np.zeros((40, n), dtype=np.uint16))


def test_quantizing_leaves_its_input_as_it_was(rng):
    """Rows are quantized in place on a copy, never on the caller's array."""
    from hecommon.he.quantize import quantize_rows

    x = rng.standard_normal((300, 70))
    before = x.copy()
    quantize_rows(x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("where", [(0, 0), (129, 255), (200, 17)])
def test_kernel_quantization_refuses_a_value_that_is_not_finite_in_any_tile(where, rng, monkeypatch):
    """Rows are ranged and quantized a tile at a time: a NaN or an infinity in a later tile (rows
    64 … of a 256-column input, a power of 2 whose buffer rows are spread) is refused as in the
    first."""
    from hecommon.he.quantize import quantize_rows

    monkeypatch.setenv("HELORA_KERNELS", "numba")
    x = rng.standard_normal((300, 256)).astype(np.float32)
    quantize_rows(x)  # finite: accepted
    for bad in (np.nan, np.inf, -np.inf):
        x[where] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            quantize_rows(x)


@pytest.mark.parametrize("itemsize", [1, 2, 8])
def test_spread_rows_are_an_odd_count_of_cache_lines_and_long_enough(itemsize):
    """``spread_row``: at least n entries, a whole odd number of 64-byte lines, and the least such."""
    spread_row = kernels.loops().spread_row
    for n in (1, 7, 8, 63, 64, 65, 576, 2047, 2048, 8192):
        m = spread_row(n, itemsize)
        assert m >= n and m * itemsize % 64 == 0 and (m * itemsize // 64) % 2 == 1
        assert m - n < 2 * 64 // itemsize


@pytest.mark.parametrize("cols", [70, 256])
@pytest.mark.parametrize("bits", [2, 8, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_quantization_equals_the_numpy_path(bits, dtype, cols, rng, monkeypatch):
    """Rows of every kind (zeros, constant, all negative, all positive, huge and tiny ranges,
    values on the rounding ties, negative zeros, subnormals) and a per-column scale: the same values, scales and zero points,
    and the same dequantized products, with rows cut across threads (130 rows, 70 columns: not
    multiples of the tiles; 256 columns: buffer rows spread, ``spread_row``)."""
    from hecommon.he.quantize import dequantize_backward, dequantize_forward, quantize_rows

    monkeypatch.setenv("HELORA_THREADS", "2")
    x = rng.standard_normal((130, cols)) * np.exp(rng.uniform(-20, 20, size=(130, 1)))
    x[0] = 0.0
    x[1] = 3.5
    x[2] = -np.abs(x[2])
    x[3] = np.abs(x[3])
    x[4] = np.arange(cols) - (cols - 1) / 2  # ties at every half level
    x[5] = np.abs(x[5])
    x[5, ::3] = -0.0  # negative zeros among positive values: the range's integer keys sort -0.0 below 0.0
    x[6] = rng.standard_normal(cols) * 1e-310  # subnormal (zeros of both signs in float32)
    x = x.astype(dtype)
    col_scale = rng.uniform(1e-3, 2.0, size=cols)
    y = rng.integers(-(1 << 40), 1 << 40, size=(130, 90))
    sums = rng.integers(-(1 << 14), 1 << 14, size=90)
    w_scale = rng.uniform(1e-4, 1.0, size=90)
    for cs in (None, col_scale):
        reference, fast = _paths(monkeypatch, lambda cs=cs: quantize_rows(x, bits, col_scale=cs))
        np.testing.assert_array_equal(fast.values, reference.values)
        assert fast.values.dtype == reference.values.dtype == (np.uint8 if bits <= 8 else np.uint16)
        np.testing.assert_array_equal(fast.scale, reference.scale)
        np.testing.assert_array_equal(fast.zero, reference.zero)
        for fn in (lambda q, out=None: dequantize_forward(y, q, w_scale, sums, out=out),
                   lambda q, out=None: dequantize_backward(y, q, sums, out=out)):
            whole = fn(reference)
            np.testing.assert_array_equal(fn(fast), whole)
            for mode in ("numpy", "numba"):  # into float32 rows of a wider array: the float64 results rounded
                monkeypatch.setenv("HELORA_KERNELS", mode)
                wide = np.zeros((140, 90), dtype=np.float32)
                assert fn(fast, wide[5:135]) is not None
                np.testing.assert_array_equal(wide[5:135], whole.astype(np.float32))
                assert not wide[:5].any() and not wide[135:].any()
                with pytest.raises(ValueError, match="out must be"):
                    fn(fast, np.zeros((130, 90), dtype=np.int64))
    for bad in (np.nan, np.inf, -np.inf):
        x[77, 5] = bad
        for mode in ("numpy", "numba"):
            monkeypatch.setenv("HELORA_KERNELS", mode)
            with pytest.raises(ValueError, match="NaN or infinity"):
                quantize_rows(x, bits)
    with pytest.raises(ValueError, match="col_scale"):
        quantize_rows(x, bits, col_scale=np.ones(3))


@pytest.mark.parametrize("threads", ["1", "2"])
def test_kernel_modulus_switch_equals_the_numpy_path(threads, rng, monkeypatch):
    """Two limbs' residues at 0, p-1 and random, switched to ``out_bits`` and ``hint_out_bits``
    (``EncryptedPartial.switch``): the same values through the compiled pass and through numpy."""
    monkeypatch.setenv("HELORA_THREADS", threads)
    ps = P.DEFAULT
    p = np.asarray(ps.primes, dtype=np.int64)[None, :, None]
    b = (rng.integers(0, 1 << 40, size=(150, ps.limbs, ps.n)) % p).astype(np.uint32)
    b[0] = 0
    b[1] = (p - 1)[0]
    b[2, 0], b[2, 1] = 0, ps.primes[1] - 1
    partial = EncryptedPartial(ps, b[::-1].copy(), b, ps.n)
    for client_a in ClientA:
        reference, fast = _paths(monkeypatch, lambda client_a=client_a: partial.switch(client_a))
        np.testing.assert_array_equal(fast.b, reference.b)
        if client_a is ClientA.NOTHING:
            np.testing.assert_array_equal(fast.a, reference.a)


@pytest.mark.parametrize("p", [P.N2048.primes[0], P.N4096.primes[-1], 12289])
def test_reduction_mod_p_is_exact_at_the_ends_of_its_range(p, rng):
    """``_fused._mod`` (a float64 quotient estimate, then an exact correction) is exact for
    ``|y| < 2^60`` next to every multiple of ``p`` and at the range's ends (Python's ``%`` as truth)."""
    from hecommon.he import _fused

    ys = [0, 1, -1, p - 1, p, p + 1, -p, -p - 1, (1 << 60) - 1, -(1 << 60) + 1]
    for q in rng.integers(-(1 << 60) // p, (1 << 60) // p, 2000).tolist() + [(1 << 60) // p, -((1 << 60) // p)]:
        ys += [q * p + d for d in (-1, 0, 1) if abs(q * p + d) < 1 << 60]
    ys += rng.integers(-(1 << 60) + 1, 1 << 60, 2000).tolist()
    inv_p = 1.0 / p
    got = [int(_fused._mod(np.int64(y), np.int64(p), inv_p)) for y in ys]
    assert got == [y % p for y in ys]


def test_the_first_use_from_several_threads_at_once_loads_the_loops_once(monkeypatch):
    """The loops load on first use; the encryption's threads may all make that first call at once.
    Each used to see the load begun by another, not yet finished, and raise "numba is not installed"."""
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(kernels, "_LOOPS", None)
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.delitem(sys.modules, "hecommon.he._fused", raising=False)  # so that the load takes its time
    barrier = threading.Barrier(4)

    def first(_):
        barrier.wait()
        return kernels.loops()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(first, range(4)))
    assert all(g is got[0] for g in got) and got[0] is not None

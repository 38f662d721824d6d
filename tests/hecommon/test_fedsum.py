"""Encrypted sums of several owners under one shared RLWE secret (``hecommon.he.fedsum``): exact
at the ends of the range for 2–5 owners, refused just past it, and nothing of one owner readable
from the sum."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from hecommon.errors import ConfigError, DecryptionError
from hecommon.he import fft
from hecommon.he.fedsum import (
    _BLOCK_ROWS,
    GROUP,
    SWITCH_BITS,
    SumScheme,
    _a_s,
    _Block,
    _PublicA,
    encode_fixed,
    sum_bits,
)
from hecommon.he.keys import SecretKey
from hecommon.he.params import N2048, N4096, ParamSet
from hecommon.he.ring import negacyclic_reference
from hecommon.he.sampling import aes_ctr, plane_binomial


def _round(owners: int, values: int, fill):
    scheme = SumScheme(owners)
    key, rid = SecretKey.generate(), os.urandom(16)
    secret = key.row_secrets(N2048, rid)
    ms = [fill(i, scheme.per_owner_max) for i in range(owners)]
    seeds = [os.urandom(16) for _ in range(owners)]
    parts = [scheme.encrypt(secret, m, s) for m, s in zip(ms, seeds, strict=True)]
    total = scheme.add(parts)
    return scheme, secret, ms, seeds, parts, total


@pytest.mark.parametrize("owners", [2, 3, 4, 5])
def test_the_sum_is_exact_at_the_ends_of_the_range(owners):
    values = 3 * N2048.n + 17  # several rows, the last one partly padding
    rng = np.random.default_rng(owners)

    def fill(i, top):
        m = rng.integers(-top, top + 1, values)
        m[:50] = top  # every owner at +max: the sum at +K·max
        m[50:100] = -top  # and at −max
        m[100:150] = top if i % 2 else -top  # alternating: the sum near 0
        return m

    scheme, secret, ms, seeds, _, total = _round(owners, values, fill)
    got = scheme.decrypt(secret, total, seeds, values)
    np.testing.assert_array_equal(got, np.sum(ms, axis=0))
    assert got[0] == owners * scheme.per_owner_max <= N2048.max_message


def test_a_value_just_past_the_range_is_refused_not_wrapped():
    scheme = SumScheme(3)
    secret = SecretKey.generate().row_secrets(N2048, os.urandom(16))
    for bad in (scheme.per_owner_max + 1, -scheme.per_owner_max - 1):
        m = np.zeros(10, dtype=np.int64)
        m[4] = bad
        with pytest.raises(ConfigError, match="outside"):
            scheme.encrypt(secret, m, os.urandom(16))
    with pytest.raises(ConfigError, match="integer"):
        scheme.encrypt(secret, np.zeros(4), os.urandom(16))
    with pytest.raises(ConfigError, match="outside"):  # 2^64 − 5 would pass as −5 once cast to int64
        scheme.encrypt(secret, np.array([3, 2**64 - 5], dtype=np.uint64), os.urandom(16))
    with pytest.raises(ConfigError, match="seed"):
        scheme.encrypt(secret, np.zeros(4, dtype=np.int64), b"short")


def test_bits_follow_the_owner_count_and_too_few_lose_the_sum():
    """``sum_bits`` grows with the owners (34 bits up to 6, 38 for 1,024), and the margin is real:
    the same five owners' sum switched three bits lower (a step ``Δ' = 2`` against rounding noise
    of σ ≈ 0.7) decrypts wrong in many coefficients, where ``sum_bits`` decrypts every one."""
    assert [sum_bits(N2048, k) for k in (1, 6, 7, 29, 30, 121, 122, 489, 490, 1024)] == [34, 34, 35, 35, 36, 36,
                                                                                        37, 37, 38, 38]
    assert SumScheme(5).per_owner_max * 5 <= N2048.max_message < (SumScheme(5).per_owner_max + 1) * 5
    assert SumScheme(2, N4096).bits == sum_bits(N4096, 2)
    with pytest.raises(ConfigError):
        sum_bits(N2048, 0)
    values = 4 * N2048.n
    rng = np.random.default_rng(3)
    scheme, secret, ms, seeds, _, total = _round(5, values, lambda i, top: rng.integers(-top, top + 1, values))
    want = np.sum(ms, axis=0)
    np.testing.assert_array_equal(scheme.decrypt(secret, total, seeds, values), want)
    low = SumScheme(5)
    object.__setattr__(low, "bits", scheme.bits - 3)
    parts = [low.encrypt(secret, m, s) for m, s in zip(ms, seeds, strict=True)]
    assert np.mean(low.decrypt(secret, low.add(parts), seeds, values) != want) > 0.05


def test_the_sum_holds_nothing_of_one_owner():
    """The sum is one contribution's size, equal to none of them, and with one owner's seed alone (or
    the wrong round's secret) it decrypts to nothing like that owner's values: only all seeds
    together open it, and then only to the sum."""
    values = 6 * N2048.n  # the correlation below: σ = 1/√values ≈ 0.0064, its bound 0.05 is 7.8σ
    rng = np.random.default_rng(7)
    scheme, secret, ms, seeds, parts, total = _round(3, values, lambda i, top: rng.integers(-1000, 1000, values))
    assert len(total.data) == len(parts[0].data)
    assert all(bytes(total.data) != bytes(p.data) for p in parts)
    alone = scheme.decrypt(secret, total, seeds[:1], values)
    assert np.mean(alone == ms[0]) < 0.01 and np.abs(alone).mean() > 1e6  # uniform noise, not o0's values
    other = SecretKey.generate().row_secrets(N2048, os.urandom(16))
    assert np.mean(scheme.decrypt(other, total, seeds, values) == np.sum(ms, axis=0)) < 0.01
    np.testing.assert_array_equal(scheme.decrypt(secret, total, seeds, values), np.sum(ms, axis=0))
    # one owner's ciphertext without the secret: its values centered look uniform, nothing like m
    b = parts[0].unpack().reshape(-1)[:values].astype(np.float64)
    naive = np.rint((np.where(b >= 2 ** (scheme.bits - 1), b - 2**scheme.bits, b)) / 2 ** (scheme.bits - N2048.msg_bits))
    assert abs(np.corrcoef(naive, ms[0])[0, 1]) < 0.05


def test_parts_of_another_shape_or_width_are_refused():
    scheme = SumScheme(2)
    secret = SecretKey.generate().row_secrets(N2048, os.urandom(16))
    one = scheme.encrypt(secret, np.zeros(10, dtype=np.int64), os.urandom(16))
    two = scheme.encrypt(secret, np.zeros(N2048.n + 1, dtype=np.int64), os.urandom(16))
    with pytest.raises(ConfigError, match="rows"):
        scheme.add([one, two])
    with pytest.raises(ConfigError, match="rows"):
        SumScheme(64).add([one, one])  # 64 owners take more bits
    with pytest.raises(DecryptionError, match="seeds"):
        scheme.decrypt(secret, one, [os.urandom(16)] * 3, 10)


# -- the transform path against the schoolbook formula -----------------------------------------------

def _fixed_noise(key: bytes, eta: int):
    """A fixed noise keystream, seekable by row as ``SumScheme._encrypt_rows`` asks for it."""
    row = N2048.n * eta // 4
    return lambda r0, r1: aes_ctr(key, (r1 - r0) * row, block=r0 * row // 16)


def _plane_noise(raw: np.ndarray, n: int, eta: int) -> np.ndarray:
    """One row's samples as ``sampling.plane_binomial`` defines them, bit by bit: the row's bytes are
    planes of N little-endian w-bit words (16 bits where 16 divides 2·eta, else bytes), sample c's
    bits are word c of plane 0, then of plane 1, …; it counts its first eta bits less its next eta."""
    w = 16 if eta % 8 == 0 else 8
    bits = np.unpackbits(raw.reshape(2 * eta // w, n, w // 8), axis=-1, bitorder="little")  # (plane, c, w)
    fields = bits.transpose(1, 0, 2).reshape(n, 2 * eta).astype(np.int64)
    return fields[:, :eta].sum(axis=1) - fields[:, eta:].sum(axis=1)


@pytest.mark.parametrize("eta", [4, 8, 12, 24, 32])
def test_plane_noise_counts_each_samples_own_bits(eta):
    """``plane_binomial`` against the planes read bit by bit (16-bit words where 16 divides 2·eta,
    else bytes), and the centered binomial's mean 0 and variance eta/2 over 2^16 samples."""
    n, rows = 1024, 64
    raw = aes_ctr(bytes(range(32)), rows * n * eta // 4)
    got = plane_binomial(raw, rows, n, eta)
    for r in (0, rows - 1):
        np.testing.assert_array_equal(got[r], _plane_noise(raw[r * n * eta // 4:(r + 1) * n * eta // 4], n, eta))
    assert abs(got.mean()) < 0.05 and abs(got.var() / (eta / 2) - 1) < 0.05
    assert np.abs(got).max() <= eta


def test_a_noise_wider_than_a_word_is_refused():
    with pytest.raises(ConfigError, match="noise_eta"):
        SumScheme(2, ParamSet("eta36", 2048, N2048.primes, noise_eta=36))


def _schoolbook(scheme: SumScheme, secrets, m_rows: np.ndarray, seed: bytes, noise) -> np.ndarray:
    """``round((e + Δ·m − a^(r mod GROUP)·s_⌊r/GROUP⌋ mod Q) / 2^SWITCH_BITS) mod 2^bits``, row by row,
    with exact int64 negacyclic products."""
    n, q = N2048.n, scheme.q_bits
    a = _PublicA.expand(seed, n, q).astype(np.int64)
    delta = 1 << (q - N2048.msg_bits)
    out = np.empty(m_rows.shape, dtype=np.uint64)
    for r in range(m_rows.shape[0]):
        s = secrets.rows(r // GROUP, r // GROUP + 1)[0]
        e = _plane_noise(noise(r, r + 1), n, N2048.noise_eta)
        y = (e + m_rows[r] * delta - negacyclic_reference(a[r % GROUP], s)) & ((1 << q) - 1)
        out[r] = ((y + (1 << (SWITCH_BITS - 1))) >> SWITCH_BITS) & ((1 << scheme.bits) - 1)
    return out


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("backend", ["fftw", "numpy"])
def test_rows_encrypt_to_the_schoolbook_formula_on_every_path(path, threads, backend, monkeypatch):
    """The compiled loops and the numpy path, on one thread or two, with either FFT, give the
    formula's integers exactly, over rows past a group of secrets, ending in a partial block, with
    messages at ±per_owner_max."""
    if path == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("HELORA_FFT", backend)
    if fft.backend() != backend:
        pytest.skip("pyFFTW not installed")
    monkeypatch.setenv("HELORA_KERNELS", path)
    monkeypatch.setenv("HELORA_THREADS", threads)
    scheme = SumScheme(4)
    secrets = SecretKey.generate().row_secrets(N2048, os.urandom(16))
    rows = GROUP + _BLOCK_ROWS // 2 + 3  # past a group of secrets, ending in a partial block
    rng = np.random.default_rng(11)
    m = rng.integers(-scheme.per_owner_max, scheme.per_owner_max + 1, size=(rows, N2048.n))
    m[0], m[-1] = scheme.per_owner_max, -scheme.per_owner_max
    seed, noise = os.urandom(16), _fixed_noise(os.urandom(32), N2048.noise_eta)
    got = scheme._encrypt_rows(secrets, rows, lambda r0, r1: m[r0:r1], seed, noise).unpack()
    np.testing.assert_array_equal(got, _schoolbook(scheme, secrets, m, seed, noise))


@pytest.mark.parametrize("backend", ["fftw", "numpy"])
@pytest.mark.parametrize("q_bits", [34 + SWITCH_BITS, 50])
def test_the_split_product_is_exact_at_the_ends_of_a(q_bits, backend, monkeypatch):
    """``a`` at ``−Q/2`` and ``Q/2 − 1`` everywhere and a secret of all ones (every product
    coefficient up to ``N·Q/2``): the halves' transforms (FFTW or numpy) round to the exact
    negacyclic product, up to the widest ``Q`` allowed (2^50)."""
    pytest.importorskip("numba")
    monkeypatch.setenv("HELORA_FFT", backend)
    if fft.backend() != backend:
        pytest.skip("pyFFTW not installed")
    n = N2048.n
    twist = np.exp(1j * np.pi * np.arange(n // 2) / n)
    ends = np.zeros((GROUP, n), dtype=np.uint64)
    ends[0::2] = 1 << (q_bits - 1)  # −Q/2 centered
    ends[1::2] = (1 << (q_bits - 1)) - 1
    s = np.ones(n)
    folded = ((s[: n // 2] + 1j * s[n // 2 :]) * twist)[None, :].copy()
    rows = 6  # a^(0) … a^(5), alternating ends
    hi, lo = (np.empty((rows, n // 2), dtype=np.complex128) for _ in range(2))
    for path in ("numpy", "numba"):
        monkeypatch.setenv("HELORA_KERNELS", path)
        a = _PublicA(ends, q_bits, twist)  # the halves' spectra, folded by this path too
        spectra = folded.copy()
        fft.forward(spectra)
        a.times(spectra, 0, hi, lo)
        got = _a_s(a, hi, lo, np.conj(twist))
        centered_a = ends.astype(np.int64) - np.where(ends >= 1 << (q_bits - 1), np.int64(1) << q_bits, 0)
        want = np.stack([negacyclic_reference(centered_a[t], s.astype(np.int64)) for t in range(rows)])
        np.testing.assert_array_equal(got, want)


def test_row_secrets_are_ternary_seekable_and_folded_alike_on_both_paths(monkeypatch):
    pytest.importorskip("numba")
    key = SecretKey.generate()
    secrets = key.row_secrets(N2048, bytes(16))
    rows = secrets.rows(0, 64)
    assert rows.dtype == np.int8 and set(np.unique(rows)) == {-1, 0, 1}
    counts = np.bincount((rows + 1).ravel(), minlength=3) / rows.size
    assert np.abs(counts - 1 / 3).max() < 0.01  # uniform over {−1, 0, 1}
    np.testing.assert_array_equal(secrets.rows(5, 9), rows[5:9])  # any range alone
    assert not np.array_equal(key.row_secrets(N2048, bytes(15) + b"\1").rows(0, 1), rows[:1])  # per round
    n = N2048.n
    twist = np.exp(1j * np.pi * np.arange(n // 2) / n)
    monkeypatch.setenv("HELORA_KERNELS", "numpy")
    slow = secrets.folded(3, 11, twist)
    monkeypatch.setenv("HELORA_KERNELS", "numba")
    np.testing.assert_array_equal(secrets.folded(3, 11, twist), slow)
    with pytest.raises(TypeError, match="not serializable"):
        pickle.dumps(secrets)
    assert "hidden" in repr(secrets)


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_fixed_point_encoding_rounds_and_refuses_past_the_limit(path, monkeypatch):
    if path == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("HELORA_KERNELS", path)
    x = np.array([0.0, 0.49, 0.5, 1.5, -2.5, 99.99, -100.0])
    out = np.empty(x.size, dtype=np.int64)
    assert encode_fixed(x, 1.0, 100, out)
    np.testing.assert_array_equal(out, np.rint(x).astype(np.int64))
    for bad in (100.01, -100.5, np.nan, np.inf):
        assert not encode_fixed(np.append(x, bad), 1.0, 100, np.empty(x.size + 1, dtype=np.int64))


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_a_block_across_a_group_of_secrets_pairs_each_row_with_its_own(path, monkeypatch):
    """Blocks of the encryption are aligned to the groups, but the products take any range: rows
    60 … 69 span secrets 0 and 1 and ``a^(60)`` … ``a^(63)``, ``a^(0)`` … ``a^(5)``; each row's product
    is the schoolbook one of its own secret and polynomial. A block keeps its secrets' transforms
    for the next rows of the same groups (70 … 75 after 60 … 69 spans other groups, 76 … 79 the
    same), and every range is still right."""
    if path == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("HELORA_KERNELS", path)
    n, q = N2048.n, SumScheme(3).q_bits
    secrets = SecretKey.generate().row_secrets(N2048, os.urandom(16))
    seed = os.urandom(16)
    expanded = _PublicA.expand(seed, n, q)
    twist = np.exp(1j * np.pi * np.arange(n // 2) / n)
    a = _PublicA(expanded, q, twist)
    block = _Block(n)
    for r0, r1, groups in ((GROUP - 4, GROUP + 6, (0, 2)), (GROUP + 6, GROUP + 12, (1, 2)),
                           (GROUP + 12, GROUP + 16, (1, 2))):
        got = _a_s(a, *a.products(secrets, r0, r1, twist, block), np.conj(twist)) & ((1 << q) - 1)
        assert block.groups == groups
        for i, r in enumerate(range(r0, r1)):
            s = secrets.rows(r // GROUP, r // GROUP + 1)[0]
            want = negacyclic_reference(expanded[r % GROUP].astype(np.int64), s) & ((1 << q) - 1)
            np.testing.assert_array_equal(got[i], want, err_msg=f"row {r}")



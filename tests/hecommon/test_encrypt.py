"""Encryption, decryption and the server product: exactness, keys, randomness (DESIGN §3, §7)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle  # noqa: F401 - only to show that secrets refuse it
import stat
from pathlib import Path

import numpy as np
import pytest
from hecommon.errors import ConfigError, DecryptionError, ParameterMismatch
from hecommon.he import params as P
from hecommon.he.encrypt import ClientA, EncryptedBatch, EncryptedPartial, _encrypt_with, decrypt, encrypt
from hecommon.he.evaluate import MatrixProduct
from hecommon.he.keys import RequestSecret, SecretKey
from hecommon.he.quantize import integer_matmul
from hecommon.he.sampling import centered_binomial, expand_a, noise_stream, sample_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PSETS = list(P.REGISTRY.values())
VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def secret(ps: P.ParamSet) -> RequestSecret:
    return SecretKey.generate().request_secret(ps, os.urandom(16))


def fresh_partial(ps: P.ParamSet, ct: EncryptedBatch, seed: bytes) -> EncryptedPartial:
    """The input ciphertexts themselves, as a partial (identity product)."""
    return EncryptedPartial(ps, expand_a(seed, ps, ct.width), ct.b, ct.n_tokens, ct.col0)


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
@pytest.mark.parametrize(("tokens", "last"), [(1, False), (1, True), (7, False), (37, True), ("N", False)])
def test_encrypt_decrypt_round_trip(ps, tokens, last, rng):
    """Requests of 1, 7, 37 and N tokens, their window at the ring's start or end: b carries the
    window's T columns only, and decrypts to the message at the extremes of its range."""
    t = ps.n if tokens == "N" else tokens
    col0 = ps.n - t if last else 0
    m = rng.integers(-ps.max_message, ps.max_message + 1, size=(t, 5))
    m[0, :2] = (-ps.max_message, ps.max_message)
    s = secret(ps)
    ct = encrypt(s, m, b"seed-0123456789a", col0=col0)
    assert (ct.n_tokens, ct.col0) == (t, col0) and ct.b.shape == (5, ps.limbs, t)
    np.testing.assert_array_equal(decrypt(s, fresh_partial(ps, ct, b"seed-0123456789a")), m)


def test_a_window_is_those_columns_of_the_whole_ciphertext(rng):
    """Encrypting tokens into coefficients ``col0 …`` under one secret and noise gives exactly those
    columns of the ciphertext of the whole sequence: a session that reveals one window at a time
    sends the same samples as one request of every token (``docs/threat-model.md``)."""
    ps = P.DEFAULT
    s, seed = secret(ps), os.urandom(16)
    m = rng.integers(-127, 128, size=(ps.n, 6))
    noise = sample_noise(ps, (6, ps.n))
    whole = _encrypt_with(s, m, seed, noise)
    for col0, t in ((0, 1), (5, 3), (ps.n // 2 - 1, 2), (ps.n - 1, 1)):
        window = _encrypt_with(s, m[col0 : col0 + t], seed, noise, col0=col0)
        np.testing.assert_array_equal(window.b, whole.b[:, :, col0 : col0 + t])
    with pytest.raises(ValueError, match="col0"):
        encrypt(s, m[:2], seed, col0=ps.n - 1)  # two tokens from the last coefficient: past N


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    d_in=st.integers(1, 96),
    d_out=st.integers(1, 48),
    tokens=st.integers(1, 2048),
    x_bits=st.integers(2, 8),
    backward=st.booleans(),
    switch=st.sampled_from(["mod q", "a and b", "b only"]),
    pset=st.sampled_from([p.name for p in PSETS]),
)
def test_product_equals_clear_integer_product(d_in, d_out, tokens, x_bits, backward, switch, pset):
    """decrypt(product(encrypt(Xq), Wq)) == Xq·Wqᵀ (forward) or Xq·Wq (backward), exactly."""
    ps = P.get(pset)
    gen = np.random.default_rng(d_in * 1000 + d_out)
    w = gen.integers(-127, 128, size=(d_out, d_in)).astype(np.int8)
    matrix = w.T.copy() if backward else w
    t = min(tokens, ps.n)
    x = gen.integers(0, 2**x_bits, size=(t, matrix.shape[1]))
    s = secret(ps)
    seed = os.urandom(16)
    out = MatrixProduct(matrix, ps, seed)(encrypt(s, x, seed))
    if switch == "mod q":
        got = decrypt(s, out)
    elif switch == "a and b":
        got = decrypt(s, out.switch())
    else:  # the client holds the hint (out.a is the same for every request of this layer)
        got = decrypt(s, out.switch(ClientA.HINT), hint=out.a)
    np.testing.assert_array_equal(got, integer_matmul(x, matrix.T))


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
def test_extreme_values_at_d_in_8192(ps):
    """All-255 activations against ±127 weights: |Y| = 255·127·8192 < 2^29 decodes exactly."""
    d_in = 8192
    w = np.full((3, d_in), 127, dtype=np.int8)
    w[1] = -127
    w[2, ::2] = -127
    x = np.full((7, d_in), 255)
    x[3] = 0
    s, seed = secret(ps), os.urandom(16)
    out = MatrixProduct(w, ps, seed)(encrypt(s, x, seed))
    expected = integer_matmul(x, w.T)
    assert expected.max() == 255 * 127 * d_in
    np.testing.assert_array_equal(decrypt(s, out), expected)
    np.testing.assert_array_equal(decrypt(s, out.switch()), expected)
    b_only = out.switch(ClientA.HINT)
    assert b_only.a is None and int(b_only.b.max()) < 2**ps.hint_out_bits
    np.testing.assert_array_equal(decrypt(s, b_only, hint=out.a), expected)
    with pytest.raises(DecryptionError, match="hint"):
        decrypt(s, b_only)
    # the client holds the switched a of an earlier reply: b alone, at out_bits
    full = out.switch()
    held = out.switch(ClientA.SWITCHED)
    assert held.a is None and held.bits == ps.out_bits and np.array_equal(held.b, full.b)
    with pytest.raises(DecryptionError, match="held"):
        decrypt(s, held)
    np.testing.assert_array_equal(decrypt(s, held.with_held_a(full.a)), expected)
    with pytest.raises(DecryptionError, match="rows"):
        held.with_held_a(full.a[:2])
    with pytest.raises(DecryptionError, match="only a result sent without a"):
        b_only.with_held_a(full.a)
    with pytest.raises(ValueError, match="client_a"):
        out.switch("held")  # a string, as the old API took: ClientA members only


@pytest.mark.parametrize("mode", ["numpy", "numba"])
def test_the_products_gemm_is_exact_at_its_bound(mode, monkeypatch):
    """Residues as they come (not centered) up to p-1 against weights of ±128 over a whole GEMM
    chunk of ``MAX_GEMM_TERMS`` inputs: sums up to 2^48, exact in float64, reduced mod p (numpy's
    operations, or the compiled pass) to the integer product mod p."""
    from hecommon.he.params import MAX_GEMM_TERMS

    monkeypatch.setenv("HELORA_KERNELS", mode)

    ps = P.DEFAULT
    k = MAX_GEMM_TERMS
    w = np.full((4, k), 128, dtype=np.int16)
    w[1] = -128
    w[2, ::2] = -128
    w[3, : k // 3] = 0
    p = np.asarray(ps.primes, dtype=np.int64)[None, :, None]
    r = np.broadcast_to(p - 1, (k, ps.limbs, ps.n)).copy()
    r[::7, :, ::5] = 0
    r[3::11, :, 1::3] = p[0] // 2  # the centering's edge
    got = MatrixProduct(w, ps).product_on_device(r.astype(np.uint32))
    expected = np.stack([(w.astype(np.int64) @ r[:, i, :]) % p[0, i, 0] for i in range(ps.limbs)], axis=1)
    assert np.abs(w.astype(np.int64) @ r[:, 0, :]).max() > 2**47
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
def test_row_shards_sum_to_the_whole_product(ps, rng):
    d_in, d_out, cut = 50, 9, 21
    w = rng.integers(-127, 128, size=(d_out, d_in)).astype(np.int8)
    x = rng.integers(0, 256, size=(100, d_in))
    s, seed = secret(ps), os.urandom(16)
    ct = encrypt(s, x, seed)
    left = MatrixProduct(w[:, :cut], ps, seed, input_start=0)(ct.rows(ct.b[:cut]))
    right = MatrixProduct(w[:, cut:], ps, seed, input_start=cut)(ct.rows(ct.b[cut:]))
    total = left + right
    np.testing.assert_array_equal(decrypt(s, total.switch()), integer_matmul(x, w.T))
    # column shards are concatenations of independent outputs
    top = MatrixProduct(w[:4], ps, seed)(ct)
    np.testing.assert_array_equal(decrypt(s, top), integer_matmul(x, w[:4].T))


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
def test_a_batch_encrypted_in_parts_is_the_whole_batch(ps, rng):
    """``encrypt(m[:, lo:hi], start=lo)`` makes ciphertexts ``lo…hi-1`` of the layer's input (rows
    ``lo…`` of its public a): parts encrypted one by one, put side by side, multiply like one batch."""
    d_in, d_out, cuts = 40, 7, (0, 13, 31, 40)
    w = rng.integers(-127, 128, size=(d_out, d_in)).astype(np.int8)
    x = rng.integers(0, 256, size=(30, d_in))
    s, seed = secret(ps), os.urandom(16)
    parts = [encrypt(s, x[:, lo:hi], seed, start=lo) for lo, hi in zip(cuts, cuts[1:], strict=False)]
    whole = EncryptedBatch(ps, np.concatenate([p.b for p in parts]), 30)
    np.testing.assert_array_equal(decrypt(s, MatrixProduct(w, ps, seed)(whole).switch()), integer_matmul(x, w.T))
    wrong = EncryptedBatch(ps, np.concatenate([encrypt(s, x[:, lo:hi], seed).b for lo, hi in zip(cuts, cuts[1:], strict=False)]), 30)
    assert not np.array_equal(decrypt(s, MatrixProduct(w, ps, seed)(wrong).switch()), integer_matmul(x, w.T))


def test_fused_weights_are_one_product(rng):
    """q|k|v as one matrix: one product gives the three outputs side by side."""
    ps = P.DEFAULT
    wq, wk, wv = (rng.integers(-127, 128, size=(r, 32)).astype(np.int8) for r in (32, 8, 8))
    fused = np.concatenate([wq, wk, wv])
    x = rng.integers(0, 256, size=(64, 32))
    s, seed = secret(ps), os.urandom(16)
    y = decrypt(s, MatrixProduct(fused, ps, seed)(encrypt(s, x, seed)).switch())
    np.testing.assert_array_equal(y[:, :32], integer_matmul(x, wq.T))
    np.testing.assert_array_equal(y[:, 40:], integer_matmul(x, wv.T))
    # backward of the fused layer is the sum dQ·Wq + dK·Wk + dV·Wv
    g = rng.integers(0, 256, size=(64, 48))
    dx = decrypt(s, MatrixProduct(fused.T.copy(), ps, seed)(encrypt(s, g, seed)).switch())
    expected = integer_matmul(g[:, :32], wq) + integer_matmul(g[:, 32:40], wk) + integer_matmul(g[:, 40:], wv)
    np.testing.assert_array_equal(dx, expected)


def test_another_key_does_not_decrypt(rng):
    ps = P.DEFAULT
    m = rng.integers(0, 256, size=(200, 3))
    ct = encrypt(secret(ps), m, b"s" * 16)
    wrong = decrypt(secret(ps), fresh_partial(ps, ct, b"s" * 16))
    assert np.mean(wrong == m) < 0.01
    # the wrong decryption is spread over the whole message space, not near m
    assert np.abs(wrong).mean() > ps.max_message / 8


def test_ciphertexts_look_uniform_whatever_the_message(rng):
    """Mean and variance of b's residues are those of uniform residues, for 0 and for 255."""
    ps = P.DEFAULT
    for value in (0, 255):
        m = np.full((ps.n, 8), value)
        ct = encrypt(secret(ps), m, os.urandom(16))
        for i, p in enumerate(ps.primes):
            u = ct.b[:, i, :].astype(np.float64) / p  # uniform on [0,1): mean 1/2, var 1/12
            assert abs(u.mean() - 0.5) < 0.01
            assert abs(u.var() - 1 / 12) < 0.003


def test_same_seed_same_a_and_ranges():
    ps = P.DEFAULT
    a1 = expand_a(b"k" * 16, ps, 6)
    a2 = expand_a(b"k" * 16, ps, 3, start=3)
    np.testing.assert_array_equal(a1[3:], a2)
    assert not np.array_equal(a1, expand_a(b"j" * 16, ps, 6))
    for i, p in enumerate(ps.primes):
        assert a1[:, i].max() < p


@pytest.mark.gpu
def test_same_seed_same_a_on_gpu(rng):  # pragma: no cover - needs a device
    ps = P.DEFAULT
    w = rng.integers(-127, 128, size=(16, 64)).astype(np.int8)
    x = rng.integers(0, 256, size=(30, 64))
    s, seed = secret(ps), os.urandom(16)
    ct = encrypt(s, x, seed)
    cpu = MatrixProduct(w, ps, seed, backend="numpy")(ct)
    gpu = MatrixProduct(w, ps, seed, backend="cupy")(ct)
    np.testing.assert_array_equal(cpu.a, gpu.a)
    np.testing.assert_array_equal(cpu.b, gpu.b)


def test_secret_and_noise_are_not_reproducible_from_the_seed(rng):
    ps = P.DEFAULT
    m = rng.integers(0, 256, size=(10, 2))
    sk = SecretKey.generate()
    nonce = os.urandom(16)
    s = sk.request_secret(ps, nonce)
    # same key, same nonce, same seed and message: the noise still differs
    assert not np.array_equal(encrypt(s, m, b"x" * 16).b, encrypt(s, m, b"x" * 16).b)
    # the per-request secret depends on the nonce and on the master key, not on the seed
    assert not np.array_equal(s.s, sk.request_secret(ps, os.urandom(16)).s)
    assert not np.array_equal(s.s, SecretKey.generate().request_secret(ps, nonce).s)
    np.testing.assert_array_equal(s.s, sk.request_secret(ps, nonce).s)
    counts = np.bincount(s.s.astype(np.int64) + 1, minlength=3)
    assert counts.min() > ps.n / 3 - 5 * np.sqrt(ps.n)


def test_noise_distribution_matches_its_specification():
    ps = P.DEFAULT
    e = sample_noise(ps, (400_000,))
    eta = ps.noise_eta
    assert abs(e.mean()) < 0.02
    assert abs(e.var() - eta / 2) < 0.1
    assert e.max() <= eta and e.min() >= -eta
    # the binomial shape: P(0) = C(2eta, eta) / 4^eta
    from math import comb

    assert abs(np.mean(e == 0) - comb(2 * eta, eta) / 4**eta) < 0.005
    with pytest.raises(ValueError):
        centered_binomial(noise_stream(8), 1, 6)


@pytest.mark.parametrize("eta", [32, 36, 64])
def test_noise_keeps_its_distribution_on_both_sides_of_the_planes_limit(eta):
    """``sample_noise`` reads planes up to eta = 32 and ``centered_binomial``'s bytes above: the
    same distribution on both sides of the switch (mean 0, variance eta/2, within ±eta)."""
    ps = dataclasses.replace(P.DEFAULT, noise_eta=eta)
    e = sample_noise(ps, (100, 2000))
    assert e.shape == (100, 2000) and e.dtype == np.int64
    assert abs(e.mean()) < 0.05
    assert abs(e.var() / (eta / 2) - 1) < 0.03
    assert e.max() <= eta and e.min() >= -eta


def test_aes_ctr_is_the_standard_keystream_on_both_paths(monkeypatch):
    """OpenSSL through ctypes (the default) and ``cryptography`` (the fallback) give the same
    AES-256-CTR keystream at any offset: lengths around the block and the 1 MiB piece, a counter
    that carries across 64 bits and one that wraps at 2^128; and the first block is NIST SP
    800-38A's F.5.5 (CTR-AES256)."""
    import hecommon.he.sampling as sampling

    assert sampling._libcrypto() is not None  # the machines we run on have libcrypto
    key = os.urandom(32)
    for nbytes, block in [(0, 0), (1, 0), (17, 5), (16, (1 << 64) - 1), (100, (1 << 128) - 2), ((1 << 20) + 33, 9)]:
        fast = sampling.aes_ctr(key, nbytes, block)
        monkeypatch.setenv("HELORA_AES", "cryptography")
        slow = sampling.aes_ctr(key, nbytes, block)
        monkeypatch.delenv("HELORA_AES")
        assert fast.dtype == slow.dtype == np.uint8 and fast.tobytes() == slow.tobytes()
    nist_key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    stream = sampling.aes_ctr(nist_key, 16, int("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff", 16))
    assert bytes(a ^ b for a, b in zip(stream.tobytes(), plain, strict=True)).hex() == "601ec313775789a5b7a7f504bbf3d228"
    with pytest.raises(ValueError, match="128-bit"):
        sampling.aes_ctr(key, 16, 1 << 128)


def test_known_answer_vector():
    """Fixed secret, message, seed and noise: the ciphertext bytes never change (tests/vectors)."""
    vec = json.loads((VECTORS / "encrypt_kat_v1.json").read_text())
    ps = P.get(vec["pset"])
    s = RequestSecret(ps, np.array(vec["secret"], dtype=np.int8))
    m = np.array(vec["message"], dtype=np.int64)
    noise = np.array(vec["noise"], dtype=np.int64)[:, None, :].repeat(ps.limbs, axis=1)
    ct = _encrypt_with(s, m, bytes.fromhex(vec["a_seed"]), noise)
    assert hashlib.sha256(ct.b.astype("<u4").tobytes()).hexdigest() == vec["sha256_b"]
    np.testing.assert_array_equal(decrypt(s, fresh_partial(ps, ct, bytes.fromhex(vec["a_seed"]))), m)


def test_message_and_shape_errors(rng):
    ps = P.DEFAULT
    s = secret(ps)
    with pytest.raises(ValueError, match="exceed"):
        encrypt(s, np.full((2, 2), ps.max_message + 1), b"s" * 16)
    with pytest.raises(ValueError, match="T <="):
        encrypt(s, np.zeros((ps.n + 1, 2), dtype=np.int64), b"s" * 16)
    with pytest.raises(TypeError):
        encrypt(s, np.zeros((2, 2)), b"s" * 16)
    ct = encrypt(s, np.zeros((2, 3), dtype=np.int64), b"s" * 16)
    with pytest.raises(ParameterMismatch, match="3 ciphertexts"):
        MatrixProduct(np.ones((2, 4), dtype=np.int8), ps, b"s" * 16)(ct)
    with pytest.raises(ConfigError):
        MatrixProduct(np.ones((2, 4)), ps, b"s" * 16)


def test_secret_key_file_and_serialization(tmp_path):
    sk = SecretKey.generate()
    path = tmp_path / "owner.key"
    sk.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SecretKey.load(path)
    assert loaded.fingerprint() == sk.fingerprint()
    with pytest.raises(FileExistsError):
        sk.save(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        SecretKey.load(path)
    with pytest.raises(TypeError):
        pickle.dumps(sk)
    with pytest.raises(TypeError):
        pickle.dumps(sk.request_secret(P.DEFAULT, os.urandom(16)))
    assert "hidden" in repr(sk.request_secret(P.DEFAULT, os.urandom(16)))
    assert sk.fingerprint() in repr(sk)


@pytest.mark.parametrize("n", [2048, 4096])
def test_fft_products_equal_the_schoolbook_product(n, rng):
    """The client's float64 FFT products are exact at the extremes of their input ranges."""
    from hecommon.he.ring import SmallSecretMultiplier, negacyclic_reference

    s = rng.integers(-1, 2, n)
    mul = SmallSecretMultiplier(s)
    a = rng.integers(-(2**26) + 1, 2**26, size=(3, n))
    a[0], a[1] = 2**26 - 1, -(2**26) + 1
    np.testing.assert_array_equal(mul.mul(a), np.stack([negacyclic_reference(x, s) for x in a]))
    wide = rng.integers(-(2**37), 2**37, size=(2, n))
    got = mul.product_wide(wide.astype(np.float64)).astype(np.int64)
    np.testing.assert_array_equal(got, np.stack([negacyclic_reference(x, s) for x in wide]))


def test_pieces_of_a_product_add_up_to_the_whole_product(rng, monkeypatch):
    """``MatrixProduct.piece`` of parts that cover the inputs once, in any order and across the
    GEMM's chunk boundaries (``MAX_GEMM_TERMS``, made small here), adds up mod q to the whole
    product: each part of a request is computed alone (the direct path), and the pieces are added
    by the aggregator or, decrypted, by the client. The same for the hint of each part's rows."""
    from hecommon.errors import ParameterMismatch
    from hecommon.he import evaluate
    from hecommon.he.encrypt import EncryptedBatch

    monkeypatch.setattr(evaluate, "MAX_GEMM_TERMS", 16)
    params = P.DEFAULT
    primes = np.asarray(params.primes, dtype=np.uint64)[:, None]
    m = rng.integers(-127, 128, size=(5, 50))
    seed = os.urandom(16)
    product = evaluate.MatrixProduct(m, params, seed)
    assert len(product._chunks) == 4
    b = rng.integers(0, min(params.primes), size=(50, params.limbs, params.n), dtype=np.uint32)
    whole = product.product_on_device(b)
    total, hint = np.zeros(whole.shape, np.uint64), np.zeros(whole.shape, np.uint64)
    for lo, hi in ((30, 50), (0, 7), (7, 30)):
        total = (total + product.piece(b[lo:hi], lo)) % primes
        hint = (hint + product.build_hint(seed, (lo, hi))) % primes
    np.testing.assert_array_equal(total, whole)
    np.testing.assert_array_equal(hint, product.hint)
    np.testing.assert_array_equal(product.piece(b, 0), whole)  # one piece: the whole product
    with pytest.raises(ParameterMismatch, match="outside"):
        product.piece(b[:5], 46)
    with pytest.raises(ParameterMismatch, match="batch has"):  # the whole-input path checks its width
        list(product.row_blocks(EncryptedBatch(params, b[:5], params.n), [(0, 5)]))

"""The int8 digit method of the GPU backend: its algebra on the CPU, its kernels on a device."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hecommon.errors import ConfigError
from hecommon.he import params as P
from hecommon.he.encrypt import decrypt, encrypt
from hecommon.he.evaluate import MatrixProduct, resolve_gemm
from hecommon.he.gpu import (
    DIGITS,
    MAX_INT8_TERMS,
    combine_digits,
    digit_product_reference,
    int8_shape_ok,
    split_digits,
)
from hecommon.he.keys import SecretKey
from hecommon.he.sampling import expand_a
from hypothesis import given, settings
from hypothesis import strategies as st


def secret(ps):
    return SecretKey.generate().request_secret(ps, os.urandom(16))


def test_split_digits_rebuilds_every_residue(rng):
    r = rng.integers(0, 2**27, size=(5, 24), dtype=np.uint32)
    r[0, :3] = [0, 2**27 - 1, 2**21]
    d = split_digits(r).astype(np.int64)
    assert d.shape == (5, DIGITS * 24) and d.min() >= 0 and d.max() <= 127
    rebuilt = sum(d[:, k * 24 : (k + 1) * 24] << (7 * k) for k in range(DIGITS))
    np.testing.assert_array_equal(rebuilt, r.astype(np.int64))


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 40), d_out=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       pset=st.sampled_from(sorted(P.REGISTRY)))
def test_digit_method_equals_the_float64_product(d_in, d_out, seed, pset):
    ps = P.get(pset)
    gen = np.random.default_rng(seed)
    m = gen.integers(-128, 128, size=(d_out, d_in)).astype(np.int8)
    residues = np.stack([gen.integers(0, p, size=(d_in, ps.n)) for p in ps.primes], axis=1).astype(np.uint32)
    layer = MatrixProduct(m, ps, os.urandom(16), backend="numpy")
    np.testing.assert_array_equal(digit_product_reference(m, residues, ps.primes),
                                  layer.product_on_device(residues))


def _int32_planes(m: np.ndarray, residues: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The digit GEMM as the GPU does it (int32 accumulators, wrapping) and exactly (int64)."""
    d_in, limbs, n = residues.shape
    digits = split_digits(residues.reshape(d_in, limbs * n))
    return m.astype(np.int32) @ digits.astype(np.int32), m.astype(np.int64) @ digits.astype(np.int64)


def test_digit_planes_fit_int32_at_the_longest_allowed_sum():
    """All residues p-1 (digits up to 127) against +127 and -128 weights, d_in = MAX_INT8_TERMS:
    every int32 accumulator is exact; one step past the limit it is not (so the check can fail)."""
    ps = P.DEFAULT
    for d_in, exact in [(MAX_INT8_TERMS, True), (MAX_INT8_TERMS + 2**13, False)]:
        m = np.full((2, d_in), 127, dtype=np.int8)
        m[1] = -128
        residues = np.stack([np.full((d_in, 2), p - 1) for p in ps.primes], axis=1).astype(np.uint32)
        y32, y64 = _int32_planes(m, residues)
        assert np.array_equal(y32.astype(np.int64), y64) is exact
        if exact:
            got = combine_digits(y32, ps.primes, 2)
            for limb, p in enumerate(ps.primes):
                assert got[0, limb, 0] == (127 * d_in * (p - 1)) % p
                assert got[1, limb, 0] == (-128 * d_in * (p - 1)) % p


def test_combine_digits_is_exact_for_the_largest_int32_planes():
    ps = P.DEFAULT
    y = np.full((1, DIGITS * ps.limbs * 8), 2**31 - 1, dtype=np.int64)
    got = combine_digits(y, ps.primes, 8)
    for limb, p in enumerate(ps.primes):
        want = sum((2**31 - 1) * pow(2, 7 * k, p) for k in range(DIGITS)) % p
        assert (got[0, limb] == want).all()


def test_gemm_choice_and_errors():
    assert resolve_gemm("numpy", "auto", 64, 64, 16384) == "float64"
    with pytest.raises(ConfigError, match="needs the cupy backend"):
        resolve_gemm("numpy", "int8", 64, 64, 16384)
    with pytest.raises(ConfigError, match="is not 'auto'"):
        resolve_gemm("numpy", "fp16", 64, 64, 16384)
    assert int8_shape_ok(576, 576, 16384)
    assert not int8_shape_ok(16, 576, 16384)  # too few rows for cuBLASLt
    assert not int8_shape_ok(576, 572, 16384)  # inner size not a multiple of 8
    assert not int8_shape_ok(64, 2**17 + 8, 16384)  # int32 accumulator would overflow


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["int8", "float64"])
@pytest.mark.parametrize("pset", sorted(P.REGISTRY))
def test_gpu_product_is_bit_identical_to_numpy(rng, gemm, pset):  # pragma: no cover - needs a device
    ps = P.get(pset)
    seed = os.urandom(16)
    for d_in, d_out in [(64, 32), (576, 192), (1536, 576), (8192, 24)]:
        m = rng.integers(-127, 128, size=(d_out, d_in)).astype(np.int8)
        m[0, :] = 127
        x = rng.integers(0, 256, size=(ps.n, d_in))
        x[:, :8] = 255
        s = secret(ps)
        ct = encrypt(s, x, seed)
        cpu = MatrixProduct(m, ps, seed, backend="numpy")(ct)
        layer = MatrixProduct(m, ps, seed, backend="cupy", gemm=gemm)
        assert layer.gemm == gemm
        gpu = layer(ct)
        np.testing.assert_array_equal(cpu.a, gpu.a)
        np.testing.assert_array_equal(cpu.b, gpu.b)
        y = decrypt(s, gpu)
        np.testing.assert_array_equal(y, x.astype(np.int64) @ m.T.astype(np.int64))


@pytest.mark.gpu
def test_gpu_int8_hint_equals_reference(rng):  # pragma: no cover - needs a device
    ps = P.DEFAULT
    seed = os.urandom(16)
    m = rng.integers(-128, 128, size=(40, 256)).astype(np.int8)
    layer = MatrixProduct(m, ps, seed, backend="cupy", gemm="int8")
    np.testing.assert_array_equal(layer.hint, digit_product_reference(m, expand_a(seed, ps, 256), ps.primes))


@pytest.mark.gpu
def test_device_memory_metric_counts_the_int8_weights(rng):  # pragma: no cover - needs a device
    from helora_evaluator.worker import device_bytes

    before = device_bytes()
    m = rng.integers(-127, 128, size=(1024, 2048)).astype(np.int8)
    layer = MatrixProduct(m, P.DEFAULT, os.urandom(16), backend="cupy", gemm="int8")
    assert device_bytes() - before >= m.nbytes
    del layer

"""Quantization (DESIGN §2): per-token asymmetric activations, per-channel weights."""

from __future__ import annotations

import numpy as np
import pytest
from hecommon.errors import ConfigError
from hecommon.he.quantize import (
    dequantize_backward,
    dequantize_forward,
    fold_output_scale,
    integer_matmul,
    quantize_rows,
    quantize_weight,
    quantized_matmul,
    quantized_matmul_backward,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 40), bits=st.integers(2, 16), seed=st.integers(0, 999))
def test_rows_round_trip_within_half_a_step(rows, cols, bits, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)) * 3
    q = quantize_rows(x, bits)
    assert q.values.min() >= 0 and q.values.max() <= 2**bits - 1
    back = (q.values - q.zero[:, None]) * q.scale[:, None]
    assert np.all(np.abs(back - x) <= q.scale[:, None] / 2 + 1e-12)


def test_constant_and_zero_rows_are_exact():
    x = np.array([[0.0, 0.0, 0.0], [2.5, 2.5, 2.5], [-1.0, -1.0, -1.0]])
    q = quantize_rows(x, 8)
    np.testing.assert_allclose((q.values - q.zero[:, None]) * q.scale[:, None], x)


def test_weights_are_symmetric_per_channel(rng):
    w = rng.standard_normal((6, 10))
    wq = quantize_weight(w, 8)
    assert wq.values.dtype == np.int8 and np.abs(wq.values).max() == 127
    np.testing.assert_allclose(wq.values * wq.scale[:, None], w, atol=wq.scale.max() / 2 + 1e-12)
    np.testing.assert_array_equal(wq.row_sums, wq.values.sum(1))
    np.testing.assert_array_equal(wq.col_sums, wq.values.sum(0))


def test_zero_point_correction_gives_the_product(rng):
    x = rng.standard_normal((16, 64))
    w = rng.standard_normal((24, 64))
    wq = quantize_weight(w)
    y = quantized_matmul(x, wq)
    # the quantized product is close to the float product (8-bit × 8-bit)
    assert np.abs(y - x @ w.T).max() < 0.05 * np.abs(x @ w.T).max()
    # and equals the float product of the dequantized operands exactly (up to float64 rounding)
    xq = quantize_rows(x)
    deq_x = (xq.values - xq.zero[:, None]) * xq.scale[:, None]
    np.testing.assert_allclose(y, deq_x @ (wq.values * wq.scale[:, None]).T, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(y, dequantize_forward(integer_matmul(xq.values, wq.values.T), xq, wq.scale, wq.row_sums))


def test_backward_folds_the_weight_scale(rng):
    dy = rng.standard_normal((16, 24))
    w = rng.standard_normal((24, 64))
    wq = quantize_weight(w)
    dx = quantized_matmul_backward(dy, wq)
    assert np.abs(dx - dy @ w).max() < 0.05 * np.abs(dy @ w).max()
    g = quantize_rows(fold_output_scale(dy, wq.scale))
    np.testing.assert_array_equal(dx, dequantize_backward(integer_matmul(g.values, wq.values), g, wq.col_sums))


def test_bad_inputs():
    with pytest.raises(ConfigError, match="bits"):
        quantize_rows(np.zeros((2, 2)), 1)
    with pytest.raises(ConfigError, match="bits"):
        quantize_weight(np.zeros((2, 2)), 9)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rows(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(np.zeros(3))
    with pytest.raises(ValueError, match="2\\^53"):
        integer_matmul(np.full((1, 2**14), 2**20), np.full((2**14, 1), 2**20))

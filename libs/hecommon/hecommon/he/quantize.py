"""HE-compatible quantization (DESIGN §2).

- Activations and output-gradients: dynamic, per row (token), asymmetric, unsigned ``bits``.
- Weights: per output channel, symmetric, signed ``bits`` (values in ±(2^(bits-1) - 1)).

The server multiplies the integer operands; the client applies the zero-point correction with
the public per-channel sums, then the scales. ``quantized_matmul`` and
``quantized_matmul_backward`` are the clear reference that the encrypted path must match bit
for bit: both paths call the same ``quantize_rows`` and ``dequantize_*`` functions and differ
only in how the integer product is obtained.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ConfigError
from . import kernels, parallel


def _check_bits(bits: int, lo: int = 2, hi: int = 16) -> None:
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"bits: {bits!r} outside {lo}..{hi}")


@dataclass(frozen=True)
class QuantizedTensor:
    """Rows quantized independently: ``x[t] ≈ scale[t] · (values[t] - zero[t])``."""

    values: np.ndarray  # (rows, cols) in [0, 2^bits - 1]: uint8 (bits <= 8) or uint16
    scale: np.ndarray  # (rows,) float64, > 0
    zero: np.ndarray  # (rows,) int64 in [0, 2^bits - 1]
    bits: int

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.scale.shape != (self.values.shape[0],):
            raise ValueError("QuantizedTensor: values (rows, cols) and scale (rows,) expected")
        if self.zero.shape != self.scale.shape:
            raise ValueError("QuantizedTensor: zero must have one entry per row")


@dataclass(frozen=True)
class QuantizedWeight:
    """Per-output-channel weights: ``w[o] ≈ scale[o] · values[o]``; sums are public."""

    values: np.ndarray  # (d_out, d_in) int8 (bits <= 8) or int16
    scale: np.ndarray  # (d_out,) float64
    bits: int

    @cached_property
    def row_sums(self) -> np.ndarray:
        """``Σ_j values[o, j]``: the forward zero-point correction, per output channel."""
        return self.values.sum(axis=1, dtype=np.int64)

    @cached_property
    def col_sums(self) -> np.ndarray:
        """``Σ_o values[o, j]``: the backward zero-point correction, per input channel."""
        return self.values.sum(axis=0, dtype=np.int64)

    @cached_property
    def as_float64(self) -> np.ndarray:
        """The integer weights as float64, converted once (the clear reference GEMMs use it)."""
        return self.values.astype(np.float64)


def quantize_rows(x: np.ndarray, bits: int = 8, col_scale: np.ndarray | None = None) -> QuantizedTensor:
    """Asymmetric unsigned quantization of each row of ``x`` (rows, cols), or of
    ``fold_output_scale(x, col_scale)`` (the backward's gradient, scaled per column first).

    With the compiled loops (``hecommon.he.kernels``, the client) one loop takes each row's range
    and then its values while the row is in cache, and writes them transposed: ``values`` is then the
    (rows, cols) view of a (cols, rows) array, whose rows (one column of ``x`` each) are what
    ``encrypt`` reads. The values are the numpy path's bit for bit."""
    _check_bits(bits)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_rows expects a 2-D array, got shape {x.shape}")
    if col_scale is not None and np.shape(col_scale) != (x.shape[1],):
        raise ValueError(f"quantize_rows: col_scale must have one entry per column ({x.shape[1]})")
    levels = (1 << bits) - 1
    dtype = np.uint8 if bits <= 8 else np.uint16  # the narrowest: a pass over it is cheaper
    scale = np.empty(x.shape[0], dtype=np.float64)
    zero = np.empty(x.shape[0], dtype=np.int64)
    if kernels.enabled():
        loop = kernels.loops().quantize_rows
        cs = np.ones(x.shape[1]) if col_scale is None else np.asarray(col_scale, dtype=np.float64)
        values_t = np.empty(x.shape[::-1], dtype=dtype)
        ranges = parallel.chunks(x.shape[0], 64)
        if not all(parallel.map_ranges(lambda r0, r1: loop(x, cs, levels, r0, r1, values_t, scale, zero), ranges)):
            raise ValueError("quantize_rows: input holds NaN or infinity")
        return QuantizedTensor(values=values_t.T, scale=scale, zero=zero, bits=bits)
    if col_scale is not None:
        x = fold_output_scale(x, col_scale)
    values = np.empty(x.shape, dtype=dtype)

    def rows(r0: int, r1: int) -> bool:  # rows are independent: ranges of them in parallel
        xr = np.array(x[r0:r1], dtype=np.float64)  # a copy: worked on in place below
        if not np.isfinite(xr).all():
            return False
        lo = np.minimum(xr.min(axis=1, initial=0.0), 0.0)
        hi = np.maximum(xr.max(axis=1, initial=0.0), 0.0)
        s = (hi - lo) / levels
        s = np.where(s > 0, s, 1.0)
        z = np.clip(np.rint(-lo / s), 0, levels).astype(np.int64)
        xr /= s[:, None]
        np.rint(xr, out=xr)
        xr += z[:, None]
        np.clip(xr, 0, levels, out=xr)
        values[r0:r1] = xr
        scale[r0:r1], zero[r0:r1] = s, z
        return True

    if not all(parallel.map_ranges(rows, parallel.chunks(x.shape[0], 64))):
        raise ValueError("quantize_rows: input holds NaN or infinity")
    return QuantizedTensor(values=values, scale=scale, zero=zero, bits=bits)


def quantize_weight(w: np.ndarray, bits: int = 8) -> QuantizedWeight:
    """Symmetric per-output-channel quantization of ``w`` (d_out, d_in)."""
    _check_bits(bits, 2, 8)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight expects a 2-D matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quantize_weight: weight holds NaN or infinity")
    top = (1 << (bits - 1)) - 1
    scale = np.abs(w).max(axis=1, initial=0.0) / top
    scale = np.where(scale > 0, scale, 1.0)
    values = np.clip(np.rint(w / scale[:, None]), -top, top).astype(np.int8)
    return QuantizedWeight(values=values, scale=scale, bits=bits)


def integer_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer ``a @ b`` through a float64 GEMM (inner products must stay below 2^53)."""
    bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * a.shape[-1]
    if bound >= 2.0**53:
        raise ValueError("integer_matmul: products may exceed 2^53, not exact in float64")
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def dequantize_forward(y_int: np.ndarray, x: QuantizedTensor, w_scale: np.ndarray, row_sums: np.ndarray,
                       out: np.ndarray | None = None) -> np.ndarray:
    """``Y = s_t · s_o · (Y_int - z_t · Σ_j q_w[o, j])`` for ``Y_int = q_x · q_wᵀ``.

    Only public values of the weight are needed (its scales and row sums, from the manifest).
    ``out``: an array of Y's shape (float32: the float64 results rounded) to write into.
    """
    return _dequantize(y_int, x, row_sums, w_scale, out)


def fold_output_scale(dy: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """Backward: fold ``s_o`` into the gradient, so the server multiplies by integers only."""
    dy = np.asarray(dy)
    out = np.empty(dy.shape, dtype=np.float64)

    def rows(r0: int, r1: int) -> None:
        np.multiply(dy[r0:r1], w_scale[None, :], out=out[r0:r1], dtype=np.float64)

    parallel.map_rows(rows, dy.shape[0], minimum=64, row_size=dy.shape[1])
    return out


def dequantize_backward(z_int: np.ndarray, g: QuantizedTensor, col_sums: np.ndarray,
                        out: np.ndarray | None = None) -> np.ndarray:
    """``dX = s_t · (Z_int - z_t · Σ_o q_w[o, j])`` for ``Z_int = q_g · q_w`` (``out``: as forward)."""
    return _dequantize(z_int, g, col_sums, None, out)


def _dequantize(y: np.ndarray, q: QuantizedTensor, sums: np.ndarray, w_scale: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """``(y - z ⊗ sums) · s_t`` (times ``w_scale`` per column if given), by ranges of rows in
    parallel (in one compiled loop where ``hecommon.he.kernels`` runs: the same float64 products),
    into ``out`` if given (float64 or float32, y's shape)."""
    if out is not None and (out.shape != y.shape or out.dtype not in (np.float32, np.float64)):
        raise ValueError(f"dequantize: out must be a {y.shape} float32 or float64 array")
    if out is not None and out.dtype != np.float64 and not kernels.enabled():  # rounded once, from float64
        out[...] = _dequantize(y, q, sums, w_scale)
        return out
    out = np.empty(y.shape, dtype=np.float64) if out is None else out
    if kernels.enabled():
        loop = kernels.loops().dequantize
        cs = np.ones(y.shape[1]) if w_scale is None else np.asarray(w_scale, dtype=np.float64)
        sums = np.asarray(sums, dtype=np.int64)
        parallel.map_rows(lambda r0, r1: loop(y, q.zero, sums, q.scale, cs, r0, r1, out), y.shape[0], minimum=64,
                          row_size=y.shape[1])
        return out

    def rows(r0: int, r1: int) -> None:
        o = out[r0:r1]
        np.subtract(y[r0:r1], np.outer(q.zero[r0:r1], sums), out=o)
        o *= q.scale[r0:r1, None]
        if w_scale is not None:
            o *= w_scale[None, :]

    parallel.map_rows(rows, y.shape[0], minimum=64, row_size=y.shape[1])
    return out


def _exact_product(a: np.ndarray, b_f64: np.ndarray, bits: int) -> np.ndarray:
    """Integer ``a @ b`` for ``a`` < 2^bits (bits <= 16) and 8-bit ``b``: below 2^53, exact."""
    assert bits <= 16 and a.shape[-1] < 2**29, "product could exceed 2^53"
    return (a.astype(np.float64) @ b_f64).astype(np.int64)


def quantized_matmul(x: np.ndarray, w: QuantizedWeight, bits: int = 8) -> np.ndarray:
    """Clear reference of the forward product ``x · wᵀ`` in the quantized domain."""
    xq = quantize_rows(x, bits)
    return dequantize_forward(_exact_product(xq.values, w.as_float64.T, bits), xq, w.scale, w.row_sums)


def quantized_matmul_backward(dy: np.ndarray, w: QuantizedWeight, bits: int = 8) -> np.ndarray:
    """Clear reference of the backward product ``dy · w`` in the quantized domain."""
    gq = quantize_rows(dy, bits, col_scale=w.scale)
    return dequantize_backward(_exact_product(gq.values, w.as_float64, bits), gq, w.col_sums)

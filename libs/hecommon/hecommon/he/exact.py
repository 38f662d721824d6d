"""Exact or refused (DESIGN §3): how wide a sum of weighted ciphertexts can be and still decode.

An output ciphertext of a layer holds ``Y = Σ_j W[o, j]·X[t, j]`` over the layer's *summed width*:
``d_in`` forward, the fused ``d_out`` backward (``dQ·Wq + dK·Wk + dV·Wv`` sums over all three).
It decodes exactly while

- ``|Y| < 2^(msg_bits-1)``: with unsigned ``x_bits`` activations (at most ``2^x_bits - 1``) and
  signed ``w_bits`` weights (at most ``2^(w_bits-1) - 1``), at most
  ``⌊max_message / (x_max·w_max)⌋`` terms (16,577 at 8 × 8 bits on ``n2048-q54``);
- the noise of the sum stays inside the budget its parameter set was checked for: the output
  moduli (``out_bits``, ``hint_out_bits``) are chosen for at most ``MAX_GEMM_TERMS`` = 2^14
  weighted ciphertexts (``ParamSet._smallest_exact_out_bits``).

``exact_terms`` is the smaller of the two, the one bound every party computes. A wider sum is
split into *sub-sums* of at most that many terms, in order of the summed index: sub-sum ``s``
covers indices ``s·terms …``. The server returns each sub-sum as its own ciphertext (output ``o``
of sub-sum ``s`` is row ``o·k + s``, so a shard of outputs stays one contiguous range of rows),
and the client adds the ``k`` decrypted integers, which is exact. The cost is ``k`` times the
reply's rows for that layer and direction (``benchmarks/exactness.py``); the float64 product cuts
its GEMMs at the sub-sums' boundaries, the int8 GPU product multiplies the ``spread`` matrix. More
than ``MAX_SUB_SUMS`` sub-sums, or bits outside 1..16 (inputs) and 1..8 (weights), are refused.
"""

from __future__ import annotations

import numpy as np

from ..errors import InexactLayer
from .params import MAX_GEMM_TERMS, ParamSet

#: The most sub-sums one layer and direction may be split into (the reply grows k-fold).
MAX_SUB_SUMS = 8


def exact_terms(params: ParamSet, x_bits: int = 8, w_bits: int = 8) -> int:
    """The widest sum that decodes exactly: terms of ``x_bits`` unsigned × ``w_bits`` signed values
    (at most 8: the noise budget and the server's product assume |w| <= 127)."""
    if not 1 <= w_bits <= 8 or not 1 <= x_bits <= 16:
        raise InexactLayer(f"exact_terms: {x_bits}-bit inputs and {w_bits}-bit weights are not supported "
                           "(inputs 1..16 bits, weights 1..8)")
    x_max = (1 << x_bits) - 1
    w_max = (1 << (w_bits - 1)) - 1
    return min(params.max_message // (x_max * max(w_max, 1)), MAX_GEMM_TERMS)


def sub_sums(layer: str, direction: str, width: int, terms: int) -> int:
    """How many sub-sums a sum of ``width`` terms needs at ``terms`` per sub-sum (1: none), or
    ``InexactLayer`` naming the layer, its width and the bound."""
    k = -(-width // terms) if terms >= 1 else 0
    if not 1 <= k <= MAX_SUB_SUMS:
        raise InexactLayer(
            f"layer {layer} {direction}: a sum of {width} terms cannot be made exact: the bound is "
            f"{terms} terms per sum (from the quantization bits and the parameter set), and at most "
            f"{MAX_SUB_SUMS} sub-sums are allowed")
    return k


def spread(matrix: np.ndarray, start: int, terms: int, k: int) -> np.ndarray:
    """The (d_out·k, d_in) matrix whose row ``o·k + s`` is row ``o`` of ``matrix`` restricted to the
    summed indices of sub-sum ``s`` (zeros elsewhere); ``matrix``'s columns are the summed indices
    ``start …`` of the layer. ``k`` = 1 returns ``matrix`` itself."""
    if k == 1:
        return matrix
    d_out, d_in = matrix.shape
    block = (start + np.arange(d_in)) // terms  # (d_in,) sub-sum of each column, < k (MatrixProduct checks)
    out = np.zeros((d_out, k, d_in), dtype=matrix.dtype)
    for s in range(k):
        cols = block == s
        out[:, s, cols] = matrix[:, cols]
    return out.reshape(d_out * k, d_in)


def fold(y: np.ndarray, k: int) -> np.ndarray:
    """(T, width·k) decrypted sub-sums → (T, width) sums: exact integer adds."""
    if k == 1:
        return y
    return y.reshape(y.shape[0], -1, k).sum(axis=2)

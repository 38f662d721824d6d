"""The server's product on int8 tensor cores (DESIGN §3, GPU backend).

A residue ``r < p < 2^27`` splits into four 7-bit digits, ``r = Σ_k d_k·2^{7k}`` with
``d_k ∈ [0, 127]``, each of which fits in int8. Then ``M·r = Σ_k 2^{7k}·(M·d_k)`` and every
``M·d_k`` is an int8 GEMM whose int32 accumulator is exact while ``d_in·127·127 < 2^31``
(``d_in ≤ 2^17``). The four digit planes sit side by side in one matrix ``(d_in, 4·L·N)`` (stored
column-major, the layout cuBLASLt's int8 kernels want) so the layer is a single tensor-core GEMM, and one fused kernel recombines the planes mod each prime
(``|y|·(2^{7k} mod p) < 2^58``, four terms < 2^60: exact in int64).

The numpy functions are the reference the GPU kernels are tested against; they also let the CPU
tests check the digit algebra itself. The GEMM runs through ``torch._int_mm`` (cuBLASLt int8),
the digit split and the recombination through cupy kernels; cupy and torch share the buffers
through DLPack, with no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DIGITS = 4
DIGIT_BITS = 7
DIGIT_MASK = (1 << DIGIT_BITS) - 1
#: the longest sum an int32 accumulator holds exactly: 2^17 · 127 · 127 < 2^31
MAX_INT8_TERMS = 2**17
#: torch._int_mm's shape rules on CUDA: rows > 16; inner and column sizes multiples of 8
_MIN_ROWS = 17


def digit_weights(primes: Sequence[int]) -> np.ndarray:
    """``2^{7k} mod p`` for every prime and digit, (L, DIGITS) int64."""
    return np.array([[pow(2, DIGIT_BITS * k, p) for k in range(DIGITS)] for p in primes], dtype=np.int64)


def split_digits(residues: np.ndarray) -> np.ndarray:
    """(d_in, C) residues below 2^28 → (d_in, DIGITS·C) int8 digit planes, plane k at columns k·C…"""
    r = np.asarray(residues, dtype=np.uint32)
    planes = [((r >> (DIGIT_BITS * k)) & DIGIT_MASK).astype(np.int8) for k in range(DIGITS)]
    return np.concatenate(planes, axis=1)


def combine_digits(y: np.ndarray, primes: Sequence[int], n: int) -> np.ndarray:
    """(d_out, DIGITS·L·n) integer GEMM output → (d_out, L, n) uint32 residues mod each prime."""
    limbs = len(primes)
    d_out = y.shape[0]
    planes = np.asarray(y, dtype=np.int64).reshape(d_out, DIGITS, limbs, n)
    w = digit_weights(primes)  # (L, DIGITS)
    acc = np.einsum("okln,lk->oln", planes, w)  # < 2^60
    return (acc % np.array(primes, dtype=np.int64)[None, :, None]).astype(np.uint32)


def digit_product_reference(matrix: np.ndarray, residues: np.ndarray, primes: Sequence[int]) -> np.ndarray:
    """``matrix · residues`` mod p by the digit method on the CPU (int64 GEMM): the GPU's reference."""
    d_in, limbs, n = residues.shape
    digits = split_digits(residues.reshape(d_in, limbs * n))
    y = matrix.astype(np.int64) @ digits.astype(np.int64)
    return combine_digits(y, primes, n)


def int8_shape_ok(d_out: int, d_in: int, columns: int) -> bool:
    """Whether cuBLASLt's int8 GEMM takes ``(d_out, d_in) @ (d_in, columns)`` exactly."""
    return (
        d_out >= _MIN_ROWS and d_in >= 16 and d_in % 8 == 0 and columns % 8 == 0 and d_in <= MAX_INT8_TERMS
    )


def int8_available() -> bool:
    """True when torch with CUDA and cupy are both importable and a device answers."""
    try:
        import cupy  # noqa: PLC0415 - optional GPU extra
        import torch  # noqa: PLC0415

        return bool(torch.cuda.is_available()) and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any failure means no usable int8 path
        return False


# Transposes (d_in, C) residues through shared-memory tiles into four planes laid out
# (4·C, d_in) row-major: as a (d_in, 4·C) matrix that is column-major, the layout cuBLASLt's int8
# GEMM runs fastest on (measured on an H100: ~5x the row-major one).
_SPLIT_SRC = r"""
extern "C" __global__ void helora_split_digits(const unsigned int* r, signed char* d,
                                               long long rows, long long cols) {
    __shared__ unsigned int tile[32][33];
    long long c0 = (long long)blockIdx.x * 32, r0 = (long long)blockIdx.y * 32;
    for (int j = threadIdx.y; j < 32; j += 8) {
        long long row = r0 + j, c = c0 + threadIdx.x;
        if (row < rows && c < cols) tile[j][threadIdx.x] = r[row * cols + c];
    }
    __syncthreads();
    long long plane = rows * cols;
    for (int j = threadIdx.y; j < 32; j += 8) {
        long long c = c0 + j, row = r0 + threadIdx.x;
        if (row < rows && c < cols) {
            unsigned int v = tile[threadIdx.x][j];
            long long at = c * rows + row;
            d[at] = (signed char)(v & 127u);
            d[at + plane] = (signed char)((v >> 7) & 127u);
            d[at + 2 * plane] = (signed char)((v >> 14) & 127u);
            d[at + 3 * plane] = (signed char)((v >> 21) & 127u);
        }
    }
}
"""

_COMBINE_SRC = r"""
long long row = i / ln;
long long col = i - row * ln;
long long l = col / n;
long long at = row * 4 * ln + col;
long long acc = (long long)y[at] * w[4 * l] + (long long)y[at + ln] * w[4 * l + 1]
              + (long long)y[at + 2 * ln] * w[4 * l + 2] + (long long)y[at + 3 * ln] * w[4 * l + 3];
long long q = p[l];
long long v = acc % q;
if (v < 0) v += q;
out = (unsigned int)v;
"""

_kernels: dict[str, Any] = {}


def _kernel(name: str) -> Any:  # pragma: no cover - needs a device
    if name not in _kernels:
        import cupy  # noqa: PLC0415

        if name == "split":
            _kernels[name] = cupy.RawKernel(_SPLIT_SRC, "helora_split_digits")
        else:
            _kernels[name] = cupy.ElementwiseKernel(
                "raw int32 y, raw int64 w, raw int64 p, int64 ln, int64 n", "uint32 out", _COMBINE_SRC,
                "helora_combine_digits",
            )
    return _kernels[name]


class Int8Product:  # pragma: no cover - needs a device
    """``M · residues`` mod p for one int8 matrix on a CUDA device, through int8 tensor cores."""

    def __init__(self, matrix: np.ndarray, primes: Sequence[int]) -> None:
        import cupy  # noqa: PLC0415
        import torch  # noqa: PLC0415

        self._cp, self._torch = cupy, torch
        self.d_out, self.d_in = (int(s) for s in matrix.shape)
        self.limbs = len(primes)
        self._m = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.int8)).cuda()
        self._w = cupy.asarray(digit_weights(primes).reshape(-1))
        self._p = cupy.asarray(np.asarray(primes, dtype=np.int64))

    def __call__(self, residues: Any) -> Any:
        """(d_in, L, n) uint32 cupy residues → (d_out, L, n) uint32 cupy residues (n: N for a hint,
        a request's T tokens for its ``b``; 4·L·n columns stay a multiple of 8 for L = 2 and 4)."""
        cp, torch = self._cp, self._torch
        d_in, limbs, n = residues.shape
        cols = limbs * n
        r = cp.ascontiguousarray(residues, dtype=cp.uint32).reshape(d_in, cols)
        digits = cp.empty((DIGITS * cols, d_in), dtype=cp.int8)  # planes, transposed
        grid = ((cols + 31) // 32, (d_in + 31) // 32)
        _kernel("split")(grid, (32, 8), (r, digits, np.int64(d_in), np.int64(cols)))
        y = torch._int_mm(self._m, torch.from_dlpack(digits).t())  # (d_out, 4·L·N) int32
        out = cp.empty((self.d_out, limbs, n), dtype=cp.uint32)
        _kernel("combine")(cp.ascontiguousarray(cp.from_dlpack(y)), self._w, self._p, cols, n, out)
        return out

"""The server's product: ``Enc(X) -> Enc(X·Mᵀ)`` for an integer matrix M (DESIGN §3).

Output ciphertext o is ``Σ_j M[o, j]·ct_j``. Stacking the ciphertexts' residues as a matrix
(d_in, L·N), the whole layer is one GEMM per part, exact in float64 while every inner product
stays below 2^53: centered residues ``|c| < 2^26``, ``|M| <= 2^7``, at most 2^14 terms per GEMM
(longer sums are chunked and reduced between chunks). The ``a`` part ``M·A`` does not depend on
the request (``a`` is fixed per layer and direction), so it is computed once: the hint.

Forward uses ``M = W`` (d_out × d_in); backward uses ``M = Wᵀ``. A row shard (a slice of the
inputs) returns a partial that the aggregator adds to the others.

Backends: numpy (CPU) and cupy (GPU, imported lazily) run the same code through ``xp``.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import numpy as np

from .encrypt import EncryptedBatch, EncryptedPartial, expand_a
from .errors import ConfigError, ParameterMismatch
from .params import MAX_GEMM_TERMS, ParamSet


def array_module(backend: str) -> ModuleType:
    """``numpy``, or ``cupy`` if asked for (and importable)."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        try:
            import cupy  # noqa: PLC0415 - optional GPU extra, imported lazily
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise ConfigError("backend 'cupy' requested but cupy is not installed") from exc
        return cupy
    raise ConfigError(f"backend: {backend!r} is not 'numpy' or 'cupy'")


def default_backend() -> str:
    """'cupy' when a CUDA device answers, else 'numpy'."""
    try:
        import cupy  # noqa: PLC0415

        return "cupy" if cupy.cuda.runtime.getDeviceCount() > 0 else "numpy"
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return "numpy"


class MatrixProduct:
    """Exact ``Y = M · ct`` for one integer matrix M (d_out × d_in), held on one device.

    ``a_seed`` and ``input_start`` identify the public ``a`` of the inputs this shard holds
    (rows ``input_start … input_start + d_in - 1`` of the layer's ``a``).
    """

    def __init__(
        self,
        matrix: np.ndarray,
        params: ParamSet,
        a_seed: bytes,
        input_start: int = 0,
        backend: str = "numpy",
    ) -> None:
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.integer):
            raise ConfigError("MatrixProduct: a 2-D integer matrix is required")
        if np.abs(matrix).max(initial=0) > 128:
            raise ConfigError("MatrixProduct: entries must fit in 8 bits")
        self.params = params
        self.d_out, self.d_in = (int(s) for s in matrix.shape)
        self.xp = array_module(backend)
        xp = self.xp
        self._moduli_f = xp.asarray(np.asarray(params.primes, dtype=np.float64)[:, None])  # (L, 1)
        self._chunks = [
            xp.asarray(matrix[:, j : j + MAX_GEMM_TERMS].astype(np.float64))
            for j in range(0, self.d_in, MAX_GEMM_TERMS)
        ]
        t0 = time.perf_counter()
        a = expand_a(a_seed, params, self.d_in, start=input_start)
        self._hint = self._product(xp.asarray(a)).astype(xp.uint32)  # (d_out, L, N) residues
        self.hint_seconds = time.perf_counter() - t0

    def _product(self, residues: Any) -> Any:
        """``M · residues`` mod p per limb, as float64 integers in [0, p); residues (d_in, L, N)."""
        xp = self.xp
        p = self._moduli_f
        c = residues.astype(xp.float64)
        c -= (c > p // 2) * p  # centered, |c| < 2^26
        flat = c.reshape(self.d_in, -1)  # (d_in, L·N)
        acc = None
        for idx, chunk in enumerate(self._chunks):
            lo = idx * MAX_GEMM_TERMS
            part = (chunk @ flat[lo : lo + chunk.shape[1]]).reshape(self.d_out, self.params.limbs, -1)  # exact < 2^47
            part -= xp.floor(part / p) * p
            if acc is None:
                acc = part
            else:
                acc += part
                acc -= (acc >= p) * p
        return acc

    @property
    def held_bytes(self) -> int:
        """Bytes of the weight chunks and the hint on this product's device."""
        return int(sum(c.nbytes for c in self._chunks) + self._hint.nbytes)

    @property
    def hint(self) -> np.ndarray:
        """``M·A`` mod q, (d_out, L, N) uint32 residues on the host: the ``a`` part of every output."""
        return self._hint if self.xp is np else self.xp.asnumpy(self._hint)

    def __call__(self, batch: EncryptedBatch) -> EncryptedPartial:
        """The partial result for one batch (mod q, not yet switched)."""
        if batch.params != self.params:
            raise ParameterMismatch(f"batch uses {batch.params.name}, this layer {self.params.name}")
        if batch.width != self.d_in:
            raise ParameterMismatch(f"batch has {batch.width} ciphertexts, this layer takes {self.d_in}")
        xp = self.xp
        b = self._product(xp.asarray(batch.b)).astype(xp.uint32)
        a = self._hint
        if xp is not np:
            a, b = xp.asnumpy(a), xp.asnumpy(b)
        return EncryptedPartial(self.params, a, b, batch.n_tokens)

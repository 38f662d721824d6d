"""The server's product: ``Enc(X) -> Enc(X·Mᵀ)`` for an integer matrix M (DESIGN §3).

Output ciphertext o is ``Σ_j M[o, j]·ct_j``. Stacking the ciphertexts' residues as a matrix
(d_in, L·n), n the columns they carry (N for the hint ``M·A``, a request's T tokens for ``b``:
``encrypt``'s token windows), the whole layer is one GEMM per part, exact in float64 while every inner product
stays below 2^53: residues ``0 <= r < 2^27``, ``|M| <= 2^7``, at most 2^14 terms per GEMM
(longer sums are chunked and reduced between chunks). The ``a`` part ``M·A`` does not depend on
the request (``a`` is fixed per layer and direction), so it is computed once: the hint.

Forward uses ``M = W`` (d_out × d_in); backward uses ``M = Wᵀ``. A row shard (a slice of the
inputs) returns a partial that the aggregator adds to the others.

Backends: numpy (CPU) and cupy (GPU, imported lazily) run the same float64 code through ``xp``.
On a GPU the default GEMM is the int8 tensor-core digit method of :mod:`hecommon.he.gpu` (bit-identical
results); ``gemm="float64"`` or ``HELORA_GPU_GEMM=float64`` keeps the float64 GEMMs.
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ConfigError, InexactLayer, ParameterMismatch
from . import kernels, parallel
from .encrypt import EncryptedBatch, EncryptedPartial
from .exact import exact_terms, spread
from .gpu import DIGITS, Int8Product, int8_available, int8_shape_ok
from .params import MAX_GEMM_TERMS, ParamSet
from .sampling import expand_a


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
        a_seed: bytes | None = None,
        input_start: int = 0,
        backend: str = "numpy",
        gemm: str = "auto",
        *,
        terms: int | None = None,
        sub_sums: int = 1,
    ) -> None:
        """``terms``: the widest exact sum (``exact.exact_terms``; default: 8-bit inputs and weights);
        a layer whose summed indices (``input_start …``, global) reach past it is split into
        ``sub_sums`` sums, or refused: output ``o`` of sub-sum ``s`` is row ``o·sub_sums + s``. The
        float64 GEMMs cut their inputs at the sub-sums' boundaries and keep one total per sub-sum
        (no more weights or multiply-adds than one sum); the int8 digit product multiplies the
        spread matrix (``exact.spread``: k times its int8 weights). ``a_seed``: build the hint of
        that public ``a`` now (``hint``); ``build_hint`` makes one for any other seed."""
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.integer):
            raise ConfigError("MatrixProduct: a 2-D integer matrix is required")
        if np.abs(matrix).max(initial=0) > 128:
            raise ConfigError("MatrixProduct: entries must fit in 8 bits")
        terms = exact_terms(params) if terms is None else terms
        reach = input_start + int(matrix.shape[1])
        if -(-reach // terms) > sub_sums:
            raise InexactLayer(f"MatrixProduct: a sum of {reach} terms exceeds the exact bound of {terms} terms "
                               f"per sum with {sub_sums} sub-sum(s); split it (exact.sub_sums) or refuse the layer")
        self.params = params
        self.sub_sums = sub_sums
        self.input_start = input_start
        self._rows, self.d_in = (int(s) for s in matrix.shape)  # weight rows, inputs
        self.d_out = self._rows * sub_sums  # output ciphertexts
        self.xp = array_module(backend)
        xp = self.xp
        in_int8 = int(matrix.max(initial=0)) <= 127 and int(matrix.min(initial=0)) >= -128
        self.gemm = resolve_gemm(backend, gemm, self.d_out, self.d_in, DIGITS * params.limbs * params.n, in_int8)
        self._int8 = (Int8Product(spread(matrix, input_start, terms, sub_sums), params.primes)
                      if self.gemm == "int8" else None)
        self._chunks = [] if self._int8 is not None else [
            xp.asarray(matrix[:, j : j + MAX_GEMM_TERMS].astype(np.float64))
            for j in range(0, self.d_in, MAX_GEMM_TERMS)
        ]
        # (lo, hi, chunk, sub-sum): the inputs lo…hi that one weight chunk and one sub-sum share
        self._segments = []
        for j in range(0, self.d_in, MAX_GEMM_TERMS):
            for s in range(sub_sums):  # sub-sum s: the layer's summed indices s·terms …, local here
                lo = max(j, s * terms - input_start)
                hi = min(j + MAX_GEMM_TERMS, self.d_in, (s + 1) * terms - input_start)
                if lo < hi:
                    self._segments.append((lo, hi, j // MAX_GEMM_TERMS, s))
        self._primes = np.asarray(params.primes, dtype=np.float64)
        self._moduli_f = xp.asarray(self._primes[:, None])  # (L, 1)
        self._hint: np.ndarray | None = None
        self.hint_seconds = 0.0
        if a_seed is not None:
            t0 = time.perf_counter()
            self._hint = self.build_hint(a_seed)
            self.hint_seconds = time.perf_counter() - t0

    def build_hint(self, a_seed: bytes, rows: tuple[int, int] | None = None) -> np.ndarray:
        """``M·A`` mod q for the public ``a`` of ``a_seed`` (rows ``input_start …`` of it): (d_out, L, N)
        uint32 residues on the host, since it goes into partials. Computed on this product's device.
        ``rows``: the hint of a request part, ``M[:, lo:hi]·A[lo:hi]`` (``piece``)."""
        if rows is not None and rows != (0, self.d_in):
            lo, hi = rows
            a = expand_a(a_seed, self.params, hi - lo, start=self.input_start + lo)
            return self.piece(a, lo)
        xp = self.xp
        a = expand_a(a_seed, self.params, self.d_in, start=self.input_start)
        hint = self._as_uint32(self._product(xp.asarray(a)))
        return hint if xp is np else xp.asnumpy(hint)

    def piece(self, residues: np.ndarray, offset: int) -> np.ndarray:
        """``M[:, offset:offset+k] · residues`` mod q for the ``k`` input ciphertexts of one request
        part (inputs ``offset …`` of this product): (d_out, L, n) uint32 on the host, in
        ``o·sub_sums + s`` order. The float64 GEMMs multiply those inputs alone (pieces over parts
        that cover every input once add up to the whole product mod q, bit for bit); the int8
        digit product, which takes a whole input, multiplies it with zeros elsewhere."""
        xp = self.xp
        k = int(residues.shape[0])
        if offset < 0 or k < 1 or offset + k > self.d_in:
            raise ParameterMismatch(f"ciphertexts {offset}…{offset + k} are outside this layer's {self.d_in} inputs")
        if self._int8 is not None:
            whole = xp.zeros((self.d_in, *residues.shape[1:]), dtype=xp.uint32)
            whole[offset : offset + k] = xp.asarray(residues)
            out = self.product_on_device(whole)
        else:
            out = self.finish(self._gemm(self._columns(xp.asarray(residues)), offset, (0, self._rows)))
        return out if xp is np else xp.asnumpy(out)

    def _columns(self, residues: Any) -> Any:
        """(k, L·n) float64 residues of k input ciphertexts (k, L, n): the right-hand side of the
        GEMMs, as they are. Uncentered, ``r < 2^27``: a sum of 2^14 terms of ``|M| <= 2^7`` stays
        below 2^48, exact in float64, and its remainder mod p is the centered residues' (one pass
        instead of four)."""
        flat = parallel.cast(residues, np.float64) if self.xp is np else residues.astype(self.xp.float64)
        return flat.reshape(residues.shape[0], -1)

    def _gemm(self, flat: Any, first: int, rows: tuple[int, int], total: Any = None) -> Any:
        """``total`` plus, for each sub-sum ``s``, ``M[rows, cols_s] · flat[cols_s]`` mod p per limb, as
        float64 integers in [0, p): a list of one (weight rows, L, N') array per sub-sum (None: no
        input of it yet), for ``flat`` the residues (``_columns``) of the k inputs ``first …`` and ``cols_s``
        those of them in sub-sum ``s`` (``total`` None: nothing yet). One exact GEMM per weight chunk
        and sub-sum the inputs meet (at most ``MAX_GEMM_TERMS`` terms each), reduced mod p after each."""
        xp = self.xp
        p = self._moduli_f
        lo_row, hi_row = rows
        last = first + flat.shape[0]
        total = [None] * self.sub_sums if total is None else total
        for seg_lo, seg_hi, idx, s in self._segments:
            lo, hi = max(first, seg_lo), min(last, seg_hi)
            if lo >= hi:
                continue
            base = idx * MAX_GEMM_TERMS
            part = (self._chunks[idx][lo_row:hi_row, lo - base : hi - base] @ flat[lo - first : hi - first]).reshape(
                hi_row - lo_row, self.params.limbs, -1)
            _reduce(xp, part, p, self._primes)
            if total[s] is None:
                total[s] = part
            else:
                total[s] += part
                total[s] -= (total[s] >= p) * p
        return total

    def _outputs(self, total: list[Any]) -> Any:
        """A ``_gemm`` total as output rows ``o·sub_sums + s`` (rows, L, N'): one sum is its array; a
        sub-sum this shard's inputs never met is zero (the other shards' partials hold it)."""
        if self.sub_sums == 1:
            return total[0]
        like = next(t for t in total if t is not None)
        stacked = self.xp.stack([t if t is not None else self.xp.zeros_like(like) for t in total], axis=1)
        return stacked.reshape(-1, *like.shape[1:])

    def _product(self, residues: Any, flat: Any = None, rows: tuple[int, int] | None = None) -> Any:
        """``M · residues`` mod p per limb and sub-sum, as float64 integers in [0, p) (uint32 on the int8
        path); residues (d_in, L, n); outputs in ``o·sub_sums + s`` order.

        ``rows``: only output rows ``lo…hi`` (from ``flat``, ``_columns(residues)``, when given)."""
        if self._int8 is not None:
            out = self._int8(residues)
            return out if rows is None else out[rows[0] : rows[1]]
        flat = self._columns(residues) if flat is None else flat
        lo, hi = rows if rows is not None else (0, self.d_out)
        first, last = lo // self.sub_sums, -(-hi // self.sub_sums)  # the weight rows they need
        out = self._outputs(self._gemm(flat, 0, (first, last)))
        skip = lo - first * self.sub_sums
        return out if (skip, hi - lo) == (0, out.shape[0]) else out[skip : skip + hi - lo]

    @property
    def held_bytes(self) -> int:
        """Bytes of the weight chunks and the hint (while it is kept) on this product's device."""
        weights = self.d_out * self.d_in if self._int8 is not None else sum(c.nbytes for c in self._chunks)  # int8: spread
        return int(weights + (self._hint.nbytes if self._hint is not None else 0))

    @property
    def hint(self) -> np.ndarray:
        """``M·A`` mod q for the seed given at construction, (d_out, L, N) uint32 residues on the host:
        the ``a`` part of every output."""
        if self._hint is None:
            raise ConfigError("this product holds no hint (none was built at construction: build_hint)")
        return self._hint

    def _check(self, batch: EncryptedBatch) -> None:
        if batch.params != self.params:
            raise ParameterMismatch(f"batch uses {batch.params.name}, this layer {self.params.name}")
        if batch.width != self.d_in:
            raise ParameterMismatch(f"batch has {batch.width} ciphertexts, this layer takes {self.d_in}")

    def __call__(self, batch: EncryptedBatch, a: Any = None) -> EncryptedPartial:
        """The partial result for one batch (mod q, not yet switched); its ``a`` part is the hint,
        or ``a`` when given (the hint already switched and packed, ``EncryptedPartial``)."""
        self._check(batch)
        xp = self.xp
        b = self.product_on_device(xp.asarray(batch.b))
        if xp is not np:
            b = xp.asnumpy(b)
        return EncryptedPartial(self.params, self.hint if a is None else a, b, batch.n_tokens, batch.col0)

    def row_blocks(self, batch: EncryptedBatch, blocks: list[tuple[int, int]]):
        """``M·b`` mod q for the output rows of each ``(lo, hi)`` in ``blocks``, one block at a time,
        as (hi - lo, L, T) uint32 host arrays: a caller can send a block while the next is computed.
        Equal, row for row, to ``__call__``'s ``b``."""
        self._check(batch)
        xp = self.xp
        b = xp.asarray(batch.b)
        if self._int8 is not None:  # a GPU computes the whole product faster than any block of it
            whole = self.product_on_device(b)
            for lo, hi in blocks:
                out = whole[lo:hi]
                yield out if xp is np else xp.asnumpy(out)
            return
        flat = self._columns(b)
        for lo, hi in blocks:
            out = self._as_uint32(self._product(b, flat, (lo, hi)))
            yield out if xp is np else xp.asnumpy(out)

    def finish(self, total: Any) -> Any:
        """A ``_gemm`` total as (d_out, L, n) uint32 residues on the device."""
        return self._as_uint32(self._outputs(total))

    def product_on_device(self, b: Any) -> Any:
        """``M·b`` mod q for (d_in, L, n) residues already on this layer's device, as uint32."""
        out = self._product(b)
        return self._as_uint32(out)

    def _as_uint32(self, out: Any) -> Any:
        """Residues in [0, p) (float64 sums, or uint32 already) as uint32: on the host, cast in
        parallel row ranges (``parallel.cast``)."""
        if out.dtype == self.xp.uint32:
            return out
        return parallel.cast(out, np.uint32) if self.xp is np else out.astype(self.xp.uint32)


def _reduce(xp: Any, part: Any, moduli: Any, primes: np.ndarray) -> None:
    """``part`` (rows, L, N') float64 integers reduced mod each limb's prime, in place: one
    compiled pass where ``hecommon.he.kernels`` runs (the client's embedded server), else numpy's
    (or cupy's) in-place operations with one temporary; the same values either way."""
    if xp is np and kernels.enabled() and part.flags.c_contiguous:
        loop = kernels.loops().reduce_mod
        parallel.map_rows(lambda lo, hi: loop(part[lo:hi], primes), part.shape[0], minimum=16, row_size=part[0].size)
        return
    q = part / moduli
    xp.floor(q, out=q)
    q *= moduli
    part -= q


def resolve_gemm(backend: str, gemm: str, d_out: int, d_in: int, columns: int, in_int8: bool = True) -> str:
    """The GEMM a layer uses: 'float64' (any backend) or 'int8' (cupy with torch's CUDA int8 GEMM).

    ``auto`` takes ``HELORA_GPU_GEMM`` if set, else int8 on a GPU whenever the shape allows it.
    """
    if gemm == "auto":
        gemm = os.environ.get("HELORA_GPU_GEMM", "auto")
    if gemm not in ("auto", "int8", "float64"):
        raise ConfigError(f"gemm: {gemm!r} is not 'auto', 'int8' or 'float64'")
    if backend != "cupy":
        if gemm == "int8":
            raise ConfigError("gemm 'int8' needs the cupy backend (a CUDA device)")
        return "float64"
    fits = in_int8 and int8_shape_ok(d_out, d_in, columns)
    if gemm == "int8":
        if not fits:
            raise ConfigError(f"gemm 'int8': shape {d_out}x{d_in} or its entries break the int8 GEMM's "
                              f"rules (int8 values, rows > 16, inner size a multiple of 8 and at most 2^17)")
        if not int8_available():
            raise ConfigError("gemm 'int8' needs torch with CUDA beside cupy")
        return "int8"
    if gemm == "auto" and fits and int8_available():
        return "int8"
    return "float64"

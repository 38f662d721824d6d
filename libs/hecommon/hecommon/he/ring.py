"""Arithmetic in ``Z_q[X]/(X^N + 1)``: RNS residues, CRT, and products with a small secret.

The server's only operation is a linear combination of ciphertexts (``evaluate.py``), which
needs no transform. The client multiplies polynomials by its ternary secret ``s`` only. For
that product a float64 FFT is exact: with ``|a_k| < 2^26`` and ``s`` ternary every result
coefficient is an integer below ``2^37``, and the FFT's rounding error (about
``2^-53 · ‖a‖₂ · ‖s‖₂ · log2 N``, i.e. below ``2^-12`` at N = 4096) is far under 1/2, so
rounding recovers it exactly. This is the folded negacyclic transform of size N/2 used by
TFHE implementations: it evaluates the polynomial at N/2 roots of ``X^N + 1`` that contain no
conjugate pair. The primes stay NTT-friendly so that an NTT backend can replace it.
"""

from __future__ import annotations

import numpy as np

from . import fft, kernels
from .params import ParamSet

#: Largest |a| accepted by ``SmallSecretMultiplier.mul`` for an exact result.
MAX_EXACT_INPUT = 1 << 26


def centered(residues: np.ndarray, moduli: np.ndarray) -> np.ndarray:
    """Map residues in [0, p) to the centered range (-p/2, p/2]; ``moduli`` broadcasts."""
    r = residues.astype(np.int64, copy=True)
    r -= np.where(r > moduli // 2, moduli, 0)
    return r


def moduli_column(params: ParamSet) -> np.ndarray:
    """The primes as an int64 array shaped (L, 1) for broadcasting over (L, N) residues."""
    return np.asarray(params.primes, dtype=np.int64)[:, None]


class SmallSecretMultiplier:
    """Exact negacyclic products ``a · s`` for one small (ternary) secret ``s``.

    ``s`` is transformed once; each ``mul`` costs one forward and one inverse FFT of size N/2.
    """

    def __init__(self, s: np.ndarray) -> None:
        n = s.shape[-1]
        if s.ndim != 1 or n & (n - 1) or n < 4:
            raise ValueError("secret must be a 1-D polynomial of power-of-two length")
        if np.abs(s).max(initial=0) > 1:
            raise ValueError("SmallSecretMultiplier expects a ternary secret")
        self.n = n
        half = n // 2
        k = np.arange(half)
        #: ψ^k (ψ = exp(iπ/N)), applied to the folded input; ``untwist`` after the inverse transform
        #: (divided by N/2: by ``ifft`` in ``product``, through ``s``'s spectrum in
        #: ``spectrum_product``). The fused kernels (``hecommon.he.kernels``) use both.
        self.twist = np.exp(1j * np.pi * k / n)
        self.untwist = np.conj(self.twist)
        self._s_hat = self._forward(s.astype(np.float64))
        self._s_hat_scaled = self._s_hat / half  # the inverse transform's 1/(N/2), exact (a power of 2)

    def _forward(self, a: np.ndarray) -> np.ndarray:
        half = self.n // 2
        folded = (a[..., :half] + 1j * a[..., half:]) * self.twist
        return np.fft.fft(folded, axis=-1)

    def _inverse(self, spectrum: np.ndarray) -> np.ndarray:
        folded = np.fft.ifft(spectrum, axis=-1) * self.untwist
        out = np.empty(spectrum.shape[:-1] + (self.n,), dtype=np.float64)
        out[..., : self.n // 2] = folded.real
        out[..., self.n // 2 :] = folded.imag
        return out

    def spectrum_product(self, folded: np.ndarray) -> None:
        """In place: folded, twisted inputs (..., N/2) complex become the inverse transform of
        their products with ``s`` (still to be untwisted by ``untwist``; ``hecommon.he.kernels``),
        through ``hecommon.he.fft`` (FFTW where installed)."""
        fft.forward(folded)
        self._times_s(folded)
        fft.inverse(folded)

    def pair_product(self, pair: fft.Pair, rows: int) -> None:
        """``spectrum_product`` of the first ``rows`` rows of each of ``pair.xs`` (a thread's
        ``fft.Pair``), which then hold the products' inverse transforms: a whole block out of place
        on the pair's plans, a shorter one in place."""
        if rows < pair.x.shape[0]:
            for x in pair.xs:
                self.spectrum_product(x[:rows])
            return
        for forward, inverse in zip(pair.forwards, pair.inverses, strict=True):
            forward()
            self._times_s(pair.y)
            inverse()

    def _times_s(self, spectra: np.ndarray) -> None:
        """In place: spectra (..., N/2) times ``s``'s (scaled by the inverse's 1/(N/2))."""
        if kernels.enabled() and spectra.flags.c_contiguous:
            kernels.loops().times_spectrum(spectra.reshape(-1, spectra.shape[-1]), self._s_hat_scaled)
        else:
            spectra *= self._s_hat_scaled

    def product(self, a: np.ndarray) -> np.ndarray:
        """Exact ``a · s`` as float64 holding integers; ``a``: float64 integers, ``|a| < 2^26``."""
        if a.shape[-1] != self.n:
            raise ValueError(f"polynomial length {a.shape[-1]} != {self.n}")
        spectrum = self._forward(a)
        spectrum *= self._s_hat
        return np.rint(self._inverse(spectrum))

    def mul(self, a: np.ndarray) -> np.ndarray:
        """Exact integer product ``a · s`` in Z[X]/(X^N+1), not reduced; ``|a| < 2^26``.

        ``a``: integer array (..., N). Returns int64 of the same shape.
        """
        return self.product(a.astype(np.float64)).astype(np.int64)

    def product_wide(self, a: np.ndarray, split_bits: int = 20) -> np.ndarray:
        """Exact ``a · s`` for float64 integers ``|a| < 2^(2·split_bits)``, as float64 integers.

        Two exact products of the halves; the result must stay below 2^53 (it does for
        ``|a| < 2^40`` and N <= 2^12).
        """
        scale = float(1 << split_bits)
        hi = np.rint(a / scale)
        lo = a - hi * scale
        out = self.product(hi)
        out *= scale
        out += self.product(lo)
        return out


def reduce_float(x: np.ndarray, moduli: np.ndarray | float) -> np.ndarray:
    """``x mod p`` in place for float64 integers ``|x| < 2^50``; ``moduli`` broadcasts.

    Exact: ``x/p`` is correctly rounded, so its floor is the true quotient (the quotient is far
    from the next integer by at least ``1/p``, far more than the rounding error ``2^-50·x/p``).
    """
    q = np.floor(x / moduli)
    q *= moduli
    x -= q
    return x


def centered_float(residues: np.ndarray, moduli: np.ndarray | int) -> np.ndarray:
    """Residues in [0, p) to float64 in (-p/2, p/2]."""
    c = residues.astype(np.float64)
    np.subtract(c, moduli, out=c, where=c > moduli // 2)
    return c


def negacyclic_reference(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Schoolbook ``a · s`` mod ``X^N + 1`` in exact int64 arithmetic (tests and checks)."""
    n = a.shape[-1]
    full = np.convolve(a.astype(np.int64), s.astype(np.int64))
    out = full[:n].copy()
    out[: n - 1] -= full[n:]
    return out


def crt_fraction(residues: np.ndarray, params: ParamSet) -> np.ndarray:
    """``x / q mod 1`` for the integer x with the given RNS residues (L, ...), in float64.

    Uses ``x/q ≡ Σ_i [r_i · (q/p_i)^-1 mod p_i] / p_i (mod 1)``, so no multi-word integer is
    ever formed. Error below ``L · 2^-52``; enough for switching to a modulus of <= 2^45.
    """
    q = params.q
    acc = np.zeros(residues.shape[1:], dtype=np.float64)
    for i, p in enumerate(params.primes):
        inv = pow(q // p, -1, p)
        y = (residues[i].astype(np.int64) * inv) % p  # < 2^54: exact in int64
        acc += y / p
    return acc - np.floor(acc)


def switch_modulus(residues: np.ndarray, params: ParamSet, bits: int | None = None) -> np.ndarray:
    """Round ``x · 2^k / q`` mod ``2^k`` (k = ``bits`` or ``params.out_bits``) from RNS residues (L, ...).

    Returns uint64 values in [0, 2^k). With two limbs the integer is rebuilt exactly
    (``q < 2^54``) and scaled in float64 (error < 2^-15, far below the rounding's own 1/2);
    with more limbs ``crt_fraction`` avoids multi-word integers.
    """
    k = params.out_bits if bits is None else bits
    if params.limbs == 2:
        p1, p2 = params.primes
        r1 = residues[0].astype(np.int64)
        t = (residues[1].astype(np.int64) - r1) % p2
        t *= pow(p1, -1, p2)
        t %= p2
        x = (t * p1 + r1).astype(np.float64)  # exact integer below q < 2^54, rounded to float64
        x *= float(1 << k) / params.q
    else:
        x = crt_fraction(residues, params) * float(1 << k)
    return np.rint(x).astype(np.uint64) & np.uint64((1 << k) - 1)

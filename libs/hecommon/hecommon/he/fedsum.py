"""Sums of several owners' integer vectors under secrets the owners share: the federated mode's
full encryption (DESIGN §5; ``docs/federated.md``, "Every coordinate encrypted").

RLWE over ``Z_Q[X]/(X^N + 1)`` with a power-of-two ``Q = 2^(bits + SWITCH_BITS)``. The owners of a
federation share a key; the aggregator holds none. For one round every owner uses the same
independent ternary secrets ``s_0, s_1, …`` (``keys.RowSecrets``, derived from the shared key and
the round id), and its own fresh 16-byte seed (``SEED_BYTES``), from which it expands ``GROUP``
public polynomials ``a_i^(0) … a_i^(GROUP−1)``, uniform mod Q. Owner ``i`` writes its integers
``m_i`` (fixed point, ``|m_i| ≤ per_owner_max``) N to a row and encrypts row r with secret
``s_j``, ``j = ⌊r/GROUP⌋``, and ``a_i^(t)``, ``t = r mod GROUP``:
``b_ir = −a_i^(t)·s_j + e_ir + Δ·m_ir (mod Q)``, ``Δ = Q / 2^msg_bits``, ``e`` centered binomial (the
split protocol's noise distribution, its bits laid out in planes: ``sampling.plane_binomial``),
then switches it to ``2^bits``: ``b'_ir = round(b_ir / 2^SWITCH_BITS)``.
Only ``b'_i`` (``bits`` per value) and the seed travel.

The aggregator adds the ``b'_i`` mod ``2^bits``. An owner decrypts row r of the sum with
``A^(t) = Σ_i a_i^(t) mod Q`` (every seed comes back with the aggregate):
``Σ_i b'_ir + round((A^(t)·s_j mod Q) / 2^SWITCH_BITS) = Δ'·Σ_i m_ir + ε (mod 2^bits)``,
``Δ' = 2^(bits − msg_bits)``.

Cost: an owner's ``a^(t)`` are transformed once; a group of ``GROUP`` rows costs one transform of
its secret and two inverse transforms a row (``a = a_hi·2^split + a_lo`` in halves keep each product
exact: ``ring``'s bound), ``2 + 1/GROUP`` transforms of size N/2 a row, against 4 for a fresh ``a``
a row in the split protocol's RNS form, and no CRT (``Q`` is a power of two). The loops around the
transforms are compiled (``hecommon.he._fused``) and the update is encoded a block of rows at a time
(``encrypt_rows``), never held whole.

Exactness: ``ε = Σ e_i / 2^SWITCH_BITS + Σ r_i − r_A``, each rounding ``r`` uniform in ``[−½, ½]``,
so ``Var ε = K/12 + 1/12 + K·σ²/4^SWITCH_BITS`` for K owners. ``sum_bits`` is the smallest ``bits``
with ``TAIL_SIGMAS·√Var ε < Δ'/2``; ``per_owner_max = ⌊max_message / K⌋`` keeps ``|Σ m_i|`` inside
the plaintext range, so the sum of up to K owners never wraps. A value past the range is refused,
never reduced.

Security: row r of owner i is an RLWE sample ``(a_i^(t), b_ir)`` under ``s_j`` with fresh noise.
Each secret ``s_j`` is used by ``GROUP·K`` samples whose ``a`` are independent and uniform (GROUP
polynomials of each of K owners); different groups have independent secrets. That is RLWE with
several samples per secret (as a public key and its encryptions are), so ``b'_i`` is
pseudorandom to anyone without the key, with ``log2 Q ≤ 50`` at N = 2048 (within the HE standard's
128-bit bound of 54, ``params.MAX_LOG_Q_128``). Two owners must never share a seed (``b_ir − b_kr``
would cancel ``a·s_j``): seeds are 16 bytes from the OS CSPRNG, and the aggregator refuses a
repeated one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DecryptionError
from . import fft, kernels
from .bits import PackedRows, pack_bits
from .keys import RowSecrets
from .parallel import chunks, map_ranges
from .params import DEFAULT, MAX_LOG_Q_128, TAIL_SIGMAS, ParamSet
from .ring import MAX_EXACT_INPUT
from .sampling import (
    MAX_PLANE_ETA,
    SEED_BYTES,
    aes_ctr,
    derive_key,
    noise_planes,
    noise_stream,
    plane_binomial,
)

#: Bits the switch drops: ``Q = 2^(bits + SWITCH_BITS)``. The noise shrinks by ``2^8``, below the
#: rounding's own (``σ/256 ≈ 0.014`` against ``1/√12 ≈ 0.29``).
SWITCH_BITS = 8
#: Rows that share one secret, each with its own of an owner's ``GROUP`` public polynomials: a
#: row costs ``2 + 1/GROUP`` transforms of size N/2 (``a^(t)`` is transformed once per owner).
GROUP = 64
#: Rows transformed at once: a block's complex (rows, N/2) buffers stay in L2 (16 measured
#: fastest here, of 4 to 64).
_BLOCK_ROWS = 16


def _max_q_bits(params: ParamSet) -> int:
    """The widest ``Q``: within the HE standard's 128-bit bound for N, and with halves of ``a``
    well below ``ring.MAX_EXACT_INPUT`` (``|a_hi|, |a_lo| ≤ 2^(⌈log Q / 2⌉ − 1) ≤ 2^24``)."""
    return min(MAX_LOG_Q_128[params.n], 2 * (MAX_EXACT_INPUT.bit_length() - 2))  # 50 at N = 2048


def sum_bits(params: ParamSet, owners: int) -> int:
    """Smallest ``bits`` at which the switched sum of ``owners`` fresh encryptions decodes exactly."""
    if not isinstance(owners, int) or isinstance(owners, bool) or owners < 1:
        raise ConfigError(f"owners: {owners!r} must be a positive integer")
    scaled = params.noise_sigma / 2.0**SWITCH_BITS
    sigma = math.sqrt(owners / 12 + 1 / 12 + owners * scaled**2)
    for bits in range(params.msg_bits + 1, _max_q_bits(params) - SWITCH_BITS + 1):
        if TAIL_SIGMAS * sigma < 2.0 ** (bits - params.msg_bits) / 2:
            return bits
    raise ConfigError(f"owners: no modulus within the security bound keeps a sum of {owners} owners exact")


class _PublicA:
    """``GROUP`` polynomials ``a^(t)`` mod ``Q`` (an owner's, or the sums of the owners'), transformed
    once: the spectra of their halves ``a = a_hi·2^split + a_lo`` (centered, ``|a_hi|, |a_lo| ≤
    2^(split−1)``), each holding the inverse transform's ``1/(N/2)`` (exact: a power of 2)."""

    def __init__(self, a: np.ndarray, q_bits: int, twist: np.ndarray) -> None:
        half = a.shape[-1] // 2
        self.split = -(-q_bits // 2)
        self.hi, self.lo = fft.empty((a.shape[0], half)), fft.empty((a.shape[0], half))

        def rows(r0: int, r1: int) -> None:  # the pool's threads take the polynomials in ranges
            if kernels.enabled():  # one pass; 1/(N/2) applied before the transform (a power of 2: exact)
                kernels.loops().fold_public(a[r0:r1], q_bits, self.split, 1.0 / half, twist, self.hi[r0:r1],
                                            self.lo[r0:r1])
                fft.forward(self.hi[r0:r1])
                fft.forward(self.lo[r0:r1])
                return
            v = a[r0:r1].astype(np.int64)
            v -= np.where(v >= 1 << (q_bits - 1), np.int64(1) << q_bits, 0)  # centered
            hi = np.rint(v / 2.0**self.split)
            lo = v - hi * 2.0**self.split
            for x, out in ((hi, self.hi[r0:r1]), (lo, self.lo[r0:r1])):
                np.multiply(x[:, :half] + 1j * x[:, half:], twist, out=out)
                fft.forward(out)
                out /= half

        map_ranges(rows, chunks(a.shape[0], 8))

    @staticmethod
    def expand(seed: bytes, n: int, q_bits: int) -> np.ndarray:
        """The public polynomials of ``seed``: (GROUP, N) uniform residues mod ``2^q_bits`` (uint64)."""
        words = aes_ctr(derive_key(b"helora/fedsum-a", seed), 8 * n * GROUP).view("<u8").astype(np.uint64)
        return (words & np.uint64((1 << q_bits) - 1)).reshape(GROUP, n)

    def spectra(self, secrets: np.ndarray, first: int, hi: np.ndarray, lo: np.ndarray) -> None:
        """Into ``hi`` and ``lo`` (rows, N/2): the spectra of ``a_hi·s`` and ``a_lo·s`` of rows
        ``first …``, given the forward transforms of their folded, twisted secrets ``⌊first/GROUP⌋ …``
        (count, N/2): row ``r`` pairs secret ``⌊r/GROUP⌋`` with ``a^(r mod GROUP)``."""
        if kernels.enabled():
            kernels.loops().group_spectra(secrets, self.hi, self.lo, first, hi, lo)
        else:
            rows = first + np.arange(hi.shape[0])
            j, t = rows // GROUP - first // GROUP, rows % GROUP
            np.multiply(secrets[j], self.hi[t], out=hi)
            np.multiply(secrets[j], self.lo[t], out=lo)

    def times(self, secrets: np.ndarray, first: int, hi: np.ndarray, lo: np.ndarray) -> None:
        """``spectra``, then their inverse transforms in place (to untwist; unscaled: the spectra
        hold 1/(N/2))."""
        self.spectra(secrets, first, hi, lo)
        fft.inverse(hi)
        fft.inverse(lo)

    def products(self, secrets: RowSecrets, r0: int, r1: int, twist: np.ndarray,
                 block: _Block) -> tuple[np.ndarray, np.ndarray]:
        """The inverse transforms of ``a_hi·s`` and ``a_lo·s`` (``times``) for rows ``r0 … r1−1``,
        in a thread's ``block`` buffers. The secrets' transforms stay in the block for the next rows
        of the same groups (a thread's blocks run in order: a group of GROUP rows is 4 blocks)."""
        g0, g1 = r0 // GROUP, (r1 - 1) // GROUP + 1
        spec = block.spec[: g1 - g0]
        if block.groups != (g0, g1):
            block.groups = None  # until the transform is done
            secrets.folded(g0, g1, twist, out=spec)
            fft.forward(spec)
            block.groups = (g0, g1)
        if r1 - r0 == _BLOCK_ROWS:  # a whole block: its bound transforms
            self.spectra(spec, r0, block.hi, block.lo)
            return block.inverse()
        hi, lo = block.hi[: r1 - r0], block.lo[: r1 - r0]
        self.times(spec, r0, hi, lo)
        return hi, lo


class _Block:
    """A thread's buffers for one block of rows: its secrets' transforms (and which groups they
    are), the spectra of ``a_hi·s`` and ``a_lo·s``, and their inverse transforms, out of place
    (faster than in place): ``hi`` → ``out``, then ``lo`` → ``hi``."""

    def __init__(self, n: int) -> None:
        half = n // 2
        self.spec = fft.empty((-(-_BLOCK_ROWS // GROUP) + 1, half))
        self.hi, self.lo, self.out = (fft.empty((_BLOCK_ROWS, half)) for _ in range(3))
        self._inverse_hi = fft.bound(self.hi, inverse=True, out=self.out)
        self._inverse_lo = fft.bound(self.lo, inverse=True, out=self.hi)
        self.groups: tuple[int, int] | None = None

    def inverse(self) -> tuple[np.ndarray, np.ndarray]:
        """The inverse transforms of a whole block's spectra in ``hi`` and ``lo``: (``a_hi·s``,
        ``a_lo·s``) as views of ``out`` and ``hi``."""
        self._inverse_hi()
        self._inverse_lo()
        return self.out, self.hi


def encode_fixed(x: np.ndarray, scale: float, limit: int, out: np.ndarray) -> bool:
    """``out = round(x·scale)`` for float64 ``x`` into int64 ``out`` (1-D, the same length); False,
    with ``out`` undefined, if a value is past ``±limit`` or not finite (one compiled pass)."""
    if kernels.enabled():
        return bool(kernels.loops().fixed_point(x, scale, limit, out))
    y = x * scale
    if not np.all(np.abs(y) <= limit):  # False for a NaN
        return False
    np.rint(y, out=y)
    out[:] = y
    return True


def _unfold(x: np.ndarray, untwist: np.ndarray) -> np.ndarray:
    """Inverse transforms (rows, N/2) to their rounded integer coefficients (rows, N) int64."""
    z = x * untwist
    return np.rint(np.concatenate([z.real, z.imag], axis=1)).astype(np.int64)


def _a_s(a: _PublicA, hi: np.ndarray, lo: np.ndarray, untwist: np.ndarray) -> np.ndarray:
    """``a·s`` (not reduced), int64, from ``_PublicA.times``'s transforms."""
    return (_unfold(hi, untwist) << a.split) + _unfold(lo, untwist)


@dataclass(frozen=True)
class SumScheme:
    """The public shape of one federation's encrypted sums: ``owners`` (the most contributions a
    round may add), the parameter set, and what follows from them."""

    owners: int
    params: ParamSet = DEFAULT
    bits: int = field(init=False)
    per_owner_max: int = field(init=False)

    def __post_init__(self) -> None:
        if self.params.noise_eta > MAX_PLANE_ETA:
            raise ConfigError(f"encrypted sum: noise_eta {self.params.noise_eta} above {MAX_PLANE_ETA} (a sample's 2·eta bits "
                              "are read as one 64-bit field: sampling.plane_binomial)")
        object.__setattr__(self, "bits", sum_bits(self.params, self.owners))
        if self.owners > self.params.max_message:
            raise ConfigError(f"owners: {self.owners} exceeds the plaintext range")
        object.__setattr__(self, "per_owner_max", self.params.max_message // self.owners)

    @property
    def q_bits(self) -> int:
        """``log2 Q``, the modulus the owners encrypt under before the switch to ``2^bits``."""
        return self.bits + SWITCH_BITS

    def rows(self, values: int) -> int:
        """Ciphertext rows holding ``values`` integers (N a row)."""
        return max(1, -(-values // self.params.n))

    def _check(self, secrets: RowSecrets) -> np.ndarray:
        if secrets.params != self.params:
            raise ConfigError("encrypted sum: the secrets' parameter set is not the scheme's")
        k = np.arange(self.params.n // 2)
        return np.exp(1j * np.pi * k / self.params.n)  # ring.SmallSecretMultiplier's twist

    def encrypt(self, secrets: RowSecrets, m: np.ndarray, seed: bytes) -> PackedRows:
        """One owner's integers ``m`` (flat) as packed ``b'`` rows at ``2^bits`` (zero-padded to
        whole rows); refuses a value past ``±per_owner_max``."""
        m = np.asarray(m)
        if m.ndim != 1 or not np.issubdtype(m.dtype, np.integer):
            raise ConfigError("encrypted sum: a flat integer vector is required")
        if m.size and m.dtype.kind == "u" and int(m.max()) > self.per_owner_max:  # before a cast wraps it
            raise ConfigError(f"encrypted sum: a value outside ±{self.per_owner_max}")
        rows = np.zeros((self.rows(m.size), self.params.n), dtype=np.int64)
        rows.reshape(-1)[: m.size] = m
        return self.encrypt_rows(secrets, rows.shape[0], lambda r0, r1: rows[r0:r1], seed)

    def encrypt_rows(self, secrets: RowSecrets, rows: int, source: Callable[[int, int], np.ndarray],
                     seed: bytes) -> PackedRows:
        """``encrypt`` of ``rows`` rows of integers that ``source(r0, r1)`` gives, (r1 − r0, N) int64,
        a block at a time as the encryption needs them (a large update is never held whole)."""
        eta = self.params.noise_eta
        return self._encrypt_rows(secrets, rows, source, seed,
                                  lambda r0, r1: noise_stream((r1 - r0) * self.params.n * eta // 4))

    def _encrypt_rows(self, secrets: RowSecrets, rows: int, source: Callable[[int, int], np.ndarray], seed: bytes,
                      noise: Callable[[int, int], np.ndarray]) -> PackedRows:
        """``encrypt_rows`` with the noise's keystream for rows ``r0 … r1−1`` from ``noise(r0, r1)``
        (``sampling.noise_stream``'s bytes; a fixed stream in known-answer tests)."""
        twist = self._check(secrets)
        if len(seed) != SEED_BYTES:
            raise ConfigError(f"encrypted sum: the seed must be {SEED_BYTES} bytes")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"encrypted sum: {rows!r} rows")
        n, q_bits, eta, limit = self.params.n, self.q_bits, self.params.noise_eta, self.per_owner_max
        a = _PublicA(_PublicA.expand(seed, n, q_bits), q_bits, twist)
        untwist, delta = np.conj(twist), 1 << (q_bits - self.params.msg_bits)
        words = np.empty((rows, n * self.bits // 64), dtype="<u8")  # N·bits fills whole words
        fused = kernels.enabled()

        def block(lo: int, hi: int) -> None:
            bufs, f, v = _Block(n), np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64)
            for r0 in range(lo, hi, _BLOCK_ROWS):
                r1 = min(r0 + _BLOCK_ROWS, hi)
                m = np.asarray(source(r0, r1))
                if m.shape != (r1 - r0, n) or m.dtype != np.int64:
                    raise ConfigError(f"encrypted sum: rows {r0}…{r1 - 1} are not ({r1 - r0}, {n}) int64")
                t_hi, t_lo = a.products(secrets, r0, r1, twist, bufs)
                raw = noise(r0, r1)
                if fused:
                    ok = kernels.loops().finish_sum_encrypt(t_hi, t_lo, untwist, a.split, m, limit, delta,
                                                            noise_planes(raw, r1 - r0, n, eta), eta, q_bits,
                                                            SWITCH_BITS, words[r0:r1], f, v)
                else:
                    ok = max(int(m.max()), -int(m.min())) <= limit
                    if ok:
                        e = plane_binomial(raw, r1 - r0, n, eta)
                        y = _switch(e + m * delta - _a_s(a, t_hi, t_lo, untwist), q_bits)
                        words[r0:r1] = np.frombuffer(pack_bits(y, self.bits), dtype="<u8").reshape(r1 - r0, -1)
                if not ok:
                    raise ConfigError(f"encrypted sum: a value outside ±{limit}, the range of one of "
                                      f"{self.owners} owners (it would wrap the sum)")

        map_ranges(block, chunks(rows, _BLOCK_ROWS, align=_BLOCK_ROWS))
        return PackedRows(self.bits, n, words.reshape(-1).view(np.uint8).data.toreadonly())

    def add(self, parts: list[PackedRows]) -> PackedRows:
        """The aggregator's sum of switched rows, mod ``2^bits`` (no key involved)."""
        if not parts:
            raise ConfigError("encrypted sum: nothing to add")
        shape = (parts[0].rows, self.params.n)
        for p in parts:
            if p.bits != self.bits or p.shape != shape:
                raise ConfigError(f"encrypted sum: parts of {shape[0]} rows at {self.bits} bits expected")
        total = parts[0].unpack().astype(np.uint64)
        for p in parts[1:]:
            total += p.unpack()
        total &= np.uint64((1 << self.bits) - 1)
        return PackedRows.pack(total, self.bits)

    def decrypt(self, secrets: RowSecrets, total: PackedRows, seeds: list[bytes], count: int) -> np.ndarray:
        """The first ``count`` integers of the sum of the owners whose seeds are ``seeds``."""
        twist = self._check(secrets)
        params, bits, q_bits = self.params, self.bits, self.q_bits
        if total.bits != bits or total.shape[1] != params.n or not 0 <= count <= total.rows * params.n:
            raise DecryptionError(f"encrypted sum: {total.rows} rows at {total.bits} bits do not hold {count} "
                                  f"values at {bits} bits")
        if not 1 <= len(seeds) <= self.owners:
            raise DecryptionError(f"encrypted sum: {len(seeds)} seeds for a federation of {self.owners}")
        a_sum = np.zeros((GROUP, params.n), dtype=np.uint64)
        for seed in seeds:  # A^(t) = Σ a_i^(t) mod Q
            a_sum += _PublicA.expand(seed, params.n, q_bits)
        a = _PublicA(a_sum & np.uint64((1 << q_bits) - 1), q_bits, twist)
        untwist, b = np.conj(twist), total.unpack()
        out = np.empty(b.shape, dtype=np.int64)

        def block(lo: int, hi: int) -> None:
            bufs = _Block(params.n)
            for r0 in range(lo, hi, _BLOCK_ROWS):
                r1 = min(r0 + _BLOCK_ROWS, hi)
                x = _switch(_a_s(a, *a.products(secrets, r0, r1, twist, bufs), untwist), q_bits)
                x = (x + b[r0:r1]).astype(np.int64) & ((1 << bits) - 1)  # Δ'·Σm + ε mod 2^bits
                x -= np.where(x >= 1 << (bits - 1), np.int64(1) << bits, 0)  # centered
                out[r0:r1] = np.rint(x / 2.0 ** (bits - params.msg_bits))

        map_ranges(block, chunks(total.rows, _BLOCK_ROWS, align=_BLOCK_ROWS))
        return out.reshape(-1)[:count]


def _switch(y: np.ndarray, q_bits: int) -> np.ndarray:
    """``round((y mod 2^q_bits) / 2^SWITCH_BITS)`` mod ``2^(q_bits − SWITCH_BITS)`` for int64 ``y``:
    uint64 (the compiled ``finish_sum_encrypt``'s integers)."""
    y = y & ((1 << q_bits) - 1)
    y += 1 << (SWITCH_BITS - 1)
    y >>= SWITCH_BITS
    y &= (1 << (q_bits - SWITCH_BITS)) - 1
    return y.astype(np.uint64)

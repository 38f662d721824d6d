"""Sums of several owners' integer vectors under one shared RLWE secret: the federated mode's
full encryption (DESIGN §5; ``docs/federated.md``, "Every coordinate encrypted").

The owners of a federation share a secret; the aggregator holds none. For one round every owner
uses the same ternary secret ``s`` (derived from the shared key and the round id) and its own
fresh 16-byte seed (``SEED_BYTES``) for the public ``a_i``. Owner ``i`` writes its integers ``m_i`` (fixed point,
``|m_i| ≤ per_owner_max``) N to a row and encrypts each row as the split protocol encrypts a
feature column, ``b_i = −a_i·s + e_i + Δ·m_i (mod q)``, then switches ``b_i`` to ``2^bits``:
``b'_i = round(b_i·2^bits/q)``. Only ``b'_i`` (``bits`` per value) and the seed travel.

The aggregator adds the ``b'_i`` mod ``2^bits``. An owner decrypts the sum with ``A = Σ a_i mod q``
(every seed comes back with the aggregate), as the split protocol's hint path does:
``Σ b'_i + round((A·s mod q)·2^bits/q) = Δ'·Σ m_i + ε (mod 2^bits)`` with ``Δ' = Δ·2^bits/q``.

Exactness: ``ε = (2^bits/q)·Σ e_i + Σ r_i − r_A``, each rounding ``r`` uniform in ``[−½, ½]``, so
``Var ε = K/12 + 1/12 + K·σ²·(2^bits/q)²`` for K owners. ``sum_bits`` is the smallest ``bits``
with ``TAIL_SIGMAS·√Var ε < Δ'/2``; ``per_owner_max = ⌊max_message / K⌋`` keeps ``|Σ m_i|`` inside
the plaintext range, so the sum of up to K owners never wraps. A value past the range is refused,
never reduced.

Security: each row is an RLWE sample ``(a_i, b_i)`` under ``s`` with a fresh uniform ``a_i`` and
fresh noise, so ``b'_i`` is pseudorandom to anyone without ``s`` (RLWE, the HE standard's
parameters of ``N2048``). Two owners must never share a seed (``b_i − b_j`` would cancel ``a·s``):
seeds are 16 bytes from the OS CSPRNG, and the aggregator refuses a repeated one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DecryptionError
from .bits import PackedRows
from .encrypt import _decode, encrypt, hint_a_s, switch_rows
from .keys import RequestSecret
from .parallel import map_rows
from .params import DEFAULT, TAIL_SIGMAS, ParamSet
from .ring import reduce_float
from .sampling import SEED_BYTES, expand_a


def sum_bits(params: ParamSet, owners: int) -> int:
    """Smallest ``bits`` at which the switched sum of ``owners`` fresh encryptions decodes exactly."""
    if not isinstance(owners, int) or isinstance(owners, bool) or owners < 1:
        raise ConfigError(f"owners: {owners!r} must be a positive integer")
    for bits in range(params.msg_bits + 1, int(params.log_q) + 1):
        scaled = params.noise_sigma * 2.0**bits / params.q
        sigma = math.sqrt(owners / 12 + 1 / 12 + owners * scaled**2)
        if TAIL_SIGMAS * sigma < 2.0 ** (bits - params.msg_bits) / 2:
            return bits
    raise ConfigError(f"owners: no modulus below q keeps a sum of {owners} owners exact")


@dataclass(frozen=True)
class SumScheme:
    """The public shape of one federation's encrypted sums: ``owners`` (the most contributions a
    round may add), the parameter set, and what follows from them."""

    owners: int
    params: ParamSet = DEFAULT
    bits: int = field(init=False)
    per_owner_max: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", sum_bits(self.params, self.owners))
        if self.owners > self.params.max_message:
            raise ConfigError(f"owners: {self.owners} exceeds the plaintext range")
        object.__setattr__(self, "per_owner_max", self.params.max_message // self.owners)

    def rows(self, values: int) -> int:
        """Ciphertext rows holding ``values`` integers (N a row)."""
        return max(1, -(-values // self.params.n))

    def encrypt(self, secret: RequestSecret, m: np.ndarray, seed: bytes) -> PackedRows:
        """One owner's integers ``m`` (flat) as packed ``b'`` rows at ``2^bits`` (zero-padded to
        whole rows); refuses a value past ``±per_owner_max``."""
        if secret.params != self.params:
            raise ConfigError("encrypted sum: the secret's parameter set is not the scheme's")
        if len(seed) != SEED_BYTES:
            raise ConfigError(f"encrypted sum: the seed must be {SEED_BYTES} bytes")
        m = np.asarray(m)
        if m.ndim != 1 or not np.issubdtype(m.dtype, np.integer):
            raise ConfigError("encrypted sum: a flat integer vector is required")
        if m.size and max(int(m.max()), -int(m.min())) > self.per_owner_max:
            raise ConfigError(f"encrypted sum: a value outside ±{self.per_owner_max}, the range of one of "
                              f"{self.owners} owners (it would wrap the sum)")
        n = self.params.n
        if m.size and m.size % n == 0:  # whole rows already (``encsum.encode_update`` pads them)
            rows = m.reshape(-1, n)
        else:
            rows = np.zeros((self.rows(m.size), n), dtype=m.dtype)
            rows.reshape(-1)[: m.size] = m
        batch = encrypt(secret, rows.T, seed)  # ciphertext j holds row j in its N coefficients
        return PackedRows.pack(switch_rows(batch.b, self.params, self.bits), self.bits)

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

    def decrypt(self, secret: RequestSecret, total: PackedRows, seeds: list[bytes], count: int) -> np.ndarray:
        """The first ``count`` integers of the sum of the owners whose seeds are ``seeds``."""
        params = self.params
        if total.bits != self.bits or total.shape[1] != params.n or not 0 <= count <= total.rows * params.n:
            raise DecryptionError(f"encrypted sum: {total.rows} rows at {total.bits} bits do not hold {count} "
                                  f"values at {self.bits} bits")
        if not 1 <= len(seeds) <= self.owners:
            raise DecryptionError(f"encrypted sum: {len(seeds)} seeds for a federation of {self.owners}")
        rows = total.rows
        b = total.unpack()
        out = np.empty((rows, params.n), dtype=np.int64)
        modulus = float(1 << self.bits)
        primes = np.array(params.primes, dtype=np.uint64)[None, :, None]
        mul = secret.multiplier

        def block(lo: int, hi: int) -> None:
            a = np.zeros((hi - lo, params.limbs, params.n), dtype=np.uint64)
            for seed in seeds:  # A = Σ a_i mod q, limb by limb
                a += expand_a(seed, params, hi - lo, start=lo)
                a %= primes
            x = hint_a_s(mul, a.astype(np.uint32), params, self.bits, (0, params.n))  # as the hint path
            x += b[lo:hi]
            x = reduce_float(x, modulus)
            x /= modulus
            out[lo:hi] = _decode(x, params).T

        map_rows(block, rows, minimum=16, row_size=params.limbs * params.n)
        return out.reshape(-1)[:count]

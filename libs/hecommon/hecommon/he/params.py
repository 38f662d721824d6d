"""Parameter sets of the linearly homomorphic RLWE scheme (DESIGN §3).

Ring ``R_q = Z_q[X]/(X^N + 1)`` with ``q = p_1 ⋯ p_L`` a product of NTT-friendly primes
``p_i ≡ 1 (mod 2N)``, ``p_i < 2^27``. Messages are integers ``|m| < 2^(msg_bits-1)`` encoded as
``Δ·m`` with ``Δ = ⌊q / 2^msg_bits⌋``; decoding divides by ``Δ`` (not BFV's ``t·x/q``).

Every set is checked at construction against the HomomorphicEncryption.org security standard
(Albrecht et al., 2018, Table 1: ternary secret, classical, 128-bit, error σ ≈ 3.19), and refused
if it is weaker: log2 q above the table's bound for N, or a noise narrower than σ = 3.19.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError, InsecureParameters

#: HE standard Table 1, 128-bit classical security, uniform ternary secret: N -> max log2(q).
MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Residues must stay below 2^27 so that a float64 GEMM over residues (0 <= r < 2^27, not
#: centered) and 8-bit weights (|w| <= 2^7) with d_in <= 2^14 terms stays below 2^48 < 2^53.
MAX_PRIME_BITS = 27
#: Longest inner dimension of one exact float64 GEMM; longer sums are chunked and reduced.
MAX_GEMM_TERMS = 1 << 14
#: HE standard (Albrecht et al., 2018), Table 1 assumes an error of standard deviation 8/√(2π) ≈ 3.19.
MIN_NOISE_SIGMA = 3.19
#: Tail bound, in standard deviations, under which every coefficient must decode exactly.
#: A Gaussian tail at 10 sigma is ~1.5e-23 per coefficient.
TAIL_SIGMAS = 10.0


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the first 13 prime bases suffice)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@dataclass(frozen=True)
class ParamSet:
    """One parameter set. Construct through the registry (``get``) or validate a custom one.

    ``noise_eta``: the error is centered-binomial with parameter eta (variance eta/2).
    ``msg_bits``: integer results ``|m| < 2^(msg_bits-1)`` decode exactly.
    """

    name: str
    n: int
    primes: tuple[int, ...]
    msg_bits: int = 30
    noise_eta: int = 24
    #: bits of the power-of-two modulus that outputs are switched to; derived.
    out_bits: int = field(init=False)
    #: bits of ``b`` when the client holds the layer's hint (``a`` is not sent); derived.
    hint_out_bits: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("ParamSet.name: a non-empty string is required")
        if self.n not in MAX_LOG_Q_128:
            raise ConfigError(f"ParamSet.n: {self.n!r} is not one of {sorted(MAX_LOG_Q_128)}")
        if not self.primes or len(set(self.primes)) != len(self.primes):
            raise ConfigError("ParamSet.primes: a non-empty tuple of distinct primes is required")
        for p in self.primes:
            if not isinstance(p, int) or not is_prime(p):
                raise ConfigError(f"ParamSet.primes: {p!r} is not a prime")
            if p.bit_length() > MAX_PRIME_BITS:
                raise ConfigError(f"ParamSet.primes: {p} has more than {MAX_PRIME_BITS} bits")
            if p % (2 * self.n) != 1:
                raise ConfigError(f"ParamSet.primes: {p} is not 1 mod 2N = {2 * self.n}")
        if not 8 <= self.msg_bits <= self.log_q - 8:
            raise ConfigError(f"ParamSet.msg_bits: {self.msg_bits} leaves no room for noise")
        if not isinstance(self.noise_eta, int) or not 4 <= self.noise_eta <= 64 or self.noise_eta % 4:
            raise ConfigError(f"ParamSet.noise_eta: {self.noise_eta!r} must be a multiple of 4 in 4..64 "
                              "(the sampler takes whole nibbles)")
        if self.noise_sigma < MIN_NOISE_SIGMA:
            raise InsecureParameters(
                f"ParamSet.noise_eta: {self.noise_eta} gives σ = {self.noise_sigma:.2f}, below the "
                f"{MIN_NOISE_SIGMA} the 128-bit table assumes (HE standard, Table 1); use 24 or more"
            )
        if self.log_q > MAX_LOG_Q_128[self.n]:
            raise InsecureParameters(
                f"ParamSet.primes: log2(q) = {self.log_q:.2f} exceeds {MAX_LOG_Q_128[self.n]}, "
                f"the 128-bit bound for N = {self.n} (HE standard, Table 1)"
            )
        object.__setattr__(self, "out_bits", self._smallest_exact_out_bits(with_a=True))
        object.__setattr__(self, "hint_out_bits", self._smallest_exact_out_bits(with_a=False))
        if self.fresh_noise_bound(MAX_GEMM_TERMS) >= self.delta / 2:
            raise ConfigError(f"ParamSet.msg_bits: {self.msg_bits} leaves Δ too small for the noise")

    # -- derived quantities -------------------------------------------------------------
    @property
    def q(self) -> int:
        return math.prod(self.primes)

    @property
    def log_q(self) -> float:
        return math.log2(self.q)

    @property
    def limbs(self) -> int:
        return len(self.primes)

    @property
    def delta(self) -> int:
        return self.q >> self.msg_bits

    @property
    def noise_sigma(self) -> float:
        return math.sqrt(self.noise_eta / 2)

    @property
    def max_message(self) -> int:
        """Largest |m| that decodes exactly."""
        return (1 << (self.msg_bits - 1)) - 1

    def fresh_noise_bound(self, d_in: int, weight_bound: int = 127) -> float:
        """Tail bound of the noise of ``Σ_j w_j·ct_j`` (each ``|w_j| <= weight_bound``)."""
        return TAIL_SIGMAS * self.noise_sigma * weight_bound * math.sqrt(d_in)

    def _smallest_exact_out_bits(self, with_a: bool) -> int:
        """Smallest k such that switching to 2^k keeps every result exact (DESIGN §3).

        With ``a`` sent: rounding ``a`` adds ``ε·s`` with variance ``N·(2/3)/12 = N/18`` (ternary
        ``s``), rounding ``b`` adds 1/12. When the client holds the hint ``a`` mod q, it rounds
        ``a·s`` itself after the product: 1/12 instead of N/18. The scaled fresh noise adds the rest.
        Exact while ``TAIL_SIGMAS·σ < Δ'/2`` with ``Δ' = 2^(k - msg_bits)``.
        """
        rounding = self.n / 18 if with_a else 1 / 12
        for k in range(self.msg_bits + 1, int(self.log_q) + 1):
            scaled = self.fresh_noise_bound(MAX_GEMM_TERMS) / TAIL_SIGMAS * 2.0**k / self.q
            sigma = math.sqrt(rounding + 1 / 12 + scaled**2)
            if TAIL_SIGMAS * sigma < 2.0 ** (k - self.msg_bits) / 2:
                return k
        raise ConfigError(f"ParamSet {self.name}: no output modulus below q keeps results exact")

    def describe(self) -> dict[str, object]:
        """Public description, as shipped in the model manifest."""
        return {
            "name": self.name,
            "n": self.n,
            "primes": list(self.primes),
            "msg_bits": self.msg_bits,
            "noise_eta": self.noise_eta,
            "out_bits": self.out_bits,
            "hint_out_bits": self.hint_out_bits,
            "log_q": round(self.log_q, 3),
        }


def _find_primes(n: int, count: int, bits: int = MAX_PRIME_BITS) -> tuple[int, ...]:
    """The ``count`` largest primes below 2^bits that are 1 mod 2n."""
    found: list[int] = []
    p = ((1 << bits) - 1) // (2 * n) * (2 * n) + 1
    while len(found) < count:
        if p < (1 << bits) and is_prime(p):
            found.append(p)
        p -= 2 * n
    return tuple(found)


# Default: N = 2048, two 27-bit primes (log2 q = 53.998 <= 54). Results |Y| < 2^29 decode.
N2048 = ParamSet("n2048-q54", 2048, _find_primes(2048, 2), msg_bits=30)
# N = 4096, four primes (log2 q = 107.99 <= 109), results |Y| < 2^35 decode; its output moduli are
# chosen, like the default's, for sums of at most MAX_GEMM_TERMS terms (hecommon.he.exact splits wider).
N4096 = ParamSet("n4096-q108", 4096, _find_primes(4096, 4), msg_bits=36)

REGISTRY: dict[str, ParamSet] = {p.name: p for p in (N2048, N4096)}
DEFAULT = N2048


def get(name: str) -> ParamSet:
    """Look up a registered parameter set by id."""
    try:
        return REGISTRY[name]
    except KeyError:
        from ..errors import ParameterMismatch

        raise ParameterMismatch(
            f"unknown parameter set {name!r}; known: {sorted(REGISTRY)}"
        ) from None

import math

import pytest
from hecommon.errors import ConfigError, InsecureParameters, ParameterMismatch
from hecommon.he import params as P


@pytest.mark.parametrize("ps", list(P.REGISTRY.values()), ids=lambda p: p.name)
def test_registered_sets_meet_the_128_bit_table(ps):
    assert ps.log_q <= P.MAX_LOG_Q_128[ps.n]
    for p in ps.primes:
        assert P.is_prime(p) and p % (2 * ps.n) == 1 and p < 2**27
    # Δ = ⌊q / 2^msg_bits⌋ and results below 2^(msg_bits-1) decode
    assert ps.delta == ps.q // 2**ps.msg_bits
    assert ps.out_bits < ps.log_q


def test_default_set_is_the_reference_design():
    ps = P.DEFAULT
    assert ps.n == 2048 and ps.limbs == 2 and ps.msg_bits == 30
    assert 53 < ps.log_q <= 54
    # the 8-bit x 8-bit worst case at d_in = 8192 fits the message space
    assert 255 * 127 * 8192 <= ps.max_message
    # and its noise stays far below Δ/2
    assert ps.fresh_noise_bound(8192) < ps.delta / 2 / 2**4


def test_insecure_set_is_refused_naming_the_field():
    primes = P._find_primes(1024, 2)
    with pytest.raises(InsecureParameters, match="primes"):
        P.ParamSet("too-big-q", 1024, primes)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="x", n=3000, primes=(134176769,)), "n"),
        (dict(name="x", n=2048, primes=(134176769, 134176769)), "primes"),
        (dict(name="x", n=2048, primes=(134176771,)), "primes"),  # not prime
        (dict(name="x", n=2048, primes=(7681,)), "primes"),  # prime, not 1 mod 4096
        (dict(name="x", n=2048, primes=(2**31 - 1,)), "primes"),  # too many bits
        (dict(name="", n=2048, primes=(134176769,)), "name"),
        (dict(name="x", n=2048, primes=(134176769, 134111233), noise_eta=0), "noise_eta"),
    ],
)
def test_malformed_sets_are_refused(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        P.ParamSet(**kwargs)


def test_unknown_set_lookup():
    with pytest.raises(ParameterMismatch, match="unknown parameter set"):
        P.get("n2048-nope")


def test_out_bits_is_the_smallest_exact_modulus():
    ps = P.DEFAULT
    k = ps.out_bits
    sigma = math.sqrt(ps.n / 18 + 1 / 12)
    assert P.TAIL_SIGMAS * sigma < 2 ** (k - ps.msg_bits) / 2
    assert not P.TAIL_SIGMAS * sigma < 2 ** (k - 1 - ps.msg_bits) / 2


@pytest.mark.parametrize("eta", [4, 8, 12, 16, 20])
def test_noise_narrower_than_the_table_is_refused(eta):
    # HE standard: σ = 3.19 (≈ 8/√(2π)); a centered binomial of parameter η has σ = √(η/2),
    # so every η below 24 that is a multiple of 4 (σ ≤ 3.16) is too narrow
    primes = P.DEFAULT.primes
    with pytest.raises(InsecureParameters, match="noise_eta"):
        P.ParamSet("narrow", 2048, primes, noise_eta=eta)


@pytest.mark.parametrize("eta", [25, 26, 30, 33])
def test_noise_eta_not_a_multiple_of_four_is_refused_at_construction(eta):
    with pytest.raises(ConfigError, match="noise_eta.*multiple of 4"):
        P.ParamSet("odd-eta", 2048, P.DEFAULT.primes, noise_eta=eta)


def test_noise_width_is_reported_and_the_default_meets_the_table():
    assert P.DEFAULT.noise_sigma >= P.MIN_NOISE_SIGMA
    assert P.ParamSet("eta28", 2048, P.DEFAULT.primes, noise_eta=28).noise_sigma > P.MIN_NOISE_SIGMA

"""Encrypted sums of several owners under one shared RLWE secret (``hecommon.he.fedsum``): exact
at the ends of the range for 2–5 owners, refused just past it, and nothing of one owner readable
from the sum."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hecommon.errors import ConfigError, DecryptionError
from hecommon.he.fedsum import SumScheme, sum_bits
from hecommon.he.keys import SecretKey
from hecommon.he.params import N2048, N4096


def _round(owners: int, values: int, fill):
    scheme = SumScheme(owners)
    key, rid = SecretKey.generate(), os.urandom(16)
    secret = key.request_secret(N2048, rid)
    ms = [fill(i, scheme.per_owner_max) for i in range(owners)]
    seeds = [os.urandom(16) for _ in range(owners)]
    parts = [scheme.encrypt(secret, m, s) for m, s in zip(ms, seeds, strict=True)]
    total = scheme.add(parts)
    return scheme, secret, ms, seeds, parts, total


@pytest.mark.parametrize("owners", [2, 3, 4, 5])
def test_the_sum_is_exact_at_the_ends_of_the_range(owners):
    values = 3 * N2048.n + 17  # several rows, the last one partly padding
    rng = np.random.default_rng(owners)

    def fill(i, top):
        m = rng.integers(-top, top + 1, values)
        m[:50] = top  # every owner at +max: the sum at +K·max
        m[50:100] = -top  # and at −max
        m[100:150] = top if i % 2 else -top  # alternating: the sum near 0
        return m

    scheme, secret, ms, seeds, _, total = _round(owners, values, fill)
    got = scheme.decrypt(secret, total, seeds, values)
    np.testing.assert_array_equal(got, np.sum(ms, axis=0))
    assert got[0] == owners * scheme.per_owner_max <= N2048.max_message


def test_a_value_just_past_the_range_is_refused_not_wrapped():
    scheme = SumScheme(3)
    secret = SecretKey.generate().request_secret(N2048, os.urandom(16))
    for bad in (scheme.per_owner_max + 1, -scheme.per_owner_max - 1):
        m = np.zeros(10, dtype=np.int64)
        m[4] = bad
        with pytest.raises(ConfigError, match="outside"):
            scheme.encrypt(secret, m, os.urandom(16))
    with pytest.raises(ConfigError, match="integer"):
        scheme.encrypt(secret, np.zeros(4), os.urandom(16))
    with pytest.raises(ConfigError, match="seed"):
        scheme.encrypt(secret, np.zeros(4, dtype=np.int64), b"short")


def test_bits_follow_the_owner_count_and_too_few_lose_the_sum():
    """``sum_bits`` grows with the owners (34 bits up to 6, 38 for 1,024), and the margin is real:
    the same five owners' sum switched three bits lower (a step ``Δ' = 2`` against rounding noise
    of σ ≈ 0.7) decrypts wrong in many coefficients, where ``sum_bits`` decrypts every one."""
    assert [sum_bits(N2048, k) for k in (1, 6, 7, 29, 30, 121, 122, 490, 491, 1024)] == [34, 34, 35, 35, 36, 36,
                                                                                        37, 37, 38, 38]
    assert SumScheme(5).per_owner_max * 5 <= N2048.max_message < (SumScheme(5).per_owner_max + 1) * 5
    assert SumScheme(2, N4096).bits == sum_bits(N4096, 2)
    with pytest.raises(ConfigError):
        sum_bits(N2048, 0)
    values = 4 * N2048.n
    rng = np.random.default_rng(3)
    scheme, secret, ms, seeds, _, total = _round(5, values, lambda i, top: rng.integers(-top, top + 1, values))
    want = np.sum(ms, axis=0)
    np.testing.assert_array_equal(scheme.decrypt(secret, total, seeds, values), want)
    low = SumScheme(5)
    object.__setattr__(low, "bits", scheme.bits - 3)
    parts = [low.encrypt(secret, m, s) for m, s in zip(ms, seeds, strict=True)]
    assert np.mean(low.decrypt(secret, low.add(parts), seeds, values) != want) > 0.05


def test_the_sum_holds_nothing_of_one_owner():
    """The sum is one contribution's size, equal to none of them, and with one owner's seed alone (or
    the wrong round's secret) it decrypts to nothing like that owner's values: only all seeds
    together open it, and then only to the sum."""
    values = 2 * N2048.n
    rng = np.random.default_rng(7)
    scheme, secret, ms, seeds, parts, total = _round(3, values, lambda i, top: rng.integers(-1000, 1000, values))
    assert len(total.data) == len(parts[0].data)
    assert all(bytes(total.data) != bytes(p.data) for p in parts)
    alone = scheme.decrypt(secret, total, seeds[:1], values)
    assert np.mean(alone == ms[0]) < 0.01 and np.abs(alone).mean() > 1e6  # uniform noise, not o0's values
    other = SecretKey.generate().request_secret(N2048, os.urandom(16))
    assert np.mean(scheme.decrypt(other, total, seeds, values) == np.sum(ms, axis=0)) < 0.01
    np.testing.assert_array_equal(scheme.decrypt(secret, total, seeds, values), np.sum(ms, axis=0))
    # one owner's ciphertext without the secret: its values centered look uniform, nothing like m
    b = parts[0].unpack().reshape(-1)[:values].astype(np.float64)
    naive = np.rint((np.where(b >= 2 ** (scheme.bits - 1), b - 2**scheme.bits, b)) / 2 ** (scheme.bits - N2048.msg_bits))
    assert abs(np.corrcoef(naive, ms[0])[0, 1]) < 0.05


def test_parts_of_another_shape_or_width_are_refused():
    scheme = SumScheme(2)
    secret = SecretKey.generate().request_secret(N2048, os.urandom(16))
    one = scheme.encrypt(secret, np.zeros(10, dtype=np.int64), os.urandom(16))
    two = scheme.encrypt(secret, np.zeros(N2048.n + 1, dtype=np.int64), os.urandom(16))
    with pytest.raises(ConfigError, match="rows"):
        scheme.add([one, two])
    with pytest.raises(ConfigError, match="rows"):
        SumScheme(64).add([one, one])  # 64 owners take more bits
    with pytest.raises(DecryptionError, match="seeds"):
        scheme.decrypt(secret, one, [os.urandom(16)] * 3, 10)

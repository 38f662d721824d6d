"""``--scheme full``: every coordinate of every owner's update encrypted with helora's RLWE
(``federated.encsum``, ``hecommon.he.fedsum``), embedded: the merged update is FlexLoRA's average
to within the fixed-point step, out-of-range updates are refused, the server sees nothing in the
clear, and bad contributions are refused while the round goes on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hecommon.errors import ConfigError, DecryptionError, MalformedMessage, ParameterMismatch
from hecommon.he.fedsum import SumScheme
from hecommon.wire import federated as fedwire
from helora_aggregator.federated import FederatedAggregator
from helora_orchestrator.federated import encsum
from helora_orchestrator.federated.round import run_round
from helora_orchestrator.federated.selective import CkksKeys


def flexlora_with_step(owners) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The sample-weighted average of the owners' ``ΔW`` now, and per layer the largest error the
    fixed point may add: half a step ``2^-f`` per owner, divided by the total weight."""
    size = len(owners)
    f = encsum.frac_bits(SumScheme(size), owners[0].cfg.update_range)
    total = sum(o.samples for o in owners)
    want = {n: sum(o.samples * o.delta()[n] for o in owners) / total for n in owners[0].shapes()}
    return want, {n: size * 0.5 * 2.0**-f / total * (1 + 1e-9) for n in want}


def test_a_full_round_is_flexlora_to_the_fixed_point_step(make_owners):
    owners = make_owners((4, 8, 16), (0.0, 0.0, 0.0), scheme="full", lr=1e-2)
    for r in (1, 2):
        for o in owners:
            o.train_local()
        want, tol = flexlora_with_step(owners)
        report = run_round(owners, FederatedAggregator(owners[0].keys.public_bytes()), r, train=False)
        assert not report.rejected
        assert isinstance(report.aggregate, fedwire.SumAggregate)
        assert report.aggregate.owners == ("o0", "o1", "o2")
        for o in owners:
            for name, dw in o.last_merged.items():
                err = np.abs(dw - want[name]).max()
                assert err <= tol[name], (name, err, tol[name])
                assert np.abs(want[name]).max() > 1e3 * tol[name]  # the step is far below the update
    # the merged adapters are every owner's own rank, and all owners hold the same ΔW
    for name in owners[0].shapes():
        np.testing.assert_array_equal(owners[0].last_merged[name], owners[2].last_merged[name])


def test_the_decrypted_sum_equals_the_integer_sum_exactly(make_owners):
    """Not just close: the aggregate decrypts to exactly the sum of the owners' fixed-point integers."""
    owners = make_owners((4, 8), (0.0, 0.0), scheme="full", lr=1e-2)
    for o in owners:
        o.train_local()
    rid = bytes(range(16))
    cs = [o.contribute_sum(rid, 2) for o in owners]
    agg, rejected = FederatedAggregator(owners[0].keys.public_bytes()).aggregate_sum(rid, cs, 2)
    assert not rejected
    scheme = SumScheme(2)
    m = sum(encsum.encode_update(o.delta(), o.samples, cs[0].layers, cs[0].frac_bits, scheme) for o in owners)
    got, weight = encsum.open_aggregate(owners[0].keys, agg)
    values = fedwire.sum_values(cs[0].layers)
    assert weight == sum(o.samples for o in owners) == m[values - 2] and m[values - 1] == 2  # weight, owners
    assert not m[values:].any()  # the padding of the last row
    pos = 0
    for lay in cs[0].layers:
        size = lay.d_out * lay.d_in
        np.testing.assert_array_equal(got[lay.name], m[pos:pos + size].reshape(lay.d_out, lay.d_in) /
                                      (weight * 2.0 ** cs[0].frac_bits))
        pos += size


def test_an_update_past_the_range_is_refused_before_anything_is_sent(make_owners):
    owners = make_owners((4,), (0.0,), scheme="full", update_range=0.2, lr=1e-2)
    owners[0].train_local()
    with pytest.raises(ConfigError, match="update range") as info:
        owners[0].contribute_sum(bytes(16), 3)
    assert "model.layers." in str(info.value) and "--update-range" in str(info.value)
    with pytest.raises(ConfigError, match="fractional bits"):
        encsum.frac_bits(SumScheme(3), 1e12)
    with pytest.raises(ConfigError, match="update_range"):
        make_owners((4,), (0.0,), scheme="full", update_range=float("nan"))


def test_the_server_sees_no_clear_value_and_no_key(make_owners):
    owners = make_owners((4, 8), (0.0, 0.0), scheme="full", lr=1e-2)
    owners[0].train_local()
    c = owners[0].contribute_sum(bytes(16), 2)
    data = fedwire.encode(c, 1 << 30)
    assert owners[0].keys.secret_key_bytes() not in data
    seen = fedwire.decode(data, 1 << 30)
    assert set(vars(seen)) == {"rid", "owner", "ctx", "params", "size", "frac_bits", "bits", "key", "layers", "seed",
                               "b", "lib"}  # no sample count, no factor, no position in the clear
    sum_key = owners[0].keys.sum_key()
    assert sum_key._master not in data  # the derived key, nor the round's ternary secret, never travels
    assert sum_key.request_secret(c_params(c), c.rid).s.tobytes() not in data
    assert seen.key == bytes.fromhex(sum_key.fingerprint())  # its public fingerprint does
    # b' read without the key, as the server would: no correlation with the update
    from helora_orchestrator.federated.dager import observed_from_sum

    for obs in observed_from_sum(data, list(owners[0].shapes())[:3]):
        true = owners[0].delta()[obs.layer].ravel()
        assert abs(np.corrcoef(obs.a.ravel(), true)[0, 1]) < 0.1, obs.layer
    assert len(c.b) <= 1.1 * 4 * sum(d_out * d_in for d_out, d_in in owners[0].shapes().values())  # ≈ fp32


def c_params(c):
    from hecommon.he.params import get

    return get(c.params)


def test_bad_contributions_are_refused_and_the_round_goes_on(make_owners):
    owners = make_owners((4, 8, 16), (0.0, 0.0, 0.0), scheme="full", lr=1e-2)
    for o in owners:
        o.train_local()
    stranger = CkksKeys.generate()
    first_seed: list[bytes] = []
    total = owners[0].samples + owners[2].samples
    want = {n: (owners[0].samples * owners[0].delta()[n] + owners[2].samples * owners[2].delta()[n]) / total
            for n in owners[0].shapes()}

    def tamper(o, data):
        c = fedwire.decode(data, 1 << 30)
        if o.name == "o0":
            first_seed.append(c.seed)
            return [data, b"\x81\xa1v\x07", data]  # garbage, then the same owner again
        if o.name == "o1":  # another federation's key, then a repeat of o0's seed
            return [fedwire.encode(dataclasses.replace(c, ctx=stranger.digest), 1 << 30),
                    fedwire.encode(dataclasses.replace(c, owner="o1b", seed=first_seed[0]), 1 << 30)]
        return [data]

    report = run_round(owners, FederatedAggregator(owners[0].keys.public_bytes()), 1, tamper=tamper, train=False)
    assert set(report.aggregate.owners) == {"o0", "o2"}
    assert "another CKKS context" in report.rejected["o1"]
    assert "seed another owner" in report.rejected["o1b"]
    assert "duplicated owner" in report.rejected["o0 (duplicate)"]
    assert any(k.startswith("#") for k in report.rejected)  # the garbage, unattributed
    for name, dw in owners[0].last_merged.items():
        assert np.abs(dw - want[name]).max() < 1e-6


def test_a_contribution_for_another_federation_size_is_refused(make_owners):
    owners = make_owners((4, 8), (0.0, 0.0), scheme="full")
    rid = bytes(16)
    c3 = owners[0].contribute_sum(rid, 3)
    server = FederatedAggregator(owners[0].keys.public_bytes())
    with pytest.raises(Exception, match="no valid contribution"):
        server.aggregate_sum(rid, [c3], 2)
    _, rejected = server.aggregate_sum(rid, [owners[1].contribute_sum(rid, 2), c3], 2)
    assert "federation of 3 owners" in rejected["o0"]
    with pytest.raises(MalformedMessage, match="bits"):
        dataclasses.replace(c3, bits=c3.bits + 1)  # the bits follow from the size: checked at construction


def test_the_sum_key_is_the_federation_s_and_only_the_owners_hold_it(tmp_path):
    keys = CkksKeys.generate()
    keys.save(tmp_path / "k")
    again = CkksKeys.load(tmp_path / "k")
    assert again.sum_key().fingerprint() == keys.sum_key().fingerprint()
    assert CkksKeys.generate().sum_key().fingerprint() != keys.sum_key().fingerprint()
    with pytest.raises(ConfigError, match="no secret key"):  # the server's public context makes no key
        import tenseal as ts

        CkksKeys(ts.context_from(keys.public_bytes()))
    assert keys.sum_key()._master not in keys.public_bytes()


def test_mixed_schemes_are_refused(make_owners):
    owners = make_owners((4, 8), (0.0, 0.0), scheme="full")
    owners[1].cfg = dataclasses.replace(owners[1].cfg, scheme="selective")
    with pytest.raises(ConfigError, match="one scheme"):
        run_round(owners, FederatedAggregator(owners[0].keys.public_bytes()), 1, train=False)


def test_encrypted_update_messages_are_validated_at_the_boundary(make_owners):
    """Each field of a ``SumContribution``/``SumAggregate`` as it comes off the wire: a wrong ``b``
    length, bits that do not match the size, a short seed, an unknown parameter set, a repeated
    seed in an aggregate: ``MalformedMessage`` naming the field, never the payload."""
    import msgpack

    owners = make_owners((4, 8), (0.0, 0.0), scheme="full")
    rid = bytes(16)
    cs = [o.contribute_sum(rid, 2) for o in owners]
    good = fedwire.encode(cs[0], 1 << 30)
    assert fedwire.decode(good, 1 << 30, fedwire.SumContribution).b == cs[0].b
    for field, value, word in (("b", cs[0].b[:-1], "contribution.b"), ("bits", cs[0].bits + 1, "contribution.bits"),
                               ("seed", b"x" * 8, "seed"), ("params", "n9999", "contribution.params"),
                               ("size", 0, "contribution.size"), ("frac_bits", 99, "contribution.frac_bits")):
        m = msgpack.unpackb(good, raw=False)
        m[field] = value
        with pytest.raises(MalformedMessage, match=word) as info:
            fedwire.decode(msgpack.packb(m, use_bin_type=True), 1 << 30)
        assert cs[0].b[:64] not in str(info.value).encode()
    agg, _ = FederatedAggregator(owners[0].keys.public_bytes()).aggregate_sum(rid, cs, 2)
    m = msgpack.unpackb(fedwire.encode(agg, 1 << 30), raw=False)
    m["seeds"] = [m["seeds"][0], m["seeds"][0]]
    with pytest.raises(MalformedMessage, match="repeated"):
        fedwire.decode(msgpack.packb(m, use_bin_type=True), 1 << 30)


def test_a_float_where_an_integer_belongs_is_refused_at_decode(make_owners):
    """msgpack carries floats: ``bits`` of 34.0 used to pass decode (34.0 == 34) and crash the
    aggregator's sum with a ValueError outside its error handling."""
    import msgpack

    owners = make_owners((4,), (0.0,), scheme="full")
    good = fedwire.encode(owners[0].contribute_sum(bytes(16), 2), 1 << 30)
    for field in ("bits", "size", "frac_bits"):
        m = msgpack.unpackb(good, raw=False)
        m[field] = float(m[field])
        with pytest.raises(MalformedMessage, match=field):
            fedwire.decode(msgpack.packb(m, use_bin_type=True), 1 << 30)


def test_a_sum_under_another_key_or_not_holding_the_owner_is_refused(make_owners):
    """The aggregate an owner opens must be summed under its own sum key (the fingerprint, then the
    decrypted owner count, which a wrong secret gets right with probability 2^-29) and hold its own
    contribution (its name with its seed, its round, size and fixed point)."""
    owners = make_owners((4, 8), (0.0, 0.0), scheme="full")
    rid = bytes(16)
    cs = [o.contribute_sum(rid, 2) for o in owners]
    server = FederatedAggregator(owners[0].keys.public_bytes())
    agg, _ = server.aggregate_sum(rid, cs, 2)
    stranger = CkksKeys.generate()
    with pytest.raises(ParameterMismatch, match="another sum key"):
        encsum.open_aggregate(stranger, dataclasses.replace(agg, ctx=stranger.digest))
    forged = dataclasses.replace(agg, ctx=stranger.digest, key=encsum.key_id(stranger))
    with pytest.raises(DecryptionError, match="not a sum under this key"):
        encsum.open_aggregate(stranger, forged)
    alone, _ = server.aggregate_sum(rid, cs[1:], 2)
    with pytest.raises(ParameterMismatch, match="not in it"):
        owners[0].merge_sum(alone)
    other_round = owners[0].contribute_sum(bytes(range(16)), 2)
    with pytest.raises(ParameterMismatch, match="not the round"):
        owners[0].merge_sum(agg)  # it sent for another round since
    del other_round
    owners[0].contribute_sum(rid, 2)  # a new seed: the aggregate holds its old one
    with pytest.raises(ParameterMismatch, match="not in it"):
        owners[0].merge_sum(agg)
    c = dataclasses.replace(cs[1], key=encsum.key_id(stranger))
    _, rejected = server.aggregate_sum(rid, [cs[0], c], 2)
    assert "another sum key" in rejected["o1"]


def test_an_update_is_encoded_a_block_at_a_time_from_its_factors():
    """``UpdateRows`` from the factors ``(A, s·B)`` equals it from ``ΔW = s·B·A`` (to the rounding of
    a product done by rows, at most one step in a rare coordinate), any row range equals that range
    of the whole, the weight and the owner count close it, and a bad layer is named."""
    rng = np.random.default_rng(5)
    shapes = {"q": (96, 80), "k": (40, 80), "down": (80, 200)}
    factors = {n: (rng.standard_normal((8, d_in)), 0.01 * rng.standard_normal((d_out, 8)))
               for n, (d_out, d_in) in shapes.items()}
    layers = tuple(fedwire.SumLayer(n, *s) for n, s in shapes.items())
    scheme = SumScheme(3)
    f = encsum.frac_bits(scheme, 4.0)
    rows = encsum.UpdateRows(factors, 7, layers, f, scheme)
    whole = encsum.encode_update(factors, 7, layers, f, scheme)
    products = {n: sb @ a for n, (a, sb) in factors.items()}
    assert np.abs(whole - encsum.encode_update(products, 7, layers, f, scheme)).max() <= 1
    assert rows.rows == whole.size // 2048 == 14  # 96·80 + 40·80 + 80·200 + 2 = 26,882 values, N = 2048 a row
    for r0, r1 in ((0, 1), (3, 7), (13, 14)):
        np.testing.assert_array_equal(rows(r0, r1).reshape(-1), whole[r0 * 2048:r1 * 2048])
    values = fedwire.sum_values(layers)
    assert whole[values - 2:values].tolist() == [7, 1] and not whole[values:].any()
    np.testing.assert_array_equal(whole[:80], np.rint(7 * 2.0**f * products["q"][0]))
    bad = dict(factors, k=(factors["k"][0], np.full((40, 8), np.nan)))
    with pytest.raises(ConfigError, match="k: the update is not finite"):
        encsum.encode_update(bad, 7, layers, f, scheme)
    with pytest.raises(ConfigError, match="down: factors of shapes"):
        encsum.UpdateRows(dict(factors, down=factors["q"]), 7, layers, f, scheme)


def test_an_owner_sends_its_rows_without_a_copy_and_an_older_wire_is_refused(make_owners):
    """A contribution carries the encryption's read-only view of its rows (no copy of megabytes
    before the message's own) and encodes as the same bytes would; a writable view is refused at
    construction; a version-1 message (one secret a round, an RNS modulus) is refused by version,
    not decrypted to noise."""
    import msgpack
    from hecommon.errors import UnsupportedVersion

    owners = make_owners((4,), (0.0,), scheme="full")
    c = owners[0].contribute_sum(bytes(16), 2)
    assert isinstance(c.b, memoryview) and c.b.readonly
    as_bytes = dataclasses.replace(c, b=bytes(c.b))
    assert fedwire.encode(c, 1 << 30) == fedwire.encode(as_bytes, 1 << 30)
    with pytest.raises(MalformedMessage, match="read-only"):
        dataclasses.replace(c, b=memoryview(bytearray(c.b)))
    m = msgpack.unpackb(fedwire.encode(c, 1 << 30), raw=False)
    m["v"] = 1
    with pytest.raises(UnsupportedVersion, match="federated wire version 2"):
        fedwire.decode(msgpack.packb(m, use_bin_type=True), 1 << 30)


CONTRIBUTE = r"""
import os
import numpy as np
from hecommon import heap
from helora_orchestrator.federated import encsum
from helora_orchestrator.federated.selective import CkksKeys

print("before", heap._applied)
update = {"q": np.full((4, 8), 1e-3)}
encsum.contribute(CkksKeys.generate(), os.urandom(16), "o0", update, {"q": (4, 8)}, 1, 2)
print("after", heap._applied)
"""


@pytest.mark.parametrize("env, after", [("keep", "True"), ("default", "None")])
def test_an_owner_contributing_keeps_its_freed_memory(env, after):
    """A contribution's rows and message are tens of MB of fresh pages a round: the owner's process
    takes ``hecommon.heap``'s policy when it first contributes (unless ``HELORA_HEAP=default``)."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CONTRIBUTE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HELORA_HEAP": env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["before", "None", "after", after]

"""The server side never holds a secret key, and bad contributions are rejected while the round goes on."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import numpy as np
import pytest
import tenseal as ts
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.wire import GatherError, fedchunks, fedfields
from hecommon.wire import federated as fedwire
from helora_aggregator.federated import FederatedAggregator, check_public_context
from helora_orchestrator.federated.round import run_round
from helora_orchestrator.federated.selective import CkksKeys

from .conftest import CKKS_ATOL

BIG = 1 << 30


def test_server_context_is_public_and_the_secret_key_never_appears(make_owners, fed_keys):
    public = fed_keys.public_bytes()
    assert ts.context_from(public).is_private() is False
    aggregator = FederatedAggregator(public)
    assert not aggregator.ctx.is_private() and not aggregator.ctx.has_secret_key()
    owners = make_owners((4, 8), (0.05, 0.1))
    report = run_round(owners, aggregator, 1)
    secret = fed_keys.secret_key_bytes()
    assert len(secret) > 1000
    probe = secret[len(secret) // 2:len(secret) // 2 + 64]  # any 64 bytes of the key's serialization
    for blob in [public, *report.received]:
        assert secret not in blob and probe not in blob
    # and the serialized context that carries the key is refused outright
    with pytest.raises(ParameterMismatch, match="secret key"):
        FederatedAggregator(fed_keys._ctx.serialize(save_secret_key=True))


def test_public_context_message_roundtrip_and_refusal_of_a_private_one(fed_keys):
    rid = bytes(16)
    msg = fedwire.decode(fedwire.encode(fedwire.PublicContext(rid, fed_keys.public_bytes())))
    assert msg.digest == fed_keys.digest
    check_public_context(msg.context)
    with pytest.raises(ParameterMismatch, match="secret key"):
        check_public_context(fed_keys._ctx.serialize(save_secret_key=True))
    with pytest.raises(MalformedMessage):
        check_public_context(b"not a context")
    other = ts.context(ts.SCHEME_TYPE.CKKS, 8192, -1, [60, 40, 60])
    other.make_context_public()
    with pytest.raises(ParameterMismatch, match="N = 8192"):
        check_public_context(other.serialize())


def _with_layer(c: fedwire.Contribution, i: int, **changes) -> fedwire.Contribution:
    layers = list(c.layers)
    layers[i] = dataclasses.replace(layers[i], **changes)
    return dataclasses.replace(c, layers=tuple(layers))


def test_bad_contributions_are_rejected_and_the_round_goes_on(make_owners, fed_keys):
    owners = make_owners((4, 8, 16), (0.02, 0.05, 0.2))
    stranger = CkksKeys.generate()  # a key that is not the round's

    def tamper(owner, data):
        c = fedwire.decode_contribution(data, BIG)
        if owner.name == "o0":  # o0 is fine, and also sends a truncated copy and a duplicate
            return [data, data[: len(data) // 2], data]
        lay = c.layers[0]
        if owner.name == "o1":  # wrong layer shape (one more input column) and a foreign context
            a = np.zeros((lay.r, lay.d_in + 1), np.float32)
            bad_shape = _with_layer(c, 0, d_in=lay.d_in + 1, a=a)
            foreign = dataclasses.replace(c, owner="o1-foreign", ctx=stranger.digest)
            return [fedwire.encode(bad_shape, BIG), fedwire.encode(foreign, BIG)]
        # o2: an encrypted column left in the clear copy, and a ciphertext under another key's context
        a = lay.a.copy()
        a[:, -1] = 1.0
        leaky = _with_layer(dataclasses.replace(c, owner="o2-leaky"), 0, a=a)
        bogus = _with_layer(dataclasses.replace(c, owner="o2-bogus"), 0, enc=(b"\x00" * 100,) * len(lay.enc))
        return [fedwire.encode(leaky, BIG), fedwire.encode(bogus, BIG)]

    for o in owners:
        o.train_local()
    valid = owners[0]
    want = {n: valid.samples * d / valid.samples for n, d in valid.delta().items()}
    report = run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1, tamper=tamper, train=False)
    rej = report.rejected
    assert set(report.aggregate.owners) == {"o0"}
    assert "duplicated owner" in rej["o0 (duplicate)"]
    assert "not valid msgpack" in rej["#1"]
    assert "shape" in rej["o1"]
    assert "another CKKS context" in rej["o1-foreign"]
    assert "not zeroed" in rej["o2-leaky"]
    assert "does not deserialize" in rej["o2-bogus"]
    assert all(len(reason) < 300 for reason in rej.values())  # short reasons, no payload
    for name, dw in owners[2].last_merged.items():  # everyone merged o0's update alone
        np.testing.assert_allclose(dw, want[name], rtol=0, atol=CKKS_ATOL)


def test_no_valid_contribution_is_a_clear_error(make_owners, fed_keys):
    owners = make_owners((4,), (0.05,))
    with pytest.raises(MalformedMessage, match="no valid contribution"):
        run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1, tamper=lambda o, d: [d[:10]])


def test_wrong_round_is_rejected(make_owners, fed_keys):
    owners = make_owners((4, 8), (0.05, 0.05))

    def tamper(owner, data):
        if owner.name == "o1":
            c = fedwire.decode_contribution(data, BIG)
            return [fedwire.encode(dataclasses.replace(c, rid=b"\x01" * 16), BIG)]
        return [data]

    report = run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1, tamper=tamper)
    assert "is not this round" in report.rejected["o1"]
    assert report.aggregate.owners == ("o0",)


def test_fedwire_strict_decoding(fed_keys, make_owners):
    owners = make_owners((4,), (0.05,))
    owners[0].train_local()
    plan_layers = tuple(fedwire.PlanLayer(n, d_out, d_in, tuple(range(4))) for n, (d_out, d_in) in owners[0].shapes().items())
    plan = fedwire.RoundPlan(bytes(16), fed_keys.digest, plan_layers)
    data = fedwire.encode(owners[0].contribute(plan), BIG)
    c = fedwire.decode_contribution(data, BIG)
    assert c.owner == "o0" and c.layers[0].k == 4  # ceil(0.05 · 64)
    m = msgpack.unpackb(data, raw=False)
    cases = {
        "version": ({**m, "v": fedwire.FEDWIRE_VERSION + 1}, "version"),
        "extra": ({**m, "x": 1}, "unexpected field"),
        "missing": ({k: v for k, v in m.items() if k != "samples"}, "missing field"),
        "samples": ({**m, "samples": 0}, "samples"),
        "type": ({**m, "type": "fed-plan"}, "expected"),
    }
    for _name, (bad, match) in cases.items():
        with pytest.raises(MalformedMessage, match=match):
            fedwire.decode_contribution(msgpack.packb(bad, use_bin_type=True), BIG)
    nan_layer = dict(m["layers"][0])
    nan_layer["b"] = np.full(len(nan_layer["b"]) // 4, np.nan, "<f4").tobytes()
    with pytest.raises(MalformedMessage, match="non-finite"):
        fedwire.decode_contribution(msgpack.packb({**m, "layers": [nan_layer, *m["layers"][1:]]}, use_bin_type=True), BIG)
    few = dict(m["layers"][0], enc=[])
    with pytest.raises(MalformedMessage, match="ciphertexts expected"):
        fedwire.decode_contribution(msgpack.packb({**m, "layers": [few, *m["layers"][1:]]}, use_bin_type=True), BIG)
    with pytest.raises(MalformedMessage, match="exceed the limit"):
        fedwire.decode_contribution(data, 1024)
    with pytest.raises(TypeError):
        fedwire.encode(fed_keys)  # no encoder for key material


def test_chunks_split_and_join_and_refuse_inconsistent_parts():
    from hecommon.errors import OversizedMessage

    data = bytes(range(256)) * 1000  # 256,000 bytes
    limit = 64 * 1024
    parts = fedchunks.split_bytes(data, limit, b"\x07" * 16)
    assert len(parts) == 4 and all(len(p) <= limit for p in parts)
    assert fedchunks.split_bytes(b"small", limit, b"\x07" * 16) == [b"small"]
    joiner = fedchunks.gather(1 << 20)
    chunks = [fedwire.decode(p, limit) for p in parts]
    assert [joiner.add(c, i) for i, c in enumerate(chunks[:3])] == [None] * 3
    assert joiner.add(chunks[1], "again") is None  # a redelivered part counts once
    assert joiner.take_copies() == ["again"]  # and is acked at once (chunks.Gather)
    joined, tokens = joiner.add(chunks[3], 3)
    assert joined == data and tokens == [0, 1, 2, 3]
    assert joiner.add(chunks[0], "late") is None and joiner.take_copies() == ["late"]  # joined already: a copy
    fresh = fedchunks.gather(1 << 20)
    with pytest.raises(MalformedMessage, match="earlier ones"):
        fresh.add(chunks[0])
        fresh.add(dataclasses.replace(chunks[1], total=chunks[1].total + 1))
    with pytest.raises(OversizedMessage):
        fedchunks.gather(100_000).add(chunks[2])
    with pytest.raises(MalformedMessage):
        fedwire.Chunk(bytes(16), 2, 2, 10, b"x")  # part out of range
    stale = fedchunks.gather(1 << 20, timeout_s=0.0)
    assert stale.add(chunks[0], "d0") is None
    time.sleep(0.01)
    assert [tokens for _, tokens in stale.expired()] == [["d0"]] and stale.held_bytes() == 0


def test_a_chunked_message_that_cannot_be_joined_hands_back_every_chunk():
    """A bad part fails the whole message: the error carries the tokens (deliveries) of every
    chunk received so far, so none is left unacked; a part of the wrong length is caught on arrival."""
    limit = 64 * 1024
    piece = limit - fedfields.CHUNK_OVERHEAD
    data = bytes(range(256)) * 1000
    chunks = [fedwire.decode(p, limit) for p in fedchunks.split_bytes(data, limit, b"\x07" * 16)]
    assert len(chunks) == 4 and len(chunks[0].data) == piece
    # the parts' lengths do not add up to the announced total (the last one is short)
    joiner = fedchunks.gather(1 << 20)
    assert [joiner.add(c, i) for i, c in enumerate(chunks[:3])] == [None] * 3
    with pytest.raises(GatherError, match="bytes") as info:
        joiner.add(dataclasses.replace(chunks[3], data=chunks[3].data[:-1]), 3)
    assert info.value.tokens == [0, 1, 2, 3] and joiner.held_bytes() == 0
    # a middle part of another length than the others, caught on arrival (not at the end)
    joiner = fedchunks.gather(1 << 20)
    assert joiner.add(chunks[0], "a") is None
    with pytest.raises(GatherError, match="part 1") as info:
        joiner.add(dataclasses.replace(chunks[1], data=chunks[1].data[:-5]), "b")
    assert info.value.tokens == ["a", "b"] and joiner.held_bytes() == 0
    # parts or total that disagree with the earlier chunks: the whole message goes too
    joiner = fedchunks.gather(1 << 20)
    assert joiner.add(chunks[0], "a") is None
    with pytest.raises(GatherError, match="earlier ones") as info:
        joiner.add(dataclasses.replace(chunks[1], total=chunks[1].total + 1), "b")
    assert info.value.tokens == ["a", "b"] and joiner.held_bytes() == 0
    assert isinstance(info.value, MalformedMessage)


def test_a_ciphertext_at_another_scale_is_rejected_and_the_round_goes_on(make_owners, fed_keys):
    """A ciphertext of the round's context but at scale 2^30 (not 2^40) deserializes and has the
    right slot count: it must be refused at check time (it used to pass, then break the sum with
    TenSEAL's "scale mismatch" for every owner)."""
    owners = make_owners((4, 8, 16), (0.05, 0.05, 0.2))
    public = ts.context_from(fed_keys.public_bytes())

    def tamper(owner, data):
        if owner.name != "o2":
            return [data]
        c = fedwire.decode_contribution(data, BIG)
        i = next(i for i, lay in enumerate(c.layers) if lay.enc)
        odd = ts.ckks_vector(public, [0.5] * fedfields.CKKS_SLOTS, scale=2.0 ** 30).serialize()
        return [fedwire.encode(_with_layer(c, i, enc=(odd, *c.layers[i].enc[1:])), BIG)]

    for o in owners:
        o.train_local()
    want = {n: sum(o.samples * o.delta()[n] for o in owners[:2]) / sum(o.samples for o in owners[:2])
            for n in owners[0].shapes()}
    report = run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1, tamper=tamper, train=False)
    assert set(report.aggregate.owners) == {"o0", "o1"}
    assert "scale 2^30" in report.rejected["o2"] and "2^40" in report.rejected["o2"]
    for name, dw in owners[0].last_merged.items():
        np.testing.assert_allclose(dw, want[name], rtol=0, atol=CKKS_ATOL)


def test_prefetch_must_hold_every_chunk_of_a_round(tmp_path, fed_keys):
    """A round holds per owner its proposal and every chunk of its contribution unacked: with a
    64 KiB message limit, contributions of up to 4 MiB come in 66 chunks, so 3 owners need a
    prefetch of 3 × (1 + 66) = 201, not 2 per owner; and the worker refuses a larger contribution."""
    from hecommon.errors import ConfigError, OversizedMessage
    from helora_aggregator.fedworker import FederatedConfig

    pub = tmp_path / "fed.key.pub"
    pub.write_bytes(fed_keys.public_bytes())
    base = dict(context=str(pub), owners=3, max_message_bytes=64 * 1024, max_contribution_bytes=4 << 20)
    chunks = -(-(4 << 20) // (64 * 1024 - fedfields.CHUNK_OVERHEAD))
    assert chunks == 66
    with pytest.raises(ConfigError, match=f"prefetch: 64 .* {3 * (1 + chunks)}"):
        FederatedConfig(**base, prefetch=64)
    cfg = FederatedConfig(**base, prefetch=3 * (1 + chunks))
    assert cfg.max_contribution_bytes == 4 << 20
    args = FederatedConfig.from_args(["--context", str(pub), "--owners", "2", "--max-contribution-bytes", "1048576"],
                                     environ={})
    assert args.max_contribution_bytes == 1 << 20 and args.prefetch == 64
    # the bound holds at run time: one message above it is refused on its first chunk,
    # while several smaller ones may be held together beyond it
    joiner = fedchunks.gather(1 << 30, max_message_bytes=100_000)
    with pytest.raises(OversizedMessage, match="100000"):
        joiner.add(fedwire.Chunk(b"\x01" * 16, 0, 2, 100_001, b"x" * 60_000), "big")
    for i in range(3):
        assert joiner.add(fedwire.Chunk(bytes([i + 2]) * 16, 0, 2, 90_000, b"x" * 60_000), i) is None
    assert joiner.held_bytes() == 270_000


def test_a_sum_that_still_fails_is_a_helora_error_for_the_round(make_owners, fed_keys):
    """Should a contribution get past ``check``, the sum still raises a ``HeloraError`` (the worker
    answers every owner of the round with it), never TenSEAL's ValueError "scale mismatch"."""
    from hecommon.errors import HeloraError

    class Unchecked(FederatedAggregator):  # the real aggregator, its per-contribution checks skipped
        def check(self, plan, c, accepted={}):  # noqa: B006 - same signature as the base
            pass

    owners = make_owners((4, 8), (0.05, 0.05))
    rid = bytes(fedwire.RID_BYTES)
    aggregator = Unchecked(fed_keys.public_bytes())
    plan, _ = aggregator.plan([o.proposal(rid) for o in owners], owners[0].shapes(), rid)
    good, other = (o.contribute(plan) for o in owners)
    i = next(i for i, lay in enumerate(other.layers) if lay.enc)
    odd = ts.ckks_vector(ts.context_from(fed_keys.public_bytes()), [0.5] * fedfields.CKKS_SLOTS, scale=2.0 ** 30)
    bad = _with_layer(other, i, enc=(odd.serialize(), *other.layers[i].enc[1:]))
    with pytest.raises(HeloraError, match="scale 2\\^30"):
        aggregator.aggregate(plan, [good, bad])

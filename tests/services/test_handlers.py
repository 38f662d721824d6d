"""Server handlers without a broker: sharding, aggregation, validation (DESIGN §4, §7)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hecommon import route, wire
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.he import params as P
from hecommon.he.encrypt import EncryptedBatch, decrypt, encrypt, unpacked
from hecommon.he.exact import fold
from hecommon.he.keys import SecretKey
from hecommon.he.quantize import integer_matmul, quantize_weight
from hecommon.he.sampling import owner_a_seed
from hecommon.shards import even_split
from helora_aggregator.handler import AggregatorHandler
from helora_orchestrator.embedded import EmbeddedServer

OWNER = os.urandom(16)  # this test client's owner seed



def _cut(server: EmbeddedServer, req: wire.EncryptedRequest):
    """(shard, sub-request) pairs of a whole request, as the embedded server routes it."""
    return route.cut(server.layers[req.layer], req)


def _request(server: EmbeddedServer, layer: str, direction: str, m: np.ndarray):
    entry = next(e for e in server.manifest.layers if e.name == layer)
    secret = SecretKey.generate().request_secret(server.manifest.params, os.urandom(16))
    seed = owner_a_seed(entry.a_seed_fwd if direction == "fwd" else entry.a_seed_bwd, OWNER)
    req = wire.EncryptedRequest(rid=os.urandom(16), layer=layer, direction=direction, batch=encrypt(secret, m, seed),
                                owner=OWNER)
    return secret, req


@pytest.mark.parametrize("hints_on_client", [True, False], ids=["b-only replies", "a and b replies"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_layers_give_the_whole_product(tiny, shards, hints_on_client, rng):
    from hecommon.model import group_weight

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=shards, hints_on_client=hints_on_client)
    assert len(server.evaluators) == shards
    g = groups[2]  # gate_up: d_out = 2 × intermediate
    wq = quantize_weight(group_weight(model, g).double().numpy()).values
    for direction, width, expected in (("fwd", g.in_features, lambda m: integer_matmul(m, wq.T)),
                                       ("bwd", g.total_out, lambda m: integer_matmul(m, wq))):
        m = rng.integers(0, 256, size=(33, width))
        secret, req = _request(server, g.name, direction, m)
        chunks = [wire.encode_request(c) for c in wire.split(req)]
        reply = wire.join([wire.decode_reply(c) for c in server.call(chunks)])
        assert (reply.result.a is None) == hints_on_client
        hint = server.hint(g.name, direction, OWNER) if hints_on_client else None
        np.testing.assert_array_equal(decrypt(secret, reply.result, hint=hint), expected(m))


def test_errors_come_back_as_error_replies(tiny, rng):
    model, groups = tiny
    server = EmbeddedServer(model, groups)
    _, req = _request(server, groups[0].name, "fwd", rng.integers(0, 256, size=(4, groups[0].in_features)))
    bad_layer = wire.EncryptedRequest(rid=req.rid, layer="99.qkv", direction="fwd", batch=req.batch, owner=OWNER)
    err = wire.decode(server.call([wire.encode_request(bad_layer)])[0])
    assert isinstance(err, wire.ErrorReply) and err.reason == ParameterMismatch.reason and "99.qkv" in err.message
    narrow = EncryptedBatch(req.batch.params, req.batch.b[:-1], 4)
    err = wire.decode(server.call([wire.encode_request(wire.EncryptedRequest(
        rid=req.rid, layer=req.layer, direction="fwd", batch=narrow, owner=OWNER))])[0])
    assert isinstance(err, wire.ErrorReply) and err.reason == MalformedMessage.reason
    # the server keeps serving valid requests afterwards
    ok = wire.decode(server.call([wire.encode_request(c) for c in wire.split(req)])[0])
    assert isinstance(ok, wire.EncryptedReply)


def test_aggregator_ignores_redelivered_partials(tiny, rng):
    from hecommon.model import group_weight

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=2)
    g = groups[0]
    m = rng.integers(0, 256, size=(5, g.in_features))
    secret, req = _request(server, g.name, "fwd", m)
    parts = [server.evaluators[i].handle(sub) for i, sub in _cut(server, req)]
    agg = AggregatorHandler()
    assert agg.add(parts[0]) is None
    assert agg.add(parts[0]) is None  # duplicate of shard 0 before completion: not counted twice
    reply = agg.add(parts[1])
    assert reply is not None
    assert agg.add(parts[1]) is None  # redelivered after completion: ignored
    # each shard summed exactly once: the result is the whole product
    wq = quantize_weight(group_weight(model, g).double().numpy()).values
    np.testing.assert_array_equal(decrypt(secret, reply.result), integer_matmul(m, wq.T))


def test_even_split_covers_every_column_once():
    assert even_split(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert even_split(5, 1) == [(0, 5)]
    with pytest.raises(ValueError):
        even_split(2, 3)


def test_manifest_is_public_and_complete(tiny):
    model, groups = tiny
    server = EmbeddedServer(model, groups, params=P.DEFAULT)
    m = wire.decode_manifest(server.manifest_bytes())
    assert [e.name for e in m.layers] == [g.name for g in groups]
    for e, g in zip(m.layers, groups, strict=True):
        assert (e.d_in, e.d_out) == (g.in_features, g.total_out)
        assert e.row_sums.shape == (g.total_out,) and e.col_sums.shape == (g.in_features,)
        assert e.a_seed_fwd != e.a_seed_bwd


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_evaluators_that_switch_a_give_the_same_replies(tiny, shards, rng):
    """The worker's evaluators send the public part switched and packed where they hold the whole
    output (forward with one shard, every backward shard); through the wire, in several messages,
    the aggregator's reply equals the one from partials mod q bit for bit, and decrypts."""
    from helora_evaluator.handler import EvaluatorHandler

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=shards, hints_on_client=False)
    switching = [EvaluatorHandler(e.params, list(e.shards.values()), e.shard_index, send_switched=True)
                 for e in server.evaluators]
    aggregator = AggregatorHandler(include_a=True)
    g = groups[2]
    limit = 64 * 1024  # partials of several messages: packed a rows are cut and joined as bytes
    for direction, width in (("fwd", g.in_features), ("bwd", g.total_out)):
        m = rng.integers(0, 256, size=(9, width))
        for _ in range(2):  # the second request reuses the cached switched a
            secret, req = _request(server, g.name, direction, m)
            expected, _ = server.exchange(req)
            reply = None
            for index, sub in _cut(server, req):
                partial = switching[index].handle(sub)
                assert partial.partial.a_switched == (direction == "bwd" or shards == 1)
                chunks = [wire.decode_partial(wire.encode_partial(c, limit), limit) for c in wire.split(partial, limit)]
                reply = aggregator.add(wire.join(chunks)) or reply
            assert reply is not None
            back = wire.join([wire.decode_reply(wire.encode_reply(c)) for c in wire.split(reply)])
            np.testing.assert_array_equal(back.result.a.unpack(), expected.result.a)  # decoded, a stays packed
            np.testing.assert_array_equal(unpacked(back.result.b), unpacked(expected.result.b))
            np.testing.assert_array_equal(decrypt(secret, reply.result), decrypt(secret, expected.result))
    # the evaluator keeps hints per owner (OwnerHints), never on the shared product
    product = switching[0]._products[(g.name, "bwd")]
    with pytest.raises(Exception, match="holds no hint"):
        product.hint  # noqa: B018


def test_switched_and_mod_q_partials_do_not_mix(tiny, rng):
    """Row shards must come mod q (they are summed); a switched part there is refused."""
    from hecommon.he.bits import PackedRows
    from hecommon.he.encrypt import EncryptedPartial

    params = P.DEFAULT
    b = np.zeros((2, params.limbs, 3), dtype=np.uint32)  # a window of 3 tokens
    packed = PackedRows.pack(np.zeros((2, params.n), dtype=np.uint64), params.out_bits)
    switched = EncryptedPartial(params, packed, b, 3)
    mod_q = EncryptedPartial(params, np.zeros((2, params.limbs, params.n), dtype=np.uint32), b, 3)
    with pytest.raises(ParameterMismatch, match="already switched"):
        switched + mod_q  # noqa: B018
    with pytest.raises(ParameterMismatch, match="switched and a mod-q"):
        EncryptedPartial.join([switched, mod_q])
    bad = PackedRows.pack(np.zeros((2, params.n), dtype=np.uint64), params.out_bits - 1)
    with pytest.raises(MalformedMessage, match="a_bits"):
        wire.PartialResult(os.urandom(16), "0.qkv", "bwd", 0, 1, 0, 2, EncryptedPartial(params, bad, b, 3))


@pytest.mark.parametrize("switch", [False, True], ids=["a mod q", "a switched"])
@pytest.mark.parametrize("shards", [1, 2])
def test_partials_computed_part_by_part_equal_the_split_whole(tiny, shards, switch, rng):
    """``handle_parts`` (the worker's: one message's output rows at a time) gives, byte for byte,
    the messages of ``wire.split(handle(req))``."""
    from helora_evaluator.handler import EvaluatorHandler

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=shards, hints_on_client=False)
    handlers = [EvaluatorHandler(e.params, list(e.shards.values()), e.shard_index, send_switched=switch)
                for e in server.evaluators]
    g = groups[2]
    limit = 100 * 1024 + wire.HEADER_ALLOWANCE
    for direction, width in (("fwd", g.in_features), ("bwd", g.total_out)):
        _, req = _request(server, g.name, direction, rng.integers(0, 256, size=(6, width)))
        for index, sub in _cut(server, req):
            expected = [wire.encode_partial(c, limit) for c in wire.split(handlers[index].handle(sub), limit)]
            got = [wire.encode_partial(p, limit) for p in handlers[index].handle_parts(sub, limit)]
            assert len(got) > 1 and got == expected


@pytest.mark.parametrize("shards", [1, 2])
def test_request_parts_computed_by_different_replicas_give_the_whole_product(tiny, shards, rng):
    """The direct path: the client cuts a request into parts (``route.pieces``) and each part may
    reach any replica of its evaluator queue, in any order. Every replica computes its part alone
    (a piece of the sum); with one shard each piece is a reply the client decrypts and adds, with
    two the aggregator adds the pieces: either way the outputs equal the whole request's, exactly,
    with the a part held by the client too."""
    from hecommon.model import group_weight
    from helora_evaluator.handler import EvaluatorHandler

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=shards, hints_on_client=False)
    g = groups[2]
    entry = server.layers[g.name]
    wq = quantize_weight(group_weight(model, g).double().numpy()).values
    limit = 40 * 1024 + wire.HEADER_ALLOWANCE  # a few rows per request part, two per partial message

    def replica(index):  # a fresh evaluator process for every part: nothing shared between parts
        e = server.evaluators[index]
        return EvaluatorHandler(e.params, list(e.shards.values()), e.shard_index, send_switched=True)

    for direction, width, expected in (("fwd", g.in_features, lambda m: integer_matmul(m, wq.T)),
                                       ("bwd", g.total_out, lambda m: integer_matmul(m, wq))):
        m = rng.integers(0, 256, size=(7, width))
        held = None
        for send_a in (True, False):
            secret, whole = _request(server, g.name, direction, m)
            plan = route.pieces(entry, direction, server.manifest.params, limit)
            assert len(plan) > 2 and route.reply_pieces(entry, direction, server.manifest.params, limit) == (
                len(plan) if shards == 1 else 1)
            parts = [dataclasses.replace(whole, batch=EncryptedBatch(whole.params, whole.batch.b[p.lo:p.hi], 7),
                                         row_start=p.lo, part=p.part, parts=p.parts, send_a=send_a) for p in plan]
            aggregator, out, replies = AggregatorHandler(include_a=True), np.zeros((7, entry.out_rows(direction)), np.int64), 0
            for part in reversed(parts):  # in any order
                for index in route.targets(entry, part):
                    h = replica(index)
                    chunks = list(h.handle_parts(part, limit))
                    if not h.answers_client(part):  # the worker sends them on; the aggregator joins a piece's chunks
                        chunks = [wire.join([wire.decode_partial(wire.encode_partial(c, limit), limit) for c in chunks])]
                    for partial in chunks:
                        if h.answers_client(part):  # one shard: a reply piece, straight to the client
                            reply = wire.decode_reply(wire.encode_reply(EvaluatorHandler.reply_part(partial), limit), limit)
                            assert (reply.piece, reply.pieces) == (part.part, len(plan))
                            res = reply.result if send_a else reply.result.with_held_a(held[reply.piece][
                                reply.out_start:reply.out_start + reply.result.width])
                            if send_a:
                                held = held or {}
                                held.setdefault(reply.piece, np.zeros((entry.out_rows(direction), h.params.n), np.uint64))[
                                    reply.out_start:reply.out_start + res.width] = res.a.unpack()
                            out[:, reply.out_start:reply.out_start + res.width] += decrypt(secret, res)
                            replies += 1
                        else:
                            done = aggregator.add(partial)
                            if done is not None:
                                res = done.result if send_a else done.result.with_held_a(held[0])
                                if send_a:
                                    held = {0: done.result.a.unpack() if hasattr(done.result.a, "unpack") else done.result.a}
                                out += decrypt(secret, res)
                                replies += 1
            assert replies >= 1
            np.testing.assert_array_equal(fold(out, entry.sums(direction)), expected(m))


@pytest.mark.parametrize("shards", [1, 2])
def test_evaluators_holding_a_whole_layer_make_the_reply_parts_themselves(tiny, shards, rng):
    """An evaluator that holds the whole layer (one shard, a switched) answers: its parts, switched
    there (``reply_part``), decode as reply parts that join into the aggregator's reply, bit for
    bit; the client's head check reads each one. With two shards nobody answers alone."""
    from helora_evaluator.handler import EvaluatorHandler

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=shards, hints_on_client=False)
    handlers = [EvaluatorHandler(e.params, list(e.shards.values()), e.shard_index, send_switched=True)
                for e in server.evaluators]
    plain = EvaluatorHandler(server.evaluators[0].params, list(server.evaluators[0].shards.values()),
                             server.evaluators[0].shard_index)  # switch_a off: the embedded server's
    g = groups[2]
    limit = 100 * 1024 + wire.HEADER_ALLOWANCE
    for direction, width in (("fwd", g.in_features), ("bwd", g.total_out)):
        secret, req = _request(server, g.name, direction, rng.integers(0, 256, size=(6, width)))
        routed = list(_cut(server, req))
        assert [handlers[i].answers_client(sub) for i, sub in routed] == [shards == 1] * len(routed)
        assert not plain.answers_client(routed[0][1])
        held_routed = list(_cut(server, dataclasses.replace(req, send_a=False)))  # a held by the client
        assert [sub.send_a for _, sub in held_routed] == [False] * len(routed)
        if shards != 1:  # the aggregator gathers the shards and leaves a out
            full, held = AggregatorHandler(include_a=True), AggregatorHandler(include_a=True)
            replies = [full.add(handlers[i].handle(sub)) for i, sub in routed]
            held_replies = [held.add(handlers[i].handle(sub)) for i, sub in held_routed]
            whole, b_only = replies[-1], held_replies[-1]
            assert b_only.result.a is None and b_only.result.bits == whole.result.bits
            np.testing.assert_array_equal(unpacked(b_only.result.b), unpacked(whole.result.b))
            np.testing.assert_array_equal(decrypt(secret, b_only.result.with_held_a(whole.result.a)),
                                          decrypt(secret, whole.result))
            continue
        expected = AggregatorHandler(include_a=True).add(handlers[0].handle(routed[0][1]))
        bodies = [wire.encode_reply(EvaluatorHandler.reply_part(p), limit) for p in handlers[0].handle_parts(routed[0][1], limit)]
        assert len(bodies) > 1
        heads = [wire.decode_reply_head(b, limit) for b in bodies]
        assert all(isinstance(h, wire.ReplyHead) and h.with_a for h in heads)
        assert [(h.part, h.parts) for h in heads] == [(i, len(bodies)) for i in range(len(bodies))]
        assert [h.out_start for h in heads] == list(np.cumsum([0] + [h.width for h in heads[:-1]]))
        assert sum(h.width for h in heads) == expected.result.width
        joined = wire.join([wire.decode_reply(b, limit) for b in bodies])
        np.testing.assert_array_equal(joined.result.a.unpack(), expected.result.a.unpack())
        np.testing.assert_array_equal(unpacked(joined.result.b), unpacked(expected.result.b))
        np.testing.assert_array_equal(decrypt(secret, joined.result), decrypt(secret, expected.result))
        held_bodies = [wire.encode_reply(EvaluatorHandler.reply_part(p), limit)
                       for p in handlers[0].handle_parts(held_routed[0][1], limit)]
        held_heads = [wire.decode_reply_head(b, limit) for b in held_bodies]
        assert all(isinstance(h, wire.ReplyHead) and not h.with_a and h.bits == h.params.out_bits for h in held_heads)
        b_only = wire.join([wire.decode_reply(b, limit) for b in held_bodies])
        assert b_only.result.a is None and sum(map(len, held_bodies)) < 0.6 * sum(map(len, bodies))
        np.testing.assert_array_equal(unpacked(b_only.result.b), unpacked(expected.result.b))
        np.testing.assert_array_equal(decrypt(secret, b_only.result.with_held_a(joined.result.a)),
                                      decrypt(secret, expected.result))


def test_a_request_part_is_checked_against_the_rows_this_evaluator_multiplies(tiny, rng):
    """The evaluator is the entry point: a part whose rows leave this shard's, another layer, or
    another parameter set is refused with a reason, before anything is multiplied."""
    from helora_evaluator.handler import EvaluatorHandler

    model, groups = tiny
    server = EmbeddedServer(model, groups, shards=2, hints_on_client=False)
    g = groups[2]
    e = server.evaluators[1]
    h = EvaluatorHandler(e.params, list(e.shards.values()), e.shard_index, send_switched=True)
    lo, hi = even_split(g.in_features, 2)[1]
    _, req = _request(server, g.name, "fwd", rng.integers(0, 256, size=(4, g.in_features)))
    mine = dataclasses.replace(req, batch=EncryptedBatch(req.params, req.batch.b[lo:hi], 4), row_start=lo)
    assert len(list(h.handle_parts(mine, 1 << 24))) == 1
    for bad, match in ((dataclasses.replace(mine, row_start=0), "outside the rows"),
                       (dataclasses.replace(mine, row_start=lo + 1), "outside the rows"),
                       (dataclasses.replace(mine, layer="99.qkv"), "does not hold layer")):
        with pytest.raises((MalformedMessage, ParameterMismatch), match=match):
            list(h.handle_parts(bad, 1 << 24))
    bwd = dataclasses.replace(req, direction="bwd", batch=EncryptedBatch(req.params, req.batch.b[:3], 4),
                              row_start=g.total_out - 2)  # runs past the layer's outputs
    with pytest.raises(MalformedMessage, match="outside the rows"):
        list(h.handle_parts(bwd, 1 << 24))

"""A per-owner public ``a`` (issue 15, DESIGN §3): no single party fixes it, no two owners share it,
and the evaluator keeps one hint per owner, for a bounded number of owners."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hecommon import wire
from hecommon.errors import MalformedMessage
from hecommon.he.encrypt import decrypt, encrypt
from hecommon.he.keys import SecretKey
from hecommon.he.quantize import integer_matmul, quantize_weight
from hecommon.he.sampling import derive_key, expand_a, owner_a_seed
from hecommon.model import group_weight
from helora_evaluator.handler import OwnerHints
from helora_orchestrator.embedded import EmbeddedServer, make_encrypted_backend


def _owner_request(server: EmbeddedServer, layer: str, owner: bytes, m: np.ndarray):
    """What the client does: ``a``'s seed from the manifest's and the owner's, then encrypt."""
    entry = next(e for e in server.manifest.layers if e.name == layer)
    secret = SecretKey.generate().request_secret(server.manifest.params, os.urandom(16))
    batch = encrypt(secret, m, owner_a_seed(entry.a_seed_fwd, owner))
    return secret, wire.EncryptedRequest(rid=os.urandom(16), layer=layer, direction="fwd", batch=batch, owner=owner)


def test_the_seed_of_a_depends_on_both_parties():
    server_seed, other_server_seed = os.urandom(16), os.urandom(16)
    alice, bob = os.urandom(16), os.urandom(16)
    seeds = {owner_a_seed(s, o) for s in (server_seed, other_server_seed) for o in (alice, bob)}
    assert len(seeds) == 4  # neither seed alone fixes a: change either, a changes
    # the client derives it itself, from public inputs only: SHAKE-256, domain-separated
    assert owner_a_seed(server_seed, alice) == derive_key(b"helora/owner-a", server_seed, alice)[:16]
    assert owner_a_seed(server_seed, alice) not in (server_seed, alice)
    with pytest.raises(ValueError, match="16-byte"):
        owner_a_seed(server_seed, alice[:8])


def test_two_owners_get_different_a_and_each_client_derives_its_own(tiny):
    model, groups = tiny
    server = EmbeddedServer(model, groups)
    backends = [make_encrypted_backend(model, groups, server=server) for _ in range(2)]
    assert backends[0].owner != backends[1].owner  # drawn from the OS CSPRNG per session
    entry = server.manifest.layers[0]
    a0, a1 = (expand_a(owner_a_seed(entry.a_seed_fwd, b.owner), server.manifest.params, 4) for b in backends)
    assert not np.array_equal(a0, a1)
    # the evaluator's hint for an owner is W·A for that owner's a, which the client can recompute
    w = quantize_weight(group_weight(model, groups[0]).double().numpy()).values
    hint = server.hint(entry.name, "fwd", backends[0].owner)
    a = expand_a(owner_a_seed(entry.a_seed_fwd, backends[0].owner), server.manifest.params, entry.d_in)
    p = np.asarray(server.manifest.params.primes, dtype=np.int64)
    expected = np.stack([(w.astype(np.int64) @ a[:, i].astype(np.int64)) % p[i] for i in range(len(p))], axis=1)
    np.testing.assert_array_equal(hint, expected)


def test_a_hint_built_for_one_owner_does_not_decrypt_another_owners_reply(tiny, rng):
    model, groups = tiny
    server = EmbeddedServer(model, groups, hints_on_client=True)  # replies carry b alone
    g = groups[0]
    w = quantize_weight(group_weight(model, g).double().numpy()).values
    alice, bob = os.urandom(16), os.urandom(16)
    m = rng.integers(0, 256, size=(7, g.in_features))
    secret, req = _owner_request(server, g.name, alice, m)
    reply, _ = server.exchange(req)
    assert reply.result.a is None
    np.testing.assert_array_equal(decrypt(secret, reply.result, hint=server.hint(g.name, "fwd", alice)),
                                  integer_matmul(m, w.T))
    wrong = decrypt(secret, reply.result, hint=server.hint(g.name, "fwd", bob))
    assert np.abs(wrong - integer_matmul(m, w.T)).mean() > 1e6  # noise, not the product
    # and a request encrypted under alice's a but labelled bob's is computed against bob's hint
    _, forged = _owner_request(server, g.name, alice, m)
    forged = wire.EncryptedRequest(rid=forged.rid, layer=forged.layer, direction="fwd", batch=forged.batch, owner=bob)
    out, _ = server.exchange(forged)
    assert not np.array_equal(decrypt(secret, out.result, hint=server.hint(g.name, "fwd", bob)), integer_matmul(m, w.T))


def test_training_with_two_owners_on_one_server_equals_the_quantized_mode(tiny, rng):
    """Two sessions on one embedded server, each with its own a: both bit-identical to the clear
    quantized product, and the evaluator holds one set of hints per owner."""
    from helora_encoder.handler import quantize_groups
    from helora_orchestrator.backend import QuantizedBackend

    model, groups = tiny
    server = EmbeddedServer(model, groups)
    g = groups[1]
    clear = QuantizedBackend(quantize_groups(model, groups))
    x = rng.standard_normal((5, g.in_features)).astype(np.float32)
    for _ in range(2):
        backend = make_encrypted_backend(model, groups, server=server)
        np.testing.assert_array_equal(backend.forward(g.name, x), clear.forward(g.name, x))
    assert server.evaluators[0].hints.owners == 2


def test_requests_without_an_owner_seed_are_refused(tiny):
    model, groups = tiny
    server = EmbeddedServer(model, groups)
    _, req = _owner_request(server, groups[0].name, os.urandom(16), np.zeros((1, groups[0].in_features), np.int64))
    with pytest.raises(MalformedMessage, match="owner"):
        wire.EncryptedRequest(rid=req.rid, layer=req.layer, direction="fwd", batch=req.batch)


def test_the_evaluator_keeps_the_most_recent_owners_and_rebuilds_a_returning_ones_hints(tiny):
    model, groups = tiny
    server = EmbeddedServer(model, groups, max_owners=2)
    ev = server.evaluators[0]
    layer = groups[0].name
    owners = [os.urandom(16) for _ in range(3)]
    first = server.hint(layer, "fwd", owners[0]).copy()
    server.hint(layer, "bwd", owners[0])
    server.hint(layer, "fwd", owners[1])
    assert ev.hints.owners == 2 and ev.hints.built == 3 and ev.hints.evicted == 0
    held = ev.hint_bytes()
    assert held == 2 * first.nbytes + server.hint(layer, "bwd", owners[0]).nbytes
    server.hint(layer, "fwd", owners[0])  # owner 0 served again: owner 1 is now the oldest
    server.hint(layer, "fwd", owners[2])
    assert ev.hints.owners == 2 and ev.hints.evicted == 1 and ev.hints.built == 4
    assert ev.hints.get(owners[1], (layer, "fwd")) is None
    server.hint(layer, "fwd", owners[1])  # owner 1 comes back: rebuilt, owner 0 dropped
    assert ev.hints.evicted == 2 and ev.hints.get(owners[0], (layer, "fwd")) is None
    np.testing.assert_array_equal(server.hint(layer, "fwd", owners[0]), first)  # same seeds, same hint
    with pytest.raises(ValueError, match="max_owners"):
        OwnerHints(0)

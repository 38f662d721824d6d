"""helora over the real RabbitMQ broker (DESIGN §4, §7): exactness, dead-lettering, isolation."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import uuid

import msgpack
import numpy as np
import pika
import pytest
import torch
from hecommon import route, wire
from hecommon.broker import topology
from hecommon.he import params as P
from hecommon.he.encrypt import EncryptedBatch, encrypt
from hecommon.he.keys import SecretKey
from hecommon.he.sampling import owner_a_seed
from hecommon.model import discover_groups, tiny_llama
from hecommon.shards import even_split
from helora_orchestrator.backend import build_backend
from helora_orchestrator.broker import make_broker_backend
from helora_orchestrator.client_model import ClientModel, build_client
from helora_orchestrator.lora import LoraSettings
from training import train_steps

pytestmark = pytest.mark.integration
LORA = LoraSettings(r=4, alpha=8)


def _model():
    return tiny_llama(0)[0]


def _broker_client(fleet, key: SecretKey | None = None, model=None) -> ClientModel:
    model = _model() if model is None else model
    backend = make_broker_backend(fleet.url, key, namespace=fleet.namespace, model=model, timeout_s=60,
                                  max_message_bytes=fleet.limit)
    return ClientModel(model, backend, discover_groups(model), LORA, seed=0)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _products(fleet, name: str) -> float:
    """``helora_he_product_seconds_count`` of one evaluator process: the request parts it computed."""
    import urllib.request

    with urllib.request.urlopen(fleet.metrics_url(name) + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^helora_he_product_seconds_count\{[^}]*\} (\S+)$", text, re.M))


def test_training_over_the_broker_equals_the_embedded_mode(fleet):
    """The direct path, both ways of serving a layer: block 0 cut in two shards (the aggregator
    combines their partials), block 1 whole on one queue with two replicas, each answering the
    client with the parts of a request it happened to receive (pieces the client adds). The
    LoRA weights equal the embedded run's bit for bit."""
    reference = train_steps(build_client(_model(), "encrypted", LORA, seed=0), steps=2, data_seed=7)
    before = {name: _products(fleet, name) for name in ("evaluator2", "evaluator3")}
    client = _broker_client(fleet)
    try:
        got = train_steps(client, steps=2, data_seed=7)
    finally:
        client.backend.transport.close()
    _assert_same(reference, got)
    assert any(torch.count_nonzero(v) for k, v in got.items() if "lora_B" in k)  # it did train
    assert client.backend.requests > 0 and client.backend.wire_bytes > 0
    layers = {e.block: e for e in client.backend.manifest.layers}
    assert layers[0].shards == 2 and layers[1].shards == 1
    params, limit = client.backend.params, fleet.limit
    assert all(route.reply_pieces(e, d, params, limit) > 1 for e in client.backend.manifest.layers if e.block == 1
               for d in ("fwd", "bwd"))  # block 1's requests come in several parts, answered piece by piece
    for name, count in before.items():  # both replicas computed parts of block 1's requests
        assert _products(fleet, name) > count, (name, fleet.logs())


def _valid_request(manifest: wire.Manifest, rows: int = 3) -> tuple[wire.EncryptedRequest, np.ndarray]:
    entry = manifest.layers[0]
    secret = SecretKey.generate().request_secret(manifest.params, os.urandom(16))
    m = np.random.default_rng(0).integers(0, 256, size=(rows, entry.d_in))
    owner = os.urandom(16)
    req = wire.EncryptedRequest(rid=os.urandom(16), layer=entry.name, direction="fwd",
                                batch=encrypt(secret, m, owner_a_seed(entry.a_seed_fwd, owner)), owner=owner)
    return req, m


def _bad_messages(manifest: wire.Manifest, limit: int) -> dict[str, tuple[bytes, str]]:
    """correlation id -> (body, expected x-helora-reason), each for shard 0 of block 0's first layer."""
    req, _ = _valid_request(manifest, rows=1)
    full, _ = _valid_request(manifest, rows=manifest.params.n)
    whole = wire.encode_request(full, 1 << 24)  # one message of N tokens above the services' limit
    first = wire.encode_request(wire.split(req, limit)[0], limit)
    entry = manifest.layers[0]
    lo, hi = even_split(entry.d_in, entry.shards)[1]  # shard 1's rows, sent to shard 0
    theirs = dataclasses.replace(req, batch=EncryptedBatch(req.params, req.batch.b[lo:lo + 1], 1), row_start=lo)
    unknown = dataclasses.replace(theirs, layer="99.qkv", row_start=0)
    head = {"v": 99, "type": "request", "pset": manifest.params.name, "rid": os.urandom(16), "lib": "0"}
    other = P.N4096
    foreign = wire.EncryptedRequest(rid=os.urandom(16), layer=req.layer, direction="fwd",
                                    batch=EncryptedBatch(other, np.zeros((1, other.limbs, 1), np.uint32), 1),
                                    owner=req.owner)
    window = msgpack.unpackb(first, raw=False)
    past_n = msgpack.packb({**window, "col0": manifest.params.n}, use_bin_type=True)  # a window past N
    wide = msgpack.packb({**window, "shape": [window["shape"][0], manifest.params.limbs, manifest.params.n]},
                         use_bin_type=True)  # N columns claimed for a one-token window
    return {uuid.uuid4().hex: body for body in (
        (past_n, "malformed"),
        (wide, "malformed"),
        (os.urandom(300), "malformed"),
        (first[: len(first) // 2], "malformed"),  # truncated
        (whole, "oversized"),
        (msgpack.packb(head, use_bin_type=True), "version"),
        (wire.encode_request(foreign, limit), "parameter_mismatch"),
        (wire.encode_request(theirs, limit), "malformed"),  # rows this evaluator does not hold
        (wire.encode_request(unknown, limit), "parameter_mismatch"),  # a layer it does not hold
    )}


def test_bad_requests_are_dead_lettered_with_their_reason_and_service_goes_on(fleet):
    """The evaluators are the entry point of requests (the direct path): what they receive is
    checked in full there, dead-lettered with its reason, and the client told at once."""
    backend = make_broker_backend(fleet.url, namespace=fleet.namespace, timeout_s=60, max_message_bytes=fleet.limit)
    topo = topology.Topology(fleet.namespace)
    bad = _bad_messages(backend.manifest, fleet.limit)
    entry = backend.manifest.layers[0]
    assert entry.shards == 2
    key = topo.routing_key(entry.name, 0, entry.shards)
    conn = pika.BlockingConnection(pika.URLParameters(fleet.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        reply_q = ch.queue_declare("", exclusive=True).method.queue
        for cid, (body, _) in bad.items():
            ch.basic_publish(topo.requests, key, body, pika.BasicProperties(reply_to=reply_q, correlation_id=cid),
                             mandatory=True)
        dead, errors = {}, {}
        end = time.monotonic() + 30
        while (len(dead) < len(bad) or len(errors) < len(bad)) and time.monotonic() < end:
            method, props, body = ch.basic_get(topo.dead, auto_ack=True)
            if method is not None and props.correlation_id in bad:
                dead[props.correlation_id] = props.headers
            method, props, body = ch.basic_get(reply_q, auto_ack=True)
            if method is not None:
                errors[props.correlation_id] = wire.decode_error(body)
            if method is None:
                conn.sleep(0.1)
    finally:
        conn.close()
    for cid, (_, reason) in bad.items():
        assert dead.get(cid, {}).get(topology.REASON_HEADER) == reason, (cid, reason, dead.get(cid), fleet.logs())
        assert dead[cid][topology.QUEUE_HEADER] == fleet.evaluator_queues[0]
        assert (topology.DROPPED_HEADER in dead[cid]) == (reason == "oversized")
        assert errors[cid].reason == reason  # the client is told too, and fails fast
    # the fleet still serves: encrypted over the broker == the clear quantized product
    x = np.random.default_rng(1).standard_normal((5, backend.manifest.layers[0].d_in)).astype(np.float32)
    model = _model()
    quantized = build_backend("quantized", model, discover_groups(model))
    layer = backend.manifest.layers[0].name
    try:
        np.testing.assert_array_equal(backend.forward(layer, x), quantized.forward(layer, x))
    finally:
        backend.transport.close()
    fleet.check_alive()


def test_two_owners_with_different_keys_train_concurrently(fleet):
    seeds = (11, 12)
    references = [train_steps(build_client(_model(), "encrypted", LORA, seed=0), steps=2, data_seed=s) for s in seeds]
    assert not all(torch.equal(references[0][k], references[1][k]) for k in references[0])  # distinct runs
    results: dict[int, object] = {}
    models = [_model() for _ in seeds]  # here: tiny_llama seeds torch's global generator, not thread-safe

    def owner(i: int) -> None:
        client = _broker_client(fleet, SecretKey.generate(), models[i])
        try:
            results[i] = train_steps(client, steps=2, data_seed=seeds[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            results[i] = exc
        finally:
            client.backend.transport.close()

    threads = [threading.Thread(target=owner, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, ref in enumerate(references):
        got = results.get(i)
        assert isinstance(got, dict), f"owner {i}: {got!r}\n{fleet.logs()}"
        _assert_same(ref, got)

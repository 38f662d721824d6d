"""The embedded default: the server's handlers (encoder, evaluators, aggregator) in-process.

DESIGN §4: "Without a broker, ``helora train`` runs the same handlers in-process". The training
path passes message objects (``exchange``) and counts the bytes their packed payloads take on
the wire; ``call`` takes and returns encoded chunks, exactly as a broker delivers them.
``federated_aggregator`` is the federated aggregator in-process (``helora federate`` without a
broker, and the honest server of the DAGER benchmark).

This module is the one place where the data owner's code imports the server services, and it
imports their pure parts only (handlers: no pika, no threads; ``tests/test_layering.py``): the
training client, the broker client and the operator tools reach none of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hecommon import route, wire
from hecommon.errors import HeloraError, ParameterMismatch
from hecommon.he import params as P
from hecommon.he.keys import SecretKey
from hecommon.model import LinearGroup
from hecommon.shards import make_shards
from helora_aggregator.federated import FederatedAggregator
from helora_aggregator.handler import AggregatorHandler
from helora_encoder.handler import build_manifest, quantize_groups
from helora_evaluator.handler import MAX_OWNERS, EvaluatorHandler

from .encrypted import ByteTransport, EncryptedBackend, Exchange


class EmbeddedServer:
    """The whole server side of helora in one process; ``call`` maps request chunks to replies.

    ``shards``: how many evaluators share every layer (1 = one evaluator holds everything).
    """

    def __init__(self, model, groups: list[LinearGroup], params: P.ParamSet = P.DEFAULT, bits: int = 8,
                 shards: int = 1, backend: str = "numpy", model_id: str = "",
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES, hints_on_client: bool = True,
                 max_owners: int = MAX_OWNERS) -> None:
        qweights = quantize_groups(model, groups, bits)
        manifest = build_manifest(model, groups, qweights, params, x_bits=bits, model_id=model_id)
        plan = {g.name: min(shards, g.in_features) for g in groups}
        self.manifest = dataclasses.replace(manifest, layers=tuple(dataclasses.replace(e, shards=plan[e.name])
                                                                   for e in manifest.layers))
        self.layers = {e.name: e for e in self.manifest.layers}
        layer_shards = make_shards(self.manifest, qweights, plan)
        count = max(len(v) for v in layer_shards.values())
        self.evaluators = []
        for i in range(count):
            mine = [v[i] for v in layer_shards.values() if i < len(v)]
            index = {v[i].layer: (i, len(v)) for v in layer_shards.values() if i < len(v)}
            self.evaluators.append(EvaluatorHandler(params, mine, index, backend, max_owners=max_owners))
        self.aggregator = AggregatorHandler(include_a=not hints_on_client)
        self._ranges = {k: [(s.lo, s.hi) for s in v] for k, v in layer_shards.items()}
        self.max_message_bytes = max_message_bytes

    def hint(self, layer: str, direction: str, owner: bytes) -> np.ndarray:
        """The layer's public hint for ``owner``'s ``a`` (the ``a`` part of its outputs), mod q:
        (outputs, L, N) uint32.

        Forward shards are row shards (their hints add up); backward shards are column shards
        (their hints are stacked). With one shard this is the evaluator's own array, not a copy.
        """
        count = len(self._ranges.get(layer, [])) or 1
        parts = [self.evaluators[i].hint(layer, direction, owner) for i in range(count)]
        if len(parts) == 1:
            return parts[0]
        if direction == "bwd":
            return np.concatenate(parts)
        total = parts[0].astype(np.uint64)
        p = np.asarray(self.manifest.params.primes, dtype=np.uint64)[:, None]
        for part in parts[1:]:
            total = (total + part) % p
        return total.astype(np.uint32)

    def manifest_bytes(self) -> bytes:
        return wire.encode_manifest(self.manifest, self.max_message_bytes)

    def exchange(self, request: wire.EncryptedRequest) -> tuple[wire.EncryptedReply, int]:
        """One whole request through the evaluators that hold its layer (``route.cut``) and the
        aggregator, as objects (the embedded path).

        Returns the reply and the bytes that would cross the network (packed payloads).
        """
        entry = self.layers.get(request.layer)
        if entry is None:
            raise ParameterMismatch(f"unknown layer {request.layer!r}")
        reply = None
        for index, sub in route.cut(entry, request):
            reply = self.aggregator.add(self.evaluators[index].handle(sub))
        if reply is None:
            raise HeloraError("aggregator did not complete the request")
        return reply, wire.payload_bytes(request) + wire.payload_bytes(reply)

    def call(self, chunks: list[bytes] | list[wire.Pieces]) -> list[bytes]:
        """Request chunks in (``bytes``, or ``wire.Pieces`` joined here as a broker's receiver
        joins a body's frames), reply chunks out, through the wire codec (what a broker carries).

        Errors come back as one ``ErrorReply``.
        """
        limit = self.max_message_bytes
        try:
            request = wire.join([wire.decode_request(bytes(c), limit) for c in chunks])
            reply, _ = self.exchange(request)
            return [wire.encode_reply(r, limit) for r in wire.split(reply, limit)]
        except HeloraError as exc:
            rid = request.rid if "request" in locals() else bytes(16)
            return [wire.encode_error(wire.ErrorReply.from_exception(rid, exc), limit)]


def make_encrypted_backend(model, groups, bits: int = 8, params: P.ParamSet | str = P.DEFAULT,
                           key: SecretKey | None = None, shards: int = 1, backend: str = "numpy",
                           model_id: str = "", over_bytes: bool = False, hints_on_client: bool = True,
                           hold_a_bytes: int = 0, server=None, **_: object) -> EncryptedBackend:
    """The embedded default: an in-process server built from ``model``, and the client over it.

    ``over_bytes``: pass every message through the wire codec (as a broker would) instead of
    handing objects over in-process. ``hints_on_client``: the client keeps each layer's public
    hint (the ``a`` part of its outputs, identical for every request) and the server sends ``b``
    alone, at ``hint_out_bits``: less than half the download. In-process the client reads the
    evaluator's own array; its one-time transfer is not counted in ``wire_bytes``. Without
    hints, ``hold_a_bytes``: as a broker client, keep each layer's switched ``a`` from its first
    reply and ask for ``b`` alone after that (``EncryptedBackend``). ``server``: an
    ``EmbeddedServer`` to share (several owners' sessions on one server); by default a new one.
    """
    ps = P.get(params) if isinstance(params, str) else params
    if server is None:
        server = EmbeddedServer(model, groups, ps, bits, shards=shards, backend=backend, model_id=model_id,
                                hints_on_client=hints_on_client)
    manifest = wire.decode_manifest(server.manifest_bytes())
    exchange: Exchange = ByteTransport(server.call) if over_bytes else server.exchange
    return EncryptedBackend(manifest, exchange, key, hints=server.hint if hints_on_client else None,
                            hold_a_bytes=hold_a_bytes)


def federated_aggregator(public_context: bytes) -> FederatedAggregator:
    """The federated aggregator in-process; it refuses a context that carries a secret key."""
    return FederatedAggregator(public_context)

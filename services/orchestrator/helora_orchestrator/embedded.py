"""The embedded default: the server's handlers (encoder, evaluators, aggregator) in-process.

Messages still cross as bytes through the same wire codec as over RabbitMQ, so the wire bytes
counted and the validation done are those of a real deployment (DESIGN §4: "Without a broker,
``helora train`` runs the same handlers in-process").
"""

from __future__ import annotations

from hecommon import params as P
from hecommon import wire
from hecommon.errors import HeloraError
from helora_aggregator.handler import AggregatorHandler
from helora_encoder.handler import EncoderHandler, build_manifest, make_shards, quantize_groups
from helora_encoder.model import LinearGroup
from helora_evaluator.handler import EvaluatorHandler


class EmbeddedServer:
    """The whole server side of helora in one process; ``call`` maps request chunks to replies.

    ``shards``: how many evaluators share every layer (1 = one evaluator holds everything).
    """

    def __init__(self, model, groups: list[LinearGroup], params: P.ParamSet = P.DEFAULT, bits: int = 8,
                 shards: int = 1, backend: str = "numpy", model_id: str = "",
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES) -> None:
        qweights = quantize_groups(model, groups, bits)
        self.manifest = build_manifest(model, groups, qweights, params, x_bits=bits, model_id=model_id)
        plan = {g.name: min(shards, g.in_features) for g in groups}
        layer_shards = make_shards(self.manifest, qweights, plan)
        self.encoder = EncoderHandler(self.manifest, {k: [(s.lo, s.hi) for s in v] for k, v in layer_shards.items()})
        count = max(len(v) for v in layer_shards.values())
        self.evaluators = []
        for i in range(count):
            mine = [v[i] for v in layer_shards.values() if i < len(v)]
            index = {v[i].layer: (i, len(v)) for v in layer_shards.values() if i < len(v)}
            self.evaluators.append(EvaluatorHandler(params, mine, index, backend))
        self.aggregator = AggregatorHandler()
        self.max_message_bytes = max_message_bytes

    def manifest_bytes(self) -> bytes:
        return wire.encode_manifest(self.manifest, self.max_message_bytes)

    def call(self, chunks: list[bytes]) -> list[bytes]:
        """Request chunks in, reply chunks out; errors come back as one ``ErrorReply``."""
        limit = self.max_message_bytes
        try:
            request = wire.join([wire.decode_request(c, limit) for c in chunks])
            reply = None
            for index, sub in self.encoder.route(request):
                partial = self.evaluators[index].handle(sub)
                reply = self.aggregator.add(wire.decode_partial(wire.encode_partial(partial, 1 << 40), 1 << 40))
            if reply is None:
                raise HeloraError("aggregator did not complete the request")
            return [wire.encode_reply(r, limit) for r in wire.split(reply, limit)]
        except HeloraError as exc:
            rid = request.rid if "request" in locals() else bytes(16)
            return [wire.encode_error(wire.ErrorReply.from_exception(rid, exc), limit)]

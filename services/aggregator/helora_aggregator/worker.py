"""The aggregator's RabbitMQ shell (DESIGN §4): gather partials, switch, reply to the client.

Consumes ``{ns}.partials``. The parts of one partial (a shard's output split below the message
limit) are joined first; ``AggregatorHandler.add`` then sums or joins the shards. Every partial
of a request stays unacked until the request's reply has been published (with confirms) to its
``reply_to``, with its ``correlation_id``: if this process dies first, the broker redelivers
them and a fresh aggregator completes the request (DESIGN §7.5). A partial of an
already-answered request (a redelivery) is acked and ignored.

Replies carry the ``a`` part (``send_a=True``): in broker mode the client holds no hints.

Streaming. A request served by one evaluator that sends its ``a`` part switched (a whole output,
``EncryptedPartial``) needs no gathering: each part of its partial becomes the same part of the
reply (the same rows, switched: a reply row is smaller than a partial row, so it fits the same
limit) and is published as soon as it arrives, while the evaluator is still publishing the next
parts and the client already receives the first. Each part is acked once its reply part is
confirmed; a copy of a part already answered is acked and dropped. If this process dies between
publishing a reply part and acking its partial, a fresh aggregator answers that part again: the
client keeps the first copy of every reply part (``helora_orchestrator.broker``).

Forwarding. An evaluator that holds a whole layer (one shard) switches ``b`` itself and sends
finished reply parts (``wire.EncryptedReply``). Their heads are checked (``wire.ReplyHead``: every
field but the packed values, which any bit pattern makes valid) and their bodies go to the
client as they came, with the same de-duplication, acks and timeouts as streamed parts.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict

import pika
import pika.exceptions as pex
from hecommon import amqp, wire
from hecommon.errors import HeloraError, MalformedMessage, ServiceTimeout
from hecommon.metrics import Metrics

from .config import AggregatorConfig
from .handler import AggregatorHandler

log = logging.getLogger("helora.aggregator")


class AggregatorWorker(amqp.Service):
    name = "aggregator"

    def __init__(self, cfg: AggregatorConfig, metrics: Metrics | None = None) -> None:
        super().__init__(cfg, metrics=metrics)
        self.metrics.set_info("any", "numpy")  # it takes whatever parameter set the partials carry
        self.handler = AggregatorHandler(cfg.max_pending, send_a=True)
        self.parts = amqp.PartCollector(cfg.part_timeout_s)
        self._held: dict[tuple[bytes, str, str], tuple[float, list[amqp.Delivery]]] = {}
        # streamed requests: key -> (first part's arrival, parts answered, properties to reply to)
        self._streams: dict[tuple[bytes, str, str], tuple[float, set[int], object]] = {}
        self._done: OrderedDict[tuple[bytes, str, str], None] = OrderedDict()

    def declare(self, ch) -> list[str]:
        self.topology.declare_queue(ch, self.topology.partials)
        return [self.topology.partials]

    def reset(self) -> None:
        self.parts.clear()
        self._held.clear()
        self.handler = AggregatorHandler(self.cfg.max_pending, send_a=True)

    def in_flight(self) -> int:
        """Deliveries queued or being handled, plus requests whose partials are still arriving."""
        return super().in_flight() + len(self._held) + len(self._streams)

    def tick(self) -> None:
        for key, ds in self.parts.expired():
            self.fail(ds, ServiceTimeout(f"layer {key[1]} {key[2]}: the partial of shard {key[3]} stayed incomplete "
                                         f"for {self.parts.timeout_s:.0f} s"), rid=key[0])
        now = time.monotonic()
        for key in [k for k, (t0, _, _) in self._streams.items() if now - t0 > self.parts.timeout_s]:
            _, sent, props = self._streams.pop(key)
            self._remember(key)  # its late parts are acked and dropped
            self.reply_error(props, ServiceTimeout(f"layer {key[1]} {key[2]}: {len(sent)} parts of the evaluator's "
                                                   f"partial came within {self.parts.timeout_s:.0f} s, not all"),
                             rid=key[0])
        for key in [k for k, (t0, _) in self._held.items() if now - t0 > self.parts.timeout_s]:
            _, ds = self._held.pop(key)
            shards, missing = self.handler.abandon(key)
            self._remember(key)  # a late partial of it is acked and dropped, not held again
            who = f"shard {', '.join(f'{i}/{shards}' for i in missing)}" if missing else "a shard"
            self.fail(ds, ServiceTimeout(f"no evaluator for layer {key[1]} {key[2]} {who} answered within "
                                         f"{self.parts.timeout_s:.0f} s"), rid=key[0])

    def handle(self, d: amqp.Delivery) -> None:
        try:
            with self.metrics.stage("decode"):
                chunk = wire.decode_partial_or_reply_head(d.body, self.limit)
            if not d.properties.reply_to:
                raise MalformedMessage(f"{'reply part' if isinstance(chunk, wire.ReplyHead) else 'partial'} "
                                       "without reply_to: nowhere to send the result")
            if (chunk.rid, chunk.layer, chunk.direction) in self._done:
                self.ack([d])  # a copy of a part of an answered request (a redelivery)
                return
            if isinstance(chunk, wire.ReplyHead):
                self._forward(chunk, d)
                return
            if self.handler.streams(chunk):
                self._stream(chunk, d)
                return
            got = self.parts.add((chunk.rid, chunk.layer, chunk.direction, chunk.shard), chunk, d)
        except HeloraError as exc:
            self.fail([d], exc)
            return
        self.ack(self.parts.take_copies())  # redundant copies (their originals are held): ack now
        if got is None:
            return
        chunks, ds = got
        key = (chunk.rid, chunk.layer, chunk.direction)
        if key in self._done:
            self.ack(ds)  # a redelivered partial of an answered request
            return
        held = self._held.setdefault(key, (time.monotonic(), []))[1]
        held.extend(ds)
        try:
            t0 = time.perf_counter()
            reply = self.handler.add(wire.join(chunks))
            switch = self.handler.switch_seconds if reply is not None else 0.0
            self.metrics.observe_stage("aggregate", time.perf_counter() - t0 - switch)
            if reply is not None:
                self.metrics.observe_stage("switch", switch)
        except HeloraError as exc:
            del self._held[key]
            self.fail(held, exc, rid=chunk.rid, pset=chunk.params.name)
            return
        if reply is not None:
            self._reply(key, reply, d.properties)

    def _stream(self, chunk: wire.PartialResult, d: amqp.Delivery) -> None:
        """One part of a one-shard partial whose a part is switched: its reply part, at once."""
        key = (chunk.rid, chunk.layer, chunk.direction)
        if self._answered(key, chunk.part, d):
            return
        try:
            reply = self.handler.reply_part(chunk)
            self.metrics.observe_stage("switch", self.handler.switch_seconds)
            body = wire.encode_reply(reply, self.limit)
        except HeloraError as exc:
            del self._streams[key]
            self._remember(key)
            self.fail([d], exc, rid=chunk.rid, pset=chunk.params.name)
            return
        self._send_part(key, chunk.part, chunk.parts, chunk.partial.n_tokens, body, d)

    def _forward(self, head: wire.ReplyHead, d: amqp.Delivery) -> None:
        """A reply part an evaluator holding the whole layer made itself: to the client as it came."""
        key = (head.rid, head.layer, head.direction)
        if not self._answered(key, head.part, d):
            self._send_part(key, head.part, head.parts, head.n_tokens, d.body, d)

    def _answered(self, key: tuple[bytes, str, str], part: int, d: amqp.Delivery) -> bool:
        """Start or continue a streamed request; True (and ``d`` acked) for a part already answered."""
        _, sent, _ = self._streams.setdefault(key, (time.monotonic(), set(), d.properties))
        if part in sent:
            self.ack([d])  # a copy of a part already answered
            return True
        return False

    def _send_part(self, key: tuple[bytes, str, str], part: int, parts: int, n_tokens: int, body: bytes,
                   d: amqp.Delivery) -> None:
        props = d.properties
        try:
            self.publish(props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id))
        except (pex.UnroutableError, pex.NackError):
            log.warning("rid %s layer %s: the client's reply queue is gone; reply part dropped", key[0].hex(), key[1])
        self.ack([d])
        sent = self._streams[key][1]
        sent.add(part)
        if len(sent) == parts:
            del self._streams[key]
            self._remember(key)
            self.metrics.request(key[1], key[2])
            self.metrics.add_tokens(n_tokens)
            log.debug("rid %s layer %s %s: streamed %d reply parts", key[0].hex(), key[1], key[2], parts)

    def _reply(self, key: tuple[bytes, str, str], reply: wire.EncryptedReply, props) -> None:
        bodies = [wire.encode_reply(r, self.limit) for r in wire.split(reply, self.limit)]
        try:
            self.publish_all(props.reply_to, bodies, pika.BasicProperties(correlation_id=props.correlation_id))
        except (pex.UnroutableError, pex.NackError):
            log.warning("rid %s layer %s: the client's reply queue is gone; reply dropped", key[0].hex(), key[1])
        _, ds = self._held.pop(key)
        # with the copies of parts that arrived after their partial was complete (a redelivery)
        self.ack(ds + self.parts.discard(lambda k: k[:3] == key))
        self.metrics.request(key[1], key[2])
        self.metrics.add_tokens(reply.result.n_tokens)
        self._remember(key)
        log.debug("rid %s layer %s %s: replied, %d bytes", key[0].hex(), key[1], key[2], sum(map(len, bodies)))

    def _remember(self, key: tuple[bytes, str, str]) -> None:
        """An answered (or abandoned) request: its redelivered partials are acked and ignored."""
        self._done[key] = None
        while len(self._done) > self.cfg.max_pending:
            self._done.popitem(last=False)


def main(argv: list[str] | None = None) -> int:
    return amqp.serve("helora-aggregator", AggregatorConfig.from_args, AggregatorWorker, argv)

if __name__ == "__main__":
    sys.exit(main())

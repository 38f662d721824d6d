"""The aggregator's RabbitMQ shell (DESIGN §4): gather partials, switch, reply to the client.

Consumes ``{ns}.partials``. The parts of one partial (a shard's piece, its outputs split below
the message limit) are joined first; ``AggregatorHandler.add`` then sums or joins the shards. Every partial
of a request stays unacked until the request's reply has been published (with confirms) to its
``reply_to``, with its ``correlation_id``: if this process dies first, the broker redelivers
them and a fresh aggregator completes the request (DESIGN §7.5). A partial of an
already-answered request (a redelivery) is acked and ignored.

Replies carry the ``a`` part (``include_a=True``): in broker mode the client holds no hints. A
request sent with ``send_a=False`` (its client holds the switched ``a`` of an earlier reply of the
layer) is answered with ``b`` alone.

Only sharded layers come here (the direct path, ``hecommon.route``): an evaluator that holds a
whole layer answers the client itself. Each evaluator sends one partial per request part it
received (a piece), and the request is answered once every piece of every shard is in.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict

import pika
import pika.exceptions as pex
from hecommon import wire
from hecommon.broker import amqp, process
from hecommon.broker.metrics import Metrics
from hecommon.errors import HeloraError, MalformedMessage, ServiceTimeout

from .config import AggregatorConfig
from .handler import AggregatorHandler

log = logging.getLogger("helora.aggregator")


class AggregatorWorker(amqp.Service):
    name = "aggregator"

    def __init__(self, cfg: AggregatorConfig, metrics: Metrics | None = None) -> None:
        super().__init__(cfg, metrics=metrics)
        self.metrics.set_info("any", "numpy")  # it takes whatever parameter set the partials carry
        self.handler = AggregatorHandler(cfg.max_pending, include_a=True)
        # the parts of each shard's piece: (rid, layer, direction, shard, piece) -> part -> message
        self.parts: wire.Gather[wire.PartialResult, amqp.Delivery] = wire.Gather(_partial_head, timeout_s=cfg.part_timeout_s)
        self._held: dict[tuple[bytes, str, str], tuple[float, list[amqp.Delivery]]] = {}
        self._done: OrderedDict[tuple[bytes, str, str], None] = OrderedDict()
        self._warned = 0.0  # when the prefetch window was last reported full

    def declare(self, ch) -> list[str]:
        self.topology.declare_queue(ch, self.topology.partials)
        return [self.topology.partials]

    def reset(self) -> None:
        self.parts.clear()
        self._held.clear()
        self.handler = AggregatorHandler(self.cfg.max_pending, include_a=True)

    def in_flight(self) -> int:
        """Deliveries queued or being handled, plus requests whose partials are still arriving."""
        return super().in_flight() + len(self._held)

    def tick(self) -> None:
        for (rid, layer, direction, shard, piece), ds in self.parts.expired():  # _partial_head's keys
            self.fail(ds, ServiceTimeout(f"layer {layer} {direction}: the partial of shard {shard} piece {piece} "
                                         f"stayed incomplete for {self.parts.timeout_s:.0f} s"), rid=rid)
        now = time.monotonic()
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
                chunk = wire.decode_partial(d.body, self.limit)
            if not d.properties.reply_to:
                raise MalformedMessage("partial without reply_to: nowhere to send the result")
            if (chunk.rid, chunk.layer, chunk.direction) in self._done:
                self.ack([d])  # a copy of a part of an answered request (a redelivery)
                return
            got = self.parts.add(chunk, d)
        except wire.GatherError as exc:  # parts that cannot make one message: every one held for it goes
            self.fail(exc.tokens, exc, rid=chunk.rid)
            return
        except HeloraError as exc:
            self.fail([d], exc)
            return
        self.ack(self.parts.take_copies())  # redundant copies (their originals are held): ack now
        if got is None:
            self._check_window()
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

    def _check_window(self) -> None:
        """Every partial message stays unacked until its request is answered, so the prefetch must
        hold all the partial messages of the sharded requests in flight at once; a window full of
        incomplete requests waits until their time is up. Say so, naming the fix."""
        held = self.parts.held() + sum(len(ds) for _, ds in self._held.values())
        if held >= self.prefetch and time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            requests = set(self._held) | {key[:3] for key in self.parts.keys()}  # type: ignore[index]
            log.warning("holding %d partial messages of %d incomplete request(s), the whole --prefetch (%d): a request "
                        "needs shards x parts x output messages of them at once; raise --prefetch", held,
                        len(requests), self.prefetch)

    def _remember(self, key: tuple[bytes, str, str]) -> None:
        """An answered (or abandoned) request: its redelivered partials are acked and ignored."""
        self._done[key] = None
        while len(self._done) > self.cfg.max_pending:
            self._done.popitem(last=False)


def _partial_head(m: wire.PartialResult) -> wire.Head:
    """A partial's parts are gathered per shard and piece of its request."""
    return wire.Head((m.rid, m.layer, m.direction, m.shard, m.piece), m.part, m.parts)


def main(argv: list[str] | None = None) -> int:
    return process.serve("helora-aggregator", AggregatorConfig.from_args, AggregatorWorker, argv, reuse_memory=True)


if __name__ == "__main__":
    sys.exit(main())

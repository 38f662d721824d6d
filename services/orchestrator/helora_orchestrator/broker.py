"""The client's transport over RabbitMQ (DESIGN §4: ``helora train --broker amqp://…``).

``BrokerTransport`` is an ``Exchange`` (``helora_orchestrator.encrypted``): it publishes each
part of a request straight to the evaluator(s) that hold its layer (``{ns}.requests``, routing
key ``{layer}.s{i}of{n}``, from the manifest's shard counts: ``hecommon.route``) with
``reply_to`` = its own exclusive, auto-delete queue and ``correlation_id`` = the request id in
hex, and waits for every reply part: from the evaluator itself where it holds the whole layer
(one piece per request part), from the aggregator where shards are combined. An ``ErrorReply``
raises at once, naming the layer and the server's reason; silence past ``timeout_s`` sends the
request once more (below), then raises an error naming the layer and the service that looks down. One transport per thread: pika's
``BlockingConnection`` is not thread-safe.

Reconnection. When the connection drops (broker restart, a connection closed by an operator, a
network cut), the transport reconnects with backoff and sends the request again **under a fresh
attempt id**, then hands the reply back under the caller's request id. Resending under the same id
does not work: the aggregator remembers answered ids so that redelivered partials are never
counted twice, and the first attempt's reply went to a reply queue that died with the old
connection, so a same-id retry would be dropped as a duplicate and time out. A fresh id makes the
retry a new request for every service; the services need no cache of (large) replies, and
de-duplication stays what it is. The retry re-sends the same ciphertexts (no new secret), so
the server learns no new ciphertext, only that a retry happened: it can link the two attempt ids by
their identical bytes (docs/threat-model.md). The abandoned attempt may still be computed; its reply
is unroutable (its queue is gone) and the evaluator or the aggregator drops it.

Silence. A request that no reply completes within ``timeout_s``, or that the aggregator answers
with a ``timeout`` error (a shard's evaluator silent), is sent again under a fresh attempt id
``silence_retries`` times (default 1) before the error is raised: a service paused or restarting
past the timeout answers the second attempt once it is back; the first attempt's late reply
arrives under an id nobody waits for and is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pika
import pika.exceptions as pex
from hecommon import route, wire
from hecommon.broker import connection, topology
from hecommon.errors import HeloraError, ParameterMismatch, TransientError
from hecommon.he.keys import SecretKey

from .encrypted import HOLD_A_MIB, EncryptedBackend

log = logging.getLogger("helora.broker")
_CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.StreamLostError, pex.ConnectionClosed, pex.ChannelClosed)


class ServerError(HeloraError):
    """The server refused a request; ``reason`` is the server's (``errors.py`` names)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class _Silent(TransientError):
    """No reply within the transport's timeout (sent again under a fresh id, then raised)."""


class BrokerTransport:
    """request → (reply, bytes moved) over RabbitMQ; reconnects with backoff on connection loss."""

    def __init__(self, url: str, namespace: str = topology.DEFAULT_NAMESPACE, timeout_s: float = 120.0,
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES, connect_s: float = 30.0,
                 retries: int = 3, silence_retries: int = 1) -> None:
        self.url = url
        self.topology = topology.Topology(namespace)
        self.timeout_s = timeout_s
        self.limit = max_message_bytes
        self.connect_s = connect_s
        self.retries = retries
        #: times a request nobody answered within ``timeout_s`` (or that the aggregator timed out)
        #: is sent again under a fresh id before the error is raised (a paused or restarting service)
        self.silence_retries = silence_retries
        self.silence_retries_used = 0
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self._reply_queue = ""
        self.layers: dict[str, wire.LayerEntry] = {}  # the manifest's (fetch_manifest): shard counts
        self._inbox: dict[str, list[bytes]] = {}
        self._awaiting: str | None = None  # the correlation id whose replies are wanted now
        #: message bodies really sent and received (every attempt), for benchmarks and metrics
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- connection ---------------------------------------------------------------------------
    def _open(self) -> None:
        name = f"helora-client-{uuid.uuid4().hex[:8]}@{self.topology.namespace}"  # rabbitmqctl list_connections
        self._conn = connection.connect(self.url, name, self.connect_s)
        self._ch = self._conn.channel()
        self._ch.confirm_delivery()
        self._reply_queue = self._ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self._ch.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)
        self._inbox.clear()

    def _on_reply(self, ch, method, properties, body: bytes) -> None:
        cid = properties.correlation_id or ""
        if cid == self._awaiting:
            self._inbox.setdefault(cid, []).append(body)
        # else: a late copy for a request already answered (or abandoned): dropped, not kept

    def _expect(self, cid: str | None) -> None:
        """Keep replies for ``cid`` only (None: none), dropping what is left of earlier ones."""
        self._awaiting = cid
        self._inbox.clear()

    def close(self) -> None:
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
        self._conn = None

    def __enter__(self) -> BrokerTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _with_reconnect(self, fn, what: str):
        """Run ``fn(attempt)`` (which may publish and wait); on connection loss reconnect and retry."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                if self._conn is None or not self._conn.is_open:
                    self._open()
                return fn(attempt)
            except _CONNECTION_ERRORS as exc:
                self.close()
                if attempt == self.retries:
                    raise TransientError(f"{what}: the broker connection failed {attempt + 1} times "
                                         f"({type(exc).__name__})") from None
                log.warning("%s: broker connection lost (%s); retrying in %.1f s", what, type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    # -- requests -------------------------------------------------------------------------------
    def _publish(self, key: str, bodies: list[bytes] | list[wire.Pieces], cid: str, exchange: str = "") -> None:
        props = pika.BasicProperties(reply_to=self._reply_queue, correlation_id=cid,
                                     delivery_mode=connection.TRAFFIC_DELIVERY)  # resent after a broker loss
        for body in bodies:
            self._ch.basic_publish(exchange, key, body, props, mandatory=True)

    def plan(self, entry: wire.LayerEntry, direction: str, params) -> tuple[list[route.Piece], int]:
        """(the request's parts, the reply's pieces) for the evaluators' layout (``hecommon.route``)."""
        return (route.pieces(entry, direction, params, self.limit),
                route.reply_pieces(entry, direction, params, self.limit))

    def _wait(self, cid: str, done, deadline: float) -> list[bytes] | None:
        while True:
            got = self._inbox.get(cid, [])
            if done(got):
                return self._inbox.pop(cid)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._conn.process_data_events(time_limit=min(left, 0.5))

    def _round_trip(self, request: _DrawnParts, attempt: int, on_part: Callable[[wire.EncryptedReply], None],
                    handed: set[tuple[int, int]]) -> None:
        """Publish the request's parts as they come (under a fresh id after the first attempt) and
        hand each reply part to ``on_part`` as it arrives, under the caller's request id, unless an
        earlier attempt handed it over already (``handed``: the reply of a retry equals the first);
        return once every part is in."""
        first = request.first()
        rid = first.rid if attempt == 0 else os.urandom(wire.RID_BYTES)
        cid = rid.hex()
        self._expect(cid)
        entry = self.layers.get(first.layer)
        if entry is None:
            raise ParameterMismatch(f"{describe(first)}: the server's manifest has no such layer")
        for part in request:  # the parts sent before a reconnection, then the rest as they are encrypted
            body = wire.encode_request_pieces(dataclasses.replace(part, rid=rid), self.limit)  # arrays not joined
            for shard in route.targets(entry, part):
                key = self.topology.routing_key(part.layer, shard, entry.shards)
                self.bytes_sent += len(body)
                try:
                    self._publish(key, [body], cid, exchange=self.topology.requests)
                except pex.UnroutableError:
                    raise TransientError(f"{describe(first)}: no evaluator holds shard {shard} of {entry.shards} "
                                         f"(routing key {key!r} on {self.topology.requests!r}): is an evaluator "
                                         f"for block {entry.block} running?") from None
        parts = wire.PartTracker()
        deadline = time.monotonic() + self.timeout_s
        while True:
            for body in self._inbox.pop(cid, []):
                self.bytes_received += len(body)
                head = wire.peek_part(body, self.limit)
                if head is not None and head in parts:
                    continue  # a copy of a part already used (a replaced evaluator or aggregator sent it again)
                msg = wire.decode(body, self.limit)
                if isinstance(msg, wire.ErrorReply):
                    raise ServerError(msg.reason, f"{describe(first)}: the server could not serve the request: "
                                                  f"{msg.reason}: {msg.message}")
                if not isinstance(msg, wire.EncryptedReply) or msg.rid != rid:
                    raise HeloraError(f"{describe(first)}: a reply for another request arrived")
                key = parts.key(msg)
                if parts.add(msg) and key not in handed:
                    on_part(dataclasses.replace(msg, rid=first.rid))  # the caller's id, whatever attempt
                    handed.add(key)
            if parts.complete:
                self._expect(None)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Silent(self._silence(first))
            self._conn.process_data_events(time_limit=min(left, 0.5))

    def stream(self, parts: Iterable[wire.EncryptedRequest], on_part: Callable[[wire.EncryptedReply], None]) -> int:
        """Send a request given as its parts (``wire.split``'s, or made one by one by a caller that
        encrypts each just before it is needed: each is published as soon as it exists), and call
        ``on_part(reply part)`` for each part of the reply as it arrives (each part once), so that
        the caller decrypts a part while the server still computes the next. Returns the bytes sent
        and received. After a reconnection the parts are sent again (the same ciphertexts, under a
        fresh id) and the reply comes again, equal to the first attempt's."""
        request = _DrawnParts(parts)
        before = self.bytes_sent + self.bytes_received
        handed: set[tuple[int, int]] = set()  # reply (piece, part)s given to on_part, over every attempt
        fresh = 0  # added to the attempt number: after a silence, every attempt has a fresh id
        for retry in range(self.silence_retries + 1):
            try:
                self._with_reconnect(lambda attempt, fresh=fresh: self._round_trip(request, attempt + fresh, on_part, handed),
                                     describe(request.first()))
                break
            except (_Silent, ServerError) as exc:
                if (isinstance(exc, ServerError) and exc.reason != "timeout") or retry == self.silence_retries:
                    raise
                log.warning("%s; sending it again under a fresh id", exc)
                self.silence_retries_used += 1
                fresh += 1 + self.retries
        return self.bytes_sent + self.bytes_received - before

    def __call__(self, request: wire.EncryptedRequest) -> tuple[wire.EncryptedReply, int]:
        """The whole reply (its parts joined) and the bytes moved."""
        got: dict[int, wire.EncryptedReply] = {}
        moved = self.stream(wire.split(request, self.limit), lambda part: got.__setitem__(part.part, part))
        return wire.join(list(got.values())), moved  # type: ignore[return-value]

    def _silence(self, request: wire.EncryptedRequest) -> str:
        """Which service looks down: the aggregator, if the layer is sharded and its queue has no
        consumer; otherwise the evaluator(s) holding the layer (their queues are not the client's)."""
        who = "the evaluator(s) holding this layer"
        entry = self.layers.get(request.layer)
        if entry is not None and entry.shards > 1:
            queue = self.topology.partials
            try:
                ok = self._ch.queue_declare(queue, passive=True).method
                if ok.consumer_count == 0:
                    who = f"the aggregator (no consumer on {queue}, {ok.message_count} waiting)"
            except pex.ChannelClosedByBroker:  # the reply queue's consumer went with the channel:
                self.close()  # a retry reconnects, with a new reply queue
                who = f"the aggregator (queue {queue} does not exist)"
        return f"{describe(request)}: no reply within {self.timeout_s:.0f} s; not answering: {who}"

    def fetch_manifest(self) -> wire.Manifest:
        """The encoder's public manifest (RPC on ``{ns}.manifest``); waits for the encoder to start,
        and asks again under a fresh id after a silence, as ``stream`` does."""
        got = None
        for _ in range(self.silence_retries + 1):
            deadline = time.monotonic() + self.timeout_s

            def ask(attempt: int, deadline: float = deadline) -> list[bytes] | None:
                cid = uuid.uuid4().hex
                self._expect(cid)
                while True:
                    try:
                        self._publish(self.topology.manifest, [b""], cid)
                    except pex.UnroutableError:  # the encoder has not declared its queue yet
                        if time.monotonic() > deadline:
                            return None
                        self._conn.sleep(0.5)
                        continue
                    return self._wait(cid, bool, deadline)

            got = self._with_reconnect(ask, "manifest")
            if got:
                break
            log.warning("manifest: the encoder did not answer within %.0f s; asking again", self.timeout_s)
        if not got:
            raise TransientError(f"manifest: the encoder did not answer on {self.topology.manifest!r} "
                                 f"within {self.timeout_s:.0f} s ({self.silence_retries + 1} asks)")
        msg = wire.decode(got[0], self.limit)
        if isinstance(msg, wire.ErrorReply):
            raise ServerError(msg.reason, f"manifest: the server refused: {msg.reason}: {msg.message}")
        if not isinstance(msg, wire.Manifest):
            raise HeloraError(f"manifest: the encoder answered with a {msg.TYPE!r} message")
        self.layers = {e.name: e for e in msg.layers}
        return msg


class TransportPool:
    """One ``BrokerTransport`` per calling thread (pika connections are not thread-safe), so that
    several requests are in flight at once (``helora train --in-flight K``); byte counters summed."""

    def __init__(self, first: BrokerTransport) -> None:
        self._args = (first.url, first.topology.namespace, first.timeout_s, first.limit, first.connect_s,
                      first.retries, first.silence_retries)
        self._local = threading.local()
        self._local.transport = first  # the creating thread keeps the one that fetched the manifest
        self._layers = first.layers
        self._all = [first]
        self._lock = threading.Lock()

    def _mine(self) -> BrokerTransport:
        t = getattr(self._local, "transport", None)
        if t is None:
            t = self._local.transport = BrokerTransport(*self._args)
            t.layers = self._layers
            with self._lock:
                self._all.append(t)
        return t

    def __call__(self, request: wire.EncryptedRequest) -> tuple[wire.EncryptedReply, int]:
        return self._mine()(request)

    def stream(self, parts: Iterable[wire.EncryptedRequest], on_part: Callable[[wire.EncryptedReply], None]) -> int:
        return self._mine().stream(parts, on_part)

    @property
    def limit(self) -> int:
        return self._all[0].limit

    def plan(self, entry: wire.LayerEntry, direction: str, params) -> tuple[list[route.Piece], int]:
        return self._all[0].plan(entry, direction, params)

    @property
    def bytes_sent(self) -> int:
        return sum(t.bytes_sent for t in self._all)

    @property
    def bytes_received(self) -> int:
        return sum(t.bytes_received for t in self._all)

    @property
    def silence_retries_used(self) -> int:
        return sum(t.silence_retries_used for t in self._all)

    def close(self) -> None:
        """Close every thread's connection (call from one thread once the others are done)."""
        for t in self._all:
            t.close()


class _DrawnParts:
    """A request's parts, drawn from ``source`` once and kept: iterating again (a retry after a
    reconnection) gives the parts already drawn, then draws the rest."""

    def __init__(self, source: Iterable[wire.EncryptedRequest]) -> None:
        self._source = iter(source)
        self._drawn: list[wire.EncryptedRequest] = []

    def first(self) -> wire.EncryptedRequest:
        if not self._drawn:
            self._drawn.append(next(self._source))
        return self._drawn[0]

    def __iter__(self) -> Iterator[wire.EncryptedRequest]:
        yield from self._drawn
        for part in self._source:
            self._drawn.append(part)
            yield part


def describe(request: wire.EncryptedRequest) -> str:
    """``layer 3.qkv (block 3, qkv) fwd``: how errors name a request."""
    block, _, kind = request.layer.partition(".")
    return f"layer {request.layer} (block {block}, {kind or '?'}) {request.direction}"


def make_broker_backend(url: str, key: SecretKey | None = None, namespace: str = topology.DEFAULT_NAMESPACE,
                        model=None, params: str | None = None, timeout_s: float = 120.0,
                        max_message_bytes: int = wire.MAX_MESSAGE_BYTES, in_flight: int = 1,
                        hold_a_bytes: int = HOLD_A_MIB << 20) -> EncryptedBackend:
    """The encrypted backend over RabbitMQ. ``hints=None``: the first reply of each layer carries
    its ``a`` part, which the client keeps (up to ``hold_a_bytes`` in all) and asks no more for.

    With ``model``, the server's manifest must describe the same architecture (config
    fingerprint); with ``params``, the same parameter set. ``in_flight > 1``: a ``TransportPool``
    (one connection per calling thread) for concurrent micro-batches.
    """
    from hecommon.model import config_fingerprint

    transport = BrokerTransport(url, namespace, timeout_s, max_message_bytes)
    manifest = transport.fetch_manifest()
    if model is not None and manifest.metadata.get("config_fingerprint") != config_fingerprint(model):
        transport.close()
        raise ParameterMismatch(f"the server serves {manifest.model!r}, a different architecture than the local model")
    if params is not None and params != manifest.params.name:
        transport.close()
        raise ParameterMismatch(f"--param-set {params}: the server uses {manifest.params.name}")
    pool = TransportPool(transport) if in_flight > 1 else transport  # one connection per training thread
    return EncryptedBackend(manifest, pool, key, hints=None, hold_a_bytes=hold_a_bytes)  # transport.close() when done

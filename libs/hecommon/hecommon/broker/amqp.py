"""helora over RabbitMQ: the service shell every service runs in (DESIGN §4).

The names it declares are ``hecommon.broker.topology``'s; the flags every service shares,
``hecommon.broker.config``'s.

Dead-lettering: RabbitMQ's own dead-lettering (reject with ``requeue=False``) cannot add headers,
so a service publishes the rejected body to ``{ns}.dlx`` itself, with ``x-helora-reason`` (the
exception's ``.reason``), ``x-helora-message`` (its short text, which never holds payload) and
``x-helora-queue``, waits for the confirm, then acks the original. If that publish fails, it
rejects the original without requeue and the queue's ``x-dead-letter-exchange`` takes over
(RabbitMQ's ``x-death`` header then records the queue and reason ``rejected``).

Faults (DESIGN §7.5): a service acks a message only once its result is published (with
confirms), so a worker that dies mid-request leaves its deliveries to the broker, which
redelivers them. A lost connection is reconnected with backoff; a broker operation cut by the
loss raises ``TransientError`` (the message comes back; it is never dead-lettered). A part that
arrives twice (a redelivery, or a sender that died half-way through publishing) is acked at
once and used once (``hecommon.wire.Gather``); the aggregator ignores partials of answered ids.
Messages are transient (``TRAFFIC_DELIVERY``): a broker restart loses those in flight, and the
client, whose connection dropped with it, sends its request again. Connections are named
``helora-{service}@{namespace}`` (``rabbitmqctl list_connections client_properties``).

Signals (``process.serve``): SIGTERM or SIGINT stops a service at once while it starts (loading,
waiting for shards or for the broker) and after its current message once it consumes; exit status 0.

Threads (DESIGN §4 RabbitMQ practice): pika's ``BlockingConnection`` lives on the main thread,
which only runs the I/O loop; deliveries go to one worker thread, which runs the service's
logic. Every ack and publish is run on the I/O thread through ``add_callback_threadsafe``, so
heartbeats keep flowing during a long product. Every publish uses publisher confirms and
``mandatory``; every payload is split below ``max_message_bytes``.
"""
from __future__ import annotations

import functools
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as pex

from ..errors import HeloraError, ServiceTimeout, TransientError
from ..wire import MAX_ERROR_CHARS, ErrorReply, encode_error
from .config import safe_url
from .connection import connect, rid_of
from .metrics import Metrics
from .process import STOP_SIGNALS, exit_at_once
from .topology import DROPPED_HEADER, MESSAGE_HEADER, QUEUE_HEADER, REASON_HEADER, Topology

log = logging.getLogger("helora.amqp")

def _reject(channel: Any, tag: int) -> None:
    """Reject without requeue: the queue's own dead-letter exchange takes the message."""
    channel.basic_reject(tag, requeue=False)


# -- the service shell -------------------------------------------------------------------------
@dataclass
class Delivery:
    """One message as the worker thread sees it; ``gen`` is the connection it came on."""

    queue: str
    tag: int
    properties: Any
    body: bytes
    gen: int
    redelivered: bool = False


@dataclass(eq=False)  # hashed by identity (Service._io_waiting)
class _IoCall:
    fn: Callable[[Any], Any]
    future: Future = field(default_factory=Future)


class Service:
    """Connection, declaration, consumption and the worker thread; subclasses add the logic.

    Subclasses implement ``declare(ch) -> queues to consume``, ``handle(delivery)`` (worker
    thread) and ``reset()`` (drop in-flight state after a reconnect: the broker redelivers every
    unacknowledged message). From the worker thread they use ``publish``, ``ack``, ``fail``.

    Metrics (``hecommon.broker.metrics``): the shell counts body bytes in and out, failures by reason and
    dead-lettered messages, times ``publish`` and ``total`` (one delivery's handling), reports
    ``in_flight()`` at each scrape and sets ``metrics.ready`` (``/readyz``) while consuming.
    """

    name = "service"

    def __init__(self, cfg: Any, io_timeout_s: float = 120.0, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.topology = Topology(cfg.namespace)
        self.limit = cfg.max_message_bytes
        self.prefetch = cfg.prefetch
        self.io_timeout_s = io_timeout_s
        self._inbox: queue.Queue[Delivery | None] = queue.Queue()
        self._stop = threading.Event()
        self._gen = 0
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self._worker: threading.Thread | None = None
        self._io_waiting: set[_IoCall] = set()  # operations handed to the I/O thread, not finished
        self._busy = 0
        self._consumed = False  # start-up lasts until the first basic_consume: a signal exits at once
        self.metrics = metrics if metrics is not None else Metrics(self.name, getattr(cfg, "metrics_group", "all"))
        self.ready = self.metrics.ready  # /readyz: set while consuming
        self.metrics.track_in_flight(lambda: self.in_flight())

    # -- to override ----------------------------------------------------------------------
    def declare(self, ch) -> list[str]:
        raise NotImplementedError

    def handle(self, d: Delivery) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget partial state after a reconnect (its deliveries come back)."""

    def tick(self) -> None:
        """Called on the worker thread about once a second when idle (timeouts)."""

    def in_flight(self) -> int:
        """``helora_in_flight``, read at each scrape (any thread): deliveries queued or being handled;
        services that hold partial sets add them."""
        return self._inbox.qsize() + self._busy

    # -- worker-thread helpers -----------------------------------------------------------------
    def io(self, fn: Callable[[Any], Any], gen: int | None = None) -> Any:
        """Run ``fn(channel)`` on the I/O thread and wait for it (from the worker thread)."""
        work = _IoCall(fn)
        conn = self._conn
        if conn is None or (gen is not None and gen != self._gen):
            raise TransientError("the connection these deliveries came on is gone")
        try:
            self._io_waiting.add(work)
            conn.add_callback_threadsafe(lambda: self._run(work))
            return work.future.result(self.io_timeout_s)
        except FutureTimeout:
            raise TransientError(f"broker operation did not finish within {self.io_timeout_s:.0f} s") from None
        except (pex.AMQPConnectionError, pex.ChannelWrongStateError, pex.ChannelClosed) as exc:
            # the connection died under this operation: the broker redelivers what was unacked,
            # so the message is retried (requeue), never dead-lettered or answered with an error
            raise TransientError(f"the broker connection was lost ({type(exc).__name__})") from None
        finally:
            self._io_waiting.discard(work)

    def _run(self, work: _IoCall) -> None:
        if work.future.done():  # failed by _drop_connection already
            return
        try:
            work.future.set_result(work.fn(self._ch))
        except BaseException as exc:  # noqa: BLE001 - handed back to the waiting thread
            work.future.set_exception(exc)

    def publish(self, routing_key: str, body: bytes, props: Any, exchange: str = "") -> None:
        """Publish with confirms and ``mandatory``; raises ``UnroutableError`` / ``NackError``."""
        if len(body) > self.limit:  # wire.encode already refuses this: a bug if reached
            raise HeloraError(f"refusing to publish {len(body)} bytes above the limit {self.limit}")
        with self.metrics.stage("publish"):
            self.io(lambda ch: ch.basic_publish(exchange, routing_key, body, props, mandatory=True))
        self.metrics.bytes_out(len(body))

    def publish_all(self, routing_key: str, bodies: list[bytes], props: Any, exchange: str = "") -> None:
        def run(ch):
            for body in bodies:
                ch.basic_publish(exchange, routing_key, body, props, mandatory=True)
        if any(len(b) > self.limit for b in bodies):
            raise HeloraError(f"refusing to publish a message above the limit {self.limit}")
        with self.metrics.stage("publish"):
            self.io(run)
        self.metrics.bytes_out(sum(map(len, bodies)))

    def ack(self, deliveries: Iterable[Delivery]) -> None:
        ds = [d for d in deliveries if d.gen == self._gen]  # older tags died with their connection
        if ds:
            self.io(lambda ch: [ch.basic_ack(d.tag) for d in ds])

    def requeue(self, deliveries: Iterable[Delivery]) -> None:
        ds = [d for d in deliveries if d.gen == self._gen]
        if ds:
            self.io(lambda ch: [ch.basic_nack(d.tag, requeue=True) for d in ds])

    def reply_error(self, props: Any, exc: BaseException, rid: bytes | None = None, pset: str = "") -> bool:
        """Tell the client at ``reply_to`` why its request failed, so it fails fast; False if its
        reply queue is gone (the client died or reconnected)."""
        reply_to = getattr(props, "reply_to", None)
        if not reply_to:
            return False
        body = encode_error(ErrorReply.from_exception(rid_of(props, rid), exc, pset), self.limit)
        try:
            self.publish(reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id))
        except (pex.UnroutableError, pex.NackError):
            log.warning("client reply queue gone; error reply dropped")
            return False
        return True

    def dead_letter(self, deliveries: Iterable[Delivery], exc: BaseException) -> None:
        """Publish each message to the DLX with its reason, then ack it (see module docstring).

        A body above the message limit cannot be republished: the dead letter then carries the
        headers alone (``x-helora-dropped-bytes`` says how large it was).
        """
        reason = exc.reason if isinstance(exc, HeloraError) else "internal"
        text = str(exc)[:MAX_ERROR_CHARS] if isinstance(exc, HeloraError) else type(exc).__name__
        for d in deliveries:
            props = d.properties
            headers = dict(getattr(props, "headers", None) or {})
            headers.update({REASON_HEADER: reason, MESSAGE_HEADER: text, QUEUE_HEADER: d.queue})
            body = d.body
            if len(body) > self.limit:
                headers[DROPPED_HEADER] = len(body)
                body = b""
            out = pika.BasicProperties(reply_to=props.reply_to, correlation_id=props.correlation_id,
                                       headers=headers, delivery_mode=pika.DeliveryMode.Persistent)
            try:
                self.publish(d.queue, body, out, exchange=self.topology.dlx)
                self.ack([d])
            except Exception:  # noqa: BLE001 - never leave it unacked: the queue's own DLX takes it
                log.warning("explicit dead-lettering failed; rejecting to the queue's dead-letter exchange")
                if d.gen == self._gen:
                    self.io(functools.partial(_reject, tag=d.tag))
            self.metrics.failure(exc, d.queue, self.topology.namespace)
            log.warning("dead-lettered a message from %s: %s (%d bytes)", d.queue, reason, len(d.body))

    def fail(self, deliveries: list[Delivery], exc: BaseException, rid: bytes | None = None,
             pset: str = "") -> None:
        """A request that cannot be served: dead-letter its messages and tell the client. A request
        that timed out waiting for parts whose client is gone (its error reply is unroutable: the
        client died mid-request, or reconnected and sent it again under a fresh id) is dropped
        instead: valid traffic that nobody will ever complete or read, not a fault to look into."""
        timeout = bool(deliveries) and isinstance(exc, ServiceTimeout)
        if timeout and not self.reply_error(deliveries[-1].properties, exc, rid, pset):
            self.ack(deliveries)
            self.metrics.failure(exc, deliveries[0].queue, self.topology.namespace)
            log.warning("dropped %d message(s) of a request its client abandoned (%s)", len(deliveries), exc)
            return
        self.dead_letter(deliveries, exc)
        if deliveries and not timeout:  # (a timeout's client was told above)
            self.reply_error(deliveries[-1].properties, exc, rid, pset)

    # -- worker thread ---------------------------------------------------------------------
    def _work_loop(self) -> None:
        seen_gen, last_tick = 0, time.monotonic()
        while True:
            if time.monotonic() - last_tick >= 1.0:
                self._tick()
                last_tick = time.monotonic()
            try:
                d = self._inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if d is None:
                return
            if d.gen != self._gen:
                continue  # its connection died: the broker redelivers it
            if d.gen != seen_gen:  # first delivery of a new connection: old partial state is void
                self.reset()
                seen_gen = d.gen
            self._busy = 1
            t0 = time.perf_counter()
            try:
                self.handle(d)
            except TransientError as exc:
                log.warning("transient failure, message requeued: %s", exc)
                try:
                    self.requeue([d])
                except HeloraError:
                    pass
            except Exception as exc:  # noqa: BLE001 - keep serving; dead-letter what failed
                log.exception("unexpected failure in %s", self.name)
                try:
                    self.fail([d], exc)
                except Exception:  # noqa: BLE001
                    log.exception("could not dead-letter a message")
            finally:
                self._busy = 0
                self.metrics.observe_stage("total", time.perf_counter() - t0)

    def _tick(self) -> None:
        if self._conn is None:
            return
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - a failed sweep must not stop the worker
            log.exception("periodic check failed in %s", self.name)

    # -- I/O thread ---------------------------------------------------------------------------
    def _on_message(self, queue_name: str):
        def callback(ch, method, properties, body) -> None:
            self.metrics.bytes_in(len(body))
            self._inbox.put(Delivery(queue_name, method.delivery_tag, properties, body, self._gen,
                                     bool(method.redelivered)))
        return callback

    def stop(self) -> None:
        """Thread- and signal-safe: finish the current message, then close."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT (main thread): once consuming, ``stop()``: finish the current message, then
        close; before the first ``basic_consume`` (the broker wait) nothing is held: exit at once."""
        def on_signal(signum: int, frame: Any) -> None:
            if not self._consumed:
                exit_at_once(signum, frame)
            self.stop()

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)

    def _session(self) -> None:
        cfg = self.cfg
        # the namespace in the connection name (`rabbitmqctl list_connections client_properties`)
        self._conn = connect(cfg.broker_url, f"helora-{self.name}@{self.topology.namespace}", stop=self._stop)
        self._ch = self._conn.channel()
        self._ch.confirm_delivery()
        self.topology.declare_common(self._ch)
        queues = self.declare(self._ch)
        self._ch.basic_qos(prefetch_count=self.prefetch)
        for q in queues:
            self._ch.basic_consume(q, self._on_message(q), auto_ack=False)
        log.info("%s consuming %s on %s", self.name, queues, safe_url(cfg.broker_url))
        self._consumed = True
        self.ready.set()
        while not self._stop.is_set():
            try:
                self._conn.process_data_events(time_limit=0.5)
            except ValueError:
                # pika 1.3: a connection that closes inside a callback (a publish from the worker
                # thread) leaves the I/O loop closed, and the next timer raises ValueError
                if self._conn.is_open:
                    raise
                raise pex.StreamLostError("the connection closed during a callback") from None

    def run(self) -> int:
        """Serve until ``stop()``; reconnect with backoff when the connection drops."""
        self._worker = threading.Thread(target=self._work_loop, name=f"{self.name}-worker", daemon=True)
        self._worker.start()
        backoff = 0.5
        try:
            while not self._stop.is_set():
                try:
                    self._session()
                except (pex.AMQPConnectionError, pex.AMQPChannelError, pex.StreamLostError,
                        pex.ConnectionClosed, TransientError) as exc:
                    if self._stop.is_set():
                        break
                    if self.ready.is_set():  # it was serving: a fresh loss starts the backoff over
                        backoff = 0.5
                    log.warning("broker connection lost (%s); reconnecting in %.1f s", type(exc).__name__, backoff)
                    self._drop_connection()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            self._shutdown()
        return 0

    def _drop_connection(self) -> None:
        self.ready.clear()
        self._gen += 1  # deliveries of the old connection are no longer ours to ack
        for work in list(self._io_waiting):  # their callbacks died with the connection: free the worker
            if not work.future.done():
                work.future.set_exception(TransientError("the broker connection was lost"))
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:  # noqa: BLE001 - already broken
            pass
        self._conn = None

    def _shutdown(self) -> None:
        """Let the worker finish its current message (bounded), then close the connection."""
        self._inbox.put(None)
        deadline = time.monotonic() + 30
        while self._worker is not None and self._worker.is_alive() and time.monotonic() < deadline:
            if self._conn is not None and self._conn.is_open:
                try:
                    self._conn.process_data_events(time_limit=0.2)  # run its pending acks
                except Exception:  # noqa: BLE001
                    break
            else:
                self._worker.join(0.2)
        self.ready.clear()
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:  # noqa: BLE001
            pass
        log.info("%s stopped", self.name)

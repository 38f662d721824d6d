"""helora's RabbitMQ connections: opened with backoff, with pika's socket reads tuned for
megabyte messages (and its frame handling patched: ``pikaframes``), and the properties that carry a
reply's route along every hop. Tested with the pika versions ``libs/hecommon/pyproject.toml``
allows: ``tune_pika_reads`` and ``pikaframes.install`` check the internals they touch and fail
loudly on a pika that changed them."""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import pika
import pika.exceptions as pex

from ..errors import ConfigError, HeloraError, TransientError
from ..wire import RID_BYTES
from . import pikaframes
from .config import safe_url

#: Bytes pika reads per ``recv`` and per I/O-loop pass (its defaults: 4 KiB and 100 KiB).
RECV_BYTES = 1 << 20
CONSUME_BYTES = 4 << 20


def tune_pika_reads(recv_bytes: int = RECV_BYTES, consume_bytes: int = CONSUME_BYTES) -> None:
    """Make pika read the socket in large pieces; helora's messages are megabytes.

    pika 1.x reads 4 KiB per ``recv`` and appends each piece to an immutable ``bytes`` frame
    buffer, so every 128 KiB frame is copied about 32 times on arrival: measured here, 3 to 6
    CPU-seconds per GB received, the largest cost of a hop. With 1 MiB reads the same transfer
    takes under 1 s/GB (``benchmarks/services.py`` reports the effect on a whole step). The
    per-pass bound still returns to the I/O loop every few MiB, so heartbeats and timers keep
    running. pika exposes no setting for this; the class attributes are checked so that a pika
    release that renames them fails loudly instead of silently losing the tuning.
    """
    from pika.adapters.utils import io_services_utils as io  # noqa: PLC0415 - pika internals

    transport = getattr(io, "_AsyncTransportBase", None)
    if transport is None or not hasattr(transport, "_MAX_RECV_BYTES") or not hasattr(transport, "_MAX_CONSUME_BYTES"):
        raise ConfigError(f"pika {pika.__version__}: its transport no longer has _MAX_RECV_BYTES; "
                          "update hecommon.broker.connection.tune_pika_reads")
    transport._MAX_RECV_BYTES = recv_bytes
    transport._MAX_CONSUME_BYTES = consume_bytes


def connect(url: str, name: str, deadline_s: float = 60.0, heartbeat: int = 30,
            stop: threading.Event | None = None) -> pika.BlockingConnection:
    """A blocking connection, retried with exponential backoff until ``deadline_s``, or until ``stop``
    is set (``Service.stop()``): the retries wait on it, and then raise ``TransientError``."""
    tune_pika_reads()
    pikaframes.install()
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.client_properties = {"connection_name": name}
    stop = stop if stop is not None else threading.Event()
    delay, end = 0.2, time.monotonic() + deadline_s
    while not stop.is_set():
        try:
            return pika.BlockingConnection(params)
        except pex.AMQPConnectionError as exc:
            if time.monotonic() + delay > end:
                raise TransientError(f"broker {safe_url(url)} did not answer within {deadline_s:.0f} s "
                                     f"({type(exc).__name__})") from None
            if stop.wait(delay * (1 + secrets.randbelow(250) / 1000)):  # jitter up to +25%
                break
            delay = min(delay * 2, 5.0)
    raise TransientError(f"stopped while waiting for the broker {safe_url(url)}")


def rid_of(properties: Any, fallback: bytes | None = None) -> bytes:
    """The request id a reply must carry: the message's own, else the hex ``correlation_id``."""
    if fallback is not None and len(fallback) == RID_BYTES:
        return fallback
    cid = getattr(properties, "correlation_id", None) or ""
    try:
        rid = bytes.fromhex(cid)
    except ValueError:
        return bytes(RID_BYTES)
    return rid if len(rid) == RID_BYTES else bytes(RID_BYTES)


#: Ciphertext traffic (requests, sub-requests, partials, replies) is published transient: the
#: broker keeps it in memory and does not write it to disk before confirming. Persisting it costs
#: about 3x the latency and 5x the broker's CPU per message (measured here: 14 MiB messages on a
#: durable classic queue, 88-98 ms against 30-33 ms a round trip) and buys nothing: a request
#: lost with a broker restart is sent again by the client, which reconnects and re-sends under
#: a fresh id (``helora_orchestrator.broker``). Queues stay durable, and dead letters persistent.
TRAFFIC_DELIVERY = pika.DeliveryMode.Transient


def forward_properties(props: Any, **extra: Any) -> pika.BasicProperties:
    """Reply routing carried along every hop: ``reply_to`` and ``correlation_id``."""
    return pika.BasicProperties(reply_to=getattr(props, "reply_to", None),
                                correlation_id=getattr(props, "correlation_id", None),
                                delivery_mode=TRAFFIC_DELIVERY, **extra)


class Unroutable(HeloraError):
    """No queue is bound for a message (``mandatory`` publish returned): a deployment mismatch."""

    reason = "unroutable"

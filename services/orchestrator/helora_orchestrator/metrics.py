"""``helora train --metrics-port P``: the data owner's metrics (docs/metrics.md, orchestrator).

The training loop sets step, loss, tokens and tokens/s (``Trainer``); ``MeteredExchange`` wraps
the backend's transport and times each layer request's round trip and counts its bytes. They are
served on the owner's own machine, by default on 127.0.0.1 only: the loss is the owner's, and
DESIGN §7.1 keeps it away from the server.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

from hecommon import wire
from hecommon.broker.metrics import MetricsServer, OrchestratorMetrics, check_metrics_fields, serve

from .encrypted import Exchange

DEFAULT_HOST = "127.0.0.1"


class MeteredExchange:
    """An ``Exchange`` that records every round trip in ``helora_orchestrator_request_seconds`` and
    ``helora_orchestrator_bytes_total``; any other attribute is the wrapped transport's.

    Bytes in and out come from the transport's own counters (``bytes_sent`` / ``bytes_received``,
    every attempt included) when it keeps them; otherwise the request's packed payload is "out"
    and the rest of the bytes it reports moved is "in" (exact for the embedded server).
    """

    def __init__(self, inner: Exchange, metrics: OrchestratorMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        if callable(getattr(inner, "stream", None)):  # the broker client: replies decrypted part by part
            self.stream = self._stream

    def __call__(self, request: wire.EncryptedRequest) -> tuple[wire.EncryptedReply, int]:
        got: list[wire.EncryptedReply] = []

        def send() -> int:
            reply, moved = self.inner(request)
            got.append(reply)
            return moved

        moved = self._metered(send, [request])
        return got[0], moved

    def _stream(self, parts: Iterable[wire.EncryptedRequest], on_part: Callable[[wire.EncryptedReply], None]) -> int:
        drawn: list[wire.EncryptedRequest] = []  # the parts as the transport draws them

        def tapped() -> Iterator[wire.EncryptedRequest]:
            for part in parts:
                drawn.append(part)
                yield part

        return self._metered(lambda: self.inner.stream(tapped(), on_part), drawn)  # type: ignore[attr-defined]

    def _metered(self, send: Callable[[], int], parts: list[wire.EncryptedRequest]) -> int:
        """``send()``, timed; ``parts``: the request's parts (filled in by the time it returns)."""
        counted = hasattr(self.inner, "bytes_sent") and hasattr(self.inner, "bytes_received")
        sent0, received0 = (self.inner.bytes_sent, self.inner.bytes_received) if counted else (0, 0)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        moved = send()
        seconds = time.perf_counter() - t0
        if counted:
            sent = self.inner.bytes_sent - sent0  # type: ignore[attr-defined]
            received = self.inner.bytes_received - received0  # type: ignore[attr-defined]
        else:
            sent = min(moved, sum(wire.payload_bytes(p) for p in parts))
            received = moved - sent
        self.metrics.round_trip(parts[0].layer, parts[0].direction, seconds, sent, received)
        return moved

    def __getattr__(self, name: str) -> Any:
        if name == "stream":  # only where __init__ set it: the backend falls back to whole replies
            raise AttributeError(name)
        return getattr(self.inner, name)


def start_metrics(port: int, host: str, client: Any) -> tuple[OrchestratorMetrics, MetricsServer]:
    """Serve the orchestrator's metrics and meter ``client``'s encrypted transport (if it has one)."""
    check_metrics_fields(SimpleNamespace(metrics_port=port, metrics_host=host))
    metrics = OrchestratorMetrics()
    backend = getattr(client, "backend", None)
    if backend is not None and hasattr(backend, "transport"):
        backend.transport = MeteredExchange(backend.transport, metrics)
    server = serve(metrics, host, port, "helora train")
    print(f"metrics on http://{host}:{server.port}/metrics", file=sys.stderr)  # the CLI configures no logging
    metrics.ready.set()  # the model and the server are there: training starts now
    return metrics, server


"""Prometheus metrics and health endpoints of every helora process (docs/metrics.md).

Each process builds one ``Metrics`` (its own ``CollectorRegistry``, so tests can build several)
and serves it with ``MetricsServer``: ``/metrics`` (Prometheus text format), ``/healthz`` (200
while the process lives) and ``/readyz`` (200 once ``ready`` is set: weights or manifest loaded
and consuming from the broker; 503 before and while reconnecting).

DESIGN §7.1: no label ever carries data. Every label value comes from a closed set defined here
(``SERVICES``, ``KINDS``, ``DIRECTIONS``, ``STAGES``, ``REASONS``, ``QUEUES``, ``DEVICES``) or
from the process's own configuration (``group``, ``version``, ``param_set``, ``backend``),
checked against ``LABEL_RE``. A value outside its set is folded into ``other`` (reasons, kinds)
or refused with ``ConfigError`` (configuration), never passed through.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import __version__
from ..errors import ConfigError, HeloraError

log = logging.getLogger("helora.metrics")
# no ``*_created`` series: a timestamp per label set doubles the scrape for nothing the dashboards use
disable_created_metrics()

SERVICES = ("encoder", "evaluator", "aggregator", "orchestrator")
#: the layer groups of a Llama block (``helora_encoder.model.GROUP_SPECS``); anything else: other
KINDS = ("qkv", "o", "gate_up", "down", "other")
#: wire direction → label
DIRECTIONS = {"fwd": "forward", "bwd": "backward"}
BYTE_DIRECTIONS = ("in", "out")
STAGES = ("decode", "he_product", "aggregate", "switch", "publish", "total")
#: every ``HeloraError.reason`` (errors.py, connection.Unroutable), ``internal`` for any other exception
REASONS = ("error", "config", "insecure_parameters", "transient", "timeout", "malformed", "version", "oversized",
           "parameter_mismatch", "decryption", "unroutable", "internal", "other")
#: queue roles (the queue's name without the namespace; every evaluator queue is ``evaluator``)
QUEUES = ("manifest", "evaluator", "partials", "other")
DEVICES = ("cpu", "cuda")
#: ``group`` of the services that serve every layer group (encoder, aggregator)
ALL_GROUPS = "all"
#: configuration values used as labels: short, lower-case names
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_PORT = 9400
DEFAULT_HOST = "0.0.0.0"
#: latency buckets, seconds: 1 ms … 5 min (a product on the CPU takes seconds)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def config_label(field: str, value: str) -> str:
    """A configuration value that becomes a label; ``ConfigError`` naming ``field`` otherwise."""
    if not isinstance(value, str) or not LABEL_RE.match(value):
        raise ConfigError(f"{field}: {value!r} must match {LABEL_RE.pattern} (it is a metric label)")
    return value


def kind_of(layer: str) -> str:
    """``"3.qkv"`` → ``"qkv"``; the block index (a number) never becomes a label."""
    kind = layer.rpartition(".")[2]
    return kind if kind in KINDS else "other"


def direction_of(direction: str) -> str:
    return DIRECTIONS.get(direction, "other")


def reason_of(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, HeloraError) else "internal"
    return reason if reason in REASONS else "other"


def queue_role(queue: str, namespace: str) -> str:
    """``helora.evaluator.b0-14.s0of2`` → ``evaluator``: the role, not the deployment's name."""
    rest = queue[len(namespace) + 1:] if queue.startswith(namespace + ".") else ""
    role = rest.split(".", 1)[0]
    return role if role in QUEUES else "other"


#: the queues (roles) each service consumes from, hence can dead-letter from
CONSUMED = {"encoder": ("manifest",), "evaluator": ("evaluator",), "aggregator": ("partials",)}


class Metrics:
    """The metrics of one service process (the contract in docs/metrics.md), in its own registry."""

    def __init__(self, service: str, group: str = ALL_GROUPS, registry: CollectorRegistry | None = None) -> None:
        if service not in SERVICES[:3]:
            raise ConfigError(f"service: {service!r} is not one of {SERVICES[:3]}")
        self.service = service
        self.group = config_label("group", group)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.ready = threading.Event()  # /readyz; the Service shell sets and clears it
        r = self.registry
        self.requests = Counter("helora_requests", "Requests (sub-requests) handled successfully",
                                ("service", "group", "kind", "direction"), registry=r)
        self.failures = Counter("helora_failures", "Messages dead-lettered or answered with an error, by reason",
                                ("service", "reason"), registry=r)
        self.stage_seconds = Histogram("helora_stage_seconds", "Latency per stage", ("service", "stage"),
                                       buckets=BUCKETS, registry=r)
        self.he_product_seconds = Histogram("helora_he_product_seconds", "Time of the encrypted matrix product",
                                            ("group", "kind", "direction"), buckets=BUCKETS, registry=r)
        self.bytes = Counter("helora_bytes", "Message body bytes received (in) and published (out)",
                             ("service", "direction"), registry=r)
        self.tokens = Counter("helora_tokens", "Token rows processed (evaluator: per product; aggregator: "
                              "per reply)", ("service", "group"), registry=r)
        self.in_flight = Gauge("helora_in_flight", "Requests being worked on and partial sets pending",
                               ("service",), registry=r)
        self.device_memory = Gauge("helora_device_memory_bytes", "Bytes held on the compute device",
                                   ("service", "device"), registry=r)
        self.dead_lettered = Counter("helora_dead_lettered", "Messages sent to the dead-letter queue",
                                     ("service", "queue"), registry=r)
        self.info = Gauge("helora_service_info", "Build and configuration of this process (value 1)",
                          ("service", "version", "param_set", "backend"), registry=r)
        self.set_info()
        for reason in REASONS:  # every series exists from the start: rate() sees the first failure
            self.failures.labels(service, reason)
        for d in BYTE_DIRECTIONS:
            self.bytes.labels(service, d)
        for queue in CONSUMED[service]:  # likewise for the dead letters of the queues it consumes
            self.dead_lettered.labels(service, queue)

    def set_info(self, param_set: str = "any", backend: str = "numpy") -> None:
        """``helora_service_info``; ``param_set`` ``any``: the service takes whatever set a message names."""
        self.info.clear()
        self.info.labels(self.service, config_label("version", __version__), config_label("param_set", param_set),
                         config_label("backend", backend)).set(1)

    # -- recording (thread-safe: prometheus_client locks each child) ------------------------------
    def request(self, layer: str, direction: str) -> None:
        self.requests.labels(self.service, self.group, kind_of(layer), direction_of(direction)).inc()

    def failure(self, exc: BaseException, queue: str | None = None, namespace: str = "") -> None:
        """One message that failed: ``failures_total`` by reason; dead-lettered from ``queue`` if given."""
        self.failures.labels(self.service, reason_of(exc)).inc()
        if queue is not None:
            self.dead_lettered.labels(self.service, queue_role(queue, namespace)).inc()

    def bytes_in(self, n: int) -> None:
        self.bytes.labels(self.service, "in").inc(n)

    def bytes_out(self, n: int) -> None:
        self.bytes.labels(self.service, "out").inc(n)

    def add_tokens(self, n: int) -> None:
        self.tokens.labels(self.service, self.group).inc(n)

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.stage_seconds.labels(self.service, stage).observe(seconds)

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time the block as ``stage`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - t0)

    def he_product(self, layer: str, direction: str, seconds: float) -> None:
        self.he_product_seconds.labels(self.group, kind_of(layer), direction_of(direction)).observe(seconds)
        self.observe_stage("he_product", seconds)

    def track_in_flight(self, fn: Callable[[], float]) -> None:
        """``helora_in_flight`` is read from ``fn`` at every scrape."""
        self.in_flight.labels(self.service).set_function(fn)

    def track_owner_hints(self, owners: Callable[[], float], held_bytes: Callable[[], float]) -> None:
        """The evaluator's per-owner hints (``helora_owners_held``, ``helora_hint_bytes``, read at each
        scrape); builds and evictions are counted by ``hint_built`` and ``owner_evicted``."""
        r = self.registry
        self.owners_held = Gauge("helora_owners_held", "Data owners whose hints this evaluator keeps",
                                 ("service", "group"), registry=r)
        self.hint_bytes = Gauge("helora_hint_bytes", "Bytes of the data owners' hints held in host memory",
                                ("service", "group"), registry=r)
        self.hint_builds = Counter("helora_hint_builds", "Hints built: one per owner, layer and direction",
                                   ("service", "group"), registry=r)
        self.hint_seconds = Counter("helora_hint_seconds", "Seconds spent building owners' hints",
                                    ("service", "group"), registry=r)
        self.owner_evictions = Counter("helora_owner_evictions", "Owners whose hints were dropped to make room",
                                       ("service", "group"), registry=r)
        self.owners_held.labels(self.service, self.group).set_function(owners)
        self.hint_bytes.labels(self.service, self.group).set_function(held_bytes)
        for counter in (self.hint_builds, self.hint_seconds, self.owner_evictions):
            counter.labels(self.service, self.group)

    def hint_built(self, seconds: float) -> None:
        self.hint_builds.labels(self.service, self.group).inc()
        self.hint_seconds.labels(self.service, self.group).inc(seconds)

    def owner_evicted(self) -> None:
        self.owner_evictions.labels(self.service, self.group).inc()

    def track_device_memory(self, device: str, fn: Callable[[], float]) -> None:
        if device not in DEVICES:
            raise ValueError(f"device {device!r} is not one of {DEVICES}")
        self.device_memory.labels(self.service, device).set_function(fn)


class OrchestratorMetrics:
    """``helora train --metrics-port``: the data owner's side (docs/metrics.md). Labels: kind, direction."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.ready = threading.Event()
        self.tokens_per_second = Gauge("helora_orchestrator_tokens_per_second",
                                       "Training throughput since the start of the run", registry=r)
        self.loss = Gauge("helora_orchestrator_loss", "Training loss of the last step", registry=r)
        self.step = Gauge("helora_orchestrator_step", "Optimizer steps done", registry=r)
        self.tokens = Counter("helora_orchestrator_tokens", "Tokens trained on", registry=r)
        self.bytes = Counter("helora_orchestrator_bytes", "Message bytes sent (out) and received (in)",
                             ("direction",), registry=r)
        self.request_seconds = Histogram("helora_orchestrator_request_seconds",
                                         "Round trip of one layer request through the server",
                                         ("kind", "direction"), buckets=BUCKETS, registry=r)
        for d in BYTE_DIRECTIONS:
            self.bytes.labels(d)

    def record_step(self, step: int, loss: float, tokens: int, tokens_per_second: float) -> None:
        self.step.set(step)
        self.loss.set(loss)
        self.tokens.inc(tokens)
        self.tokens_per_second.set(tokens_per_second)

    def round_trip(self, layer: str, direction: str, seconds: float, sent: int, received: int) -> None:
        self.request_seconds.labels(kind_of(layer), direction_of(direction)).observe(seconds)
        self.bytes.labels("out").inc(sent)
        self.bytes.labels("in").inc(received)


# -- HTTP ------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            began = time.monotonic()
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            with self.server.scraped:
                self.server.last_scrape = max(self.server.last_scrape, began)
                self.server.scraped.notify_all()
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            ready = self.server.ready.is_set()
            self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
        else:
            self._send(404, b"not found: /metrics, /healthz, /readyz\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("metrics http: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    ready: threading.Event
    scraped: threading.Condition
    last_scrape: float  # time.monotonic() at which the latest served /metrics began to be generated


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on ``host:port`` from a daemon thread (port 0: any free)."""

    def __init__(self, registry: CollectorRegistry, ready: threading.Event, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT) -> None:
        try:
            self._httpd = _Server((host, port), _Handler)
        except OSError as exc:
            raise OSError(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._httpd.registry = registry
        self._httpd.ready = ready
        self._httpd.scraped = threading.Condition()
        self._httpd.last_scrape = -math.inf
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def close_after_scrape(self, timeout_s: float) -> bool:
        """Serve until a ``/metrics`` scrape that began after this call has been answered (at most
        ``timeout_s``; 0: at once), then close. True if such a scrape came: a process that ends
        right after its last update (``helora train``) is seen with its final values by a
        Prometheus that scrapes it every few seconds."""
        mark = time.monotonic()
        httpd = self._httpd
        with httpd.scraped:
            seen = httpd.scraped.wait_for(lambda: httpd.last_scrape >= mark, timeout=max(timeout_s, 0.0))
        self.close()
        return seen


def serve(metrics: Metrics | OrchestratorMetrics, host: str, port: int, name: str) -> MetricsServer:
    """Start the endpoints and log the bound port (the line tests and operators read)."""
    server = MetricsServer(metrics.registry, metrics.ready, host, port)
    log.info("%s metrics on http://%s:%d/metrics (/healthz, /readyz)", name, host, server.port)
    return server


# -- configuration ----------------------------------------------------------------------------
def add_metrics_flags(p: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """``--metrics-port``, ``--metrics-host``; a string default goes through ``type`` as well, so a
    bad ``HELORA_METRICS_PORT`` is a usage error, not a traceback."""
    p.add_argument("--metrics-port", type=int, default=environ.get("HELORA_METRICS_PORT", str(DEFAULT_PORT)),
                   help=f"port of /metrics, /healthz, /readyz; 0: any free port, logged "
                        f"(env HELORA_METRICS_PORT, default {DEFAULT_PORT})")
    p.add_argument("--metrics-host", default=environ.get("HELORA_METRICS_HOST", DEFAULT_HOST),
                   help=f"address the metrics endpoints listen on (env HELORA_METRICS_HOST, default {DEFAULT_HOST})")


_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


def check_metrics_fields(cfg: Any) -> None:
    """Validate ``metrics_port`` (0..65535) and ``metrics_host`` (an IP address or a host name)."""
    port = cfg.metrics_port
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics_port: {port!r} outside 0..65535")
    host = cfg.metrics_host
    if not isinstance(host, str):
        raise ConfigError(f"metrics_host: {host!r} is not an address")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.match(host):
            raise ConfigError(f"metrics_host: {host!r} is neither an IP address nor a host name") from None

"""A service's process around its broker shell (``amqp.Service``): the worker's ``main``
(``serve``: configuration, logging, the metrics endpoints, start-up, exit status) and the stop
signals, which end a starting service at once (``exit_at_once``)."""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from .. import heap
from ..errors import HeloraError
from .metrics import Metrics
from .metrics import serve as serve_metrics

log = logging.getLogger("helora.amqp")

#: what stops a service: SIGTERM (``kubectl delete``, ``helora up`` on exit) and SIGINT (Ctrl-C)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_at_once(signum: int, _frame: Any) -> None:
    """A stop signal while a service starts (importing torch, quantizing, waiting for shards or for
    the broker): it holds no delivery and no partial state yet, so the process ends here, with the
    status of a graceful stop, 0. Not by raising an exception: one raised while torch runs Python code
    from C++ (its import does) aborts the process (pybind11 calls std::terminate)."""
    try:  # the log write itself may be interrupted (reentrant stderr write): exit all the same
        log.info("%s during start-up: stopped", signal.Signals(signum).name)
    finally:
        os._exit(0)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)


def serve(prog: str, from_args: Callable[[list[str] | None], Any], build: Callable[[Any, Metrics], Any],
          argv: list[str] | None = None, *, reuse_memory: bool = False) -> int:
    """A worker's ``main``: parse and validate the config, start the metrics endpoints, build the
    service (``build(cfg, metrics)``: loading weights may take minutes; ``/healthz`` answers and
    ``/readyz`` says 503 meanwhile), run it.

    Bad arguments and start-up failures exit with status 2 and one line, never a traceback.
    SIGTERM and SIGINT are handled from the first step (a container's PID 1 ignores a signal it has
    no handler for: a pod deleted while it starts would wait out its grace period): until the
    service consumes they end the process at once (``exit_at_once``); after, it finishes its current
    message and closes (``amqp.Service.install_signal_handlers``). Either way the exit status is 0.
    ``reuse_memory``: the process keeps its freed memory for reuse (``hecommon.heap``; services whose
    requests allocate large arrays: the CPU evaluator, the aggregator).
    """
    previous = [(sig, signal.signal(sig, exit_at_once)) for sig in STOP_SIGNALS]
    try:
        return _serve(prog, from_args, build, argv, reuse_memory)
    finally:  # a caller that goes on (a test) gets its own handlers back
        for sig, handler in previous:
            signal.signal(sig, handler)


def _serve(prog: str, from_args: Callable[[list[str] | None], Any], build: Callable[[Any, Metrics], Any],
           argv: list[str] | None, reuse_memory: bool) -> int:
    try:
        cfg = from_args(argv)
    except HeloraError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        metrics = Metrics(prog.removeprefix("helora-"), getattr(cfg, "metrics_group", "all"))
        serve_metrics(metrics, cfg.metrics_host, cfg.metrics_port, prog)
        if reuse_memory:
            heap.reuse_freed_memory()
        worker = build(cfg, metrics)
    except (HeloraError, OSError) as exc:
        log.error("start-up failed: %s", exc)
        return 2
    worker.install_signal_handlers()
    return int(worker.run())

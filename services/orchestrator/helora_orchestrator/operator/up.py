"""``helora up``: the whole server side on this machine, for a person to try (issue 4).

Starts the encoder, N evaluators (every layer cut into N shards: evaluator ``i`` runs
``--shard i/N`` over every block) and the aggregator as subprocesses against a running broker,
waits until each one consumes, prints how to train against it, and on Ctrl-C (SIGINT) or SIGTERM
stops them (SIGTERM, then SIGKILL after a grace period), removes nothing from the broker, and
exits 0. A service that dies on its own stops the others and ``up`` exits 1 with its log's tail.

``LocalFleet`` is the same thing as a library: the integration tests (faults, tap, ``helora up``)
and ``benchmarks/services.py`` start their fleets with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hecommon import wire
from hecommon.broker import config as broker_config
from hecommon.broker import connection, topology
from hecommon.errors import ConfigError, HeloraError
from hecommon.shards import MANIFEST_FILE

TINY = "tiny"
SMOLLM2 = "smollm2"  # the bundled SmolLM2-135M-Instruct
#: the encoder is told to shard blocks 0..MAX_BLOCK (the model decides how many exist)
MAX_BLOCK = 1023


def stop_processes(procs: dict[str, subprocess.Popen], timeout_s: float) -> dict[str, int]:
    """SIGTERM to every live child, SIGKILL to those still running after ``timeout_s``; exit codes."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout_s
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = p.wait()
    return codes


def tail_logs(log_dir: Path, tail: int = 3000) -> str:
    """The last ``tail`` characters of every ``*.log`` in ``log_dir``, each under its name."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(log_dir.glob("*.log")))


@dataclass
class LocalFleet:
    """Encoder, ``evaluators`` evaluators and the aggregator as child processes (see module doc)."""

    broker_url: str = topology.DEFAULT_URL
    namespace: str = topology.DEFAULT_NAMESPACE
    model: str = TINY  # 'tiny', 'smollm2' or a .gguf file / HF directory
    seed: int = 0  # the tiny model's seed
    evaluators: int = 1
    shard_dir: Path | None = None  # default: a fresh temporary directory
    log_dir: Path | None = None  # default: next to the shards
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    part_timeout_s: float = 60.0  # the aggregator's (the one service that puts parts together)
    backend: str = "auto"  # the evaluators' product backend: auto, numpy, cupy
    metrics_port: int = 0  # first port of /metrics (encoder, evaluators, aggregator); 0: any free port
    threads: int | None = None  # OMP/BLAS threads per service (None: the library default)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    blocks: tuple[int, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)  # set: waits give up (Ctrl-C)

    def __post_init__(self) -> None:
        topology.Topology(self.namespace)  # validates the name
        if not isinstance(self.evaluators, int) or not 1 <= self.evaluators <= 64:
            raise ConfigError(f"evaluators: {self.evaluators!r} outside 1..64")
        if not self.broker_url.startswith(("amqp://", "amqps://")):
            raise ConfigError("broker: an amqp:// or amqps:// URL is required")
        if self.shard_dir is None:
            self.shard_dir = Path(tempfile.mkdtemp(prefix="helora-shards-"))
        self.shard_dir = Path(self.shard_dir)
        self.log_dir = Path(self.log_dir) if self.log_dir is not None else self.shard_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- processes ------------------------------------------------------------------------------
    def _env(self, port: int) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "HELORA_METRICS_PORT": str(port)}
        if self.threads is not None:
            env.update({k: str(self.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        return env

    def start_service(self, name: str, module: str, *args: str, port_offset: int = 0) -> subprocess.Popen:
        """One service as a child process; its output goes to ``log_dir/{name}.log``."""
        port = self.metrics_port + port_offset if self.metrics_port else 0
        argv = [sys.executable, "-m", module, "--broker", self.broker_url, "--namespace", self.namespace,
                "--max-message-bytes", str(self.max_message_bytes), *args]
        assert self.log_dir is not None
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(port))
        return self.procs[name]

    def start_encoder(self) -> None:
        args = ["--seed", str(self.seed), "--shards", f"0-{MAX_BLOCK}:{self.evaluators}",
                "--shard-dir", str(self.shard_dir)]
        if self.model != SMOLLM2:
            args = ["--model", self.model, *args]
        self.start_service("encoder", "helora_encoder.worker", *args)

    def start_evaluator(self, index: int, name: str | None = None) -> subprocess.Popen:
        """Evaluator ``index`` of ``evaluators`` (a replacement may take another ``name``)."""
        return self.start_service(name or f"evaluator{index}", "helora_evaluator.worker",
                                  "--blocks", topology.blocks_label(self.blocks), "--shard", f"{index}/{self.evaluators}",
                                  "--shard-dir", str(self.shard_dir), "--backend", self.backend,
                                  port_offset=1 + index)

    def start_aggregator(self) -> None:
        self.start_service("aggregator", "helora_aggregator.worker", "--part-timeout-s", str(self.part_timeout_s),
                           port_offset=1 + self.evaluators)

    def start(self, timeout_s: float = 600.0) -> LocalFleet:
        """Everything, in order; returns once every service consumes (or raises, naming who did not)."""
        assert self.shard_dir is not None
        manifest = self.shard_dir / MANIFEST_FILE
        since = time.time() - 1.0
        self.start_encoder()
        end = time.monotonic() + timeout_s
        while not (manifest.is_file() and manifest.stat().st_mtime >= since):  # written last, atomically
            self.check_alive()
            if time.monotonic() > end:
                raise HeloraError(f"the encoder wrote no manifest within {timeout_s:.0f} s\n{self.logs()}")
            time.sleep(0.2)
        m = wire.decode_manifest(manifest.read_bytes(), self.max_message_bytes)
        self.blocks = tuple(sorted({e.block for e in m.layers}))
        for i in range(self.evaluators):
            self.start_evaluator(i)
        self.start_aggregator()
        self.wait_ready(max(1.0, end - time.monotonic()))
        return self

    def evaluator_queue(self, index: int) -> str:
        return topology.Topology(self.namespace).evaluator_queue(topology.blocks_label(self.blocks), index, self.evaluators)

    def queues(self) -> dict[str, str]:
        """Queue → the service that consumes it."""
        t = topology.Topology(self.namespace)
        out = {t.manifest: "encoder", t.partials: "aggregator"}
        out.update({self.evaluator_queue(i): f"evaluator {i}/{self.evaluators}" for i in range(self.evaluators)})
        return out

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Every queue has a consumer (passive declares; an absent queue is not ready yet)."""
        import pika.exceptions as pex

        logging.getLogger("pika").setLevel(logging.CRITICAL)  # passive declares of absent queues are expected
        end = time.monotonic() + timeout_s
        conn = connection.connect(self.broker_url, f"helora-up@{self.namespace}", deadline_s=timeout_s)
        try:
            ch = conn.channel()
            while True:
                self.check_alive()
                waiting = []
                for q, who in self.queues().items():
                    try:
                        if ch.queue_declare(q, passive=True).method.consumer_count == 0:
                            waiting.append(who)
                    except pex.ChannelClosedByBroker:
                        ch = conn.channel()
                        waiting.append(who)
                if not waiting:
                    return
                if time.monotonic() > end:
                    raise HeloraError(f"not ready within {timeout_s:.0f} s: {', '.join(waiting)}\n{self.logs()}")
                conn.sleep(0.3)
        finally:
            if conn.is_open:
                conn.close()

    def check_alive(self) -> None:
        if self.cancel.is_set():
            raise HeloraError("interrupted")
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise HeloraError(f"services exited: {dead}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        assert self.log_dir is not None
        return tail_logs(self.log_dir, tail)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        return stop_processes(self.procs, timeout_s)

    def delete_topology(self) -> None:
        """Remove this namespace's exchanges and queues (tests and benchmarks clean up with it)."""
        conn = connection.connect(self.broker_url, f"helora-up@{self.namespace}", deadline_s=10)
        try:
            topology.Topology(self.namespace).delete(conn.channel(), [self.evaluator_queue(i)
                                                                for i in range(self.evaluators)])
        finally:
            conn.close()


# -- the command ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", dest="broker_url", default=os.environ.get("HELORA_BROKER_URL", topology.DEFAULT_URL),
                   metavar="URL", help="RabbitMQ URL (env HELORA_BROKER_URL; default: the local broker)")
    p.add_argument("--namespace", default=topology.DEFAULT_NAMESPACE, help="prefix of every exchange and queue")
    p.add_argument("--model", default=TINY, metavar="MODEL",
                   help="'tiny' (a tiny random Llama, default), 'smollm2' (the bundled SmolLM2-135M) or a path")
    p.add_argument("--seed", type=int, default=0, help="the tiny model's seed")
    p.add_argument("--evaluators", type=int, default=2, help="evaluators; each holds 1/N of every layer")
    p.add_argument("--shard-dir", default=None, metavar="DIR", help="where the encoder writes the shards "
                   "(default: a temporary directory)")
    p.add_argument("--backend", default="auto", choices=("auto", "numpy", "cupy"), help="the evaluators' backend")
    p.add_argument("--max-message-bytes", type=int, default=wire.MAX_MESSAGE_BYTES)
    p.add_argument("--metrics-port", type=int, default=9400,
                   help="encoder's /metrics port; evaluators and aggregator take the next ones (0: any free port)")
    p.add_argument("--ready-timeout-s", type=float, default=900.0)


def _train_hint(f: LocalFleet) -> str:
    model = "" if f.model == SMOLLM2 else f" --model {f.model}"
    if f.model == TINY and f.seed:
        model += f" --seed {f.seed}"
    shape = "--batch-size 2 --seq-len 64" if f.model == TINY else "--batch-size 8 --seq-len 256"
    url = f.broker_url if f.broker_url == topology.DEFAULT_URL else broker_config.safe_url(f.broker_url)  # no password shown
    return (f"helora train --broker '{url}' --namespace {f.namespace}{model} "
            f"--steps 2 {shape} --out runs/up")


def cmd_up(args: argparse.Namespace) -> int:
    """Start the fleet, print how to use it, wait for Ctrl-C or a dead service, stop everything."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fleet = LocalFleet(args.broker_url, args.namespace, args.model, args.seed, args.evaluators,
                           Path(args.shard_dir) if args.shard_dir else None, None, args.max_message_bytes,
                           backend=args.backend, metrics_port=args.metrics_port)
    except HeloraError as exc:
        print(f"helora up: error: {exc}", file=sys.stderr)
        return 2
    fleet.cancel = stop  # Ctrl-C during start-up (SmolLM2 takes a minute) stops too
    print(f"helora up: starting the encoder ({args.model}); shards in {fleet.shard_dir}, logs in {fleet.log_dir}",
          flush=True)
    code = 0
    try:
        fleet.start(args.ready_timeout_s)
        for name, p in fleet.procs.items():
            print(f"helora up: {name} pid {p.pid}", flush=True)
        print(f"helora up: ready: {len(fleet.procs)} services in namespace {fleet.namespace!r}. In another shell:\n"
              f"  {_train_hint(fleet)}\nCtrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            fleet.check_alive()
    except HeloraError as exc:
        if not stop.is_set():
            print(f"helora up: error: {exc}", file=sys.stderr)
            code = 1
    finally:
        codes = fleet.stop()
        print(f"helora up: stopped ({', '.join(f'{n} {c}' for n, c in codes.items())})", flush=True)
    return code

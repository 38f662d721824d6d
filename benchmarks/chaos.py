"""Chaos (issue 21): a training run over RabbitMQ that faults hit at random moments, against an
undisturbed run of the same seed.

    benchmarks/chaos.py [--quick] [--minutes M] [--seed S] [--json PATH]

What runs:
- a RabbitMQ node of its own (``rabbitmq-server`` under another node name, port and data
  directory, stopped and removed at the end): the broker it restarts is never one it did not start;
- a fleet on it: the encoder; block 0 cut in two shards (evaluators ``e0``, ``e1``, whose partials
  the aggregator combines); block 1 whole on evaluator ``e2``; the aggregator;
- ``helora train`` (the tiny model, encrypted, a checkpoint every step) as a subprocess;
- a fault injector driven by ``--seed``: every few seconds one of
  ``kill`` (SIGKILL a service, start it again), ``term`` (SIGTERM, graceful, start it again),
  ``pause`` (SIGSTOP a service past the client's timeout, then SIGCONT), ``close_connections``
  (the broker closes every connection), ``broker_restart`` (``rabbitmqctl stop_app`` and
  ``start_app``: every connection drops, non-durable queues and transient messages go) and
  ``kill_orchestrator`` (SIGKILL ``helora train``, start it again with ``--resume``), in a shuffled
  cycle so that every kind comes back;
- the same training embedded (no broker, no fault): the undisturbed run.

What it reports (printed and with ``--json``, these keys at the top level):
``faults_injected`` (by kind), ``steps_completed``, ``equals_undisturbed`` (the final LoRA weights
equal the undisturbed run's bit for bit), ``messages_lost`` (requests the client gave up on: a
``helora train`` that failed on its own, which the script then resumes), ``duplicates_counted_twice``
(a partial or reply part summed twice would change a product and so the weights: 0 where
``equals_undisturbed``, else unknown), ``max_step_stall_s`` (the longest time without a new
checkpoint, faults included), ``dead_letters`` (every message of the dead-letter queue with its
reason: none for valid traffic), and ``requests_sent_again`` (requests the client sent again under a
fresh id after a silence or a reconnection, from its log). Every wait is bounded; the script stops
by itself: faults for ``--minutes`` (or until the training ends), then the training's undisturbed
end within as long again (at least ten minutes). ``--quick`` (``make chaos``, in CI): 200 steps,
faults every 3–6 s, a few minutes; otherwise 2,000 steps, faults every 5–20 s. Exit status 1 unless
the run finished equal to the undisturbed one with nothing lost and nothing dead-lettered.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from common import machine, write_json  # noqa: E402
from hecommon.broker import topology  # noqa: E402
from hecommon.broker.topology import MESSAGE_HEADER, QUEUE_HEADER, REASON_HEADER  # noqa: E402
from hecommon.errors import HeloraError  # noqa: E402
from helora_orchestrator.operator.up import LocalFleet, stop_processes  # noqa: E402

KINDS = ("kill", "term", "pause", "close_connections", "broker_restart", "kill_orchestrator")
SERVICES = ("encoder", "e0", "e1", "e2", "aggregator")
#: (name, --blocks, --shard): block 0 in two shards, block 1 whole
EVALUATORS = (("e0", "0", "0/2"), ("e1", "0", "1/2"), ("e2", "1", "0/1"))
CLIENT_TIMEOUT_S = 6.0  # the client's --broker-timeout-s; a pause lasts past it
TRAIN_ARGS = ("--model", "tiny", "--mode", "encrypted", "--seed", "0", "--seq-len", "32", "--batch-size", "2",
              "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--warmup", "2", "--checkpoint-every", "1",
              "--no-progress", "--eval-every", "0", "--in-flight", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)


class OwnBroker:
    """A RabbitMQ node of this script's own: its node name, AMQP and distribution ports, data and
    log directories; stopped and deleted by ``shutdown``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, dist = _free_port(), _free_port()
        self.node = f"helora-chaos-{os.getpid()}@localhost"
        root.mkdir(parents=True, exist_ok=True)
        (root / "enabled_plugins").write_text("[].\n")  # nothing on the shared node's plugin ports
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(dist), "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(root / "log"), "RABBITMQ_PID_FILE": str(root / "pid"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf")}
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        out = _run(["rabbitmqctl", "-q", "-n", self.node, *args], timeout_s)
        if out.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def start(self, timeout_s: float = 90.0) -> None:
        if shutil.which("rabbitmq-server") is None:
            raise SystemExit("chaos: rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        if os.geteuid() == 0:  # the Debian wrapper runs the node as the rabbitmq user
            _run(["chown", "-R", "rabbitmq:rabbitmq", str(self.root)], 30)
        out = _run(["rabbitmq-server", "-detached"], 60, self.env)
        if out.returncode:
            raise RuntimeError(f"rabbitmq-server: {out.stderr.strip() or out.stdout.strip()}")
        self.ctl("wait", str(self.root / "pid"), "--timeout", str(int(timeout_s)), timeout_s=timeout_s + 10)

    def restart_app(self) -> None:
        self.ctl("stop_app")
        time.sleep(1.0)
        self.ctl("start_app")

    def close_connections(self) -> None:
        self.ctl("close_all_connections", "helora chaos: connections closed by the broker")

    def shutdown(self) -> None:
        try:
            self.ctl("stop", timeout_s=60)
        except Exception as exc:  # noqa: BLE001 - report and go on removing what is left
            print(f"chaos: stopping the broker node: {exc}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


class ChaosFleet(LocalFleet):
    """``LocalFleet`` with block 0 in two shards and block 1 whole; restarts a service by name."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.argv: dict[str, tuple[str, tuple[str, ...]]] = {}

    def start_service(self, name: str, module: str, *args: str, port_offset: int = 0):
        self.argv[name] = (module, args)
        return super().start_service(name, module, *args, port_offset=0)

    def start(self, timeout_s: float = 300.0) -> ChaosFleet:
        self.start_service("encoder", "helora_encoder.worker", "--model", "tiny", "--seed", "0", "--shards", "0:2",
                           "--shard-dir", str(self.shard_dir))
        for name, blocks, shard in EVALUATORS:
            self.start_service(name, "helora_evaluator.worker", "--blocks", blocks, "--shard", shard,
                               "--shard-dir", str(self.shard_dir), "--backend", "numpy", "--wait-shards-s", "120")
        self.start_service("aggregator", "helora_aggregator.worker", "--prefetch", "1024", "--part-timeout-s", "30")
        self.wait_ready(timeout_s)
        return self

    def restart(self, name: str) -> None:
        module, args = self.argv[name]
        self.start_service(name, module, *args)

    def queues(self) -> dict[str, str]:
        t = topology.Topology(self.namespace)
        out = {t.manifest: "encoder", t.partials: "aggregator"}
        for name, blocks, shard in EVALUATORS:
            i, n = (int(x) for x in shard.split("/"))
            out[t.evaluator_queue(blocks, i, n)] = name
        return out

    def delete_topology(self) -> None:  # the whole node goes at the end
        pass


class Trainer:
    """``helora train`` over the broker as a child process, started again with ``--resume``."""

    def __init__(self, url: str, namespace: str, out: Path, steps: int, log: Path) -> None:
        self.argv = [sys.executable, "-m", "helora_orchestrator.cli", "train", *TRAIN_ARGS, "--steps", str(steps),
                     "--broker", url, "--namespace", namespace, "--broker-timeout-s", str(CLIENT_TIMEOUT_S),
                     "--out", str(out), "--metrics-linger-s", "0"]
        self.out, self.log, self.proc, self.starts = out, log, None, 0

    def start(self) -> None:
        resume = ["--resume"] if (self.out / "checkpoint").exists() else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts} {' '.join(resume)}\n".encode())
            self.proc = subprocess.Popen([*self.argv, *resume], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1

    def step(self) -> int:
        """The latest checkpoint's step (0 before the first)."""
        link = self.out / "checkpoint"
        try:
            return int(json.loads((link.resolve() / "trainer_state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return 0


def undisturbed(out: Path, steps: int, log: Path) -> None:
    """The same training in-process (no broker): the reference the chaotic run must equal."""
    argv = [sys.executable, "-m", "helora_orchestrator.cli", "train", *TRAIN_ARGS, "--steps", str(steps),
            "--out", str(out)]
    with open(log, "wb") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=1800,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code:
        raise SystemExit(f"chaos: the undisturbed run failed ({code}); see {log}")


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and bool(x) and all(bool((x[k] == y[k]).all()) and x[k].dtype == y[k].dtype
                                                    for k in x)


def dead_letters(url: str, namespace: str) -> list[dict[str, str]]:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, _ = ch.basic_get(topology.Topology(namespace).dead, auto_ack=True)
            if method is None:
                return out
            h = props.headers or {}
            out.append({k: str(h.get(v, "")) for k, v in (("reason", REASON_HEADER), ("message", MESSAGE_HEADER),
                                                           ("queue", QUEUE_HEADER))})
    finally:
        conn.close()


class Injector:
    def __init__(self, rng: random.Random, fleet: ChaosFleet, broker: OwnBroker, trainer: Trainer) -> None:
        self.rng, self.fleet, self.broker, self.trainer = rng, fleet, broker, trainer
        self.counts = dict.fromkeys(KINDS, 0)
        self.cycle: list[str] = []
        self.events: list[str] = []

    def next_kind(self) -> str:
        if not self.cycle:
            self.cycle = list(KINDS)
            self.rng.shuffle(self.cycle)
        return self.cycle.pop()

    def inject(self, kind: str) -> None:
        f = self.fleet
        name = self.rng.choice(SERVICES)
        if kind == "kill":
            f.procs[name].kill()
            f.procs[name].wait(30)
            f.restart(name)
        elif kind == "term":
            f.procs[name].terminate()
            code = f.procs[name].wait(60)
            if code != 0:
                self.events.append(f"{name} exited {code} on SIGTERM")
            f.restart(name)
        elif kind == "pause":
            f.procs[name].send_signal(signal.SIGSTOP)
            time.sleep(CLIENT_TIMEOUT_S + 1.0)
            f.procs[name].send_signal(signal.SIGCONT)
        elif kind == "close_connections":
            name = "every connection"
            self.broker.close_connections()
        elif kind == "broker_restart":
            name = "the broker"
            self.broker.restart_app()
        else:
            name = "helora train"
            p = self.trainer.proc
            if p is None or p.poll() is not None:
                return  # not running (done, or being restarted): no fault
            p.kill()
            p.wait(30)
            self.trainer.start()
        self.counts[kind] += 1
        self.events.append(f"{time.strftime('%H:%M:%S')} {kind} {name}")
        if kind in ("kill", "term", "broker_restart"):
            self.settle()

    def restart_dead(self) -> None:
        """Start again every service that exited on its own (a finding: noted in ``events``)."""
        for name, p in self.fleet.procs.items():
            if p.poll() is not None:
                self.events.append(f"{time.strftime('%H:%M:%S')} {name} exited {p.returncode} on its own")
                self.fleet.restart(name)

    def settle(self, timeout_s: float = 180.0) -> None:
        """Every queue consumed again, restarting services that died meanwhile (bounded)."""
        end = time.monotonic() + timeout_s
        while True:
            self.restart_dead()
            try:
                self.fleet.wait_ready(max(1.0, end - time.monotonic()))
                return
            except HeloraError:
                if time.monotonic() > end:
                    raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps, faults every 3-6 s (make chaos; CI)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="minutes during which faults are injected (default: 8 quick, 30 otherwise); the run then "
                         "trains to its end undisturbed, within as long again (at least 10 minutes)")
    ap.add_argument("--seed", type=int, default=0, help="the fault injector's seed")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 200 quick, 2000 otherwise)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (8.0 if args.quick else 30.0)
    steps = args.steps if args.steps is not None else (200 if args.quick else 2000)
    if not (0 < minutes <= 600 and 1 <= steps <= 100000):
        raise SystemExit("chaos: --minutes must be in (0, 600] and --steps in 1..100000")
    gap = (3.0, 6.0) if args.quick else (5.0, 20.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a CI timeout: the finally below still cleans up
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="helora-chaos-"))
    root.chmod(0o755)  # the broker node runs as the rabbitmq user and keeps its data in here
    t0 = time.monotonic()
    print(f"chaos: seed {args.seed}, {steps} steps, faults for at most {minutes:g} min; work in {root}", flush=True)
    undisturbed(root / "reference", steps, root / "reference.log")
    print(f"chaos: undisturbed run done in {time.monotonic() - t0:.0f} s", flush=True)
    broker = OwnBroker(root / "rabbitmq")
    fleet = trainer = None
    result: dict = {}
    try:
        broker.start()
        fleet = ChaosFleet(broker_url=broker.url, namespace="helora-chaos", shard_dir=root / "shards",
                           log_dir=root / "logs", max_message_bytes=256 * 1024, threads=1)
        fleet.start()
        trainer = Trainer(broker.url, fleet.namespace, root / "run", steps, root / "logs" / "train.log")
        injector = Injector(rng, fleet, broker, trainer)
        trainer.start()
        faults_until = time.monotonic() + minutes * 60
        end = faults_until + max(10.0, minutes) * 60
        last_step, last_change, stall, failures = 0, time.monotonic(), 0.0, []
        next_fault = time.monotonic() + rng.uniform(*gap)
        while time.monotonic() < end:
            code = trainer.proc.poll()
            if code == 0:
                break
            if code is not None:  # it failed on its own: a request it gave up on; resume it
                failures.append(code)
                if len(failures) > 20:
                    raise SystemExit(f"chaos: helora train failed {len(failures)} times\n{fleet.logs()}")
                trainer.start()
            step = trainer.step()
            if step != last_step:
                last_step, last_change = step, time.monotonic()
            stall = max(stall, time.monotonic() - last_change)
            injector.restart_dead()
            if time.monotonic() >= next_fault and time.monotonic() < faults_until:
                kind = injector.next_kind()
                print(f"chaos: {time.monotonic() - t0:6.1f} s step {step}: {kind}", flush=True)
                injector.inject(kind)
                next_fault = time.monotonic() + rng.uniform(*gap)
            time.sleep(0.2)
        finished = trainer.proc.poll() == 0
        if not finished:
            trainer.proc.kill()
        text = (root / "logs" / "train.log").read_text(errors="replace")
        equal = finished and same_weights(root / "run", root / "reference")
        result = {
            "faults_injected": injector.counts,
            "steps_completed": trainer.step(),
            "steps": steps,
            "finished": finished,
            "equals_undisturbed": equal,
            "messages_lost": len(failures),
            "duplicates_counted_twice": 0 if equal else None,
            "max_step_stall_s": round(stall, 1),
            "dead_letters": dead_letters(broker.url, fleet.namespace),
            "requests_sent_again": len(re.findall(r"sending it again under a fresh id|retrying in", text)),
            "orchestrator_starts": trainer.starts,
            "events": injector.events,
            "seed": args.seed, "fault_minutes": minutes, "wall_s": round(time.monotonic() - t0, 1),
            "quick": args.quick, "machine": machine(),
        }
    finally:
        if trainer is not None and trainer.proc is not None and trainer.proc.poll() is None:
            trainer.proc.kill()
        codes = stop_processes(fleet.procs, 30) if fleet is not None else {}
        broker.shutdown()
    print(json.dumps({k: v for k, v in result.items() if k not in ("events", "machine")}, indent=1))
    if codes and any(c not in (0, -9) for c in codes.values()):
        print(f"chaos: services' exit codes at the end: {codes}", file=sys.stderr)
    write_json(args.json, result)
    ok = (result.get("equals_undisturbed") and result.get("messages_lost") == 0 and not result.get("dead_letters"))
    if not ok:
        print(f"chaos: logs kept in {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

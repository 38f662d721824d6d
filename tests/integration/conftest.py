"""A real helora fleet on the real broker, as subprocesses, under a namespace unique to this
session: the encoder; block 0 cut in two shards (two evaluators, whose partials the aggregator
combines); block 1 whole on one evaluator queue consumed by two replicas (each answering the
client directly, with the parts of one request shared between them); the aggregator."""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helora_orchestrator.operator.up import stop_processes, tail_logs

URL = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: small on purpose: requests, partials and replies of the tiny model all travel in several parts
LIMIT = 256 * 1024
SHARDS = 2  # block 0's shards
#: (process name, --blocks, --shard): two shards of block 0, two replicas of block 1's one queue
EVALUATORS = (("evaluator0", "0", f"0/{SHARDS}"), ("evaluator1", "0", f"1/{SHARDS}"),
              ("evaluator2", "1", "0/1"), ("evaluator3", "1", "0/1"))
#: the line each service logs once its metrics endpoints listen (``hecommon.broker.metrics.serve``)
METRICS_LINE = re.compile(rb"metrics on http://[^:/\s]+:(\d+)/metrics")



@dataclass
class Fleet:
    namespace: str
    shard_dir: Path
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    url: str = URL
    limit: int = LIMIT

    @property
    def evaluator_queues(self) -> list[str]:
        from hecommon.broker.topology import Topology

        t = Topology(self.namespace)
        return [*(t.evaluator_queue("0", i, SHARDS) for i in range(SHARDS)), t.evaluator_queue("1", 0, 1)]

    def start(self, name: str, module: str, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", module, "--broker", URL, "--namespace", self.namespace,
                "--max-message-bytes", str(LIMIT), "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                *args]  # port 0: one host, many services
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def logs(self) -> str:
        return tail_logs(self.log_dir)

    def metrics_url(self, name: str) -> str:
        """``http://127.0.0.1:PORT`` of a service's metrics endpoints, from the port its log names."""
        found = METRICS_LINE.search((self.log_dir / f"{name}.log").read_bytes())
        if found is None:
            raise AssertionError(f"{name} logged no metrics port\n{self.logs()}")
        return f"http://127.0.0.1:{int(found.group(1))}"

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"services exited: {dead}\n{self.logs()}")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every service consuming: the encoder answers, evaluators and aggregator have consumers."""
        import pika
        import pika.exceptions as pex
        from hecommon.broker.topology import Topology

        logging.getLogger("pika").setLevel(logging.ERROR)  # passive declares of absent queues are expected
        queues = [*self.evaluator_queues, Topology(self.namespace).partials, Topology(self.namespace).manifest]
        consumers = {q: sum(1 for _, blocks, shard in EVALUATORS
                            if Topology(self.namespace).evaluator_queue(blocks, *map(int, shard.split("/"))) == q)
                     for q in queues}  # two replicas on block 1's queue
        end = time.monotonic() + timeout_s
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        try:
            ch = conn.channel()
            while True:
                self.check_alive()
                try:
                    if all(ch.queue_declare(q, passive=True).method.consumer_count >= max(1, consumers[q])
                           for q in queues):
                        return
                except pex.ChannelClosedByBroker:  # not declared yet
                    ch = conn.channel()
                if time.monotonic() > end:
                    raise AssertionError(f"fleet not ready within {timeout_s} s\n{self.logs()}")
                time.sleep(0.3)
        finally:
            conn.close()

    def stop(self, timeout_s: float = 10.0) -> dict[str, int]:
        return stop_processes(self.procs, timeout_s)

    def delete_topology(self) -> None:
        import pika
        from hecommon.broker.topology import Topology

        conn = pika.BlockingConnection(pika.URLParameters(URL))
        try:
            Topology(self.namespace).delete(conn.channel(), self.evaluator_queues)
        finally:
            conn.close()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory, local_broker):
    root = tmp_path_factory.mktemp("fleet")
    f = Fleet(f"helora-test-{secrets.token_hex(4)}", root / "shards", root)
    try:
        f.start("encoder", "helora_encoder.worker", "--model", "tiny", "--seed", "0", "--shards", f"0:{SHARDS}",
                "--shard-dir", str(f.shard_dir))
        for name, blocks, shard in EVALUATORS:
            f.start(name, "helora_evaluator.worker", "--blocks", blocks, "--shard", shard,
                    "--shard-dir", str(f.shard_dir), "--backend", "numpy", "--wait-shards-s", "60")
        # every partial message stays unacked until its request is answered: at this tiny message
        # limit a sharded request is up to 150 of them, and --in-flight runs three at once
        f.start("aggregator", "helora_aggregator.worker", "--prefetch", "1024", "--part-timeout-s", "30")
        f.wait_ready()
        yield f
        f.check_alive()  # nothing crashed during the tests
    finally:
        codes = f.stop()
        f.delete_topology()
    assert all(c == 0 for c in codes.values()), f"unclean shutdown {codes}\n{f.logs()}"


"""SIGTERM and SIGINT end every service at once while it starts (issue 15, item 5).

A pod deleted during start-up must not wait out its grace period. Each service is started for real
(``python -m ...``) and signalled inside one of its start-up stages: the evaluator waiting for the
encoder's shards, the encoder quantizing its model, every service retrying an unreachable broker.
It must exit with status 0 (as after a graceful stop) within ``EXIT_S``, its last log line saying so.

No broker is needed: ``--broker`` points at a closed local port, so a service that gets that far
keeps retrying the connection. The last test needs the real broker: once a service consumes, a
signal still means "finish the current message, then close".

In a container the service is PID 1, and the kernel drops any signal that PID 1 has no handler
for; ``test_evaluator_as_pid1`` runs the evaluator as the init of a PID namespace of its own
(``unshare``) to check exactly that case.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

#: nothing listens on port 1: every connection is refused at once, and the service retries
CLOSED_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"
BROKER = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: a signalled service must be gone within this long
EXIT_S = 2.0
#: imports (torch) and the tiny model, on a busy 2-core machine
START_S = 60.0
#: how long after a stage's log line the signal is sent: the service is then inside that stage's wait
SETTLE_S = 0.3
#: ``hecommon.broker.metrics.serve`` logs this line once the endpoints listen, just before the service's
#: start-up work (``process.serve``: metrics, then build, then run)
METRICS_LINE = re.compile(r"metrics on http://[^:/\s]+:(\d+)/metrics")


@dataclass
class Service:
    proc: subprocess.Popen
    log: Path
    pid: int  # the process to signal: the service itself (not unshare, in the PID-1 case)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str | re.Pattern[str], timeout_s: float = START_S) -> re.Match[str]:
        end = time.monotonic() + timeout_s
        while True:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {pattern!r}\n{self.text()}"
            assert time.monotonic() < end, f"no {pattern!r} within {timeout_s} s\n{self.text()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Send ``sig``; the seconds until the process is gone (it must exit 0 within ``EXIT_S``)."""
        t0 = time.monotonic()
        os.kill(self.pid, sig)
        try:
            code = self.proc.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {EXIT_S} s after {signal.Signals(sig).name}\n{self.text()[-3000:]}")
        seconds = time.monotonic() - t0
        text = self.text()
        assert code == 0, f"exit status {code} after {signal.Signals(sig).name}\n{text[-3000:]}"
        # the orderly way out: ``process.serve`` or ``Service._shutdown`` logs it last (pika's own
        # tracebacks of refused connection attempts may come before)
        last = text.rstrip().splitlines()[-1]
        assert re.search(r"stopped", last) and "KeyboardInterrupt" not in text, text[-3000:]
        return seconds

    def kill(self) -> None:
        for pid in {self.pid, self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def _start(tmp_path: Path, module: str, *args: str, broker: str = CLOSED_BROKER, pid1: bool = False):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", module, "--broker", broker, "--metrics-port", "0", "--metrics-host", "127.0.0.1",
            *args]
    if pid1:  # the service as PID 1 of a fresh PID namespace, as in a container; SIGKILLed if unshare dies
        argv = ["unshare", "--user", "--map-root-user", "--pid", "--kill-child", *argv]
    log = tmp_path / f"{module}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Service(proc, log, _child(proc.pid) if pid1 else proc.pid)


def _child(pid: int, timeout_s: float = 10.0) -> int:
    """The only child of ``pid`` (unshare's forked service), by its pid in this namespace."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"unshare {pid} started no child within {timeout_s} s")


@pytest.fixture
def service(tmp_path):
    """``service(module, *args, **kw)`` starts a service; whatever is left running is killed at the end."""
    started: list[Service] = []

    def start(module: str, *args: str, **kw) -> Service:
        started.append(_start(tmp_path, module, *args, **kw))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.kill()


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--kill-child", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


#: the evaluator's one log line when it starts polling for the encoder's files
SHARD_WAIT_LINE = r"waiting for .* from the encoder"


def _evaluator(start, shard_dir: Path, **kw) -> Service:
    """An evaluator pointed at an empty shard directory: it waits for the encoder's files."""
    shard_dir.mkdir(exist_ok=True)
    return start("helora_evaluator.worker", "--shard-dir", str(shard_dir), "--blocks", "0", "--backend", "numpy",
                 "--wait-shards-s", "600", **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_evaluator_waiting_for_shards(service, tmp_path, sig):
    ev = _evaluator(service, tmp_path / "shards")
    ev.wait_log(SHARD_WAIT_LINE)  # past the imports, polling for the manifest
    time.sleep(SETTLE_S)  # in the shard wait: the directory stays empty
    ev.stop(sig)


@pytest.mark.skipif(not _unshare_works(), reason="unshare cannot make a user and PID namespace here")
def test_evaluator_as_pid1(service, tmp_path):
    """The container case: PID 1 without a handler would never see the SIGTERM."""
    ev = _evaluator(service, tmp_path / "shards", pid1=True)
    ev.wait_log(SHARD_WAIT_LINE)
    time.sleep(SETTLE_S)
    ev.stop(signal.SIGTERM)


def test_evaluator_waiting_for_broker(service, tmp_path):
    """The shards are there: the evaluator loads them and then retries the closed broker port."""
    shards = tmp_path / "shards"
    enc = service("helora_encoder.worker", "--model", "tiny", "--seed", "0", "--shard-dir", str(shards))
    enc.wait_log(r"layers quantized, shards and manifest in")
    enc.kill()
    ev = _evaluator(service, shards)
    ev.wait_log(r"holding \d+ layer shard")
    time.sleep(SETTLE_S)
    ev.stop()


@pytest.mark.parametrize("stage", [METRICS_LINE, r"loading and quantizing the model"], ids=["importing", "quantizing"])
def test_encoder_while_preparing(service, tmp_path, stage):
    """Importing torch (about 1 s) and quantizing the model (about 2 s for the tiny one here) are CPU
    work, not waits; torch runs Python code from C++ there, where a raised exception would abort."""
    enc = service("helora_encoder.worker", "--model", "tiny", "--seed", "0", "--shard-dir", str(tmp_path / "shards"))
    enc.wait_log(stage)
    time.sleep(SETTLE_S)
    enc.stop()
    assert not re.search(r"layers quantized", enc.text()), "the signal came too late to test this stage"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_encoder_waiting_for_broker(service, tmp_path, sig):
    enc = service("helora_encoder.worker", "--model", "tiny", "--seed", "0", "--shard-dir", str(tmp_path / "shards"))
    enc.wait_log(r"layers quantized, shards and manifest in")
    time.sleep(SETTLE_S)
    enc.stop(sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_aggregator_waiting_for_broker(service, sig):
    agg = service("helora_aggregator.worker")
    agg.wait_log(METRICS_LINE)
    time.sleep(SETTLE_S)
    agg.stop(sig)


def test_aggregator_waiting_for_broker_later(service):
    """Well into the broker wait (past connect()'s first retries), not just at its start."""
    agg = service("helora_aggregator.worker")
    agg.wait_log(METRICS_LINE)
    time.sleep(2.5)
    agg.stop()


def test_federated_aggregator_waiting_for_broker(service, tmp_path):
    from helora_orchestrator.federated.selective import CkksKeys

    pub = tmp_path / "fed.key.pub"
    pub.write_bytes(CkksKeys.generate().public_bytes())
    fed = service("helora_aggregator.fedworker", "--context", str(pub), "--owners", "2")
    fed.wait_log(METRICS_LINE)
    time.sleep(SETTLE_S)
    fed.stop()


def test_stop_from_another_thread_ends_the_broker_wait():
    """``Service.stop()`` without a signal (a service run on a thread): the connection retries wait
    on the stop event, so ``run()`` returns at once instead of after connect()'s 60 s deadline."""
    import threading

    from helora_aggregator.config import AggregatorConfig
    from helora_aggregator.worker import AggregatorWorker

    worker = AggregatorWorker(AggregatorConfig(broker_url=CLOSED_BROKER))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    time.sleep(1.0)  # past the first refused attempts: in a retry wait
    t0 = time.monotonic()
    worker.stop()
    thread.join(EXIT_S)
    assert not thread.is_alive(), f"run() still waiting for the broker {EXIT_S} s after stop()"
    assert time.monotonic() - t0 < EXIT_S



@pytest.mark.integration
def test_signal_after_start_up_still_finishes_then_closes(service, local_broker):
    """Once consuming, the service's own handler takes over: it stops consuming, closes, exits 0."""
    import pika
    from hecommon.broker.topology import Topology

    ns = f"helora-sigterm-{secrets.token_hex(4)}"
    agg = service("helora_aggregator.worker", "--namespace", ns, broker=BROKER)
    port = int(agg.wait_log(METRICS_LINE).group(1))
    try:
        end = time.monotonic() + START_S
        while True:  # /readyz says 200 once it consumes
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert agg.proc.poll() is None and time.monotonic() < end, agg.text()
            time.sleep(0.1)
        agg.stop()
        assert "aggregator stopped" in agg.text(), agg.text()
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(BROKER))
        try:
            Topology(ns).delete(conn.channel())
        finally:
            conn.close()

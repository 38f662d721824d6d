"""``helora up`` (issue 4): the whole pipeline on this machine, one training step through it, Ctrl-C."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helora_orchestrator.operator.up import LocalFleet

pytestmark = pytest.mark.integration
URL = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_helora_up_serves_a_training_step_and_stops_everything_on_ctrl_c(tmp_path, local_broker):
    helora = str(Path(sys.executable).with_name("helora"))
    ns = f"helora-up-{secrets.token_hex(4)}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "HELORA_BROKER_URL": URL}
    up = subprocess.Popen([helora, "up", "--namespace", ns, "--evaluators", "2", "--shard-dir", str(tmp_path / "s"),
                           "--metrics-port", "0", "--backend", "numpy"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 180
        while not any("ready:" in line for line in lines):
            assert up.poll() is None, "".join(lines)
            assert time.monotonic() < end, "helora up: not ready in 180 s\n" + "".join(lines)
            time.sleep(0.2)
        pids = {m.group(1): int(m.group(2)) for line in lines if (m := re.match(r"helora up: (\w+) pid (\d+)", line))}
        assert set(pids) == {"encoder", "evaluator0", "evaluator1", "aggregator"}, lines
        hint = next(line for line in lines if "helora train --broker" in line)
        assert f"--namespace {ns}" in hint and "--model tiny" in hint
        # the printed command works (with a smaller run and its own output directory)
        train = subprocess.run([helora, "train", "--broker", URL, "--namespace", ns, "--model", "tiny", "--steps", "1",
                                "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--eval-batches", "1",
                                "--out", str(tmp_path / "run"), "--no-progress"],
                               capture_output=True, text=True, env=env, timeout=300)
        assert train.returncode == 0, train.stdout + train.stderr
        assert "steps 1" in train.stdout and (tmp_path / "run" / "adapter").is_dir()
        assert all(_alive(pid) for pid in pids.values())
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(60) == 0, "".join(lines)
        reader.join(10)
        assert any(re.search(r"stopped \(encoder 0, evaluator0 0, evaluator1 0, aggregator 0\)", line)
                   for line in lines), "".join(lines)
        assert not [name for name, pid in pids.items() if _alive(pid)]  # every child is gone
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        fleet = LocalFleet(URL, ns, evaluators=2, shard_dir=tmp_path / "s")
        fleet.blocks = (0, 1)  # the tiny model's blocks: its evaluator queues
        fleet.delete_topology()

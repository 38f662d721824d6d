"""The service images, built by ``make images``, run as a fleet against the local broker (issue 19).

One encoder, two evaluators (each half of every layer, so the aggregator sums their partials) and
the aggregator run in containers with the host's network; the host trains one encrypted step of the
tiny model through them with ``helora train --broker`` and the adapter equals the embedded run's bit
for bit. Then: every container reports healthy, runs as the Dockerfile's non-root user, counted
requests in /metrics and stops within its grace period (exit 0 or 143, never 137, SIGKILL); an
evaluator still waiting for shards stops within 2 s; no image holds the host's pip settings; a
build with a bad pin fails with pip's message."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import images  # tools/, on sys.path through tests/images/conftest.py
import pytest
from listen_ports import free_listen_port

pytestmark = [pytest.mark.images, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
URL = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
UID = "10001"  # docker/Dockerfile's USER
GRACE_S = 10
EVALUATORS = 2
BLOCKS = "0-1"  # the tiny model's two blocks
SHARDS_IN = "/var/lib/helora/shards"  # HELORA_SHARD_DIR in the images
TRAIN = ["--model", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--warmup", "1",
         "--eval-batches", "1", "--no-progress"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class ContainerFleet:
    """The fleet's containers by name, each with its metrics port on the host's network."""

    def __init__(self, podman, namespace: str, shard_dir: Path):
        self.podman, self.namespace, self.shard_dir = podman, namespace, shard_dir
        self.ports: dict[str, int] = {}

    def run(self, name: str, target: str, *args: str, shard_dir: Path | None = None) -> None:
        self.ports[name] = port = free_listen_port()  # outside the ephemeral range
        self.podman("run", "--detach", "--name", f"{self.namespace}-{name}", "--network", "host",
                    "--env", f"HELORA_BROKER_URL={URL}", "--env", f"HELORA_NAMESPACE={self.namespace}",
                    "--env", f"HELORA_METRICS_PORT={port}", "--env", "HELORA_METRICS_HOST=127.0.0.1",
                    "--volume", f"{shard_dir or self.shard_dir}:{SHARDS_IN}", images.image_name(target), *args,
                    capture=True)

    def container(self, name: str) -> str:
        return f"{self.namespace}-{name}"

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + self.podman("logs", self.container(n), check=False, capture=True).stdout[-3000:]
                         for n in self.ports)

    def state(self, name: str, field: str) -> str:
        return self.podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.container(name),
                           capture=True).stdout.strip()

    def wait_ready(self, names: list[str], timeout_s: float = 180.0) -> None:
        end = time.monotonic() + timeout_s
        for name in names:
            while _get(f"http://127.0.0.1:{self.ports[name]}/readyz")[0] != 200:
                if self.state(name, "Running") != "true" or time.monotonic() > end:
                    raise AssertionError(f"{name} not ready (running: {self.state(name, 'Running')})\n{self.logs()}")
                time.sleep(0.5)

    def stop(self, name: str) -> tuple[float, int]:
        """``podman stop`` with the grace period: seconds it took and the exit code."""
        t0 = time.monotonic()
        self.podman("stop", "--time", str(GRACE_S), self.container(name), capture=True)
        return time.monotonic() - t0, int(self.state(name, "ExitCode"))

    def remove(self) -> None:
        for name in self.ports:
            self.podman("rm", "--force", "--time", "0", self.container(name), check=False, capture=True)


@pytest.fixture(scope="module")
def fleet(podman, tmp_path_factory, local_broker):
    import pika
    from hecommon.broker.topology import Topology

    shard_dir = tmp_path_factory.mktemp("shards")
    os.chown(shard_dir, int(UID), int(UID))  # the services write and read it as the image's user
    f = ContainerFleet(podman, f"{images.SMOKE_PREFIX}{secrets.token_hex(4)}", shard_dir)
    try:
        f.run("encoder", "encoder", "--model", "tiny", "--seed", "0", "--shards", f"0-1023:{EVALUATORS}")
        f.wait_ready(["encoder"])
        for i in range(EVALUATORS):
            f.run(f"evaluator{i}", "evaluator-cpu", "--blocks", BLOCKS, "--shard", f"{i}/{EVALUATORS}",
                  "--wait-shards-s", "120")
        f.run("aggregator", "aggregator", "--part-timeout-s", "30")
        f.wait_ready(list(f.ports))
        yield f
    finally:
        f.remove()
        try:
            conn = pika.BlockingConnection(pika.URLParameters(URL))
            try:
                t = Topology(f.namespace)
                t.delete(conn.channel(), [t.evaluator_queue(BLOCKS, i, EVALUATORS) for i in range(EVALUATORS)])
            finally:
                conn.close()
        except pika.exceptions.AMQPError as exc:  # the test's own error, if any, stays the one reported
            print(f"teardown: the queues of {f.namespace} were not deleted ({exc!r}); make images-clean does it")


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((out / "adapter").glob("*.safetensors"))
    assert files, f"no adapter in {out}"
    return load_file(files[0])


def test_a_training_step_through_the_containers_equals_the_embedded_run(fleet, tmp_path):
    import torch

    helora = str(Path(sys.executable).with_name("helora"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    broker = subprocess.run([helora, "train", "--broker", URL, "--namespace", fleet.namespace, *TRAIN,
                             "--out", str(tmp_path / "broker")], capture_output=True, text=True, env=env, timeout=600)
    assert broker.returncode == 0, broker.stdout + broker.stderr + fleet.logs()
    embedded = subprocess.run([helora, "train", "--mode", "encrypted", *TRAIN, "--out", str(tmp_path / "embedded")],
                              capture_output=True, text=True, env=env, timeout=600)
    assert embedded.returncode == 0, embedded.stdout + embedded.stderr
    got, want = _adapter(tmp_path / "broker"), _adapter(tmp_path / "embedded")
    assert got.keys() == want.keys() and got
    assert all(torch.equal(got[k], want[k]) for k in want), "containerized fleet != embedded run"
    # every service counted what it served (the encoder serves manifests, empty requests, and counts
    # no request: docs/metrics.md; the deliveries it handled and the bytes it sent show them)
    for name, port in fleet.ports.items():
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, f"{name}: /metrics answered {status}"
        counted = {"handled": _total(text, "helora_stage_seconds_count", stage="total"),
                   "bytes_out": _total(text, "helora_bytes_total", direction="out"),
                   "requests": _total(text, "helora_requests_total")}
        wanted = ("handled", "bytes_out") if name == "encoder" else ("handled", "bytes_out", "requests")
        assert all(counted[k] > 0 for k in wanted), f"{name}: /metrics counted {counted}"


def _total(text: str, metric: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``, from a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == metric and labels.items() <= s.labels.items())


def test_every_container_is_healthy_and_runs_as_the_images_user(fleet):
    for name in fleet.ports:
        c = fleet.container(name)
        check = fleet.podman("healthcheck", "run", c, check=False, capture=True)
        assert check.returncode == 0, f"{name}: unhealthy: {check.stdout}\n{fleet.logs()}"
        assert fleet.state(name, "Health.Status") == "healthy"
        assert fleet.podman("exec", c, "id", "-u", capture=True).stdout.strip() == UID
        assert fleet.podman("inspect", "--format", "{{.Config.User}}", c, capture=True).stdout.strip() == f"{UID}:{UID}"


def test_every_container_stops_within_its_grace_period(fleet):
    stopped = {name: fleet.stop(name) for name in ("aggregator", *(f"evaluator{i}" for i in range(EVALUATORS)),
                                                   "encoder")}
    print("podman stop (s, exit code):", {n: (round(s, 2), c) for n, (s, c) in stopped.items()})
    for name, (seconds, code) in stopped.items():
        assert code in (0, 143) and seconds < GRACE_S, f"{name}: exit {code} after {seconds:.1f} s\n{fleet.logs()}"


def test_an_evaluator_waiting_for_shards_stops_within_two_seconds(podman, tmp_path):
    empty = tmp_path / "no-shards"
    empty.mkdir()
    os.chown(empty, int(UID), int(UID))
    f = ContainerFleet(podman, f"{images.SMOKE_PREFIX}{secrets.token_hex(4)}", empty)
    try:
        f.run("waiting", "evaluator-cpu", "--blocks", "0", "--wait-shards-s", "600")
        end = time.monotonic() + 120
        while "from the encoder" not in podman("logs", f.container("waiting"), capture=True).stdout:
            assert f.state("waiting", "Running") == "true" and time.monotonic() < end, f.logs()
            time.sleep(0.3)
        seconds, code = f.stop("waiting")
        print(f"evaluator in the shard wait: stopped in {seconds:.2f} s, exit {code}")
        assert code in (0, 143) and seconds < 2.0, f"exit {code} after {seconds:.1f} s\n{f.logs()}"
    finally:
        f.remove()


def test_no_image_holds_the_hosts_pip_settings(podman):
    for target in images.CPU_TARGETS:
        images.check_no_host_settings(podman, images.image_name(target))  # raises ImageError naming what it found


def test_a_bad_pin_fails_the_build_with_pips_message(podman, tmp_path):
    context = tmp_path / "context"
    for part in ("docker", "libs/hecommon", "services/aggregator"):
        shutil.copytree(ROOT / part, context / part, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    base = context / "docker" / "requirements" / "base.txt"
    base.write_text(base.read_text().replace("pika==1.4.4", "pika==0.0.404"))
    with pytest.raises(images.ImageError) as failed:
        images.build(podman, "aggregator", tag="bad-pin", context=context, capture=True)
    message = str(failed.value)
    print("\n".join(line for line in message.splitlines() if "pika" in line))  # in the CI log (-rP)
    assert "No matching distribution found for pika==0.0.404" in message
    assert not podman.exists(images.image_name("aggregator", "bad-pin"))

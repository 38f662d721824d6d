"""``helora train --metrics-port``: the orchestrator's metrics from a real training loop, over HTTP."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from hecommon.model import config_fingerprint, tiny_llama
from helora_orchestrator.checkpoint import CheckpointMeta, checkpoint_dir
from helora_orchestrator.cli import main
from helora_orchestrator.client_model import build_client
from helora_orchestrator.lora import LoraSettings
from helora_orchestrator.metrics import MeteredExchange, start_metrics
from helora_orchestrator.train import TrainConfig, Trainer
from listen_ports import free_listen_port
from prometheus_client.parser import text_string_to_metric_families

LORA = LoraSettings(r=4, alpha=8)


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}, text


def test_training_loop_exposes_step_loss_tokens_and_round_trips(tiny_splits, tmp_path, contract_violations):
    model, _ = tiny_llama(seed=0)
    cfg = TrainConfig(steps=2, warmup_steps=1, batch_size=2, seq_len=32, eval_batches=1, mode="encrypted",
                      output_dir=str(tmp_path), progress=False)
    client = build_client(model, "encrypted", LORA, seed=0)
    meta = CheckpointMeta(base_model_id="tiny", base_model_fingerprint=config_fingerprint(model), mode="encrypted",
                          bits=8, lora=LORA.to_dict(), param_set=client.backend.params.name)
    metrics, server = start_metrics(0, "127.0.0.1", client)
    try:
        assert isinstance(client.backend.transport, MeteredExchange)
        trainer = Trainer(cfg, client, *tiny_splits, meta, metrics)
        trainer.start(resume=False)
        summary = trainer.run()
        got, text = _scrape(server.port)
    finally:
        server.close()
    assert got[("helora_orchestrator_step", ())] == 2
    assert got[("helora_orchestrator_loss", ())] == pytest.approx(summary.final_train_loss)
    assert got[("helora_orchestrator_tokens_total", ())] == 2 * 2 * 32
    assert got[("helora_orchestrator_tokens_per_second", ())] > 0
    sent = got[("helora_orchestrator_bytes_total", (("direction", "out"),))]
    received = got[("helora_orchestrator_bytes_total", (("direction", "in"),))]
    assert sent > 0 and received > 0 and sent + received == client.wire_bytes  # every request metered
    round_trips = sum(v for (name, _), v in got.items() if name == "helora_orchestrator_request_seconds_count")
    assert round_trips == client.backend.requests > 0
    assert got[("helora_orchestrator_request_seconds_count", (("direction", "backward"), ("kind", "qkv")))] > 0
    assert contract_violations(text, set(), set()) == []


def test_cli_train_with_metrics_port_names_the_port(tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--mode", "quantized", "--seq-len", "32", "--batch-size", "2",
                 "--steps", "1", "--eval-batches", "1", "--out", str(tmp_path / "run"), "--no-progress",
                 "--metrics-port", "0", "--metrics-linger-s", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics", err), err


def test_cli_train_serves_the_last_steps_values_until_scraped(tmp_path):
    """The run ends right after its last step: the endpoint stays until a scrape has seen that step
    (a Prometheus scraping every few seconds would otherwise miss a short run entirely)."""
    port = free_listen_port()
    codes: list[int] = []
    train = threading.Thread(target=lambda: codes.append(main([
        "train", "--model", "tiny", "--mode", "quantized", "--seq-len", "32", "--batch-size", "2", "--steps", "2",
        "--eval-batches", "1", "--out", str(tmp_path / "run"), "--no-progress",
        "--metrics-port", str(port), "--metrics-linger-s", "120"])))
    train.start()
    deadline = time.monotonic() + 120
    # no scrape before the run's work is done: its last act, the final checkpoint, is written;
    # then a scraper comes (a Prometheus scraping every few seconds, later than the last step)
    while checkpoint_dir(tmp_path / "run") is None and train.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    step = None
    while train.is_alive() and time.monotonic() < deadline:  # scraping on, until the run ends
        try:
            got, _ = _scrape(port)
        except OSError:  # closed already
            time.sleep(0.05)
            continue
        step = got[("helora_orchestrator_step", ())]
        time.sleep(0.05)
    train.join(10)
    assert step == 2, f"the last step was never served (last scraped step: {step})"
    assert not train.is_alive() and codes == [0]


def test_bad_metrics_linger_exits_2(capsys):
    assert main(["train", "--model", "tiny", "--metrics-port", "0", "--metrics-linger-s", "-1"]) == 2
    assert "--metrics-linger-s" in capsys.readouterr().err


@pytest.mark.parametrize("port, message", [("-1", "metrics_port: -1 outside 0..65535"),
                                           ("70000", "metrics_port: 70000 outside 0..65535")])
def test_bad_metrics_port_exits_2(capsys, port, message):
    assert main(["train", "--model", "tiny", "--metrics-port", port]) == 2
    assert message in capsys.readouterr().err


class _Streaming:
    """The embedded server's exchange, taking each request in parts and handing each reply to
    ``on_part`` in several parts, as the broker client does (``BrokerTransport.stream``)."""

    limit = 20 * 1024  # requests of several parts

    def __init__(self, inner) -> None:
        self.inner = inner
        self.parts = self.request_parts = 0

    def __call__(self, request):
        return self.inner(request)

    def plan(self, entry, direction, params):
        from helora_orchestrator.encrypted import ByteTransport

        return ByteTransport.plan(self, entry, direction, params)  # whole requests, cut below the limit

    def stream(self, parts, on_part) -> int:
        from hecommon import wire

        parts = list(parts)
        self.request_parts = max(self.request_parts, len(parts))
        reply, moved = self.inner(wire.join(parts))
        parts = wire.split(reply, reply._row_bytes() * 5 + wire.HEADER_ALLOWANCE)  # five outputs per part
        for part in reversed(parts):  # in any order
            on_part(part)
        self.parts += len(parts)
        return moved


def test_round_trips_of_a_streaming_transport_are_metered_and_exact():
    """The metered transport keeps streaming (the backend decrypts part by part: the same outputs)
    and still records every round trip and its bytes."""
    import numpy as np

    model, _ = tiny_llama(seed=0)
    client = build_client(model, "encrypted", LORA, seed=0)
    backend = client.backend
    group = next(iter(backend.layers.values()))
    x = np.random.default_rng(0).standard_normal((6, group.d_in)).astype(np.float32)
    expected = backend.forward(group.name, x)
    streaming = backend.transport = _Streaming(backend.transport)
    metrics, server = start_metrics(0, "127.0.0.1", client)
    try:
        np.testing.assert_array_equal(backend.forward(group.name, x), expected)
        got, _ = _scrape(server.port)
    finally:
        server.close()
    assert streaming.parts > 1 and streaming.request_parts > 1
    assert sum(v for (name, _), v in got.items() if name == "helora_orchestrator_request_seconds_count") == 1
    assert got[("helora_orchestrator_bytes_total", (("direction", "out"),))] > 0

"""Metrics and health endpoints over real HTTP (docs/metrics.md; DESIGN §7.1: no label carries data)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from hecommon.broker import metrics as M
from hecommon.errors import ConfigError, MalformedMessage, OversizedMessage, TransientError
from prometheus_client.parser import text_string_to_metric_families


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


@pytest.fixture
def served():
    m = M.Metrics("evaluator", group="blocks-0-14")
    server = M.MetricsServer(m.registry, m.ready, "127.0.0.1", 0)
    yield m, f"http://127.0.0.1:{server.port}"
    server.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_port_zero_binds_a_free_port_and_endpoints_answer(served):
    m, url = served
    port = int(url.rsplit(":", 1)[1])
    assert 0 < port < 65536
    assert _get(url + "/healthz")[0] == 200
    status, ctype, text = _get(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and "version=" in ctype
    assert "helora_service_info" in text and "_created" not in text
    assert _get(url + "/nothing")[0] == 404


def test_readyz_follows_the_ready_flag(served):
    m, url = served
    assert _get(url + "/readyz")[0] == 503
    m.ready.set()
    assert _get(url + "/readyz")[0] == 200
    m.ready.clear()  # a lost broker connection
    assert _get(url + "/readyz")[0] == 503
    assert _get(url + "/healthz")[0] == 200  # alive all along


def test_recorded_values_appear_in_the_scrape(served, contract_violations):
    m, url = served
    m.set_info("n2048-q54", "numpy")
    m.request("3.qkv", "fwd")
    m.request("3.qkv", "fwd")
    m.request("12.down", "bwd")
    m.add_tokens(24)
    m.bytes_in(1000)
    m.bytes_out(300)
    m.he_product("3.qkv", "fwd", 0.2)
    m.failure(OversizedMessage("too big"), "helora-test-0a1b2c3d.evaluator.b0-14.s0of2", "helora-test-0a1b2c3d")
    m.failure(ValueError("a bug, not a HeloraError"))
    with m.stage("decode"):
        pass
    m.track_in_flight(lambda: 3)
    m.track_device_memory("cpu", lambda: 4096)
    got = _samples(_get(url + "/metrics")[2])
    ev = (("service", "evaluator"),)
    assert got[("helora_requests_total", (("direction", "forward"), ("group", "blocks-0-14"), ("kind", "qkv"),
                                          ("service", "evaluator")))] == 2
    assert got[("helora_requests_total", (("direction", "backward"), ("group", "blocks-0-14"), ("kind", "down"),
                                          ("service", "evaluator")))] == 1
    assert got[("helora_tokens_total", (("group", "blocks-0-14"), ("service", "evaluator")))] == 24
    assert got[("helora_bytes_total", (("direction", "in"), *ev))] == 1000
    assert got[("helora_bytes_total", (("direction", "out"), *ev))] == 300
    assert got[("helora_he_product_seconds_count", (("direction", "forward"), ("group", "blocks-0-14"),
                                                    ("kind", "qkv")))] == 1
    assert got[("helora_stage_seconds_count", (*ev, ("stage", "he_product")))] == 1
    assert got[("helora_stage_seconds_count", (*ev, ("stage", "decode")))] == 1
    assert got[("helora_failures_total", (("reason", "oversized"), *ev))] == 1
    assert got[("helora_failures_total", (("reason", "internal"), *ev))] == 1
    assert got[("helora_failures_total", (("reason", "malformed"), *ev))] == 0  # present before any failure
    assert got[("helora_dead_lettered_total", (("queue", "evaluator"), *ev))] == 1  # the role, not the name
    assert got[("helora_in_flight", ev)] == 3
    assert got[("helora_device_memory_bytes", (("device", "cpu"), *ev))] == 4096
    assert got[("helora_service_info", (("backend", "numpy"), ("param_set", "n2048-q54"), *ev,
                                        ("version", M.__version__)))] == 1
    assert contract_violations(_get(url + "/metrics")[2], {"blocks-0-14"}, {"n2048-q54"}) == []


def test_owner_hint_metrics_follow_the_evaluators_hints(served, contract_violations):
    """helora_owners_held and helora_hint_bytes are read from the handler at each scrape; builds,
    their seconds and evictions are counted as they happen (labels: service and group only)."""
    import os

    import numpy as np
    from helora_evaluator.handler import OwnerHints

    m, url = served
    hints = OwnerHints(max_owners=1)
    m.track_owner_hints(lambda: hints.owners, hints.held_bytes)
    hints.on_build, hints.on_evict = m.hint_built, m.owner_evicted
    hints.put(os.urandom(16), ("0.qkv", "fwd"), np.zeros((3, 2, 8), np.uint32), 0.5)
    hints.put(os.urandom(16), ("0.qkv", "fwd"), np.zeros((5, 2, 8), np.uint32), 0.25)
    text = _get(url + "/metrics")[2]
    got = _samples(text)
    key = (("group", "blocks-0-14"), ("service", "evaluator"))
    assert got[("helora_owners_held", key)] == 1
    assert got[("helora_hint_bytes", key)] == 5 * 2 * 8 * 4
    assert got[("helora_hint_builds_total", key)] == 2
    assert got[("helora_hint_seconds_total", key)] == 0.75
    assert got[("helora_owner_evictions_total", key)] == 1
    assert contract_violations(text, {"blocks-0-14"}, {"n2048-q54"}) == []


def test_label_values_come_from_closed_sets():
    assert M.kind_of("3.qkv") == "qkv" and M.kind_of("29.gate_up") == "gate_up"
    assert M.kind_of("3.lm_head") == "other" and M.kind_of("0123abcd") == "other"  # never the raw name
    assert M.direction_of("fwd") == "forward" and M.direction_of("bwd") == "backward"
    assert M.direction_of("sideways") == "other"
    assert M.reason_of(TransientError("x")) == "transient" and M.reason_of(MalformedMessage("x")) == "malformed"
    assert M.reason_of(KeyError("secret")) == "internal"

    class Odd(MalformedMessage):
        reason = "f00dfeed"  # a reason outside the set is folded, not exported

    assert M.reason_of(Odd("x")) == "other"
    assert M.queue_role("helora.ingress", "helora") == "other"  # the routing encoder's queue: gone
    assert M.queue_role("ns.evaluator.b0-14.s1of2", "ns") == "evaluator"
    assert M.queue_role("elsewhere.manifest", "ns") == "other"
    m = M.Metrics("aggregator")
    with pytest.raises(ValueError, match="stage"):
        m.observe_stage("rid-0a1b", 1.0)
    with pytest.raises(ValueError, match="device"):
        m.track_device_memory("gpu0", lambda: 0)


def test_configuration_labels_are_validated():
    with pytest.raises(ConfigError, match="service"):
        M.Metrics("gateway")
    with pytest.raises(ConfigError, match="group"):
        M.Metrics("evaluator", group="Blocks 0..14")
    with pytest.raises(ConfigError, match="param_set"):
        M.Metrics("encoder").set_info("N2048 / q54", "numpy")


def test_each_metrics_object_has_its_own_registry():
    a, b = M.Metrics("encoder"), M.Metrics("encoder")
    a.bytes_in(5)
    got = _samples(M.generate_latest(b.registry).decode())
    assert got[("helora_bytes_total", (("direction", "in"), ("service", "encoder")))] == 0


def test_orchestrator_metrics(contract_violations):
    m = M.OrchestratorMetrics()
    server = M.serve(m, "127.0.0.1", 0, "helora train")
    try:
        m.record_step(3, 2.5, 96, 40.0)
        m.round_trip("1.o", "bwd", 0.05, sent=1000, received=700)
        text = _get(f"http://127.0.0.1:{server.port}/metrics")[2]
    finally:
        server.close()
    got = _samples(text)
    assert got[("helora_orchestrator_step", ())] == 3 and got[("helora_orchestrator_loss", ())] == 2.5
    assert got[("helora_orchestrator_tokens_total", ())] == 96
    assert got[("helora_orchestrator_tokens_per_second", ())] == 40
    assert got[("helora_orchestrator_bytes_total", (("direction", "out"),))] == 1000
    assert got[("helora_orchestrator_bytes_total", (("direction", "in"),))] == 700
    assert got[("helora_orchestrator_request_seconds_count", (("direction", "backward"), ("kind", "o")))] == 1
    assert contract_violations(text, set(), set()) == []


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match=r"metrics: cannot listen on 127\.0\.0\.1:\d+"):
            M.MetricsServer(M.Metrics("encoder").registry, M.Metrics("encoder").ready, "127.0.0.1",
                            s.getsockname()[1])


@pytest.mark.parametrize("port, host, match", [
    (-1, "0.0.0.0", "metrics_port"), (65536, "0.0.0.0", "metrics_port"), (True, "0.0.0.0", "metrics_port"),
    (9400, "", "metrics_host"), (9400, "bad host!", "metrics_host"), (9400, None, "metrics_host"),
])
def test_metrics_flags_are_validated(port, host, match):
    from helora_aggregator.config import AggregatorConfig

    with pytest.raises(ConfigError, match=match):
        AggregatorConfig(metrics_port=port, metrics_host=host)


def test_metrics_flags_from_cli_and_environment(capsys):
    from helora_encoder.config import EncoderConfig
    from helora_evaluator.config import EvaluatorConfig

    cfg = EvaluatorConfig.from_args(["--blocks", "0-14"], environ={})
    assert (cfg.metrics_port, cfg.metrics_host, cfg.metrics_group) == (9400, "0.0.0.0", "blocks-0-14")
    cfg = EvaluatorConfig.from_args(["--blocks", "0-3,7", "--metrics-port", "0"],
                                    environ={"HELORA_METRICS_HOST": "127.0.0.1", "HELORA_GROUP": "attn-a"})
    assert (cfg.metrics_port, cfg.metrics_host, cfg.metrics_group) == (0, "127.0.0.1", "attn-a")
    assert EvaluatorConfig(blocks="0-3,7").metrics_group == "blocks-0-3_7"
    with pytest.raises(ConfigError, match="group"):
        EvaluatorConfig(group="Layer Group #1")
    assert EncoderConfig.from_args([], environ={"HELORA_METRICS_PORT": "9555"}).metrics_port == 9555
    with pytest.raises(SystemExit) as exit_:
        EncoderConfig.from_args([], environ={"HELORA_METRICS_PORT": "ninety"})
    assert exit_.value.code == 2 and "--metrics-port" in capsys.readouterr().err


@pytest.mark.parametrize("service", ["encoder", "evaluator", "aggregator"])
def test_dead_letter_series_exist_at_zero_before_the_first_one(service):
    """rate() over a counter born at its first increment never shows that increment."""
    m = M.Metrics(service)
    for queue in M.CONSUMED[service]:
        assert m.registry.get_sample_value("helora_dead_lettered_total", {"service": service, "queue": queue}) == 0.0
    m.failure(MalformedMessage("bad"), queue=f"helora.{M.CONSUMED[service][0]}", namespace="helora")
    assert m.registry.get_sample_value(
        "helora_dead_lettered_total", {"service": service, "queue": M.CONSUMED[service][0]}) == 1.0


def test_close_after_scrape_waits_for_a_scrape_of_the_last_values():
    """A short run's last values are served until scraped once (the orchestrator ends right after its
    last step; a scrape interval later the endpoint would be gone and the run never seen)."""
    m = M.OrchestratorMetrics()
    server = M.MetricsServer(m.registry, m.ready, "127.0.0.1", 0)
    m.record_step(3, 1.25, 64, 10.0)
    outcome: list[bool] = []
    closer = threading.Thread(target=lambda: outcome.append(server.close_after_scrape(30.0)))
    t0 = time.monotonic()
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive(), "closed before anyone scraped the last values"
    status, _, text = _get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and _samples(text)[("helora_orchestrator_loss", ())] == 1.25
    closer.join(10)
    assert not closer.is_alive() and outcome == [True] and time.monotonic() - t0 < 10
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{server.port}/metrics")


def test_close_after_scrape_gives_up_after_its_timeout_and_zero_closes_at_once():
    m = M.OrchestratorMetrics()
    server = M.MetricsServer(m.registry, m.ready, "127.0.0.1", 0)
    t0 = time.monotonic()
    assert server.close_after_scrape(0.5) is False
    assert 0.5 <= time.monotonic() - t0 < 5
    other = M.MetricsServer(m.registry, m.ready, "127.0.0.1", 0)
    _get(f"http://127.0.0.1:{other.port}/metrics")  # a scrape before the call does not count
    t0 = time.monotonic()
    assert other.close_after_scrape(0) is False and time.monotonic() - t0 < 1

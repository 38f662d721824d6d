"""Metrics and health endpoints of the real fleet, scraped over HTTP (docs/metrics.md, DESIGN §7.1)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pika
import pytest
import torch
from hecommon import route
from hecommon.broker import topology
from hecommon.model import discover_groups, tiny_llama
from helora_orchestrator.broker import make_broker_backend
from helora_orchestrator.client_model import ClientModel, causal_lm_loss
from helora_orchestrator.lora import LoraSettings
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration
SERVICES = ("encoder", "evaluator0", "evaluator1", "evaluator2", "evaluator3", "aggregator")
#: evaluator process -> (its block, its shard of that block's layers); 2 and 3: replicas of one queue
EVALUATORS = {"evaluator0": (0, 0), "evaluator1": (0, 1), "evaluator2": (1, 0), "evaluator3": (1, 0)}
GROUPS = {0: "blocks-0", 1: "blocks-1"}  # derived from --blocks (conftest), no --group given
TOKENS = 16
KINDS = ("qkv", "o", "gate_up", "down")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Scrape:
    """One /metrics text; ``value(name, **labels)`` sums the samples whose labels include ``labels``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _scrape(fleet, name: str) -> Scrape:
    status, text = _get(fleet.metrics_url(name) + "/metrics")
    assert status == 200, (name, status)
    return Scrape(text)


def _until(fleet, check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Counters move after the reply or the dead letter is out: poll until ``check()`` holds."""
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what} within {timeout_s} s\n{fleet.logs()}")
        time.sleep(0.2)


def test_every_service_is_alive_and_ready(fleet):
    for name in SERVICES:
        url = fleet.metrics_url(name)
        assert _get(url + "/healthz")[0] == 200, name
        assert _get(url + "/readyz")[0] == 200, name  # the fleet fixture waited for every consumer


def test_a_training_step_moves_the_counters_of_every_service(fleet):
    """Every message counted where it went on the direct path: the evaluators count the request
    parts they computed (``hecommon.route``'s plan, shard by shard; block 1's two replicas
    between them), the aggregator the requests of the sharded block 0, the encoder none."""
    before = {n: _scrape(fleet, n) for n in SERVICES}
    model = tiny_llama(0)[0]
    backend = make_broker_backend(fleet.url, namespace=fleet.namespace, model=model, timeout_s=60,
                                  max_message_bytes=fleet.limit)
    calls: list[tuple[str, str]] = []
    inner = backend._call

    def spy(layer, direction, m, a_seed):  # which layer calls the client made (a spy: nothing replaced)
        calls.append((layer, direction))
        return inner(layer, direction, m, a_seed)

    backend._call = spy
    client = ClientModel(model, backend, discover_groups(model), LoraSettings(r=4, alpha=8), seed=0)
    try:
        opt = torch.optim.AdamW(client.lora_parameters(), lr=1e-2)
        ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(3))
        loss, n = causal_lm_loss(client(ids), ids)
        (loss / n).backward()
        opt.step()
    finally:
        backend.transport.close()
    assert len(calls) == backend.requests and {d for _, d in calls} == {"fwd", "bwd"}
    layers = {e.name: e for e in backend.manifest.layers}
    parts = {(0, 0): 0, (0, 1): 0, (1, 0): 0}  # (block, shard) -> request parts it receives
    for layer, direction in calls:
        e = layers[layer]
        for p in route.pieces(e, direction, backend.params, fleet.limit):
            for shard in p.shards:
                parts[(e.block, shard)] += 1
    per_block = {b: sum(1 for layer, _ in calls if layers[layer].block == b) for b in (0, 1)}
    assert per_block[0] and per_block[1] and parts[(1, 0)] > per_block[1]  # block 1: several parts a request

    def delta(name: str, metric: str, **labels: str) -> float:
        return _scrape(fleet, name).value(metric, **labels) - before[name].value(metric, **labels)

    def evaluators(metric: str, block: int, shard: int, **labels: str) -> float:
        return sum(delta(name, metric, **labels) for name, place in EVALUATORS.items() if place == (block, shard))

    for (block, shard), count in parts.items():
        _until(fleet, lambda b=block, s=shard, c=count: evaluators("helora_requests_total", b, s) == c,
               f"block {block} shard {shard}: helora_requests_total did not grow by its {count} request parts")
        assert evaluators("helora_he_product_seconds_count", block, shard) == count
        assert evaluators("helora_stage_seconds_count", block, shard, stage="he_product") == count
        # a layer call's tokens once per shard that computes it (each gets a part 0)
        assert evaluators("helora_tokens_total", block, shard, service="evaluator") == TOKENS * per_block[block]
        for kind in KINDS:
            assert evaluators("helora_requests_total", block, shard, group=GROUPS[block], kind=kind,
                              direction="forward") > 0, kind
        assert evaluators("helora_requests_total", block, shard, direction="backward") > 0
    assert evaluators("helora_stage_seconds_count", 1, 0, stage="switch") > 0  # block 1: replies made there
    for name in ("evaluator2", "evaluator3"):  # both replicas served parts of block 1's requests
        assert delta(name, "helora_requests_total") > 0, name
    for name in EVALUATORS:
        now = _scrape(fleet, name)
        assert now.value("helora_device_memory_bytes", service="evaluator", device="cpu") > 0
        assert now.value("helora_service_info", service="evaluator", backend="numpy",
                         param_set=backend.params.name) == 1
    _until(fleet, lambda: delta("aggregator", "helora_requests_total") == per_block[0],
           "aggregator: helora_requests_total did not grow by block 0's requests")
    assert delta("aggregator", "helora_tokens_total", service="aggregator", group="all") == TOKENS * per_block[0]
    assert delta("aggregator", "helora_stage_seconds_count", stage="switch") == per_block[0]
    assert delta("encoder", "helora_requests_total") == 0  # not on the per-request path
    for name in SERVICES:
        if name != "encoder":  # the manifest request is empty; its answer is not
            assert delta(name, "helora_bytes_total", direction="in") > 0, name
        assert delta(name, "helora_bytes_total", direction="out") > 0, name
        assert delta(name, "helora_failures_total") == 0, name
        assert _scrape(fleet, name).value("helora_in_flight") == 0, name  # all answered


def test_bad_messages_count_as_failures_on_the_service_that_got_them(fleet):
    topo = topology.Topology(fleet.namespace)
    sent = {  # service -> (queue it consumes, [(body, expected reason)])
        "encoder": (topo.manifest, [(b"", "malformed")]),  # a manifest request without reply_to
        "evaluator0": (fleet.evaluator_queues[0], [(os.urandom(200), "malformed"),
                                                   (os.urandom(fleet.limit + 1), "oversized")]),
        "aggregator": (topo.partials, [(os.urandom(200), "malformed")]),
    }
    role = {"encoder": "manifest", "evaluator0": "evaluator", "aggregator": "partials"}
    before = {n: _scrape(fleet, n) for n in SERVICES}
    conn = pika.BlockingConnection(pika.URLParameters(fleet.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for queue, bodies in sent.values():
            for body, _ in bodies:
                ch.basic_publish("", queue, body, pika.BasicProperties(correlation_id="metrics-test"), mandatory=True)
    finally:
        conn.close()

    def delta(name: str, metric: str, **labels: str) -> float:
        return _scrape(fleet, name).value(metric, **labels) - before[name].value(metric, **labels)

    for name, (_, bodies) in sent.items():
        _until(fleet, lambda name=name, bodies=bodies: delta(name, "helora_dead_lettered_total") == len(bodies),
               f"{name}: helora_dead_lettered_total did not count its {len(bodies)} bad message(s)")
        assert delta(name, "helora_dead_lettered_total", queue=role[name]) == len(bodies)
        for reason in {r for _, r in bodies}:
            assert delta(name, "helora_failures_total", reason=reason) == sum(r == reason for _, r in bodies)
        assert delta(name, "helora_failures_total") == len(bodies)
    for name in set(SERVICES) - set(sent):
        assert delta(name, "helora_failures_total") == 0, name  # nothing counted on the wrong service
    fleet.check_alive()


def test_no_label_carries_data(fleet, contract_violations):
    """Every label of every service's scrape is from its closed set or the configuration: no
    request id, token, size or key material, no hex and no numbers outside ``le``, ``version``,
    ``group`` and ``param_set``."""
    from hecommon.he import params as P

    for name in SERVICES:
        text = _scrape(fleet, name).text
        assert contract_violations(text, {*GROUPS.values(), "all"}, set(P.REGISTRY)) == [], name
        assert fleet.namespace not in text  # the deployment's own names stay out of labels too

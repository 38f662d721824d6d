"""``helora status`` on API objects built from the rendered chart (charts/helora, tools/helmchart.py).

The chart's Deployments become Pods the way a ReplicaSet would make them (the pod template's
labels, annotations and spec, ``replicas`` copies) with a Ready condition set per test; the
broker's Service is the one the RabbitMQ cluster operator creates. ``summarize`` is checked on
plain dicts and on the ``kubernetes`` client's model objects; the command line is checked on a
missing kubeconfig, an unreachable cluster, and against a stand-in API server on the loopback
address that answers the three list calls with the same objects.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import helmchart  # tools/, on sys.path through tests/deploy/conftest.py
import pytest
import yaml
from helora_orchestrator import cli
from helora_orchestrator.operator.status import StatusError, render, summarize
from listen_ports import free_listen_port

ROOT = Path(__file__).resolve().parents[2]

CI_VALUES = ROOT / "charts" / "helora" / "ci"
RELEASE = NAMESPACE = "helora"
BROKER = {"apiVersion": "v1", "kind": "Service",
          "metadata": {"name": "helora-rabbitmq", "namespace": NAMESPACE,
                       "labels": {"app.kubernetes.io/component": "rabbitmq"}},
          "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.42",
                   "ports": [{"name": "amqp", "port": 5672}, {"name": "management", "port": 15672}]},
          "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}}


def rendered(*values_files: str, **values) -> list[dict]:
    return helmchart.render(values_files=[CI_VALUES / f for f in values_files], values=values or None,
                            release=RELEASE, namespace=NAMESPACE)


def pods_of(objects: list[dict], not_ready: set[str] = frozenset(), not_ready_pods: set[str] = frozenset()) -> list[dict]:
    """Pods of every Deployment; a Deployment named in ``not_ready`` gets pods that are not Ready,
    a pod named in ``not_ready_pods`` too."""
    pods = []
    for d in objects:
        if d["kind"] != "Deployment":
            continue
        name, template = d["metadata"]["name"], copy.deepcopy(d["spec"]["template"])
        for c in template["spec"]["containers"]:  # the API server returns every quantity as a string
            for part in ("limits", "requests"):
                c.get("resources", {})[part] = {k: str(v) for k, v in c.get("resources", {}).get(part, {}).items()}
        for i in range(d["spec"].get("replicas", 1)):
            pod_name = f"{name}-7c9f8d-{i}"
            ready = name not in not_ready and pod_name not in not_ready_pods
            pods.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": NAMESPACE, **copy.deepcopy(template["metadata"])},
                "spec": {**copy.deepcopy(template["spec"]), "nodeName": f"gpu-node-{i}"},
                "status": {"phase": "Running",
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                           "containerStatuses": [{"name": c["name"], "ready": ready, "restartCount": 0 if ready else 3,
                                                  "image": c["image"], "imageID": "", "started": True}
                                                 for c in template["spec"]["containers"]]},
            })
    return pods


def config_of(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))


def evaluator_deployments(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "Deployment"
            and o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluator"]


@pytest.fixture(scope="module")
def default_chart() -> list[dict]:
    return rendered()


# -- summarize ---------------------------------------------------------------------------------
def test_all_ready(default_chart):
    s = summarize(pods_of(default_chart), [BROKER], config_of(default_chart), RELEASE, NAMESPACE)
    n = int(config_of(default_chart)["data"]["numBlocks"])
    assert s.healthy and s.num_blocks == n and s.covered == tuple(range(n)) and s.uncovered == ()
    assert {p.component for p in s.pods} == {"encoder", "evaluator", "aggregator"} and all(p.ready for p in s.pods)
    evaluators = [p for p in s.pods if p.component == "evaluator"]
    assert len({g.name for g in s.groups}) == len(evaluator_deployments(default_chart)) == len(evaluators)
    assert all(dict(p.gpus).get("nvidia.com/gpu", 0) >= 1 for p in evaluators)
    assert all(p.gpus == () for p in s.pods if p.component != "evaluator")
    assert s.broker == "amqp://helora-rabbitmq:5672/%2F"
    assert "LoadBalancer" in s.broker_service and "203.0.113.7:5672" in s.broker_service
    text = render(s)
    assert "NOT READY" not in text and f"ready 0-{n - 1}; without a ready evaluator: -" in text
    assert "nvidia.com/gpu=1" in text and "amqp://helora-rabbitmq:5672/%2F" in text


def test_one_group_not_ready_leaves_its_blocks_uncovered(default_chart):
    victim = evaluator_deployments(default_chart)[1]
    blocks = victim["spec"]["template"]["metadata"]["annotations"]["helora.dev/blocks"]
    lo, hi = map(int, blocks.split("-"))
    s = summarize(pods_of(default_chart, not_ready={victim["metadata"]["name"]}), [BROKER],
                  config_of(default_chart), RELEASE, NAMESPACE)
    assert not s.healthy
    assert s.uncovered == tuple(range(lo, hi + 1))
    assert set(s.covered) == set(range(s.num_blocks)) - set(s.uncovered)
    group = victim["spec"]["template"]["metadata"]["labels"]["helora.dev/group"]
    bad = [g for g in s.groups if not g.ready]
    assert [g.name for g in bad] == [group]
    text = render(s)
    assert f"group {group}: blocks {lo}-{hi}, 1 shard(s): NOT READY (no ready pod for shard 0/1)" in text
    assert f"without a ready evaluator: {lo}-{hi}" in text
    assert f"{victim['metadata']['name']}-7c9f8d-0" in text and "NO" in text.split()


def test_a_sharded_group_needs_every_shard_and_one_ready_replica_is_enough(default_chart):
    n = int(config_of(default_chart)["data"]["numBlocks"])
    objects = rendered(evaluators=[{"name": "all", "blocks": f"0-{n - 1}", "shards": 2, "replicas": 2}])
    deps = evaluator_deployments(objects)
    assert len(deps) == 2  # one Deployment per shard
    # one replica of shard 0 down: its twin still serves, every block stays covered
    s = summarize(pods_of(objects, not_ready_pods={f"{deps[0]['metadata']['name']}-7c9f8d-0"}), [BROKER],
                  config_of(objects), RELEASE, NAMESPACE)
    assert s.covered == tuple(range(n)) and not s.healthy  # covered, but a pod is not ready
    # every replica of shard 1 down: the whole group is uncovered though shard 0 is fine
    s = summarize(pods_of(objects, not_ready={deps[1]["metadata"]["name"]}), [BROKER], config_of(objects),
                  RELEASE, NAMESPACE)
    assert s.uncovered == tuple(range(n)) and s.groups[0].ready_shards == (0,)
    assert "NOT READY (no ready pod for shard 1/2)" in render(s)


def test_pods_without_gpus():
    objects = rendered("cpu-only.yaml")
    s = summarize(pods_of(objects), [BROKER], config_of(objects), RELEASE, NAMESPACE)
    assert s.healthy and all(p.gpus == () for p in s.pods)
    evaluator_rows = [line for line in render(s).splitlines() if "-evaluator-" in line]
    assert evaluator_rows and all(line.split()[-1] == "-" for line in evaluator_rows)


def test_mig_profiles_are_shown_as_gpus():
    objects = rendered("mig.yaml")
    s = summarize(pods_of(objects), [BROKER], config_of(objects), RELEASE, NAMESPACE)
    resources = {name for p in s.pods for name, _ in p.gpus}
    assert resources and all(r.startswith("nvidia.com/mig-") for r in resources), resources


def test_blocks_from_the_environment_when_the_annotations_are_missing(default_chart):
    pods = pods_of(default_chart)
    for p in pods:
        p["metadata"].pop("annotations", None)
    with_env = summarize(pods, [BROKER], config_of(default_chart), RELEASE, NAMESPACE)
    assert with_env.covered == tuple(range(with_env.num_blocks)) and with_env.healthy


def test_client_model_objects_give_the_same_status(default_chart):
    from kubernetes.client import ApiClient

    api = ApiClient()
    victim = evaluator_deployments(default_chart)[0]["metadata"]["name"]
    dict_pods = pods_of(default_chart, not_ready={victim})
    model_pods = [api.deserialize(json.dumps(p), "V1Pod", "application/json") for p in dict_pods]
    model_services = [api.deserialize(json.dumps(BROKER), "V1Service", "application/json")]
    model_config = api.deserialize(json.dumps(config_of(default_chart)), "V1ConfigMap",
                                   "application/json")
    assert type(model_pods[0]).__name__ == "V1Pod"
    assert summarize(model_pods, model_services, model_config, RELEASE, NAMESPACE) == \
        summarize(dict_pods, [BROKER], config_of(default_chart), RELEASE, NAMESPACE)


def test_without_the_configmap_the_model_size_is_unknown(default_chart):
    s = summarize(pods_of(default_chart), [BROKER], None, RELEASE, NAMESPACE)
    assert s.num_blocks is None and s.broker is None and not s.healthy
    assert "model size unknown" in render(s) and "broker: unknown" in render(s)


def test_no_pods():
    s = summarize([], [], None, RELEASE, NAMESPACE)
    assert not s.healthy and "no pods with label app.kubernetes.io/instance=helora" in render(s)


def test_a_bad_shard_annotation_is_a_clear_error(default_chart):
    pods = pods_of(default_chart)
    ev = next(p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluator")
    ev["metadata"]["annotations"]["helora.dev/shard"] = "2/2"
    with pytest.raises(StatusError, match="shard '2/2' is not I/N"):
        summarize(pods, [], None)


# -- the command line --------------------------------------------------------------------------


def _kubeconfig(path: Path, server: str, namespace: str = NAMESPACE) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
    }))
    return path


def test_cli_without_a_kubeconfig(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert cli.main(["status", "--kubeconfig", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("helora status: error: no kubeconfig at") and "--kubeconfig" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.kube/config absent too
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    assert cli.main(["status"]) == 2
    assert "no kubeconfig" in capsys.readouterr().err


def test_cli_with_an_unreachable_cluster(tmp_path, capsys):
    port = free_listen_port()  # nothing listens there
    cfg = _kubeconfig(tmp_path / "config", f"http://127.0.0.1:{port}")
    assert cli.main(["status", "--kubeconfig", str(cfg), "--timeout-s", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot reach the Kubernetes API at http://127.0.0.1:{port}" in err and len(err.splitlines()) == 1


def test_cli_with_an_unknown_context(tmp_path, capsys):
    cfg = _kubeconfig(tmp_path / "config", "http://127.0.0.1:1")
    assert cli.main(["status", "--kubeconfig", str(cfg), "--context", "prod"]) == 2
    assert "--context prod: not in the kubeconfig" in capsys.readouterr().err


class _ApiServer(BaseHTTPRequestHandler):
    """A stand-in for the Kubernetes API server: the three list calls ``helora status`` makes."""

    objects: dict[str, list[dict]] = {}
    seen: list[tuple[str, dict]] = []
    forbidden: set[str] = set()  # namespaces the caller may not read

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        self.seen.append((url.path, parse_qs(url.query)))
        parts = url.path.strip("/").split("/")  # api v1 namespaces NS KIND
        if len(parts) == 5 and parts[3] in self.forbidden:
            body, status = json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden"}), 403
        elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] in self.objects:
            kind = {"pods": "PodList", "configmaps": "ConfigMapList", "services": "ServiceList"}[parts[4]]
            items = [o for o in self.objects[parts[4]] if o["metadata"].get("namespace", NAMESPACE) == parts[3]]
            body, status = json.dumps({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items}), 200
        else:
            body, status = json.dumps({"kind": "Status", "code": 404, "message": "not found"}), 404
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _serve_api(objects: dict[str, list[dict]], forbidden: set[str] = frozenset()) -> ThreadingHTTPServer:
    _ApiServer.objects, _ApiServer.seen, _ApiServer.forbidden = objects, [], set(forbidden)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _status_against(tmp_path: Path, objects: dict[str, list[dict]], *argv: str,
                    forbidden: set[str] = frozenset()) -> int:
    """``helora status`` against a stand-in API server holding ``objects``; its exit code."""
    server = _serve_api(objects, forbidden)
    try:
        cfg = _kubeconfig(tmp_path / "config", f"http://127.0.0.1:{server.server_address[1]}")
        return cli.main(["status", "--kubeconfig", str(cfg), *argv])
    finally:
        server.shutdown()
        server.server_close()


def test_broker_in_another_namespace(tmp_path, capsys):
    """The broker's Service in its own namespace: found when readable; when the Role does not
    reach that namespace, the endpoint is still shown and the command still works."""
    host = "helora-rabbitmq.rabbitmq.svc.cluster.local"
    objects = rendered(broker={"host": host})
    other = {**BROKER, "metadata": {**BROKER["metadata"], "namespace": "rabbitmq"}}
    s = summarize(pods_of(objects), [BROKER, other], config_of(objects), RELEASE, NAMESPACE)
    assert s.broker == f"amqp://{host}:5672/%2F" and s.broker_service.startswith("Service rabbitmq/helora-rabbitmq")
    configmaps = [{**o, "metadata": {**o["metadata"], "namespace": NAMESPACE}} for o in objects if o["kind"] == "ConfigMap"]
    assert _status_against(tmp_path, {"pods": pods_of(objects), "configmaps": configmaps, "services": [BROKER, other]},
                           forbidden={"rabbitmq"}) == 0
    out = capsys.readouterr().out
    assert f"amqp://{host}:5672/%2F (Service rabbitmq/helora-rabbitmq not found or not readable)" in out
    assert any(path == "/api/v1/namespaces/rabbitmq/services" for path, _ in _ApiServer.seen)


def test_cli_against_a_stand_in_api_server(default_chart, tmp_path, capsys):
    victim = evaluator_deployments(default_chart)[2]
    configmaps = [{**o, "metadata": {**o["metadata"], "namespace": NAMESPACE}}
                  for o in default_chart if o["kind"] == "ConfigMap"]
    code = _status_against(tmp_path, {"pods": pods_of(default_chart, not_ready={victim["metadata"]["name"]}),
                                      "configmaps": configmaps, "services": [BROKER]}, "--release", RELEASE)
    out = capsys.readouterr().out
    assert code == 1, out  # a group is not ready
    blocks = victim["spec"]["template"]["metadata"]["annotations"]["helora.dev/blocks"]
    assert f"without a ready evaluator: {blocks}" in out and "203.0.113.7:5672" in out
    pod_calls = [q for path, q in _ApiServer.seen if path.endswith("/pods")]
    assert pod_calls == [{"labelSelector": [f"app.kubernetes.io/instance={RELEASE}"]}]
    assert all(path.startswith(f"/api/v1/namespaces/{NAMESPACE}/") for path, _ in _ApiServer.seen)
    # the same cluster with every pod ready: exit 0
    assert _status_against(tmp_path, {**_ApiServer.objects, "pods": pods_of(default_chart)}) == 0

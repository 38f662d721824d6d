"""charts/helora rendered offline (Helm v4 SDK) with its default values and every values file in
charts/helora/ci: the objects are valid Kubernetes (strict schemas) and valid custom resources
(upstream CRDs), every container's environment is a valid configuration of its real service,
GPUs go to evaluators only with requests = limits, the evaluator groups cover every block once,
probes are everywhere, no credential leaves the Secret, and bad values are refused by name.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import chart_check
import crd_validate
import helmchart
import pytest
import yaml
from hecommon import wire
from hecommon.broker import metrics as hm
from hecommon.broker import topology
from helora_aggregator.config import AggregatorConfig
from helora_encoder.config import EncoderConfig
from helora_evaluator.config import EvaluatorConfig
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
CASES = {"defaults": []} | {p.stem: [p] for p in helmchart.CI_VALUES}
CONFIGS = {"encoder": EncoderConfig, "evaluator": EvaluatorConfig, "aggregator": AggregatorConfig}
FAKE_USER, FAKE_PASSWORD = "helora-ci", "Fake-Passw0rd.for_CI-only"
GPU_PREFIX = "nvidia.com/"
SMOLLM2_BLOCKS = 30


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each values case rendered once for the whole module."""
    return {name: helmchart.render(files) for name, files in CASES.items()}


def kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(objects: list[dict[str, Any]]):
    for d in kinds(objects, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            yield d, c


def resolve_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The process environment the kubelet would build: secretKeyRef looked up, $(VAR) expanded."""
    env: dict[str, str] = {}
    for e in container["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), e["value"])
    return env


def secrets_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The chart's own Secrets decoded, plus the operator's default-user Secret it may point to."""
    out = {"helora-rabbitmq-default-user": {"username": FAKE_USER, "password": FAKE_PASSWORD}}
    for s in kinds(objects, "Secret"):
        out[s["metadata"]["name"]] = {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
    return out


def bad(values: dict[str, Any]) -> str:
    with pytest.raises(helmchart.ChartError) as info:
        helmchart.render(values=values)
    return str(info.value)


def groups(*specs: str, **extra: Any) -> dict[str, Any]:
    return {"evaluators": [{"name": f"g{i}", "blocks": s, **extra} for i, s in enumerate(specs)]}


# -- validity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case: str) -> None:
    assert helmchart.lint(CASES[case]) == []


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid(rendered, case: str) -> None:
    """kubernetes-validate --strict for built-in kinds, the upstream CRDs for the others."""
    assert chart_check.check_objects(case, rendered[case]) == []


@pytest.mark.parametrize("manifest", sorted(p.name for p in (ROOT / "k8s").glob("*.yaml")))
def test_k8s_manifests_are_valid(manifest: str) -> None:
    objects = chart_check.k8s_objects()[manifest]
    assert objects and chart_check.check_objects(manifest, objects) == []


def test_the_validators_reject_what_the_api_server_would() -> None:
    """The checks above can fail: a misspelt field, a wrong type, an unknown kind."""
    objects = helmchart.render(CASES["monitoring-on"])
    deploy = kinds(objects, "Deployment")[0]
    deploy["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    assert any("'envv' was unexpected" in p for p in chart_check.validate_object(deploy))
    so = kinds(objects, "ScaledObject")[0]
    so["spec"]["minReplicaCount"] = "one"
    so["spec"]["triggers"][0]["metdata"] = {}
    problems = chart_check.validate_object(so)
    assert any(p.startswith("spec.minReplicaCount:") for p in problems)
    assert any("'metdata' was unexpected" in p for p in problems)
    cluster = chart_check.k8s_objects()["rabbitmq-cluster.yaml"][0]
    cluster["spec"]["rabbitmq"]["additonalConfig"] = cluster["spec"]["rabbitmq"].pop("additionalConfig")
    assert any("additonalConfig" in p for p in chart_check.validate_object(cluster))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("Couldn't find schema" in p for p in chart_check.validate_object(unknown))


def test_missing_crds_fail_clearly(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("HELORA_CRDS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(crd_validate.CrdError, match="HELORA_CRDS_DIR"):
        crd_validate.crds_dir()
    assert chart_check.main([]) == 1
    assert "upstream CRDs not found" in capsys.readouterr().err


# -- the services' configuration ----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_container_env_is_a_valid_service_config(rendered, case: str) -> None:
    """Each container's environment, resolved like the kubelet does, parses with the real
    service's ``from_args``; the evaluators' queues are the ones KEDA watches and the encoder's
    shard plan gives each group the number of shards its Deployments serve."""
    objects = rendered[case]
    secrets = secrets_of(objects)
    queues, shards = {}, {}
    encoder_plan = None
    for d, c in containers(objects):
        env = resolve_env(c, secrets)
        assert c["command"] == [f"helora-{component(d)}"]
        cfg = CONFIGS[component(d)].from_args([], environ=env)
        assert cfg.broker_url.startswith(f"amqp://{secrets[c['env'][0]['valueFrom']['secretKeyRef']['name']]['username']}:")
        assert cfg.metrics_port == 9400 and cfg.namespace == "helora"
        if component(d) == "encoder":
            encoder_plan = cfg.plan
        elif component(d) == "evaluator":
            ann = d["metadata"]["annotations"]
            assert cfg.queue_name == ann["helora.dev/queue"]
            assert cfg.metrics_group == d["metadata"]["labels"]["helora.dev/group"]
            queues[d["metadata"]["name"]] = cfg.queue_name
            shards.setdefault(cfg.block_list, set()).add(cfg.shard_pair)
    assert encoder_plan is not None
    for blocks, pairs in shards.items():
        n = {count for _, count in pairs}.pop()
        assert pairs == {(i, n) for i in range(n)}, f"blocks {blocks}: shards {sorted(pairs)}"
        assert [count for plan_blocks, count in encoder_plan if plan_blocks == blocks] == [n]
    for so in kinds(objects, "ScaledObject"):
        assert so["spec"]["triggers"][0]["metadata"]["queueName"] == queues[so["spec"]["scaleTargetRef"]["name"]]


@pytest.mark.parametrize("case", CASES)
def test_evaluator_groups_cover_every_block_once(rendered, case: str) -> None:
    owner: dict[int, str] = {}
    for d, c in containers(rendered[case]):
        if component(d) != "evaluator":
            continue
        env = {e["name"]: e.get("value") for e in c["env"]}
        group = d["metadata"]["labels"]["helora.dev/group"]
        for b in topology.parse_blocks(env["HELORA_BLOCKS"]):
            assert owner.setdefault(b, group) == group, f"block {b} in {owner[b]} and {group}"
    assert sorted(owner) == list(range(SMOLLM2_BLOCKS))


def test_default_values_split_smollm2_into_groups(rendered) -> None:
    evaluators = [d for d in kinds(rendered["defaults"], "Deployment") if component(d) == "evaluator"]
    assert len(evaluators) >= 2, "the default values should spread the 30 blocks over several GPUs"
    assert helmchart.render(values={"model": {"numBlocks": SMOLLM2_BLOCKS}})  # the defaults name 30 blocks


# -- GPUs, probes, volumes -------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_gpus_go_to_evaluators_only_with_requests_equal_to_limits(rendered, case: str) -> None:
    gpu_pods = 0
    for d, c in containers(rendered[case]):
        res = c.get("resources", {})
        gpu = {k for part in ("requests", "limits") for k in res.get(part, {}) if k.startswith(GPU_PREFIX)}
        if component(d) != "evaluator":
            assert not gpu, f"{d['metadata']['name']} asks for {gpu}"
            continue
        for key in gpu:
            assert res["requests"].get(key) == res["limits"].get(key), f"{d['metadata']['name']} {key}"
            assert int(res["limits"][key]) >= 1
            assert re.fullmatch(r"nvidia\.com/(gpu|mig-[1-7]g\.[0-9]+gb)", key)
        backend = {e["name"]: e.get("value") for e in c["env"]}["HELORA_BACKEND"]
        assert backend == ("cupy" if gpu else "numpy")
        assert d["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0].endswith(
            "/evaluator" if gpu else "/evaluator-cpu")
        gpu_pods += bool(gpu)
    assert (gpu_pods == 0) == (case == "cpu-only")


def test_mig_profiles_reach_the_pods(rendered) -> None:
    asked = {k for _, c in containers(rendered["mig"]) for k in c["resources"]["limits"] if k.startswith(GPU_PREFIX)}
    assert asked == {"nvidia.com/mig-1g.10gb", "nvidia.com/mig-2g.20gb"}


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_startup_readiness_and_liveness_probes(rendered, case: str) -> None:
    for d, c in containers(rendered[case]):
        name = d["metadata"]["name"]
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"], name
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        startup = c["startupProbe"]
        assert startup["httpGet"]["port"] == "metrics", name
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        # loading and quantizing the model (encoder), waiting for and loading shards (evaluators)
        assert budget >= (600 if component(d) in ("encoder", "evaluator") else 60), f"{name}: {budget} s"
        if component(d) == "evaluator":
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert int(env["HELORA_WAIT_SHARDS_S"]) <= budget


@pytest.mark.parametrize("case", CASES)
def test_shards_are_one_volume_written_by_the_encoder_read_by_evaluators(rendered, case: str) -> None:
    objects = rendered[case]
    (pvc,) = kinds(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for d, c in containers(objects):
        pod = d["spec"]["template"]["spec"]
        claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        if component(d) == "aggregator":
            assert not claims
            continue
        (vol,) = claims
        assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        read_only = component(d) == "evaluator"
        assert mounts[vol["name"]].get("readOnly", False) is read_only
        assert vol["persistentVolumeClaim"].get("readOnly", False) is read_only
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (encoder,) = [d for d in kinds(objects, "Deployment") if component(d) == "encoder"]
    assert encoder["spec"]["replicas"] <= 1 and encoder["spec"]["strategy"]["type"] == "Recreate"


# -- secrets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("password", [FAKE_PASSWORD, ""])
def test_no_credential_outside_the_secret(password: str) -> None:
    """A known password (and a generated one) appears in the Secret only: not in a ConfigMap, an
    env value, an annotation or any other object; every credential env var is a secretKeyRef."""
    values = {"broker": {"auth": {"existingSecret": "", "username": FAKE_USER, "password": password}},
              "metrics": {"serviceMonitor": {"enabled": True}}, "autoscaling": {"keda": {"enabled": True}},
              "networkPolicy": {"enabled": True}, "podDisruptionBudget": {"enabled": True}}
    objects = helmchart.render(values=values)
    (secret,) = kinds(objects, "Secret")
    stored = base64.b64decode(secret["data"]["password"]).decode()
    assert stored == (password or stored) and len(stored) >= 16
    needles = {stored, base64.b64encode(stored.encode()).decode()}
    others = [o for o in objects if o["kind"] != "Secret"]
    assert len(others) > 10
    for o in others:
        text = yaml.safe_dump(o)
        assert not any(n in text for n in needles), f"{o['kind']}/{o['metadata']['name']} holds the password"
    notes = helmchart.render_notes(values=values)
    assert not any(n in notes for n in needles)
    for _, c in containers(objects):
        for e in c["env"]:
            if re.search(r"PASSWORD|USERNAME|SECRET|TOKEN", e["name"]):
                assert e["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"], e
    (auth,) = kinds(objects, "TriggerAuthentication")
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}


def test_existing_secret_is_referenced_not_created(rendered) -> None:
    objects = rendered["defaults"]
    assert not kinds(objects, "Secret")
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for _, c in containers(objects) for e in c["env"] if "valueFrom" in e}
    assert refs == {"helora-rabbitmq-default-user"}  # the cluster operator's Secret (k8s/rabbitmq-cluster.yaml)


# -- bad values --------------------------------------------------------------------------------
BAD = {
    "negative evaluator replicas": ({"evaluators": [{"name": "all", "blocks": "0-29", "replicas": -1}]},
                                    ["/evaluators/0/replicas", "minimum: got -1, want 0"]),
    "negative aggregator replicas": ({"aggregator": {"replicas": -2}}, ["/aggregator/replicas", "minimum"]),
    "two encoders": ({"encoder": {"replicas": 2}}, ["/encoder/replicas", "maximum"]),
    "AMD GPU": (groups("0-29", gpu={"resource": "amd.com/gpu"}), ["/evaluators/0/gpu/resource"]),
    "MIG profile without memory": (groups("0-29", gpu={"resource": "nvidia.com/mig-1g"}),
                                   ["/evaluators/0/gpu/resource"]),
    "negative GPU count": (groups("0-29", gpu={"count": -1}), ["/evaluators/0/gpu/count"]),
    "dots in a block range": (groups("0..29"), ["/evaluators/0/blocks"]),
    "open block range": (groups("0-"), ["/evaluators/0/blocks"]),
    "two ranges in one group": (groups("0-9,10-29"), ["/evaluators/0/blocks"]),
    "backwards range": (groups("29-0"), ["g0", "runs backwards"]),
    "overlapping groups": (groups("0-14", "10-29"), ["block 10 is in both \"g0\" and \"g1\""]),
    "a gap": (groups("0-9", "11-19", "25-29"), ["blocks 10, 20-24 have no evaluator group", "0-29"]),
    "past the model": (groups("0-30"), ["reaches block 30", "blocks 0-29", "model.numBlocks = 30"]),
    "duplicate group names": ({"evaluators": [{"name": "a", "blocks": "0-9"}, {"name": "a", "blocks": "10-29"}]},
                              ["\"a\" is used twice"]),
    "upper-case group name": ({"evaluators": [{"name": "Early", "blocks": "0-29"}]}, ["/evaluators/0/name"]),
    "misspelt key": ({"evaluators": [{"name": "a", "blocks": "0-29", "replica": 2}]}, ["replica"]),
    "min above max replicas": (groups("0-29", autoscaling={"minReplicas": 5, "maxReplicas": 2}),
                               ["minReplicas 5 is above maxReplicas 2"]),
    "no evaluator": ({"evaluators": []}, ["/evaluators", "minItems"]),
    "password not URL-safe": ({"broker": {"auth": {"existingSecret": "", "password": "p@ss:word"}}},
                              ["/broker/auth/password"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_values_are_refused_with_a_clear_message(case: str) -> None:
    values, expected = BAD[case]
    message = bad(values)
    for fragment in expected:
        assert fragment in message, message


def test_lint_reports_the_template_checks_too(tmp_path) -> None:
    """Helm's lint mode logs a template ``fail`` instead of reporting it; ``lint`` renders too."""
    assert any("blocks 4-29 have no evaluator group" in m for m in helmchart.lint(values=groups("0-3")))
    assert any("/evaluators/0/replicas" in m for m in helmchart.lint(values=groups("0-29", replicas=-1)))
    with pytest.raises(helmchart.ChartError, match="no-such.yaml"):
        helmchart.lint([tmp_path / "no-such.yaml"])


def test_the_cli_wrapper_renders_and_refuses() -> None:
    helm = [sys.executable, str(ROOT / "tools" / "helm")]
    ok = subprocess.run([*helm, "template", "-f", str(helmchart.CI_VALUES[0]), "--set", "logLevel=DEBUG"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "kind: Deployment" in ok.stdout and 'value: "DEBUG"' in ok.stdout
    refused = subprocess.run([*helm, "template", "-f", str(helmchart.CI_VALUES[0]), "--set", "evaluators[0].blocks=0-28"],
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "blocks 29 have no evaluator group" in refused.stderr
    lint = subprocess.run([*helm, "lint"], capture_output=True, text=True, check=False)
    assert lint.returncode == 0 and "lint ok" in lint.stdout


# -- optional objects ----------------------------------------------------------------------------
def test_monitoring_objects(rendered) -> None:
    objects = rendered["monitoring-on"]
    evaluators = [d for d in kinds(objects, "Deployment") if component(d) == "evaluator"]
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in kinds(objects, "ScaledObject")}
    assert set(scaled) == {d["metadata"]["name"] for d in evaluators}
    (auth,) = kinds(objects, "TriggerAuthentication")
    for d in evaluators:
        assert "replicas" not in d["spec"], "KEDA owns the replica count"
        (trigger,) = scaled[d["metadata"]["name"]]["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["protocol"] == "http"
        assert trigger["metadata"]["host"].startswith("http://") and "@" not in trigger["metadata"]["host"]
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    zero = scaled["helora-evaluator-blocks-15-29"]["spec"]
    assert zero["minReplicaCount"] == 0 and zero["initialCooldownPeriod"] >= 600  # the first pod declares the queue
    (sm,) = kinds(objects, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # the metrics' own `service` label wins
    (svc,) = kinds(objects, "Service")
    assert all(sm["spec"]["selector"]["matchLabels"][k] == v for k, v in svc["metadata"]["labels"].items()
               if k in sm["spec"]["selector"]["matchLabels"])
    assert svc["spec"]["selector"].items() <= evaluators[0]["spec"]["template"]["metadata"]["labels"].items()
    pdbs = kinds(objects, "PodDisruptionBudget")
    assert len(pdbs) == len(kinds(objects, "Deployment"))
    for pdb in pdbs:
        (target,) = [d for d in kinds(objects, "Deployment") if d["metadata"]["name"] == pdb["metadata"]["name"]]
        assert pdb["spec"]["selector"]["matchLabels"] == target["spec"]["selector"]["matchLabels"]


def test_network_policies(rendered) -> None:
    broker, services = kinds(rendered["monitoring-on"], "NetworkPolicy")
    assert broker["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "helora-rabbitmq"}
    amqp_rule = broker["spec"]["ingress"][0]
    assert amqp_rule["ports"] == [{"port": 5672, "protocol": "TCP"}]
    assert amqp_rule["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "helora", "app.kubernetes.io/instance": "helora"}
    assert amqp_rule["from"][1] == {"ipBlock": {"cidr": "203.0.113.0/24"}}  # the orchestrator
    for rule in broker["spec"]["ingress"][2:]:
        assert all(p["port"] != 5672 for p in rule["ports"]), "AMQP only for helora and the orchestrator"
    assert services["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert {p["port"] for r in services["spec"]["egress"] for p in r["ports"]} == {5672, 53}
    assert not kinds(rendered["defaults"], "NetworkPolicy")


def test_notes_tell_how_to_connect_the_orchestrator() -> None:
    notes = helmchart.render_notes()
    assert "kubectl -n helora port-forward svc/helora-rabbitmq 5672:5672" in notes
    assert "helora train --broker \"amqp://" in notes and "--namespace helora" in notes
    assert "blocks-20-29: blocks 20-29" in notes


# -- the dashboard -----------------------------------------------------------------------------
def exported_sample_names() -> set[str]:
    """Every sample name the services and the orchestrator really export (hecommon.broker.metrics)."""
    names: set[str] = set()
    registries = []
    for service in ("encoder", "evaluator", "aggregator"):
        registries.append(hm.Metrics(service, registry=CollectorRegistry()).registry)
    registries.append(hm.OrchestratorMetrics(registry=CollectorRegistry()).registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for r in registries:
        for fam in r.collect():
            names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
    return names


def test_dashboard_configmap_is_labelled_and_valid(rendered) -> None:
    (cm,) = [o for o in kinds(rendered["defaults"], "ConfigMap") if "helora.json" in o.get("data", {})]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["helora.json"])
    assert dash == json.loads((helmchart.CHART_DIR / "dashboards" / "helora.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(p["targets"] for p in dash["panels"])
    known = exported_sample_names()
    used = {m for e in exprs for m in re.findall(r"\bhelora_[a-z_]+", e)}
    assert used and used <= known, f"not exported by any service: {sorted(used - known)}"
    text = " ".join(exprs)
    for needed in ("helora_tokens_total", "helora_requests_total", "helora_stage_seconds_bucket",
                   "helora_bytes_total", "rabbitmq_queue_messages_ready", "helora_dead_lettered_total",
                   "helora_failures_total", "helora_he_product_seconds_bucket", "DCGM_FI_DEV_GPU_UTIL",
                   "kube_deployment_status_replicas_available"):
        assert needed in text, needed
    assert "helora_orchestrator_" not in text  # the owner's run (its loss) is not the cluster's to read
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.95," in text
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "group"}


# -- k8s/ and the docs agree with the chart ------------------------------------------------------
def test_broker_config_matches_the_services() -> None:
    """The RabbitmqCluster's max_message_size equals what the services split below (the chart's
    default and hecommon's), and queues default to quorum."""
    (cluster,) = chart_check.k8s_objects()["rabbitmq-cluster.yaml"]
    conf = dict(line.split(" = ", 1) for line in cluster["spec"]["rabbitmq"]["additionalConfig"].splitlines()
                if " = " in line and not line.lstrip().startswith("#"))
    chart_default = helmchart.render_templates()["helora/templates/configmap.yaml"]
    assert int(conf["max_message_size"]) == wire.MAX_MESSAGE_BYTES
    assert int(conf["max_message_size"]) == yaml.safe_load((helmchart.CHART_DIR / "values.yaml").read_text())[
        "broker"]["maxMessageBytes"]
    assert conf["default_queue_type"] == "quorum"
    assert cluster["metadata"]["name"] == "helora-rabbitmq" and 'brokerHost: "helora-rabbitmq"' in chart_default


def test_keda_example_matches_what_the_chart_renders(rendered) -> None:
    example = {o["kind"]: o for o in chart_check.k8s_objects()["keda-rabbitmq-trigger.yaml"]}
    trigger = example["ScaledObject"]["spec"]["triggers"][0]
    (target,) = [d for d in kinds(rendered["defaults"], "Deployment")
                 if d["metadata"]["name"] == example["ScaledObject"]["spec"]["scaleTargetRef"]["name"]]
    assert trigger["metadata"]["queueName"] == target["metadata"]["annotations"]["helora.dev/queue"]
    assert trigger["metadata"]["protocol"] == "http"
    assert trigger["authenticationRef"]["name"] == example["TriggerAuthentication"]["metadata"]["name"]


def test_status_role_is_read_only_and_covers_what_helora_status_lists() -> None:
    roles = {o["metadata"]["name"]: o for o in chart_check.k8s_objects()["rbac.yaml"] if o["kind"] == "Role"}
    rules = roles["helora-status"]["rules"]
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert {("pods", "list"), ("services", "list"), ("configmaps", "list"), ("deployments", "list")} <= granted
    assert {v for _, v in granted} <= {"get", "list", "watch"}
    assert not any(r == "secrets" for r, _ in granted)
    (creds,) = [r for r in roles["helora-broker-credentials"]["rules"] if "secrets" in r["resources"]]
    assert creds["resourceNames"] == ["helora-rabbitmq-default-user"] and creds["verbs"] == ["get"]


def test_the_readme_values_example_installs(tmp_path) -> None:
    """The values file in k8s/README.md renders, validates and covers the model."""
    text = (ROOT / "k8s" / "README.md").read_text()
    block = re.search(r"```yaml\n# my-values.yaml\n(.*?)```", text, re.S)
    assert block, "k8s/README.md lost its values example"
    path = tmp_path / "my-values.yaml"
    path.write_text(block[1])
    objects = helmchart.render([path])
    assert chart_check.check_objects("README example", objects) == []
    assert helmchart.lint([path]) == []
    images = {c["image"] for _, c in containers(objects)}
    assert "registry.example.com/helora/evaluator:0.1.0" in images

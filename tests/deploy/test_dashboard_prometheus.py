"""Every panel of the Grafana dashboard (charts/helora/dashboards/helora.json) returns data from a
real Prometheus that scraped helora during a short training run on this machine.

The run: encoder (tiny model), two evaluator layer groups (blocks 0 and 1), aggregator, as
subprocesses on the real RabbitMQ under a namespace unique to this run, and ``helora train
--model tiny --broker … --metrics-port P`` through them; one malformed request to block 0's
evaluator afterwards gives the failure and dead-letter panels something to count. Prometheus is the
Debian package ``prometheus`` (.ci/run installs it), scraping every second:

- the services as the chart's ServiceMonitor does (its path and ``honorLabels``, read from the
  rendered chart; target labels ``namespace``, ``pod``, ``service``), so a query that needs the
  metric's own ``service`` label or the pod's ``namespace`` label is checked with the labels it
  will have on a cluster;
- the orchestrator's endpoint (on the data owner's machine in real use);
- RabbitMQ's own plugin on :15692, path ``/metrics/per-object`` (what
  ``prometheus.return_per_object_metrics = true`` in k8s/rabbitmq-cluster.yaml makes ``/metrics``;
  without that setting the test scrapes the plain ``/metrics`` and the queue panels fail);
- a STAND-IN for two cluster exporters, tests/deploy/data/cluster_exporters.prom served from this
  test: DCGM's ``DCGM_FI_DEV_GPU_UTIL`` and kube-state-metrics'
  ``kube_deployment_status_replicas_available``. No GPU and no cluster exist here, so the panels on
  those two families (GPU utilisation, the Deployment half of Replicas) are checked for their
  names and labels only, against fixed made-up values; ``test_only_cluster_exporters_are_stood_in``
  keeps that list to exactly those two families.

Each panel query is evaluated like Grafana over the time range of the run (``/api/v1/query_range``,
step 1 s, ``$__rate_interval`` = 4 s: max(interval + scrape, 4 × scrape)), with the template
variables set to the values their own queries return.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from listen_ports import free_listen_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "helora" / "dashboards" / "helora.json"
#: the data owner's dashboard (orchestrator metrics, loss included): for the owner's own Prometheus
OWNER_DASHBOARD = ROOT / "docs" / "grafana" / "helora-owner.json"
STAND_IN = Path(__file__).parent / "data" / "cluster_exporters.prom"
BROKER_URL = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RABBITMQ_PROMETHEUS = ("127.0.0.1", 15692)
K8S_NAMESPACE = "helora"  # the Kubernetes namespace label the ServiceMonitor would attach
SCRAPE_S = 1
RATE_INTERVAL = "4s"
#: the metric families served by the stand-in, and nothing else
STOOD_IN = ("DCGM_FI_DEV_GPU_UTIL", "kube_deployment_status_replicas_available")
#: evaluator layer groups of the run: name → blocks of the tiny model (2 blocks)
GROUPS = {"blocks-0": "0", "blocks-1": "1"}
STEPS = 4
METRICS_LINE = re.compile(rb"metrics on http://[^:/\s]+:(\d+)/metrics")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _http(url: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


# -- the dashboard -----------------------------------------------------------------------------
def dashboard_queries(paths: tuple[Path, ...] = (DASHBOARD, OWNER_DASHBOARD)) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included, of both dashboards."""
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    out = []
    for path in paths:
        board = json.loads(path.read_text())
        out += [(p.get("title", "?"), t["expr"]) for p in walk(board["panels"]) for t in p.get("targets", [])
                if t.get("expr")]
    return out


def test_the_cluster_dashboard_reads_nothing_of_the_data_owner():
    """The loss (and the rest of the orchestrator's metrics) stays with the owner (DESIGN §7)."""
    cluster = dashboard_queries((DASHBOARD,))
    assert cluster and not [e for _, e in cluster if "helora_orchestrator_" in e]
    owner = dashboard_queries((OWNER_DASHBOARD,))
    assert any("helora_orchestrator_loss" in e for _, e in owner)


def dashboard_variables() -> list[tuple[str, str]]:
    """(name, label_values(...) query) of every query variable, in order (later ones use earlier)."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for v in board.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query") or v.get("definition")
            out.append((v["name"], q))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    left = re.findall(r"\$\{?\w+", expr)
    assert not left, f"unknown dashboard variable(s) {left} in {expr}"
    return expr


# -- Prometheus --------------------------------------------------------------------------------
@dataclass
class Prometheus:
    binary: str
    workdir: Path
    port: int = field(default_factory=free_listen_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict) -> None:
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        check = subprocess.run(["promtool", "check", "config", str(self.workdir / "prometheus.yml")],
                               capture_output=True, text=True) if shutil.which("promtool") else None
        assert check is None or check.returncode == 0, check.stdout + check.stderr
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while _http(self.url + "/-/ready", 2)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"prometheus did not become ready\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> dict:
        status, body = _http(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}", 30)
        reply = json.loads(body or b"{}")
        assert status == 200 and reply.get("status") == "success", f"{path} {params}: HTTP {status} {reply}"
        return reply["data"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{SCRAPE_S}s")["result"]

    def label_values(self, query: str, start: float, end: float) -> list[str]:
        """Grafana's ``label_values(SELECTOR, LABEL)``: /api/v1/label/LABEL/values?match[]=SELECTOR."""
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
        assert m, f"not a label_values(...) query: {query}"
        return self.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1), "start": f"{start:.3f}",
                                                          "end": f"{end:.3f}"})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _StandIn(BaseHTTPRequestHandler):
    """Serves tests/deploy/data/cluster_exporters.prom at /metrics."""

    def do_GET(self):  # noqa: N802
        body = STAND_IN.read_bytes()
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


# -- the helora processes ----------------------------------------------------------------------
@dataclass
class Run:
    namespace: str
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    start_s: float = 0.0
    end_s: float = 0.0
    prometheus: Prometheus | None = None
    variables: dict[str, str] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def service(self, name: str, module: str, *args: str) -> None:
        self.ports[name] = free_listen_port()
        self.spawn(name, [sys.executable, "-m", module, "--broker", BROKER_URL, "--namespace", self.namespace,
                          "--metrics-port", str(self.ports[name]), "--metrics-host", "127.0.0.1", *args])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Every service answers /readyz with 200: weights or manifest loaded, consuming."""
        end = time.monotonic() + timeout_s
        waiting = set(self.ports) - {"orchestrator"}
        while waiting:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            assert not dead, f"services exited: {dead}\n{self.logs()}"
            waiting = {n for n in waiting if _http(f"http://127.0.0.1:{self.ports[n]}/readyz", 2)[0] != 200}
            if waiting and time.monotonic() > end:
                raise AssertionError(f"not ready within {timeout_s} s: {sorted(waiting)}\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes

    def delete_topology(self) -> None:
        import pika
        from hecommon.broker.topology import Topology

        topo = Topology(self.namespace)
        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        try:
            topo.delete(conn.channel(), [topo.evaluator_queue(b, 0, 1) for b in GROUPS.values()])
        finally:
            conn.close()


def chart_scrape_endpoint() -> dict:
    """The endpoint of the chart's ServiceMonitor (monitoring switched on): path, honorLabels."""
    import helmchart  # tools/, on sys.path through tests/deploy/conftest.py

    objects = helmchart.render(values_files=[ROOT / "charts" / "helora" / "ci" / "monitoring-on.yaml"])
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1, [o["metadata"]["name"] for o in monitors]
    return monitors[0]["spec"]["endpoints"][0]


def rabbitmq_path() -> str:
    """What k8s/ makes Prometheus read from the broker. With ``prometheus.return_per_object_metrics
    = true`` its ``/metrics`` is what ``/metrics/per-object`` serves by default, so that path stands
    in here (the shared test broker's configuration is left alone)."""
    monitor = yaml.safe_load((ROOT / "k8s" / "rabbitmq-servicemonitor.yaml").read_text())
    path = monitor["spec"]["endpoints"][0].get("path", "/metrics")
    per_object = re.search(r"^\s*prometheus\.return_per_object_metrics\s*=\s*true\s*$",
                           (ROOT / "k8s" / "rabbitmq-cluster.yaml").read_text(), re.MULTILINE)
    return "/metrics/per-object" if path == "/metrics" and per_object else path


def scrape_config(run: Run, stand_in_port: int) -> dict:
    """Jobs as a cluster's Prometheus would have them (see the module docstring): the helora job
    takes its path and honor_labels from the chart's ServiceMonitor, the broker's from k8s/."""
    endpoint = chart_scrape_endpoint()
    services = [{"targets": [f"127.0.0.1:{run.ports[name]}"],
                 "labels": {"namespace": K8S_NAMESPACE, "service": "helora-metrics", "endpoint": "metrics",
                            "pod": f"helora-{name}-0", "container": name.rstrip("01")}}
                for name in sorted(run.ports) if name != "orchestrator"]
    return {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                   "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {"job_name": "helora-metrics", "honor_labels": bool(endpoint.get("honorLabels", False)),
             "metrics_path": endpoint.get("path", "/metrics"), "static_configs": services},
            {"job_name": "helora-orchestrator", "static_configs": [{"targets": [f"127.0.0.1:{run.ports['orchestrator']}"]}]},
            {"job_name": "rabbitmq", "metrics_path": rabbitmq_path(),
             "static_configs": [{"targets": ["{}:{}".format(*RABBITMQ_PROMETHEUS)]}]},
            {"job_name": "cluster-exporters-stand-in", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{stand_in_port}"]}]},
        ],
    }


def _publish_malformed(namespace: str) -> None:
    """One malformed request to block 0's evaluator, the requests' entry point: it dead-letters it
    (reason malformed)."""
    import pika
    from hecommon.broker.topology import Topology

    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        t = Topology(namespace)
        ch.basic_publish(t.requests, t.routing_key("0.qkv", 0, 1), b"\xc1 not msgpack",
                         pika.BasicProperties(correlation_id="dashboard-test"), mandatory=True)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: apt-get install -y prometheus (the Debian package; .ci/run does it)")
    if not _answers("127.0.0.1", 5672):
        pytest.skip("no RabbitMQ broker on 127.0.0.1:5672 (start it with: rabbitmq-server -detached)")
    if not _answers(*RABBITMQ_PROMETHEUS):
        pytest.fail("RabbitMQ's Prometheus endpoint :15692 does not answer: rabbitmq-plugins enable rabbitmq_prometheus "
                    "(.ci/run does it)")
    root = tmp_path_factory.mktemp("dashboard")
    r = Run(f"helora-dash-{secrets.token_hex(4)}", root)
    stand_in = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    prom = Prometheus(binary, root)
    try:
        r.service("encoder", "helora_encoder.worker", "--model", "tiny", "--seed", "0", "--shard-dir", str(root / "shards"))
        for i, (group, blocks) in enumerate(GROUPS.items()):
            r.service(f"evaluator{i}", "helora_evaluator.worker", "--blocks", blocks, "--group", group, "--shard", "0/1",
                      "--shard-dir", str(root / "shards"), "--backend", "numpy", "--wait-shards-s", "120")
        r.service("aggregator", "helora_aggregator.worker")
        r.ports["orchestrator"] = free_listen_port()
        prom.start(scrape_config(r, stand_in.server_address[1]))
        r.prometheus = prom
        r.wait_ready()
        r.start_s = time.time()
        r.spawn("orchestrator", [sys.executable, "-m", "helora_orchestrator.cli", "train", "--model", "tiny",
                                 "--broker", BROKER_URL, "--namespace", r.namespace, "--steps", str(STEPS),
                                 "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--eval-batches", "1",
                                 "--out", str(root / "out"), "--no-progress",
                                 "--metrics-port", str(r.ports["orchestrator"]), "--metrics-host", "127.0.0.1"])
        try:
            code = r.procs["orchestrator"].wait(300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"helora train did not finish within 300 s\n{r.logs()}") from None
        assert code == 0, f"helora train exited {code}\n{r.logs()}"
        _publish_malformed(r.namespace)
        time.sleep(6 * SCRAPE_S)  # the dead letter is counted and scraped; rate windows close
        r.end_s = time.time()
        for name, query in dashboard_variables():
            values = prom.label_values(substitute(query, r.variables), r.start_s, r.end_s)
            assert values, f"dashboard variable ${name}: {query} has no values\n{prom.log()}"
            r.variables[name] = "(" + "|".join(map(_regex_escape, values)) + ")"  # Grafana's multi-value form
        yield r
    finally:
        prom.stop()
        stand_in.shutdown()
        stand_in.server_close()
        codes = r.stop()
        try:
            r.delete_topology()
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the test's own failure
            print(f"could not delete the test topology {r.namespace}: {exc}", file=sys.stderr)
    services = {n: c for n, c in codes.items() if n != "orchestrator"}
    assert all(c == 0 for c in services.values()), f"unclean shutdown {services}\n{r.logs()}"


def _regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a PromQL regex string (a doubled backslash)."""
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\\\1", value)


def _finite_values(result: list[dict]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"] if math.isfinite(float(v))]


# -- the tests ---------------------------------------------------------------------------------
def test_every_target_was_scraped(run):
    up = run.prometheus.query_range("up", run.start_s, run.end_s)
    seen = {(s["metric"]["job"], s["metric"].get("pod", "")) for s in up if 1.0 in map(lambda v: float(v[1]), s["values"])}
    jobs = {job for job, _ in seen}
    assert jobs == {"helora-metrics", "helora-orchestrator", "rabbitmq", "cluster-exporters-stand-in"}, seen
    assert {pod for job, pod in seen if job == "helora-metrics"} == \
        {f"helora-{n}-0" for n in run.ports if n != "orchestrator"}


def test_template_variables(run):
    assert run.variables["namespace"] == f"({K8S_NAMESPACE})"
    groups = set(run.variables["group"].strip("()").split("|"))
    assert {_regex_escape(g) for g in GROUPS} <= groups, groups


@pytest.mark.parametrize(("title", "expr"), dashboard_queries(), ids=[f"{t}: {e[:50]}" for t, e in dashboard_queries()])
def test_panel_returns_data(run, title, expr):
    query = substitute(expr, run.variables)
    result = run.prometheus.query_range(query, run.start_s, run.end_s)
    assert result, f"panel {title!r}: no series for {query}"
    assert _finite_values(result), f"panel {title!r}: only NaN for {query}: {result[:2]}"


#: panels whose values must move during the run: (title, a regex the expression must match)
ACTIVE = [("Tokens/s per layer group", "helora_tokens_total"), ("Requests/s per layer group", "helora_requests_total"),
          ("Latency p95 per stage", "helora_stage_seconds"), ("HE product time per layer group", "helora_he_product"),
          ("Bytes/s in and out", "helora_bytes_total"), ("Failures by reason", "helora_failures_total"),
          ("Dead-lettered messages", "helora_dead_lettered_total"),
          ("Orchestrator tokens/s", "tokens"),
          ("Orchestrator loss", "loss"), ("Orchestrator round trip p95", "request_seconds")]


@pytest.mark.parametrize(("title", "metric"), ACTIVE)
def test_activity_shows_on_the_panel(run, title, metric):
    """The run is visible: a positive value at some point (rates of counters, quantiles of latencies)."""
    exprs = [e for t, e in dashboard_queries() if t == title and re.search(metric, e)]
    assert exprs, f"no panel {title!r} with a query on {metric}"
    for expr in exprs:
        values = _finite_values(run.prometheus.query_range(substitute(expr, run.variables), run.start_s, run.end_s))
        assert values and max(values) > 0, f"panel {title!r}: {expr} never above 0: {values[:10]}"


def test_per_group_panels_split_by_the_runs_groups(run):
    expr = next(e for t, e in dashboard_queries() if t == "Tokens/s per layer group")
    result = run.prometheus.query_range(substitute(expr, run.variables), run.start_s, run.end_s)
    assert {s["metric"].get("group") for s in result} >= set(GROUPS)


def test_queue_depth_shows_this_runs_queues(run):
    for expr in (e for t, e in dashboard_queries() if "rabbitmq_queue_messages" in e):
        result = run.prometheus.query_range(substitute(expr, run.variables), run.start_s, run.end_s)
        queues = {s["metric"].get("queue", "") for s in result}
        assert any(q.startswith(run.namespace + ".") for q in queues), f"{expr}: no queue of {run.namespace}"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, matchers, ranges, grouping clauses and
    function names taken out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group() in {"and", "or", "unless", "bool", "offset"}:
            continue  # a function or an operator
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # the exponent or suffix of a number
        names.add(m.group())
    return names


def test_metric_names_parser():
    assert metric_names('histogram_quantile(0.95, sum by (le, stage) (rate(helora_stage_seconds_bucket'
                        '{namespace=~"$namespace"}[$__rate_interval])))') == {"helora_stage_seconds_bucket"}
    assert metric_names("helora_orchestrator_loss") == {"helora_orchestrator_loss"}
    assert metric_names("sum(rate(a_total[1m])) * 60 / on (x) b") == {"a_total", "b"}


def test_only_cluster_exporters_are_stood_in():
    """Every metric a panel reads is exported by helora, RabbitMQ, or one of the two stood-in families."""
    names = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    others = names - set(STOOD_IN)
    assert others and all(n.startswith(("helora_", "rabbitmq_")) for n in others), sorted(others)
    served = {line.split("{")[0] for line in STAND_IN.read_text().splitlines() if line and not line.startswith("#")}
    assert served == set(STOOD_IN)

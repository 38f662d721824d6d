#!/usr/bin/env python3
"""Build helora's images with podman, without a registry (issue 19).

    tools/images.py build [TARGET ...]   # default: the CPU images (encoder, evaluator-cpu, aggregator)
    tools/images.py build evaluator      # the GPU evaluator (CUDA from the PyPI wheels of torch and cupy)
    tools/images.py clean                # every container, image and layer of this work directory
    tools/images.py env                  # the environment that points podman at this work directory

Everything lives in one work directory (default ``out/images``, or ``$HELORA_IMAGES_DIR``): podman's
storage (``CONTAINERS_STORAGE_CONF``), its settings (``docker/podman/containers.conf`` plus this
directory's ``tmp_dir`` and volume path, through ``CONTAINERS_CONF``), the base image's tarball.
``clean`` removes all of it (only a directory this tool made: it carries a marker file), and
nothing of the host's own podman (storage, ``/run/libpod``, networks) is touched.

The base image is made here, with no registry: ``mmdebstrap --variant=minbase`` of Debian bookworm
with python3 and a virtualenv first on PATH (Debian's Python refuses system-wide pip installs),
imported as ``localhost/helora-base:bookworm``. docker/Dockerfile takes it through its build
argument PYTHON_BASE; nothing else differs from a production build from python:3.11-slim.

pip inside a build uses the host's pip settings (``pip config list``): the CA bundle (HTTPS goes
through a proxy only the host's bundle trusts), ``find-links`` directories (where the CPU build of
torch lies) and http(s) indexes. They reach the build as read-only bind mounts under
``/opt/helora-pip`` plus a pip configuration mounted over ``/etc/pip.conf``; the base image carries
both mount points empty, so no layer holds anything of them (the image smoke test checks it).
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONTAINERS_CONF = ROOT / "docker" / "podman" / "containers.conf"
CPU_TARGETS = ("encoder", "evaluator-cpu", "aggregator")
GPU_TARGET = "evaluator"
BASE = "localhost/helora-base:bookworm"
#: inside the base image: the empty mount points of the host's pip settings during a build
PIP_MOUNT = "/opt/helora-pip"
PIP_CONF = "/etc/pip.conf"
BASE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: written into a work directory when it is made: ``clean`` removes no directory without it
MARKER = ".helora-images"
#: the namespace prefix of the image smoke test's queues (tests/images)
SMOKE_PREFIX = "helora-img-"
#: host commands the builds need, each from the Debian package of the same name
HOST_TOOLS = ("podman", "runc", "mmdebstrap")
#: pip settings carried into a build; the rest (constraints, caches) stay on the host
PIP_KEYS = ("cert", "find-links", "index-url", "extra-index-url", "timeout", "default-timeout", "retries")


class ImageError(RuntimeError):
    """A build or podman step failed; the message says which and why."""


def app_version() -> str:
    for line in (ROOT / "charts" / "helora" / "Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise ImageError("charts/helora/Chart.yaml has no appVersion")


def image_name(target: str, tag: str | None = None) -> str:
    """The chart's reference with its default repository "helora": ``helora/<target>:<appVersion>``."""
    return f"localhost/helora/{target}:{tag or app_version()}"


@dataclass(frozen=True)
class Podman:
    """podman pointed at one work directory's storage and at docker/podman/containers.conf."""

    workdir: Path

    @classmethod
    def default(cls) -> Podman:
        return cls(Path(os.environ.get("HELORA_IMAGES_DIR", ROOT / "out" / "images")).resolve())

    @property
    def storage_conf(self) -> Path:
        return self.workdir / "storage.conf"

    @property
    def containers_conf(self) -> Path:
        return self.workdir / "containers.conf"

    def env(self) -> dict[str, str]:
        if not self.storage_conf.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / MARKER).touch()
            self.storage_conf.write_text(
                "[storage]\ndriver = \"overlay\"\n"
                f"graphroot = \"{self.workdir / 'storage'}\"\nrunroot = \"{self.workdir / 'run'}\"\n")
            # docker/podman/containers.conf, with podman's own state here too (root's default,
            # /run/libpod, is the host's podman's: nothing of this work directory may touch it)
            self.containers_conf.write_text(CONTAINERS_CONF.read_text().replace(
                "[engine]\n", f"[engine]\ntmp_dir = \"{self.workdir / 'tmp'}\"\n"
                f"volume_path = \"{self.workdir / 'volumes'}\"\n", 1))
        return {**os.environ, "CONTAINERS_CONF": str(self.containers_conf),
                "CONTAINERS_STORAGE_CONF": str(self.storage_conf)}

    def __call__(self, *args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", *args], env=self.env(), text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
        if check and done.returncode != 0:
            tail = f":\n{done.stdout[-4000:]}" if capture and done.stdout else ""
            raise ImageError(f"podman {shlex.join(args[:3])} … exited {done.returncode}{tail}")
        return done

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0


def require_host_tools() -> None:
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(f"missing: {', '.join(missing)} (tools/image-deps.sh installs them: "
                         f"apt-get install -y {' '.join(missing)})")


def make_base(podman: Podman) -> None:
    """Debian bookworm minbase with python3 and /opt/venv, imported as BASE (skipped when present)."""
    if podman.exists(BASE):
        return
    tarball = podman.workdir / "base.tar"
    hook = (f'chroot "$1" python3 -m venv /opt/venv && mkdir -p "$1{PIP_MOUNT}" && : > "$1{PIP_CONF}"')
    print(f"images: {BASE}: mmdebstrap bookworm (minbase, python3, python3-venv)", flush=True)
    t0 = time.monotonic()
    done = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv",
                           f"--customize-hook={hook}", "bookworm", str(tarball)])
    if done.returncode != 0:
        raise ImageError(f"mmdebstrap exited {done.returncode}")
    podman("import", "--change", f"ENV PATH={BASE_PATH}", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE,
           capture=True)
    tarball.unlink()
    print(f"images: {BASE} in {time.monotonic() - t0:.0f} s", flush=True)


def pip_settings() -> dict[str, list[str]]:
    """The host's pip install settings by key, from ``pip config list`` (``section.key=repr(value)``).

    Sections ``global`` and ``install`` count, and ``:env:`` (PIP_* variables) above them; values
    are whitespace-separated lists (pip's multi-line values included)."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageError(f"pip config list exited {done.returncode}: {done.stderr.strip()[-1000:]}")
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, list[str]]] = {}
    for line in done.stdout.splitlines():
        name, sep, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or key not in PIP_KEYS:
            continue
        if section not in rank:
            print(f"images: pip setting {name} left out of the build (section {section!r})", flush=True)
            continue
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise ImageError(f"pip config list: cannot read {line!r}") from None
        if key not in found or rank[section] >= found[key][0]:
            found[key] = (rank[section], str(value).split())
    return {key: values for key, (_, values) in found.items()}


def pip_mounts(settings: dict[str, list[str]], staging: Path) -> list[str]:
    """``-v`` arguments for a build, and ``staging/pip.conf`` naming the mounted paths.

    Paths go under PIP_MOUNT (staging itself, mounted there read-only, holds their mount points);
    file:// indexes are left out (their relative links need their whole tree), http(s) ones kept."""
    mounts = ["-v", f"{staging}:{PIP_MOUNT}:ro", "-v", f"{staging / 'pip.conf'}:{PIP_CONF}:ro"]
    conf: dict[str, list[str]] = {}
    for key, values in settings.items():
        for i, value in enumerate(values):
            if key == "cert":
                (staging / "cert.pem").touch()
                mounts += ["-v", f"{value}:{PIP_MOUNT}/cert.pem:ro"]
                conf[key] = [f"{PIP_MOUNT}/cert.pem"]
            elif key == "find-links" and Path(value.removeprefix("file://")).is_dir():
                value = value.removeprefix("file://")
                (staging / f"links{i}").mkdir()
                mounts += ["-v", f"{value}:{PIP_MOUNT}/links{i}:ro"]
                conf.setdefault(key, []).append(f"{PIP_MOUNT}/links{i}")
            elif key.endswith("index-url") or key == "find-links":
                if value.startswith(("http://", "https://")):
                    conf.setdefault(key, []).append(value)
                else:
                    print(f"images: pip {key} {value} left out of the build (not a directory or http(s))",
                          flush=True)
            else:
                conf[key] = [value]
    (staging / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {' '.join(v)}\n" for k, v in conf.items()))
    return mounts


def build(podman: Podman, target: str, tag: str | None = None, context: Path = ROOT, capture: bool = False) -> float:
    """One Dockerfile target FROM the local base; seconds taken. The build's output (pip's included)
    goes to this process's output, or with ``capture`` into the ImageError of a failed build."""
    if target not in (*CPU_TARGETS, GPU_TARGET):
        raise ImageError(f"unknown target {target!r} (one of {', '.join((*CPU_TARGETS, GPU_TARGET))})")
    make_base(podman)
    t0 = time.monotonic()
    settings = pip_settings()
    if target == GPU_TARGET:  # find-links may hold torch's CPU build, whose "+cpu" satisfies torch==X too
        settings.pop("find-links", None)
    with tempfile.TemporaryDirectory(prefix="helora-pip-") as staging:
        mounts = pip_mounts(settings, Path(staging))
        podman("build", "--format", "docker", "--network", "host", "--layers", *mounts,
               "--build-arg", f"PYTHON_BASE={BASE}", "-f", str(context / DOCKERFILE.relative_to(ROOT)),
               "--target", target, "-t", image_name(target, tag), str(context), capture=capture)
    seconds = time.monotonic() - t0
    size = podman("image", "inspect", "--format", "{{.Size}}", image_name(target, tag), capture=True).stdout
    print(f"images: {image_name(target, tag)} built in {seconds:.0f} s, {int(size) / 1e6:.0f} MB", flush=True)
    return seconds


#: run inside the GPU image after its build: the CUDA runtime is the wheels', not a base image's
GPU_CHECK = """
import cupy, torch
from cuda.pathfinder import load_nvidia_dynamic_lib
libs = {name: load_nvidia_dynamic_lib(name).abs_path for name in ("cudart", "cublas", "nvrtc")}
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cupy {cupy.__version__} "
      f"(CUDA runtime {cupy.cuda.get_local_runtime_version()}), libraries from the wheels: {libs}")
"""


def check_no_host_settings(podman: Podman, image: str) -> None:
    """The build's mount points, empty in the base image, are empty in ``image``, and pip inside it
    knows no certificate, find-links or index of the host's."""
    script = (f'test ! -s {PIP_CONF} && test -z "$(ls -A {PIP_MOUNT})" '
              "&& ! pip config list | grep -E 'cert|find-links|index-url'")
    done = podman("run", "--rm", "--network", "none", "--no-healthcheck", "--entrypoint", "/bin/sh", image,
                  "-c", script, check=False, capture=True)
    if done.returncode != 0:
        raise ImageError(f"{image} holds the host's pip settings: {done.stdout[-2000:]}")


def check_gpu(podman: Podman, tag: str | None = None) -> None:
    """``import cupy, torch`` and ``helora-evaluator --help`` inside the GPU image (no device needed)."""
    image = image_name(GPU_TARGET, tag)
    print(podman("run", "--rm", "--network", "none", "--no-healthcheck", "--entrypoint", "python", image,
                 "-c", GPU_CHECK, capture=True).stdout.strip().splitlines()[-1], flush=True)
    usage = podman("run", "--rm", "--network", "none", "--no-healthcheck", image, "--help", capture=True).stdout
    if "usage: helora-evaluator" not in usage:
        raise ImageError(f"{image}: helora-evaluator --help printed no usage:\n{usage[-2000:]}")
    check_no_host_settings(podman, image)
    print(f"images: {image}: import cupy, torch and helora-evaluator --help work; no host pip settings in it",
          flush=True)


def clean(podman: Podman) -> None:
    """Every container, image and layer in the work directory, then the directory itself; and what
    a smoke test that was cut short left on the local broker (``helora-img-*`` queues, exchanges)."""
    if podman.workdir.exists():
        if not (podman.workdir / MARKER).is_file():
            raise ImageError(f"{podman.workdir} was not made by tools/images.py ({MARKER} is missing): not removed")
        if shutil.which("podman"):
            podman("rm", "--all", "--force", "--time", "0", check=False, capture=True)
            podman("rmi", "--all", "--force", check=False, capture=True)
        shutil.rmtree(podman.workdir)
        print(f"images: removed {podman.workdir}", flush=True)
    left = smoke_queues()
    if left:
        delete_namespaces(left)
        print(f"images: removed {len(left)} queue(s) named {SMOKE_PREFIX}* and their exchanges from the broker",
              flush=True)


def smoke_queues() -> list[str]:
    """The smoke test's queues on the local broker (``rabbitmqctl``; none without it)."""
    if not shutil.which("rabbitmqctl"):
        return []
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True)
    return [q for q in listed.stdout.split() if q.startswith(SMOKE_PREFIX)] if listed.returncode == 0 else []


def delete_namespaces(queues: list[str]) -> None:
    """Each namespace's exchanges and the given queues (``Topology.delete``, over AMQP)."""
    import pika
    from hecommon.broker.topology import Topology

    url = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for ns in sorted({q.split(".", 1)[0] for q in queues}):
            t = Topology(ns)
            t.delete(conn.channel(), [q for q in queues if q.split(".", 1)[0] == ns
                                      and q not in (t.manifest, t.partials, t.dead)])
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/images.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build images FROM the local base")
    b.add_argument("targets", nargs="*", default=list(CPU_TARGETS), metavar="TARGET")
    b.add_argument("--tag", default=None, help="image tag (default: the chart's appVersion)")
    sub.add_parser("clean", help="remove every container, image and layer of the work directory")
    sub.add_parser("env", help="print the variables that point podman at the work directory")
    args = p.parse_args(argv)
    podman = Podman.default()
    try:
        if args.command == "env":
            env = podman.env()
            for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
                print(f"export {key}={shlex.quote(env[key])}")
        elif args.command == "clean":
            clean(podman)
        else:
            require_host_tools()
            total = sum(build(podman, t, args.tag) for t in args.targets)
            print(f"images: {len(args.targets)} built in {total:.0f} s", flush=True)
            if GPU_TARGET in args.targets:
                check_gpu(podman, args.tag)
    except ImageError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

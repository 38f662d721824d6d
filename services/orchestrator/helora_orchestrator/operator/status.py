"""``helora status``: a helora release on a Kubernetes cluster, seen from the data owner's machine.

Shows the release's pods (component, evaluator group, blocks, shard, readiness, GPUs), which
decoder blocks of the model have a ready evaluator for every shard and which do not, and the
broker endpoint the orchestrator connects to (DESIGN §6).

``summarize(pods, services, config)`` is the logic: a pure function over Kubernetes API objects,
either the ``kubernetes`` client's models (``V1Pod``…) or plain dicts in the API's JSON form.
``fetch`` is the thin network part (three list calls); ``render`` prints the table. The chart
(charts/helora) labels every pod ``app.kubernetes.io/instance=<release>`` and
``app.kubernetes.io/component``; evaluator pods carry ``helora.dev/group`` and the annotations
``helora.dev/blocks`` and ``helora.dev/shard`` (read from ``HELORA_BLOCKS`` / ``HELORA_SHARD`` or
``--blocks`` / ``--shard`` when absent); the ConfigMap ``<fullname>-config`` holds the broker host
and ``numBlocks``. Nothing here reads a Secret.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hecommon.broker.topology import parse_blocks
from hecommon.errors import ConfigError

INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
GROUP = "helora.dev/group"
BLOCKS = "helora.dev/blocks"
SHARD = "helora.dev/shard"
#: resource names that are not accelerators; every other extended resource (nvidia.com/gpu,
#: nvidia.com/mig-1g.10gb, amd.com/gpu, …) is shown as a GPU
PLAIN_RESOURCES = ("cpu", "memory", "ephemeral-storage", "hugepages-", "storage")


class StatusError(ConfigError):
    """No kubeconfig, an unreachable cluster, or an API error: one clear line, exit status 2."""


@dataclass(frozen=True)
class PodInfo:
    name: str
    component: str
    ready: bool
    phase: str  # Running, Pending, …, Terminating
    restarts: int
    gpus: tuple[tuple[str, int], ...]  # (resource name, count), from the containers' limits
    group: str | None = None
    blocks: tuple[int, ...] = ()
    shard: tuple[int, int] | None = None  # (i, n)
    node: str | None = None


@dataclass(frozen=True)
class GroupCoverage:
    name: str
    blocks: tuple[int, ...]
    shards: int
    ready_shards: tuple[int, ...]  # shard indices with at least one ready pod

    @property
    def ready(self) -> bool:
        return len(self.ready_shards) == self.shards


@dataclass(frozen=True)
class Status:
    release: str
    namespace: str
    pods: tuple[PodInfo, ...]
    groups: tuple[GroupCoverage, ...]
    num_blocks: int | None  # None: the release's ConfigMap was not found
    covered: tuple[int, ...]  # blocks with a ready evaluator for every shard
    uncovered: tuple[int, ...]
    broker: str | None  # in-cluster endpoint, amqp://host:port/vhost (never credentials)
    broker_service: str | None  # what the cluster says about that Service

    @property
    def healthy(self) -> bool:
        return bool(self.pods) and all(p.ready for p in self.pods) and not self.uncovered and self.num_blocks is not None


# -- API objects → plain dicts ---------------------------------------------------------------------
def as_dict(obj: Any) -> dict:
    """A Kubernetes object in the API's JSON form (camelCase keys), whatever it came as."""
    if isinstance(obj, Mapping):
        return dict(obj)
    from kubernetes.client import ApiClient  # noqa: PLC0415 - only for client model objects

    return ApiClient().sanitize_for_serialization(obj)


def _get(d: Mapping | None, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(d, Mapping) or key not in d or d[key] is None:
            return default
        d = d[key]
    return d


def _flag(container: Mapping, flag: str, env: str) -> str | None:
    """A container's ``--flag VALUE`` / ``--flag=VALUE`` argument, else its ``env`` variable."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    for item in container.get("env") or []:
        if item.get("name") == env and item.get("value") is not None:
            return item["value"]
    return None


def _gpus(containers: Iterable[Mapping]) -> tuple[tuple[str, int], ...]:
    total: dict[str, int] = {}
    for c in containers:
        for name, qty in (_get(c, "resources", "limits") or {}).items():
            if not name.startswith(PLAIN_RESOURCES):
                if not str(qty).isdigit():
                    raise StatusError(f"resource {name}: {qty!r} is not a whole number of devices")
                total[name] = total.get(name, 0) + int(str(qty))
    return tuple(sorted(total.items()))


def _ready(pod: Mapping) -> bool:
    if _get(pod, "metadata", "deletionTimestamp"):
        return False
    conditions = _get(pod, "status", "conditions", default=[])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_info(pod: Any) -> PodInfo:
    p = as_dict(pod)
    meta, spec = p.get("metadata") or {}, p.get("spec") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    containers = spec.get("containers") or []
    component = labels.get(COMPONENT, "?")
    blocks: tuple[int, ...] = ()
    shard = None
    if component == "evaluator":
        main = next((c for c in containers if c.get("name") == "evaluator"), containers[0] if containers else {})
        spec_blocks = notes.get(BLOCKS) or _flag(main, "--blocks", "HELORA_BLOCKS")
        blocks = parse_blocks(spec_blocks) if spec_blocks else ()
        spec_shard = notes.get(SHARD) or _flag(main, "--shard", "HELORA_SHARD") or "0/1"
        i, _, n = spec_shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise StatusError(f"pod {meta.get('name')}: shard {spec_shard!r} is not I/N")
        shard = (int(i), int(n))
    phase = "Terminating" if meta.get("deletionTimestamp") else _get(p, "status", "phase", default="Unknown")
    restarts = sum(int(s.get("restartCount") or 0) for s in _get(p, "status", "containerStatuses", default=[]))
    return PodInfo(meta.get("name", "?"), component, _ready(p), phase, restarts, _gpus(containers),
                   labels.get(GROUP) if component == "evaluator" else None, blocks, shard, spec.get("nodeName"))


# -- the summary -------------------------------------------------------------------------------
def _coverage(pods: list[PodInfo]) -> tuple[GroupCoverage, ...]:
    groups: dict[tuple[str, tuple[int, ...], int], set[int]] = {}
    for p in pods:
        if p.component != "evaluator" or not p.blocks or p.shard is None:
            continue
        key = (p.group or f"blocks-{p.blocks[0]}-{p.blocks[-1]}", p.blocks, p.shard[1])
        ready = groups.setdefault(key, set())
        if p.ready:
            ready.add(p.shard[0])
    return tuple(GroupCoverage(name, blocks, n, tuple(sorted(r)))
                 for (name, blocks, n), r in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def _broker(config: Mapping[str, str] | None, services: list[dict], namespace: str) -> tuple[str | None, str | None]:
    if not config or not config.get("brokerHost"):
        return None, None
    host, port, vhost = config["brokerHost"], config.get("brokerPort", "5672"), config.get("brokerVhost", "/")
    url = f"amqp://{host}:{port}/{quote(vhost, safe='')}"
    name, _, rest = host.partition(".")
    svc_ns = rest.split(".", 1)[0] if rest else namespace
    svc = next((s for s in services if _get(s, "metadata", "name") == name
                and _get(s, "metadata", "namespace", default=namespace) == svc_ns), None)
    if svc is None:
        return url, f"Service {svc_ns}/{name} not found or not readable"
    kind = _get(svc, "spec", "type", default="ClusterIP")
    text = f"Service {svc_ns}/{name}: {kind} {_get(svc, 'spec', 'clusterIP', default='')}".rstrip()
    external = [i.get("ip") or i.get("hostname") for i in _get(svc, "status", "loadBalancer", "ingress", default=[])]
    if kind == "LoadBalancer":
        text += f", external {external[0]}:{port}" if external else ", external address pending"
    return url, text


def summarize(pods: Iterable[Any], services: Iterable[Any] = (), config: Mapping[str, str] | Any | None = None,
              release: str = "helora", namespace: str = "helora") -> Status:
    """The release's state from its pods, the Services (to find the broker's) and the data of its
    ConfigMap ``<fullname>-config`` (a mapping, or the ConfigMap object itself)."""
    order = {"encoder": 0, "evaluator": 1, "aggregator": 2}  # the way a request flows
    infos = sorted((pod_info(p) for p in pods),
                   key=lambda p: (order.get(p.component, 3), p.blocks[:1], p.shard or (0, 0), p.name))
    if config is not None and (not isinstance(config, Mapping) or "data" in config):  # the ConfigMap itself
        config = as_dict(config).get("data") or {}
    num_blocks = int(config["numBlocks"]) if config and str(config.get("numBlocks", "")).isdigit() else None
    groups = _coverage(infos)
    covered = sorted({b for g in groups if g.ready for b in g.blocks})
    universe = range(num_blocks) if num_blocks is not None else sorted({b for g in groups for b in g.blocks})
    uncovered = tuple(b for b in universe if b not in set(covered))
    broker, broker_service = _broker(config, [as_dict(s) for s in services], namespace)
    return Status(release, namespace, tuple(infos), groups, num_blocks, tuple(covered), uncovered, broker,
                  broker_service)


# -- the table ---------------------------------------------------------------------------------
def ranges(blocks: Iterable[int]) -> str:
    """``(0, 1, 2, 5)`` → ``0-2, 5``."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs) or "-"


def render(s: Status) -> str:
    head = ("POD", "COMPONENT", "GROUP", "BLOCKS", "SHARD", "READY", "STATUS", "RESTARTS", "GPUS")
    rows = [head] + [(p.name, p.component, p.group or "-", ranges(p.blocks) if p.blocks else "-",
                      f"{p.shard[0]}/{p.shard[1]}" if p.shard else "-", "yes" if p.ready else "NO", p.phase,
                      str(p.restarts), ", ".join(f"{n}={c}" for n, c in p.gpus) or "-") for p in s.pods]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"release {s.release} in namespace {s.namespace}: {len(s.pods)} pod(s), "
             f"{sum(p.ready for p in s.pods)} ready"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows] if s.pods else \
        [f"no pods with label {INSTANCE}={s.release} (is the release installed in this namespace?)"]
    lines.append("")
    for g in s.groups:
        missing = [f"{i}/{g.shards}" for i in range(g.shards) if i not in g.ready_shards]
        state = "ready" if g.ready else f"NOT READY (no ready pod for shard {', '.join(missing)})"
        lines.append(f"group {g.name}: blocks {ranges(g.blocks)}, {g.shards} shard(s): {state}")
    total = f"{s.num_blocks} blocks" if s.num_blocks is not None else "model size unknown (no ConfigMap)"
    lines.append(f"blocks ({total}): ready {ranges(s.covered)}; without a ready evaluator: {ranges(s.uncovered)}")
    if s.broker:
        lines.append(f"broker: {s.broker} ({s.broker_service}); credentials not shown")
    else:
        lines.append("broker: unknown (the release's ConfigMap was not found)")
    return "\n".join(lines)


# -- the network part --------------------------------------------------------------------------
def _kubeconfig_paths(kubeconfig: str | None) -> list[Path]:
    if kubeconfig:
        return [Path(kubeconfig).expanduser()]
    env = os.environ.get("KUBECONFIG")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p] if env else [Path("~/.kube/config").expanduser()]


def fetch(kubeconfig: str | None, context: str | None, namespace: str | None, release: str,
          timeout_s: float = 10.0) -> tuple[list, list, dict | None, str]:
    """(pods, services, ConfigMap data or None, namespace) of the release; ``StatusError`` on failure."""
    paths = _kubeconfig_paths(kubeconfig)
    if not any(p.is_file() for p in paths):
        raise StatusError(f"no kubeconfig at {', '.join(map(str, paths))}; pass --kubeconfig PATH or set KUBECONFIG")
    import urllib3  # noqa: PLC0415 - the kubernetes client's HTTP library
    from kubernetes import client, config  # noqa: PLC0415 - only `helora status` needs it
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415

    path = str(paths[0]) if kubeconfig else None  # None: the client merges $KUBECONFIG itself
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
        ctx = active if context is None else next((c for c in contexts if c["name"] == context), None)
        if ctx is None:
            raise StatusError(f"--context {context}: not in the kubeconfig (it has {[c['name'] for c in contexts]})")
        api = config.new_client_from_config(config_file=path, context=context)
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        raise StatusError(f"kubeconfig: {exc}") from None
    ns = namespace or _get(ctx, "context", "namespace") or "default"
    core = client.CoreV1Api(api)
    selector = f"{INSTANCE}={release}"
    host = api.configuration.host
    try:
        pods = core.list_namespaced_pod(ns, label_selector=selector, _request_timeout=timeout_s).items
        maps = core.list_namespaced_config_map(ns, label_selector=selector, _request_timeout=timeout_s).items
        data = next((m.data for m in maps if m.metadata and (m.metadata.name or "").endswith("-config")
                     and m.data and "numBlocks" in m.data), None)
        services = list(core.list_namespaced_service(ns, _request_timeout=timeout_s).items)
        broker_ns = data["brokerHost"].split(".")[1] if data and "." in data.get("brokerHost", "") else ns
        if broker_ns != ns:
            try:
                services += core.list_namespaced_service(broker_ns, _request_timeout=timeout_s).items
            except client.ApiException as exc:  # not allowed there: the endpoint is shown without its Service
                if exc.status not in (403, 404):
                    raise
    except client.ApiException as exc:
        raise StatusError(f"the Kubernetes API at {host} answered {exc.status} {exc.reason} "
                          f"(namespace {ns}, context {_get(ctx, 'name')})") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # refused, timed out, TLS: unreachable
        raise StatusError(f"cannot reach the Kubernetes API at {host}: {type(exc).__name__}") from None
    finally:
        api.close()
    return pods, services, data, ns


def add_parser(sub: Any) -> argparse.ArgumentParser:
    s = sub.add_parser("status", help="the release's pods, GPUs, block coverage and broker on a Kubernetes cluster")
    s.add_argument("--kubeconfig", default=None, metavar="PATH", help="default: $KUBECONFIG, else ~/.kube/config")
    s.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    s.add_argument("--namespace", default=None, help="the release's namespace (default: the context's)")
    s.add_argument("--release", default="helora", help="Helm release name (default: helora)")
    s.add_argument("--timeout-s", type=float, default=10.0, help="per API call")
    s.set_defaults(broker=None, mode="encrypted", param_set=None)  # cli.main's checks read these
    return s


def cmd_status(args: argparse.Namespace) -> int:
    """Prints the table; exit 0 when every pod is ready and every block covered, 1 otherwise."""
    if not args.timeout_s > 0:
        raise StatusError("--timeout-s must be positive")
    pods, services, data, ns = fetch(args.kubeconfig, args.context, args.namespace, args.release, args.timeout_s)
    status = summarize(pods, services, data, args.release, ns)
    print(render(status))
    return 0 if status.healthy else 1

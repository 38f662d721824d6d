"""``make chart-check``: lint ``charts/helora``, render it with each values file, and validate every
object offline: built-in kinds with ``kubernetes-validate --strict`` (the Kubernetes OpenAPI
schemas it ships), custom resources against their upstream CRDs (``crd_validate``). The
manifests in ``k8s/`` get the same validation. Exit status 1 on any problem, with each named.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import crd_validate
import helmchart
import kubernetes_validate
import yaml

#: the chart's oldest supported Kubernetes (Chart.yaml kubeVersion) and a current one
K8S_VERSIONS = ("1.27.0", "1.31.0")
K8S_DIR = helmchart.REPO / "k8s"


def validate_object(obj: Mapping[str, Any], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Problems of one object (empty: valid)."""
    if crd_validate.is_custom(obj):
        return crd_validate.validate(obj, strict=True)
    problems = []
    for v in versions:
        try:
            kubernetes_validate.validate(dict(obj), v, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "(root)"
            problems.append(f"k8s {v}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"k8s {v}: {exc.message}; not a custom resource with a CRD either")
    return problems


def name_of(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def check_objects(label: str, objects: list[dict[str, Any]]) -> list[str]:
    out = []
    for obj in objects:
        out += [f"{label}: {name_of(obj)}: {p}" for p in validate_object(obj)]
    return out


def k8s_objects(directory: Path = K8S_DIR) -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(directory.glob("*.yaml"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--values", action="append", type=Path,
                    help="values files to check (default: the chart's defaults and charts/helora/ci/*.yaml)")
    args = ap.parse_args(argv)
    try:
        crd_validate.crds_dir()
    except crd_validate.CrdError as exc:
        print(f"chart-check: {exc}", file=sys.stderr)
        return 1
    cases: list[tuple[str, list[Path]]] = [("defaults", [])] + [
        (p.name, [p]) for p in (args.values or helmchart.CI_VALUES)]
    problems: list[str] = []
    rows = []
    for label, files in cases:
        problems += [f"{label}: lint: {m}" for m in helmchart.lint(files)]
        try:
            objects = helmchart.render(files)
        except helmchart.ChartError as exc:
            problems.append(f"{label}: render: {exc}")
            continue
        found = check_objects(label, objects)
        problems += found
        rows.append((label, len(objects), sum(crd_validate.is_custom(o) for o in objects), "ok" if not found else "FAIL"))
    for name, objects in k8s_objects().items():
        found = check_objects(f"k8s/{name}", objects)
        problems += found
        rows.append((f"k8s/{name}", len(objects), sum(crd_validate.is_custom(o) for o in objects), "ok" if not found else "FAIL"))
    print(f"{'values / manifest':32} {'objects':>7} {'custom':>6}  result   (kubernetes {', '.join(K8S_VERSIONS)}; "
          f"CRDs from {crd_validate.crds_dir()})")
    for label, n, c, result in rows:
        print(f"{label:32} {n:7d} {c:6d}  {result}")
    for p in problems:
        print(f"chart-check: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

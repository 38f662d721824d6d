"""Validate custom resources against their upstream CustomResourceDefinitions.

The CRDs live outside the repository in ``shared/crds`` (``SOURCES.txt`` there names each file's
upstream commit): ``$HELORA_CRDS_DIR``, else ``<repo>/../shared/crds``, else ``/work/shared/crds``.
The KEDA files are Helm templates; their ``{{ … }}`` lines only touch labels and annotations, so
they are dropped before parsing. Each served version's ``openAPIV3Schema`` is checked with
``jsonschema``; ``strict`` adds ``additionalProperties: false`` wherever the API server would
reject (or prune) unknown fields, like ``kubectl apply --validate=strict``.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
FALLBACK = Path("/work/shared/crds")


class CrdError(Exception):
    """The CRD directory is missing or a resource has no CRD."""


def crds_dir() -> Path:
    """Where the upstream CRDs are; a clear error when nowhere."""
    env = os.environ.get("HELORA_CRDS_DIR")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "crds", FALLBACK]
    for d in candidates:
        if (d / "SOURCES.txt").is_file():
            return d
    raise CrdError("upstream CRDs not found: looked in " + ", ".join(map(str, candidates))
                   + " (set HELORA_CRDS_DIR to the directory holding SOURCES.txt and the CRD files)")


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    text = "\n".join(line for line in path.read_text().splitlines() if "{{" not in line)
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
            yield doc


def _strict(schema: Any) -> Any:
    """Unknown fields become errors where the structural schema does not preserve them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def schemas(strict: bool = True, directory: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → openAPIV3Schema for every served version of every CRD found."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    root = Path(directory) if directory else crds_dir()
    for path in sorted(root.glob("*.yaml")):
        for crd in _documents(path):
            spec = crd["spec"]
            for v in spec["versions"]:
                schema = v.get("schema", {}).get("openAPIV3Schema")
                if v.get("served", True) and schema:
                    schema = copy.deepcopy(schema)
                    # metadata is the API server's ObjectMeta: checked by name below, not here
                    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                    out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (
                        _strict(schema) if strict else schema)
    if not out:
        raise CrdError(f"no CustomResourceDefinition in {root}")
    return out


def is_custom(obj: Mapping[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in schemas()


def validate(obj: Mapping[str, Any], strict: bool = True) -> list[str]:
    """Problems of one custom resource (empty: valid), each naming the field path."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    table = schemas(strict)
    if key not in table:
        known = ", ".join(f"{k} {a}" for a, k in sorted(table))
        raise CrdError(f"no CRD for {key[1]} {key[0]} (known: {known})")
    problems = []
    name = (obj.get("metadata") or {}).get("name")
    if not name:
        problems.append("metadata.name: missing")
    validator = jsonschema.Draft7Validator(table[key])
    for err in sorted(validator.iter_errors(dict(obj)), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        problems.append(f"{where}: {err.message}")
    return problems

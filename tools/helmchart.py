"""Render and lint ``charts/helora`` offline with the Helm v4 Go SDK (PyPI ``helm-python-sdk``).

``render`` mirrors ``helm template``: ``values_files`` are merged like ``-f`` (maps deep-merged,
lists replaced), ``set_values`` parsed like ``--set`` (Helm's own parser) into the result, then the
chart's defaults are coalesced under them and ``values.schema.json`` is enforced. The templates'
own checks (``fail``) and schema errors raise ``ChartError`` with Helm's message.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART_DIR = REPO / "charts" / "helora"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*.yaml"))
RELEASE = "helora"
NAMESPACE = "helora"


class ChartError(Exception):
    """The chart refused the values (schema or template check) or failed to render."""


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``helm -f a -f b``: maps merged recursively, everything else (lists too) replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_set(base: Any, parsed: Any) -> Any:
    """``--set`` parses *into* the values: list items are merged by index (``a[1].b=2``)."""
    if isinstance(base, dict) and isinstance(parsed, dict):
        out = dict(base)
        for k, v in parsed.items():
            out[k] = _merge_set(base.get(k), v)
        return out
    if isinstance(base, list) and isinstance(parsed, list):
        out_list = list(base) + [None] * max(0, len(parsed) - len(base))
        for i, v in enumerate(parsed):
            if v is not None:
                out_list[i] = _merge_set(out_list[i], v)
        return out_list
    return copy.deepcopy(parsed)


def user_values(values_files: Iterable[str | Path] = (), set_values: Iterable[str] = (),
                values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The user-supplied values (before the chart's defaults), as Helm composes them."""
    out: dict[str, Any] = {}
    for f in values_files:
        try:
            text = Path(f).read_text()
        except OSError as exc:
            raise ChartError(f"values file {f}: {exc.strerror}") from None
        try:
            doc = helm.values_from_yaml(text)
        except helm.HelmError as exc:
            raise ChartError(f"{f}: {exc}") from None
        out = merge(out, doc or {})
    for expr in set_values:
        try:
            out = _merge_set(out, helm.parse_set_string(expr))
        except helm.HelmError as exc:
            raise ChartError(f"--set {expr!r}: {exc}") from None
    if values:
        out = merge(out, values)
    return out


def render_templates(values_files: Iterable[str | Path] = (), set_values: Iterable[str] = (),
                     values: Mapping[str, Any] | None = None, release: str = RELEASE,
                     namespace: str = NAMESPACE, chart_dir: Path = CHART_DIR) -> dict[str, str]:
    """Template path → rendered text (NOTES.txt included), like ``helm template``."""
    vals = user_values(values_files, set_values, values)
    try:
        with helm.Chart.load(str(chart_dir)) as chart:
            return chart.render(values=vals, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as exc:
        raise ChartError(str(exc)) from None


def render(values_files: Iterable[str | Path] = (), set_values: Iterable[str] = (),
           values: Mapping[str, Any] | None = None, release: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders, as dicts, in template order."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(render_templates(values_files, set_values, values, release, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                out.append(doc)
                if not doc["metadata"]["annotations"]:
                    del doc["metadata"]["annotations"]
    return out


def render_notes(values_files: Iterable[str | Path] = (), set_values: Iterable[str] = (),
                 values: Mapping[str, Any] | None = None, release: str = RELEASE,
                 namespace: str = NAMESPACE) -> str:
    rendered = render_templates(values_files, set_values, values, release, namespace)
    return next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")


def _quietly(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` with file descriptor 2 captured: in lint mode the Go library logs each template
    ``fail`` to stderr itself (``lint`` reports them through ``render`` instead)."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            return fn(*args, **kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def lint(values_files: Iterable[str | Path] = (), set_values: Iterable[str] = (),
         values: Mapping[str, Any] | None = None, strict: bool = True,
         chart_dir: Path = CHART_DIR) -> list[str]:
    """``helm lint --strict`` plus a render: the findings at warning level and above (empty: clean).

    Helm's lint mode turns the templates' ``fail`` checks into log lines, not findings, so the
    values are also rendered and a refusal is reported as a finding on ``templates/``.
    """
    vals = user_values(values_files, set_values, values)
    try:
        report = _quietly(helm.lint, str(chart_dir), vals, strict=strict, namespace=NAMESPACE)
    except helm.HelmError as exc:
        raise ChartError(str(exc)) from None
    found = [f"{m['path']}: {m['error'].strip()}" for m in report["messages"] if m["severity"] >= 2]
    if not report["total_charts_linted"]:
        return found + [e.strip() for e in report["errors"]] or [f"{chart_dir}: no chart linted"]
    if not found:
        try:
            render_templates(values=vals, chart_dir=chart_dir)
        except ChartError as exc:
            found.append(f"templates/: {exc}")
    return found


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(dict(o), sort_keys=False) for o in objects)

"""The import graph (issue 16, DESIGN §4): which package may import which, read from the code's
``import`` statements (``ast``, not a grep of strings), transitively through hecommon.

- hecommon imports no service;
- the encoder, the evaluator and the aggregator import hecommon and themselves only;
- no ``handler.py`` reaches pika, directly or through the hecommon modules it imports;
- nothing under ``hecommon.he`` (the scheme) reaches ``hecommon.wire`` or ``hecommon.broker``, or
  pika, directly or transitively;
- the data owner's code (the orchestrator) imports server services in one module only, its
  in-process server (``helora_orchestrator.embedded``: the embedded mode runs the services'
  handlers in-process, DESIGN §4), and there only their pure modules, which reach no pika; the
  client over the broker (its transport, the encrypted backend) and the operator tools reach no
  server service at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "hecommon": ROOT / "libs/hecommon/hecommon",
    "helora_encoder": ROOT / "services/encoder/helora_encoder",
    "helora_evaluator": ROOT / "services/evaluator/helora_evaluator",
    "helora_aggregator": ROOT / "services/aggregator/helora_aggregator",
    "helora_orchestrator": ROOT / "services/orchestrator/helora_orchestrator",
}
SERVICES = [p for p in PACKAGES if p != "hecommon"]
#: the orchestrator's in-process server, and the pure service modules it may import
IN_PROCESS = "helora_orchestrator.embedded"
IN_PROCESS_IMPORTS = {"helora_encoder.handler", "helora_evaluator.handler", "helora_aggregator.handler",
                      "helora_aggregator.federated"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((pkg, *parts))] = path
    return out


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports, anywhere in its body (lazy imports included), absolute."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def _closure(module: str) -> set[str]:
    """``module``'s imports, followed through every module of this repository."""
    seen, todo = set(), [module]
    while todo:
        for name in _imports(todo.pop()):
            if name not in seen:
                seen.add(name)
                if name in MODULES:
                    todo.append(name)
    return seen


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_is_read_from_the_code():
    """The reader sees what it must: a known lazy import, a relative one, pika in the broker runtime."""
    assert "torch" in _imports("hecommon.model")
    assert "hecommon.shards" in _imports("helora_evaluator.handler")
    assert "hecommon.errors" in _imports("hecommon.he.exact")  # from .errors import …
    assert "pika" in _closure("hecommon.broker.amqp")
    assert "helora_aggregator.federated" in _imports("helora_orchestrator.embedded")
    assert "helora_orchestrator.embedded" in _imports("helora_orchestrator.federated.round")  # from ..embedded


def test_hecommon_imports_no_service():
    bad = {(m, n) for m in MODULES if _top(m) == "hecommon" for n in _imports(m) if _top(n) in SERVICES}
    assert bad == set()


def test_server_services_import_only_hecommon_and_themselves():
    bad = {(m, n) for m in MODULES if _top(m) in SERVICES and _top(m) != "helora_orchestrator"
           for n in _imports(m) if _top(n) in SERVICES and _top(n) != _top(m)}
    assert bad == set()


def test_the_owner_imports_server_services_only_in_its_in_process_server():
    got: dict[str, set[str]] = {}
    for m in MODULES:
        if _top(m) == "helora_orchestrator":
            others = {n for n in _imports(m) if _top(n) in SERVICES and _top(n) != "helora_orchestrator"}
            if others:
                got[m] = {n for n in others if n in MODULES}  # modules, not the names imported from them
    assert got == {IN_PROCESS: IN_PROCESS_IMPORTS}
    assert not any(_top(n) == "pika" for n in _closure(IN_PROCESS))  # pure: no broker in-process


def test_the_broker_client_and_the_operator_tools_reach_no_server_service():
    """(The trainer reaches the in-process server: ``--mode encrypted`` without a broker is the
    embedded mode; so does the federated owner over RabbitMQ, which trains locally with it.)"""
    roots = ["helora_orchestrator.broker", "helora_orchestrator.encrypted",
             *(m for m in MODULES if m.startswith("helora_orchestrator.operator"))]
    reach = {m: sorted(n for n in _closure(m) if _top(n) in SERVICES and _top(n) != "helora_orchestrator")
             for m in roots}
    assert reach == {m: [] for m in roots}


def test_no_handler_reaches_pika():
    handlers = [m for m in MODULES if m.endswith(".handler")]
    assert len(handlers) == 3
    reach = {m: sorted(n for n in _closure(m) if _top(n) == "pika") for m in handlers}
    assert reach == {m: [] for m in handlers}


def test_the_scheme_reaches_neither_the_wire_nor_the_broker():
    scheme = [m for m in MODULES if m.startswith("hecommon.he.") or m == "hecommon.he"]
    assert len(scheme) >= 12
    below = ("hecommon.wire", "hecommon.broker", "pika")
    reach = {m: sorted(n for n in _closure(m) if any(n == b or n.startswith(b + ".") for b in below))
             for m in scheme}
    assert reach == {m: [] for m in scheme}
    assert any(n.startswith("hecommon.he.") for n in _closure("hecommon.wire.messages"))  # the wire uses it

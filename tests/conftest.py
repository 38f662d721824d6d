"""Shared fixtures. Secret keys in tests come from the real CSPRNG; only the known-answer tests
use the deterministic ``_encrypt_with`` entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

SUPPORT = str(Path(__file__).resolve().parent / "support")
if SUPPORT not in sys.path:  # helpers (listen_ports) for every test module, under --import-mode=importlib; not
    sys.path.insert(0, SUPPORT)  # tests/ itself, whose folders (hecommon, …) would shadow the packages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def local_broker() -> None:
    """Skips the test when no RabbitMQ answers on 127.0.0.1:5672 (integration tests need a real one)."""
    from broker_check import MISSING, broker_answers  # tests/support

    if not broker_answers():
        pytest.skip(MISSING)


@pytest.fixture
def rng() -> np.random.Generator:
    # test data only: never key material
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests when no CUDA device answers."""
    from hecommon.he.evaluate import default_backend

    if default_backend() == "cupy":
        return
    skip = pytest.mark.skip(reason="no CUDA device with cupy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- the metrics contract (docs/metrics.md), written out here independently of hecommon.broker.metrics ----
_METRIC_NAMES = {
    "helora_requests_total", "helora_failures_total", "helora_stage_seconds", "helora_he_product_seconds",
    "helora_bytes_total", "helora_tokens_total", "helora_in_flight", "helora_device_memory_bytes",
    "helora_dead_lettered_total", "helora_service_info", "helora_orchestrator_tokens_per_second",
    "helora_orchestrator_loss", "helora_orchestrator_step", "helora_orchestrator_tokens_total",
    "helora_orchestrator_bytes_total", "helora_orchestrator_request_seconds", "helora_owners_held",
    "helora_hint_bytes", "helora_hint_builds_total", "helora_hint_seconds_total", "helora_owner_evictions_total",
}
_CLOSED_LABELS = {
    "service": {"encoder", "evaluator", "aggregator", "orchestrator"},
    "kind": {"qkv", "o", "gate_up", "down", "other"},
    "stage": {"decode", "he_product", "aggregate", "switch", "publish", "total"},
    "reason": {"error", "config", "insecure_parameters", "transient", "timeout", "malformed", "version", "oversized",
               "parameter_mismatch", "decryption", "unroutable", "internal", "other"},
    "queue": {"manifest", "evaluator", "partials", "other"},
    "device": {"cpu", "cuda"},
    "backend": {"numpy", "cupy"},
}


def metrics_contract_violations(text: str, groups: set[str], param_sets: set[str]) -> list[str]:
    """Every sample of a Prometheus text scrape checked against the contract: known metric names,
    known label names, every label value from its closed set or from the configuration
    (``groups``, ``param_sets``, the library version); numbers only in ``le`` and ``version``."""
    import re

    from hecommon import __version__
    from prometheus_client.parser import text_string_to_metric_families

    config = {"group": groups, "param_set": param_sets | {"any"}, "version": {__version__}}
    bad: list[str] = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("helora_"):
            continue  # the client library's own process/platform collectors are not registered
        for s in family.samples:
            base = re.sub(r"_(bucket|count|sum|total)$", "", s.name)
            if not ({s.name, base + "_total", base} & _METRIC_NAMES):
                bad.append(f"unknown metric {s.name}")
            for label, value in s.labels.items():
                if label == "le":
                    if value != "+Inf":
                        float(value)
                    continue
                if label == "direction":
                    allowed = {"in", "out"} if "bytes" in s.name else {"forward", "backward", "other"}
                else:
                    allowed = _CLOSED_LABELS.get(label) or config.get(label)
                if allowed is None:
                    bad.append(f"{s.name}: label {label!r} is not in the contract")
                elif value not in allowed:
                    bad.append(f"{s.name}: {label}={value!r} is outside {sorted(allowed)}")
                elif label != "version" and label not in config and re.search(r"\d|[0-9a-f]{8,}", value):
                    bad.append(f"{s.name}: {label}={value!r} carries a number")
    return bad


@pytest.fixture
def contract_violations():
    return metrics_contract_violations

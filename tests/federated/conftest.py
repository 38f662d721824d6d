"""Fixtures of the federated tests: a shared CKKS key, per-owner text data, owners on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helora_orchestrator.federated.client import OwnerConfig
from helora_orchestrator.federated.round import build_owners
from helora_orchestrator.federated.selective import CkksKeys

#: CKKS tolerance asserted on the aggregated ΔW (entries of order 1e-3..1e-1): scale 2^40 leaves a
#: fresh-encryption and encoding error of ~1e-9..1e-8 per value (measured), and a sum of three
#: owners (each pre-multiplied by its sample count, then divided by the total) stays below 1e-7.
CKKS_ATOL = 1e-6


@pytest.fixture(scope="session")
def fed_keys() -> CkksKeys:
    return CkksKeys.generate()


def fed_rows(n: int = 90) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [{"text": f"Owner text {i}: the {words[i % 6]} of {i} is {i * 7 % 13}, then {words[(i + 2) % 6]}."}
            for i in range(n)]


@pytest.fixture
def fed_data(tmp_path: Path) -> Path:
    path = tmp_path / "fed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fed_rows()))
    return path


@pytest.fixture
def make_owners(fed_data: Path, fed_keys: CkksKeys):
    """``make_owners(ranks, budgets, **cfg)`` → owners ``o0, o1…`` on the tiny model, one shared key;
    SHE-LoRA's scheme unless ``scheme="full"`` is asked for (most tests here are about it)."""

    def make(ranks=(4, 8, 16), budgets=(0.02, 0.05, 0.2), **kw):
        kw.setdefault("scheme", "selective")
        configs = [OwnerConfig(f"o{i}", rank=r, budget=b, seed=10 + i, **kw)
                   for i, (r, b) in enumerate(zip(ranks, budgets, strict=True))]
        return build_owners(configs, "tiny", fed_data, seed=0, keys=fed_keys)[0]

    return make

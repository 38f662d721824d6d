"""Shared fixtures. Secret keys in tests come from the real CSPRNG; only the known-answer tests
use the deterministic ``_encrypt_with`` entry point."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def rng() -> np.random.Generator:
    # test data only: never key material
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests when no CUDA device answers."""
    from hecommon.evaluate import default_backend

    if default_backend() == "cupy":
        return
    skip = pytest.mark.skip(reason="no CUDA device with cupy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

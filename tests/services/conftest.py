"""Fixtures of the server-side tests."""

from __future__ import annotations

import pytest
from hecommon.model import discover_groups, tiny_llama


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama and its fused layer groups."""
    model, _ = tiny_llama(0)
    return model, discover_groups(model)

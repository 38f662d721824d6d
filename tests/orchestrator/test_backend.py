"""Local backends: the fp32 reference and the clear quantized computation (DESIGN §2)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hecommon.errors import ConfigError
from hecommon.he.quantize import quantize_weight, quantized_matmul, quantized_matmul_backward
from hecommon.model import discover_groups, tiny_llama
from helora_orchestrator.backend import ClearBackend, LinearBackend, QuantizedBackend, build_backend


def test_clear_backend_is_a_plain_matmul(rng):
    w = rng.standard_normal((12, 5)).astype(np.float32)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    dy = rng.standard_normal((7, 12)).astype(np.float32)
    b = ClearBackend({"g": w})
    assert isinstance(b, LinearBackend) and b.wire_bytes == 0
    np.testing.assert_allclose(b.forward("g", x), x @ w.T, rtol=1e-6)
    np.testing.assert_allclose(b.backward("g", dy), dy @ w, rtol=1e-6)


def test_quantized_backend_uses_hecommon_reference(rng):
    w = rng.standard_normal((12, 5))
    qw = quantize_weight(w, 8)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    dy = rng.standard_normal((3, 12)).astype(np.float32)
    b = QuantizedBackend({"g": qw}, bits=8)
    np.testing.assert_array_equal(b.forward("g", x), quantized_matmul(x, qw, 8).astype(np.float32))
    np.testing.assert_array_equal(b.backward("g", dy), quantized_matmul_backward(dy, qw, 8).astype(np.float32))
    # quantization error is small but not zero: it really is the quantized path
    err = np.abs(b.forward("g", x) - x @ w.T).max()
    assert 0 < err < 0.1


def test_backend_errors_name_the_problem(rng):
    b = ClearBackend({"g": np.zeros((4, 3), np.float32)})
    with pytest.raises(ConfigError, match="unknown group 'h'"):
        b.forward("h", np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"g: x must be \(T, 3\)"):
        b.forward("g", np.zeros((1, 4), np.float32))


def test_build_backend_modes(monkeypatch):
    model, _ = tiny_llama()
    groups = discover_groups(model)
    assert isinstance(build_backend("clear", model, groups), ClearBackend)
    q = build_backend("quantized", model, groups, bits=6)
    assert isinstance(q, QuantizedBackend) and q.qweights["0.qkv"].values.shape == (128, 64) and q.bits == 6
    with pytest.raises(ConfigError, match="mode: 'fp16'"):
        build_backend("fp16", model, groups)
    monkeypatch.setitem(sys.modules, "helora_orchestrator.embedded", None)  # as if the module were absent
    with pytest.raises(ConfigError, match="'encrypted' is not available"):
        build_backend("encrypted", model, groups)

"""Generation sessions (issue 18): each request's tokens take the next coefficients of one secret per
layer and direction, never a coefficient twice, a new secret past N; the results are the quantized
backend's bit for bit, and the client's a·s products are computed once per window."""

from __future__ import annotations

import numpy as np
import pytest
from hecommon.errors import HeloraError
from hecommon.model import tiny_llama
from helora_orchestrator import encrypted as encrypted_module
from helora_orchestrator.client_model import build_client


def _clients():
    model = tiny_llama(seed=7)[0]
    return build_client(model, "quantized"), build_client(tiny_llama(seed=7)[0], "encrypted")


def _record(backend) -> list[tuple[str, str, int, int]]:
    """(layer, direction, col0, tokens) of every request the backend sends, in order."""
    seen: list[tuple[str, str, int, int]] = []
    inner = backend.transport

    def transport(request):
        seen.append((request.layer, request.direction, request.batch.col0, request.batch.n_tokens))
        return inner(request)

    backend.transport = transport
    return seen


class _Counting:
    """The backend's key, counting the request secrets drawn from it."""

    def __init__(self, key) -> None:
        self.key, self.drawn = key, []

    def request_secret(self, params, nonce):
        self.drawn.append(self.key.request_secret(params, nonce))
        return self.drawn[-1]


def test_a_session_equals_the_quantized_backend_and_never_uses_a_coefficient_twice():
    quantized, client = _clients()
    backend = client.backend
    n = backend.params.n
    counting = backend.key = _Counting(backend.key)
    secrets = counting.drawn
    seen = _record(backend)
    entry = backend.manifest.layers[0]
    rng = np.random.default_rng(0)
    # the third call of 700 (the seventh) passes N = 2048: a new secret; requests wider than the
    # window of 4 go without masks, the others with them: both under the session's secret
    sizes = [5, 1, 1, 7, 700, 700, 700, 1, 3]
    with backend.session(window=4) as session:
        for t in sizes:
            x = rng.standard_normal((t, entry.d_in)).astype(np.float32)
            np.testing.assert_array_equal(backend.forward(entry.name, x), quantized.backend.forward(entry.name, x))
    assert [s[3] for s in seen] == sizes
    starts = [s[2] for s in seen]
    assert starts == [0, 5, 6, 7, 14, 714, 0, 700, 701]  # 1414 + 700 > 2048: coefficient 0 of a new secret
    assert session.layers[(entry.name, "fwd")].secrets == 2 == len(secrets)
    used: dict[int, set[int]] = {}
    epoch = -1
    for _, _, col0, t in seen:
        epoch += col0 == 0
        cols = set(range(col0, col0 + t))
        assert not cols & used.setdefault(epoch, set()) and max(cols) < n
        used[epoch] |= cols
    # outside a session every request has a fresh secret and starts at coefficient 0
    x = rng.standard_normal((3, entry.d_in)).astype(np.float32)
    np.testing.assert_array_equal(backend.forward(entry.name, x), quantized.backend.forward(entry.name, x))
    assert seen[-1][2] == 0 and len(secrets) == 3


def test_the_masks_are_computed_once_per_window(monkeypatch):
    quantized, client = _clients()
    backend = client.backend
    entry = backend.manifest.layers[0]
    calls = {"in": 0, "out": 0}
    inputs, outputs = encrypted_module.input_masks, encrypted_module.output_masks

    def count_in(*args, **kwargs):
        calls["in"] += 1
        return inputs(*args, **kwargs)

    def count_out(*args, **kwargs):
        calls["out"] += 1
        return outputs(*args, **kwargs)

    monkeypatch.setattr(encrypted_module, "input_masks", count_in)
    monkeypatch.setattr(encrypted_module, "output_masks", count_out)
    rng = np.random.default_rng(1)
    with backend.session(window=4):
        for _ in range(10):  # ten one-token steps, windows of four coefficients: three windows
            x = rng.standard_normal((1, entry.d_in)).astype(np.float32)
            np.testing.assert_array_equal(backend.forward(entry.name, x), quantized.backend.forward(entry.name, x))
    assert calls == {"in": 3, "out": 3}  # the embedded server answers in one part


def test_sessions_do_not_nest_and_bad_windows_are_refused():
    _, client = _clients()
    with client.backend.session(), pytest.raises(HeloraError, match="already open"), client.backend.session():
        pass
    with pytest.raises(ValueError, match="window"):
        client.backend.session(window=0).__enter__()
    assert client.backend._session is None


def test_encrypted_generation_in_a_session_equals_quantized_generation():
    quantized, client = _clients()
    seen = _record(client.backend)
    prompts = [[5, 17, 42, 99, 3], [7, 8]]
    assert client.generate(prompts, 5) == quantized.generate(prompts, 5)
    # the prompts' 2 × 5 tokens (left-padded) in coefficients 0 … 9 of each layer, then 2 a step
    first = seen[0][0]
    assert [(c, t) for layer, d, c, t in seen if layer == first and d == "fwd"] == [(0, 10), (10, 2), (12, 2),
                                                                                     (14, 2), (16, 2)]

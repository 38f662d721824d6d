"""Backends that compute the frozen block linears for the client (DESIGN §1, §2).

A backend serves fused groups by name: forward ``Y = X·Wᵀ`` and backward ``dX = dY·W`` with
no bias and no weight gradient. ``clear`` is the fp32 reference, ``quantized`` is the clear
quantized computation that the encrypted path must match bit for bit (DESIGN §2, §7.2), and
``encrypted`` (``helora_orchestrator.encrypted``) sends the same products to the server.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from hecommon.errors import ConfigError
from hecommon.he.quantize import (
    QuantizedWeight,
    quantize_weight,
    quantized_matmul,
    quantized_matmul_backward,
)
from hecommon.model import LinearGroup, group_weight

MODES = ("clear", "quantized", "encrypted")


@runtime_checkable
class LinearBackend(Protocol):
    """What the client model needs from whoever holds the frozen weights."""

    wire_bytes: int  # bytes sent + received so far (0 for local backends)

    def forward(self, group: str, x: np.ndarray) -> np.ndarray:
        """``x`` (T, d_in) float32 → ``x·Wᵀ`` (T, sum(out)), no bias."""
        ...

    def backward(self, group: str, dy: np.ndarray) -> np.ndarray:
        """``dy`` (T, sum(out)) → ``dy·W`` (T, d_in): the sum over the group's members."""
        ...


def _check_rows(group: str, a: np.ndarray, width: int, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{group}: {what} must be (T, {width}), got {a.shape}")
    return a


class ClearBackend:
    """fp32 products with the plain weights: the reference of the gradient check."""

    mode = "clear"

    def __init__(self, weights: dict[str, np.ndarray]):
        # (sum(out), d_in) float32 per group
        self.weights = {k: np.ascontiguousarray(w, dtype=np.float32) for k, w in weights.items()}
        self.wire_bytes = 0

    def _weight(self, group: str) -> np.ndarray:
        try:
            return self.weights[group]
        except KeyError:
            raise ConfigError(f"backend: unknown group {group!r}") from None

    # torch's GEMM rather than numpy's: it shares the thread pool of the rest of the client step,
    # so the two pools do not fight over the cores (see helora_orchestrator/__init__.py).
    def forward(self, group: str, x: np.ndarray) -> np.ndarray:
        w = self._weight(group)
        x = _check_rows(group, x, w.shape[1], "x")
        return (torch.from_numpy(x) @ torch.from_numpy(w).T).numpy()

    def backward(self, group: str, dy: np.ndarray) -> np.ndarray:
        w = self._weight(group)
        dy = _check_rows(group, dy, w.shape[0], "dy")
        return (torch.from_numpy(dy) @ torch.from_numpy(w)).numpy()


class QuantizedBackend:
    """Per-token activations × per-channel weights in integers, in the clear (DESIGN §2)."""

    mode = "quantized"

    def __init__(self, qweights: dict[str, QuantizedWeight], bits: int = 8):
        self.qweights = dict(qweights)
        self.bits = bits
        self.wire_bytes = 0

    def _weight(self, group: str) -> QuantizedWeight:
        try:
            return self.qweights[group]
        except KeyError:
            raise ConfigError(f"backend: unknown group {group!r}") from None

    def forward(self, group: str, x: np.ndarray) -> np.ndarray:
        w = self._weight(group)
        x = _check_rows(group, x, w.values.shape[1], "x")
        return quantized_matmul(x, w, self.bits).astype(np.float32)

    def backward(self, group: str, dy: np.ndarray) -> np.ndarray:
        w = self._weight(group)
        dy = _check_rows(group, dy, w.values.shape[0], "dy")
        return quantized_matmul_backward(dy, w, self.bits).astype(np.float32)


def fused_weights(model, groups: list[LinearGroup]) -> dict[str, np.ndarray]:
    """Group name → fused fp32 weight (sum(out), d_in), read before the client drops them."""
    return {g.name: group_weight(model, g).float().cpu().numpy() for g in groups}


#: what the embedded mode imports: without one of them, ``--mode encrypted`` needs a broker
IN_PROCESS_MODULES = ("helora_orchestrator.embedded", "helora_orchestrator.encrypted", "helora_encoder",
                      "helora_evaluator", "helora_aggregator")


def build_backend(mode: str, model, groups: list[LinearGroup], bits: int = 8, **kwargs) -> LinearBackend:
    """The backend for ``mode``; call it while ``model`` still holds its block weights.

    ``kwargs`` go to ``make_encrypted_backend`` (parameter set, embedded server options).
    """
    if mode == "clear":
        return ClearBackend(fused_weights(model, groups))
    if mode == "quantized":
        return QuantizedBackend({k: quantize_weight(w, bits) for k, w in fused_weights(model, groups).items()}, bits)
    if mode == "encrypted":
        # Imported lazily: the encrypted path pulls in the HE stack only when it is used.
        try:
            from helora_orchestrator.embedded import make_encrypted_backend
        except ModuleNotFoundError as e:  # the in-process server imports the server services' handlers
            if e.name not in IN_PROCESS_MODULES:
                raise
            raise ConfigError(f"mode: 'encrypted' is not available in this build (no {e.name}: the embedded mode "
                              "runs the encoder's, evaluator's and aggregator's handlers in-process)") from None
        return make_encrypted_backend(model, groups, bits=bits, **kwargs)
    raise ConfigError(f"mode: {mode!r} is not one of {MODES}")

"""Wanda-style column sensitivity of each LoRA ``A`` (SHE-LoRA §4.1; Sun et al. 2023, "Wanda").

Column ``j`` of ``A`` (an input dimension) scores ``‖X_j‖₂ · Σ_r |A[r, j]|``, where ``X_j`` is the
``j``-th feature of the LoRA path's input over the owner's own calibration tokens. Forward hooks
on every ``LoraLinear`` capture those inputs; nothing here leaves the owner.
"""

from __future__ import annotations

import numpy as np
import torch

from ..client_model import ClientModel
from ..data import PackedData
from ..lora import LoraLinear


def lora_layers(client: ClientModel) -> dict[str, LoraLinear]:
    """Layer name (module path in the HF model) → its ``LoraLinear``, in model order."""
    return {name: m for name, m in client.hf.named_modules() if isinstance(m, LoraLinear)}


@torch.no_grad()
def input_norms(client: ClientModel, data: PackedData, batches: int = 2, batch_size: int = 4) -> dict[str, np.ndarray]:
    """``‖X_j‖₂`` per layer: (d_in,) float64 over the first ``batches`` micro-batches of ``data``."""
    layers = lora_layers(client)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}

    def hook(name: str):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # (tokens, d_in)
            sums[name] += (x * x).sum(dim=0)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    was_training = client.training
    client.eval()
    try:
        n = min(batches, -(-len(data) // batch_size))
        for b in range(n):
            ids, _ = data.batch(range(b * batch_size, min(len(data), (b + 1) * batch_size)))
            client(ids)
    finally:
        for h in handles:
            h.remove()
        client.train(was_training)
    return {name: s.sqrt().numpy() for name, s in sums.items()}


def column_scores(client: ClientModel, data: PackedData, batches: int = 2, batch_size: int = 4) -> dict[str, np.ndarray]:
    """Sensitivity of every column of every ``A``: (d_in,) float64 per layer (higher: more sensitive)."""
    norms = input_norms(client, data, batches, batch_size)
    out = {}
    for name, m in lora_layers(client).items():
        a = m.lora_A.weight.detach().to(torch.float64).abs().sum(dim=0).numpy()  # Σ_r |A[r, j]|
        out[name] = a * norms[name]
    return out

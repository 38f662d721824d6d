"""A few training steps the integration tests compare bit for bit (broker against embedded)."""

from __future__ import annotations

import torch
from helora_orchestrator.client_model import causal_lm_loss


def train_steps(client, steps: int, data_seed: int) -> dict[str, torch.Tensor]:
    """A few AdamW steps on seeded random token batches; the LoRA weights after them."""
    opt = torch.optim.AdamW(client.lora_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        ids = torch.randint(0, client.hf.config.vocab_size, (2, 24), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(client(ids), ids)
        (loss / n).backward()
        opt.step()
    return client.lora_state_dict()

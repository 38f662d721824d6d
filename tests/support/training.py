"""Training helpers: a few steps the integration tests compare bit for bit (broker against
embedded), and a ``Trainer`` on the tiny model (tests/orchestrator)."""

from __future__ import annotations

from pathlib import Path

import torch
from hecommon.model import config_fingerprint, tiny_llama
from helora_orchestrator.checkpoint import CheckpointMeta
from helora_orchestrator.client_model import build_client, causal_lm_loss
from helora_orchestrator.lora import LoraSettings
from helora_orchestrator.train import TrainConfig, Trainer

LORA = LoraSettings(r=4, alpha=8)


def make_trainer(splits, out: Path, mode: str = "clear", param_set: str | None = None, **cfg) -> Trainer:
    """A Trainer of the tiny model (``cfg["model"]``: its config overrides) on ``splits``."""
    model, _ = tiny_llama(seed=0, **cfg.pop("model", {}))
    config = TrainConfig(**{"steps": 4, "lr": 5e-3, "warmup_steps": 1, "batch_size": 2, "grad_accum": 2,
                            "seq_len": 32, "eval_batches": 2, "mode": mode, "output_dir": str(out),
                            "progress": False, **cfg})
    meta = CheckpointMeta(base_model_id="tiny", base_model_fingerprint=config_fingerprint(model), mode=mode,
                          bits=config.bits, lora=LORA.to_dict(), param_set=param_set)
    return Trainer(config, build_client(model, mode, LORA, bits=config.bits, seed=0), *splits, meta)


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

"""Adapter export in PEFT's format (DESIGN §4: "exports the adapter in PEFT format").

``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_{A,B}.weight`` (the keys of
``peft.get_peft_model_state_dict``) and ``adapter_config.json`` is written by ``LoraConfig``
itself, so ``PeftModel.from_pretrained(base, out_dir)`` loads it like any PEFT adapter.
``helora_meta.json`` (base-model fingerprint, mode, bits) lets helora refuse a wrong base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hecommon.errors import ConfigError
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointMeta
from .client_model import ClientModel
from .lora import LoraSettings

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "helora_meta.json"


def _peft_config(settings: LoraSettings, base_model: str | None):
    from peft import LoraConfig

    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return LoraConfig(
        r=settings.r, lora_alpha=alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def export_peft(client: ClientModel, out_dir: str | Path, meta: CheckpointMeta | None = None) -> Path:
    """Write the client's LoRA adapter as a PEFT adapter directory; returns it."""
    return write_peft(client.lora_settings, client.lora_state_dict(), out_dir, meta)


def write_peft(settings: LoraSettings, weights: dict[str, torch.Tensor], out_dir: str | Path,
               meta: CheckpointMeta | None = None) -> Path:
    """A PEFT adapter directory from LoRA weights keyed like ``ClientModel.lora_state_dict``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = meta.base_model_id if meta else None
    _peft_config(settings, base).save_pretrained(str(out))
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in weights.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    if meta is not None:
        (out / META).write_text(meta.to_json())
    return out


def load_peft_adapter(adapter_dir: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor], CheckpointMeta | None]:
    """Read a PEFT LoRA adapter: settings, weights keyed like ``ClientModel.lora_state_dict``, meta."""
    d = Path(adapter_dir)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise ConfigError(f"adapter: {d} needs {CONFIG} and {WEIGHTS}")
    cfg = json.loads((d / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ConfigError(f"adapter: {d} is not a plain LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConfigError(f"adapter: {d} sets rank_pattern or alpha_pattern (one rank and alpha per adapter only)")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"adapter: bias {cfg.get('bias')!r} is not supported")
    targets = cfg.get("target_modules") or []
    settings = LoraSettings(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                            target_modules=tuple(sorted(targets, key=_target_order)))
    raw = load_file(str(d / WEIGHTS))
    bad = [k for k in raw if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise ConfigError(f"adapter: unexpected key {bad[0]!r}")
    meta = CheckpointMeta.from_json((d / META).read_text()) if (d / META).is_file() else None
    return settings, {k[len(PEFT_PREFIX):]: v for k, v in raw.items()}, meta


def _target_order(name: str) -> int:
    from .lora import BLOCK_LINEARS

    return BLOCK_LINEARS.index(name) if name in BLOCK_LINEARS else len(BLOCK_LINEARS)

"""LoRA adapters, run on the client in the clear (DESIGN §1; Hu et al. 2021, PEFT's ``LoraLayer``).

``y = base(x) + (alpha / r) · B(A(dropout(x)))`` with ``A`` kaiming-uniform and ``B`` zero, so
training starts from the base model. Computed in the same order as PEFT so that an exported
adapter gives the same logits under ``PeftModel`` (export.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from hecommon.errors import ConfigError
from torch import nn

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules`` are leaf names of block linears."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = BLOCK_LINEARS

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"lora.r: {self.r!r} must be a positive integer")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha: {self.alpha!r} must be a positive number")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: {self.dropout!r} must be in [0, 1)")
        targets = tuple(self.target_modules)
        object.__setattr__(self, "target_modules", targets)
        unknown = [t for t in targets if t not in BLOCK_LINEARS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ConfigError(f"lora.target_modules: {targets!r}: must be distinct names among {BLOCK_LINEARS}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"lora: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


class LoraLinear(nn.Module):
    """Wraps a frozen linear (here a backend-computed one) with a trainable low-rank path."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, settings: LoraSettings,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.scaling = settings.scaling
        self.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, settings.r, bias=False)
        self.lora_B = nn.Linear(settings.r, out_features, bias=False)
        # PEFT's default init: A ~ kaiming-uniform(a=√5), B = 0 (so ΔW = 0 at step 0).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

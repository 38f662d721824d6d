"""One data owner of a federation (SHE-LoRA, arXiv 2505.21051; DESIGN §5): train, propose, contribute, merge.

The owner fine-tunes privately through the usual ``Trainer`` in any mode (clear, quantized, or
encrypted against the split-protocol server), then takes part in a round:

1. ``proposal``: Wanda-style column scores of every ``A`` on its own calibration batches
   (``sensitivity.py``), its top ``k_i = ceil(budget·d_in)`` positions per layer (``negotiate.py``);
2. ``contribute``: with the round's global ordered lists, ``s_i·B_i`` in clear, ``A_i`` with the
   chosen columns swapped to the end and zeroed, and ``Enc(w_i·s_i·B_i·a_ij)`` for those columns
   (``selective.py``);
3. ``merge``: decrypt the aggregate, divide by the total weight, SVD back to its own rank
   (``reparam.py``), load it, and reset the optimizer's moments (they belong to the old factors).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from hecommon.errors import ConfigError, ParameterMismatch
from hecommon.wire.federated import (
    Aggregate,
    Contribution,
    LayerContribution,
    Proposal,
    RoundPlan,
    SumAggregate,
    SumContribution,
)

from ..backend import MODES
from ..checkpoint import CheckpointMeta
from ..client_model import build_client
from ..data import PackedData
from ..lora import BLOCK_LINEARS, LoraSettings
from ..train import TrainConfig, Trainer
from .encsum import open_aggregate, timed_contribute
from .negotiate import budget_columns, make_proposal
from .reparam import reconstruct, svd_to_rank
from .schemes import DEFAULT_UPDATE_RANGE, SCHEMES
from .selective import CkksKeys, select_and_encrypt
from .sensitivity import column_scores, lora_layers

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class OwnerConfig:
    """One owner's settings; ``budget``: fraction of each layer's ``A`` columns to encrypt."""

    name: str
    rank: int = 8
    budget: float = 0.01
    alpha: float | None = None  # None: 2·rank
    local_steps: int = 2
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 32
    mode: str = "clear"
    bits: int = 8
    seed: int = 0
    optimizer: str = "adamw"
    targets: tuple[str, ...] = BLOCK_LINEARS
    calibration_batches: int = 2
    eval_batches: int = 4
    scheme: str = "full"
    update_range: float = DEFAULT_UPDATE_RANGE  # full: the bound on |samples × ΔW| (the same for every owner)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= 64:
            raise ConfigError(f"owner name: {self.name!r} must be 1..64 characters")
        budget_columns(self.budget, 1)  # validates the fraction
        for f in ("local_steps", "batch_size", "calibration_batches", "eval_batches"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "local_steps" else 1):
                raise ConfigError(f"{f}: {v!r} must be a {'non-negative' if f == 'local_steps' else 'positive'} integer")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: {self.lr!r} must be a positive number")
        if self.mode not in MODES:
            raise ConfigError(f"mode: {self.mode!r} is not one of {MODES}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme: {self.scheme!r} is not one of {SCHEMES}")
        if not (isinstance(self.update_range, int | float) and math.isfinite(self.update_range)
                and self.update_range > 0):
            raise ConfigError(f"update_range: {self.update_range!r} must be a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: {self.optimizer!r} is not one of {OPTIMIZERS}")
        _ = self.lora  # validates rank, alpha and targets

    @property
    def lora(self) -> LoraSettings:
        alpha = float(2 * self.rank) if self.alpha is None else self.alpha
        return LoraSettings(r=self.rank, alpha=alpha, dropout=0.0, target_modules=tuple(self.targets))


class Owner:
    """A data owner: its ``ClientModel``, its ``Trainer`` and the federation's shared CKKS key."""

    def __init__(self, cfg: OwnerConfig, model, train_data: PackedData, eval_data: PackedData, keys: CkksKeys,
                 model_id: str = "", **backend_kwargs):
        from hecommon.model import config_fingerprint

        self.cfg, self.keys = cfg, keys
        self.samples = len(train_data)
        if cfg.mode == "encrypted":
            backend_kwargs.setdefault("model_id", model_id)
        fingerprint = config_fingerprint(model)
        self.client = build_client(model, cfg.mode, cfg.lora, bits=cfg.bits, seed=cfg.seed, **backend_kwargs)
        tcfg = TrainConfig(steps=max(1, cfg.local_steps), lr=cfg.lr, warmup_steps=0, min_lr_ratio=1.0,
                           batch_size=cfg.batch_size, seq_len=max(2, cfg.seq_len), seed=cfg.seed, mode=cfg.mode,
                           bits=cfg.bits, eval_batches=cfg.eval_batches, progress=False)
        meta = CheckpointMeta(base_model_id=model_id, base_model_fingerprint=fingerprint, mode=cfg.mode,
                              bits=cfg.bits, lora=cfg.lora.to_dict())
        self.trainer = Trainer(tcfg, self.client, train_data, eval_data, meta)
        if cfg.optimizer == "sgd":  # plain gradient steps: the setting of gradient-inversion attacks
            sgd = torch.optim.SGD(self.client.lora_parameters(), lr=cfg.lr)
            self.trainer.optimizer = sgd  # type: ignore[assignment]  # Trainer's attribute is inferred as AdamW
            self.trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(self.trainer.optimizer, lambda s: 1.0)
        self.enc_seconds = 0.0
        self.last_merged: dict[str, np.ndarray] = {}
        self._sent: SumContribution | None = None  # --scheme full: the last contribution (its merge checks it)

    @property
    def name(self) -> str:
        return self.cfg.name

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Layer → (d_out, d_in) of every LoRA layer: public (the base model's shapes)."""
        return {n: (m.out_features, m.in_features) for n, m in lora_layers(self.client).items()}

    def train_local(self) -> float:
        """``local_steps`` private optimizer steps; the mean training loss (nan for none)."""
        losses = [self.trainer.train_step()[0] for _ in range(self.cfg.local_steps)]
        return float(np.mean(losses)) if losses else float("nan")

    def eval_loss(self) -> float:
        return self.trainer.evaluate()

    def adapter(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer → (A (r, d_in), B (d_out, r)), copies."""
        return {n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone())
                for n, m in lora_layers(self.client).items()}

    def delta(self) -> dict[str, np.ndarray]:
        """Layer → this owner's ``s·B·A`` (d_out, d_in) float64: the update it contributes."""
        return {n: m.scaling * (m.lora_B.weight.detach().double() @ m.lora_A.weight.detach().double()).numpy()
                for n, m in lora_layers(self.client).items()}

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Layer → ``(A, s·B)`` float64, whose product is ``delta``'s (``encsum`` forms it block by block)."""
        return {n: (m.lora_A.weight.detach().double().numpy(), m.scaling * m.lora_B.weight.detach().double().numpy())
                for n, m in lora_layers(self.client).items()}

    # -- one round -----------------------------------------------------------------------
    def proposal(self, rid: bytes) -> Proposal:
        scores = column_scores(self.client, self.trainer.train_data, self.cfg.calibration_batches, self.cfg.batch_size)
        return make_proposal(rid, self.name, self.keys.digest, scores, self.shapes(), self.cfg.budget)

    def contribute(self, plan: RoundPlan) -> Contribution:
        if plan.ctx != self.keys.digest:
            raise ParameterMismatch("round plan: another CKKS context than this owner's key")
        _match_layers("round plan", {x.name: (x.d_out, x.d_in) for x in plan.layers}, self.shapes())
        layers = []
        t0 = time.perf_counter()
        for name, m in lora_layers(self.client).items():
            pl = plan.layer(name)
            a = m.lora_A.weight.detach().double().numpy()
            b_eff = (m.scaling * m.lora_B.weight.detach().double()).numpy().astype(np.float32)
            k = min(budget_columns(self.cfg.budget, m.in_features), len(pl.order))
            swapped, enc = select_and_encrypt(self.keys, a.astype(np.float32), b_eff, pl.order, k, self.samples)
            layers.append(LayerContribution(name, m.out_features, m.in_features, m.lora_A.weight.shape[0], k,
                                            b_eff, swapped, enc))
        self.enc_seconds = time.perf_counter() - t0
        return Contribution(plan.rid, self.name, self.samples, self.keys.digest, tuple(layers))

    def contribute_sum(self, rid: bytes, size: int) -> SumContribution:
        """``--scheme full``: this owner's whole ``w·ΔW`` and ``w``, every coordinate encrypted, for a
        federation of ``size`` owners (``encsum``)."""
        c, self.enc_seconds = timed_contribute(self.keys, rid, self.name, self.factors(), self.shapes(), self.samples,
                                               size, self.cfg.update_range)
        self._sent = c
        return c

    def merge_sum(self, agg: SumAggregate) -> dict[str, np.ndarray]:
        """Decrypt the encrypted sum, divide by the total weight, load it at this owner's rank."""
        _match_layers("aggregate", {x.name: (x.d_out, x.d_in) for x in agg.layers}, self.shapes())
        if [x.name for x in agg.layers] != list(self.shapes()):
            raise ParameterMismatch("aggregate: the layers are not in this owner's order")
        sent = self._sent
        if sent is None or (agg.rid, agg.size, agg.frac_bits) != (sent.rid, sent.size, sent.frac_bits):
            raise ParameterMismatch("aggregate: not the round, federation size or fixed point this owner sent")
        if (self.name, sent.seed) not in zip(agg.owners, agg.seeds, strict=True):
            raise ParameterMismatch("aggregate: this owner's contribution is not in it")
        full, _ = open_aggregate(self.keys, agg)
        return self._load(full)

    def merge(self, agg: Aggregate) -> dict[str, np.ndarray]:
        """Load the aggregate at this owner's rank; returns the full aggregated ``ΔW`` per layer."""
        if agg.ctx != self.keys.digest:
            raise ParameterMismatch("aggregate: another CKKS context than this owner's key")
        _match_layers("aggregate", {x.name: (x.d_out, x.d_in) for x in agg.layers}, self.shapes())
        return self._load({name: reconstruct(agg.layer(name), agg.total, self.keys) for name in self.shapes()})

    def _load(self, full: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The aggregated ``ΔW`` of every layer at this owner's rank (SVD), optimizer moments reset."""
        with torch.no_grad():
            for name, m in lora_layers(self.client).items():
                a, b = svd_to_rank(full[name], m.lora_A.weight.shape[0], m.scaling)
                m.lora_A.weight.copy_(torch.from_numpy(a))
                m.lora_B.weight.copy_(torch.from_numpy(b))
        self.trainer.optimizer.state.clear()  # moments of the old factors mean nothing for the new ones
        self.last_merged = full
        return full


def _match_layers(what: str, got: dict[str, tuple[int, int]], own: dict[str, tuple[int, int]]) -> None:
    """The server's layer set and shapes must be this owner's own: a ``ParameterMismatch`` naming the layer."""
    missing, extra = sorted(set(own) - set(got)), sorted(set(got) - set(own))
    if missing or extra:
        raise ParameterMismatch(f"{what}: layers do not match this owner's adapter (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
    for name, shape in own.items():
        if tuple(got[name]) != tuple(shape):
            raise ParameterMismatch(f"{what}: {name}: shape (d_out, d_in) = {tuple(got[name])}, "
                                    f"this owner's is {tuple(shape)}")

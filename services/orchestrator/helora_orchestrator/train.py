"""The data owner's training loop (DESIGN §1: LoRA, loss, optimizer, clipping, checkpoints on the client).

AdamW on the LoRA parameters only, linear warm-up then cosine decay, gradient clipping, gradient
accumulation over micro-batches, held-out evaluation, and checkpoints that resume onto the same
trajectory bit for bit (same data order, optimizer, schedule and RNG states).
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from hecommon.broker.metrics import OrchestratorMetrics
from hecommon.errors import ConfigError
from tqdm.auto import tqdm

from .backend import MODES
from .checkpoint import (
    CheckpointMeta,
    TrainingState,
    capture_rng,
    checkpoint_dir,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .client_model import ClientModel, causal_lm_loss
from .data import DataOrder, PackedData
from .runlog import RunLog, StepRecord, phase_seconds


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run; validated on construction, naming the bad field."""

    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    #: micro-batches of one step run concurrently (broker mode): requests in flight at once
    in_flight: int = 1
    seq_len: int = 256
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: checkpoint at the end only
    mode: str = "encrypted"
    bits: int = 8
    output_dir: str = "helora-out"
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_batches", "in_flight")
        non_negative = ("warmup_steps", "seed", "eval_every", "checkpoint_every")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{f.name}: {v!r} must be an integer")
            if f.name in positive and v < 1:
                raise ConfigError(f"{f.name}: {v!r} must be at least 1")
            if f.name in non_negative and v < 0:
                raise ConfigError(f"{f.name}: {v!r} must not be negative")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: {self.lr!r} must be a positive number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: {self.min_lr_ratio!r} must be in [0, 1]")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: {self.seq_len} must be at least 2")
        if self.mode not in MODES:
            raise ConfigError(f"mode: {self.mode!r} is not one of {MODES}")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"bits: {self.bits} must be in 2..8")


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    final_train_loss: float
    eval_loss: float
    tokens_per_s: float
    wire_bytes: int

    def __str__(self) -> str:
        return (f"steps {self.steps}  train loss {self.final_train_loss:.4f}  eval loss {self.eval_loss:.4f}  "
                f"(ppl {math.exp(min(self.eval_loss, 50)):.2f})  {self.tokens_per_s:.1f} tok/s  "
                f"wire {human_bytes(self.wire_bytes)}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to 1, then cosine down to ``min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(client: ClientModel, data: PackedData, batches: int, batch_size: int) -> float:
    """Token-weighted mean loss over the first ``batches`` micro-batches of held-out data."""
    was_training = client.training
    client.eval()
    total, count = 0.0, 0
    for b in range(min(batches, -(-len(data) // batch_size))):
        ids, labels = data.batch(range(b * batch_size, min(len(data), (b + 1) * batch_size)))
        loss, n = causal_lm_loss(client(ids), labels)
        total, count = total + float(loss), count + n
    client.train(was_training)
    return total / max(count, 1)


class Trainer:
    """One run: call :meth:`run`; ``resume=True`` continues from ``<output_dir>/checkpoint``.

    ``metrics`` (``hecommon.broker.metrics.OrchestratorMetrics``): step, loss, tokens and tokens/s after
    every optimizer step (``helora train --metrics-port``). Every step and evaluation is also
    appended to ``<output_dir>/metrics.jsonl`` (``runlog``; ``helora report`` draws it).
    """

    def __init__(self, cfg: TrainConfig, client: ClientModel, train_data: PackedData, eval_data: PackedData,
                 meta: CheckpointMeta, metrics: OrchestratorMetrics | None = None):
        self.cfg, self.client, self.meta, self.metrics = cfg, client, meta, metrics
        self.train_data, self.eval_data = train_data, eval_data
        self.optimizer = torch.optim.AdamW(client.lora_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s))
        self.order = DataOrder(len(train_data), cfg.batch_size, cfg.seed)
        self.step = 0

    def start(self, resume: bool) -> None:
        """Seed a fresh run, or restore a checkpoint; never overwrite one by accident."""
        out = Path(self.cfg.output_dir)
        if resume:
            state = load_checkpoint(out, self.meta)  # validates before anything changes
            self.client.load_lora_state_dict(state.lora)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            self.order.load_state(state.data)
            restore_rng(state.rng)
            self.step = state.step
        elif checkpoint_dir(out) is not None:
            raise ConfigError(f"output: {out} already holds a checkpoint; resume it or choose another output dir")
        else:
            torch.manual_seed(self.cfg.seed)
            np.random.seed(self.cfg.seed)
            random.seed(self.cfg.seed)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens)."""
        self.client.train()
        batches = [self.train_data.batch(self.order.next_batch()) for _ in range(self.cfg.grad_accum)]
        scored = sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)
        params = self.client.lora_parameters()
        total = 0.0
        if self.cfg.in_flight > 1 and len(batches) > 1:
            total = self._concurrent_micro_batches(batches, scored, params)
        else:
            for ids, labels in batches:
                loss, _ = causal_lm_loss(self.client(ids), labels)
                (loss / max(scored, 1)).backward()
                total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / max(scored, 1), sum(ids.numel() for ids, _ in batches)

    def _concurrent_micro_batches(self, batches, scored: int, params: list[torch.nn.Parameter]) -> float:
        """The micro-batches on ``in_flight`` threads, each with its own autograd graph (and its own
        broker connection), so that their requests overlap on the server. Each thread returns its
        gradients (``autograd.grad``); they are added here in micro-batch order, the order in which
        sequential ``backward()`` calls accumulate them, so the step is the same bit for bit.
        Needs LoRA dropout 0 (one random stream, drawn in an order threads would change)."""

        def one(batch) -> tuple[float, tuple[torch.Tensor | None, ...]]:
            ids, labels = batch
            loss, _ = causal_lm_loss(self.client(ids), labels)
            grads = torch.autograd.grad(loss / max(scored, 1), params, allow_unused=True)
            return float(loss.detach()), grads

        with ThreadPoolExecutor(self.cfg.in_flight, thread_name_prefix="micro-batch") as pool:
            results = list(pool.map(one, batches))
        total = 0.0
        for loss, grads in results:
            total += loss
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return total

    def evaluate(self) -> float:
        return evaluate(self.client, self.eval_data, self.cfg.eval_batches, self.cfg.batch_size)

    def save(self) -> Path:
        state = TrainingState(step=self.step, lora=self.client.lora_state_dict(),
                              optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                              data=self.order.state(), rng=capture_rng())
        return save_checkpoint(self.cfg.output_dir, self.meta, state)

    def run(self, until: int | None = None) -> TrainSummary:
        """Train to ``cfg.steps`` (or stop after step ``until``, as a kill would), checkpointing."""
        cfg = self.cfg
        last = min(cfg.steps, until if until is not None else cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
        log = RunLog(cfg.output_dir)
        loss, eval_loss, tokens, elapsed = float("nan"), float("nan"), 0, 0.0
        while self.step < last:
            t0, before, wire0 = time.perf_counter(), self.client.linear_seconds, self.client.wire_bytes
            loss, n = self.train_step()
            wall = time.perf_counter() - t0
            elapsed, tokens = elapsed + wall, tokens + n
            log.step(StepRecord(self.step, loss, n, n / wall if wall else 0.0, self.client.wire_bytes - wire0,
                                phase_seconds(wall, before, self.client.linear_seconds)))
            if self.metrics is not None:
                self.metrics.record_step(self.step, loss, n, tokens / elapsed if elapsed else 0.0)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:.1f}",
                            wire=human_bytes(self.client.wire_bytes), refresh=False)
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                eval_loss = self.evaluate()
                log.eval(self.step, eval_loss)
                bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        if self.step >= cfg.steps:
            eval_loss = self.evaluate()
            log.eval(self.step, eval_loss)
            self.save()
        return TrainSummary(self.step, loss, eval_loss, tokens / elapsed if elapsed else 0.0, self.client.wire_bytes)

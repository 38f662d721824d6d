"""What one federated round did, for one owner or all of them (embedded rounds and rounds over
RabbitMQ alike): losses, bytes, encryption time, rejections, and what the aggregator saw."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hecommon.wire.federated import Aggregate, RoundPlan, SumAggregate


@dataclass
class RoundReport:
    round: int
    train_loss: dict[str, float] = field(default_factory=dict)
    eval_loss: dict[str, float] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)  # (proposal +) contribution, per owner
    bytes_down: int = 0  # (plan +) aggregate, received by each owner
    enc_seconds: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    #: what the aggregator saw and answered this round (for attacks and tests): the plan, the
    #: contribution bytes exactly as received, and the aggregate
    plan: RoundPlan | None = field(default=None, repr=False)
    received: list[bytes] = field(default_factory=list, repr=False)
    aggregate: Aggregate | SumAggregate | None = field(default=None, repr=False)

    @property
    def mean_eval_loss(self) -> float:
        vals = [v for v in self.eval_loss.values() if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    def __str__(self) -> str:
        from ..train import human_bytes

        losses = "  ".join(f"{k} {v:.4f}" for k, v in self.eval_loss.items())
        up = sum(self.bytes_up.values())
        rej = f"  rejected: {self.rejected}" if self.rejected else ""
        return (f"round {self.round}: held-out loss {self.mean_eval_loss:.4f} ({losses})  "
                f"up {human_bytes(up)}  down {human_bytes(self.bytes_down)}/owner{rej}")

"""Negotiation of the encrypted columns (SHE-LoRA §4.2): the owner's side.

Each owner proposes the positions of its ``k_i`` most sensitive columns per layer, best first
(the server learns positions and order, never the scores or the data); the server merges the
proposals into one global ordered list per layer (``hecommon.wire.fedfields.global_order``,
re-exported here); each owner then encrypts the prefix of that list that fits its budget.
"""

from __future__ import annotations

import math

import numpy as np
from hecommon.errors import ConfigError
from hecommon.wire.federated import Proposal, ProposalLayer
from hecommon.wire.fedfields import global_order

__all__ = ["budget_columns", "global_order", "make_proposal", "top_k"]


def budget_columns(budget: float, d_in: int) -> int:
    """Columns of ``A`` an owner encrypts per layer: ``ceil(budget · d_in)``; 0 → none, 1 → all."""
    if not isinstance(budget, int | float) or not 0.0 <= budget <= 1.0:
        raise ConfigError(f"budget: {budget!r} must be a fraction in [0, 1]")
    return min(d_in, math.ceil(budget * d_in - 1e-9))


def top_k(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """The ``k`` highest-scoring column indices, best first (ties: lower index first)."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return tuple(int(j) for j in order[:k])


def make_proposal(rid: bytes, owner: str, ctx: bytes, scores: dict[str, np.ndarray],
                  shapes: dict[str, tuple[int, int]], budget: float) -> Proposal:
    layers = tuple(ProposalLayer(name, d_out, d_in, top_k(scores[name], budget_columns(budget, d_in)))
                   for name, (d_out, d_in) in shapes.items())
    return Proposal(rid, owner, ctx, layers)

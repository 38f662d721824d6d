"""Encoder: quantizes the frozen block linears and builds the public manifest.

Pure logic, no broker (STYLE): the RabbitMQ shell and the embedded mode call the same functions.
DESIGN §4: at start the encoder quantizes the weights once, writes the shards the evaluators
hold, and serves the public manifest (shapes, per-channel weight scales, zero-point sums, the
parameter set, the public seeds of ``a`` and each layer's shard count). It is not on the
per-request path: clients address the evaluators themselves (``hecommon.route``), and the
evaluators validate what they receive.
"""

from __future__ import annotations

import os

import numpy as np
from hecommon.he import params as P
from hecommon.he.exact import exact_terms
from hecommon.he.quantize import QuantizedWeight, quantize_weight
from hecommon.model import LinearGroup, config_fingerprint, group_weight
from hecommon.wire import LayerEntry, Manifest


def quantize_groups(model, groups: list[LinearGroup], bits: int = 8) -> dict[str, QuantizedWeight]:
    """Per-channel quantization of every fused group weight, once (DESIGN §2)."""
    return {g.name: quantize_weight(group_weight(model, g).double().cpu().numpy(), bits) for g in groups}


def build_manifest(
    model, groups: list[LinearGroup], qweights: dict[str, QuantizedWeight],
    params: P.ParamSet = P.DEFAULT, x_bits: int = 8, model_id: str = "",
) -> Manifest:
    """The public manifest. Seeds of ``a`` are fresh public randomness, one per layer and direction
    (the server's half of each owner's ``a``: ``sampling.owner_a_seed``). Every layer is exact, split
    into sub-sums, or refused here (``InexactLayer``), before any client encrypts anything."""
    entries = []
    w_bits = next(iter(qweights.values())).bits if qweights else 8
    terms = exact_terms(params, x_bits, w_bits)
    for g in groups:
        w = qweights[g.name]
        entries.append(LayerEntry(
            name=g.name, block=g.block, d_in=g.in_features, d_out=g.total_out,
            members=tuple(zip(g.members, g.out_features, strict=True)),
            a_seed_fwd=os.urandom(16), a_seed_bwd=os.urandom(16),
            weight_scale=w.scale.astype(np.float64), row_sums=w.row_sums, col_sums=w.col_sums, exact_terms=terms,
        ))
    meta = {"config_fingerprint": config_fingerprint(model)}
    return Manifest(rid=os.urandom(16), model=model_id or "custom", params=params, layers=tuple(entries),
                    x_bits=x_bits, w_bits=w_bits, metadata=meta)

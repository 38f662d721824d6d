"""Encoder: quantizes the frozen block linears, publishes the manifest, validates and routes.

Pure logic, no broker (STYLE): the RabbitMQ shell and the embedded mode call the same methods.
DESIGN §4: at start the encoder quantizes the weights once, writes the shards the evaluators
hold, and serves the public manifest (shapes, per-channel weight scales, zero-point sums, the
parameter set and the public seeds of ``a``). Per request it validates the message against the
manifest and splits it across the evaluators that hold the layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hecommon import params as P
from hecommon.encrypt import EncryptedBatch
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.quantize import QuantizedWeight, quantize_weight
from hecommon.wire import EncryptedRequest, LayerEntry, Manifest, RequestHead

from .model import LinearGroup, config_fingerprint, group_weight


@dataclass(frozen=True)
class Shard:
    """What one evaluator holds of one layer: input columns ``[lo, hi)`` of the fused weight.

    Forward, the shard is a *row shard* of the request (its inputs ``lo…hi``; partials summed);
    backward, it is a *column shard* (all inputs, its outputs ``lo…hi``; partials joined).
    """

    layer: str
    lo: int
    hi: int
    values: np.ndarray  # (d_out, hi - lo) int8: W[:, lo:hi]
    a_seed_fwd: bytes
    a_seed_bwd: bytes


def quantize_groups(model, groups: list[LinearGroup], bits: int = 8) -> dict[str, QuantizedWeight]:
    """Per-channel quantization of every fused group weight, once (DESIGN §2)."""
    return {g.name: quantize_weight(group_weight(model, g).double().cpu().numpy(), bits) for g in groups}


def build_manifest(
    model, groups: list[LinearGroup], qweights: dict[str, QuantizedWeight],
    params: P.ParamSet = P.DEFAULT, x_bits: int = 8, model_id: str = "",
) -> Manifest:
    """The public manifest. Seeds of ``a`` are fresh public randomness, one per layer and direction."""
    entries = []
    for g in groups:
        w = qweights[g.name]
        entries.append(LayerEntry(
            name=g.name, block=g.block, d_in=g.in_features, d_out=g.total_out,
            members=tuple(zip(g.members, g.out_features, strict=True)),
            a_seed_fwd=os.urandom(16), a_seed_bwd=os.urandom(16),
            weight_scale=w.scale.astype(np.float64), row_sums=w.row_sums, col_sums=w.col_sums,
        ))
    meta = {"config_fingerprint": config_fingerprint(model)}
    return Manifest(rid=os.urandom(16), model=model_id or "custom", params=params, layers=tuple(entries),
                    x_bits=x_bits, w_bits=next(iter(qweights.values())).bits if qweights else 8, metadata=meta)


def even_split(width: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``0…width``, sizes differing by at most one."""
    if not 1 <= parts <= width:
        raise ValueError(f"cannot split {width} columns into {parts} shards")
    cuts = np.linspace(0, width, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def make_shards(manifest: Manifest, qweights: dict[str, QuantizedWeight], plan: dict[str, int]) -> dict[str, list[Shard]]:
    """Cut each layer into ``plan.get(layer, 1)`` shards of input columns."""
    out: dict[str, list[Shard]] = {}
    for e in manifest.layers:
        w = qweights[e.name].values
        out[e.name] = [Shard(e.name, lo, hi, np.ascontiguousarray(w[:, lo:hi]), e.a_seed_fwd, e.a_seed_bwd)
                       for lo, hi in even_split(e.d_in, plan.get(e.name, 1))]
    return out


class EncoderHandler:
    """Validates requests against the manifest and routes them to the shards that hold the layer."""

    def __init__(self, manifest: Manifest, shard_ranges: dict[str, list[tuple[int, int]]]) -> None:
        self.manifest = manifest
        self.layers = {e.name: e for e in manifest.layers}
        self.shard_ranges = shard_ranges

    def validate(self, req: EncryptedRequest | RequestHead) -> LayerEntry:
        """The request's parameter set, layer and width against the manifest (a whole request, or
        the joined head of one: the RabbitMQ encoder checks heads and forwards uncut bodies)."""
        if req.params != self.manifest.params:
            raise ParameterMismatch(f"request uses {req.params.name}, the server {self.manifest.params.name}")
        entry = self.layers.get(req.layer)
        if entry is None:
            raise ParameterMismatch(f"unknown layer {req.layer!r}")
        width = entry.d_in if req.direction == "fwd" else entry.d_out
        if req.parts != 1 or req.row_start != 0 or req.width != width:
            raise MalformedMessage(f"layer {req.layer} {req.direction} takes {width} ciphertexts in one "
                                   f"request, got {req.width} (part {req.part}/{req.parts})")
        return entry

    def shard_count(self, req: EncryptedRequest | RequestHead) -> int:
        """How many evaluators serve the request's layer."""
        return len(self.shard_ranges.get(req.layer, [(0, self.layers[req.layer].d_in)]))

    def cuts(self, req: EncryptedRequest | RequestHead) -> bool:
        """Whether routing cuts the request (a forward request to a layer with several shards);
        otherwise every shard gets the request as it is."""
        return req.direction == "fwd" and self.shard_count(req) > 1

    def route(self, req: EncryptedRequest) -> list[tuple[int, EncryptedRequest]]:
        """(shard index, sub-request) pairs. Forward requests are cut by input rows."""
        self.validate(req)
        ranges = self.shard_ranges.get(req.layer, [(0, self.layers[req.layer].d_in)])
        if req.direction == "bwd" or len(ranges) == 1:
            return [(i, req) for i in range(len(ranges))]
        b = req.batch
        return [(i, EncryptedRequest(rid=req.rid, layer=req.layer, direction="fwd", row_start=lo,
                                     batch=EncryptedBatch(b.params, b.b[lo:hi], b.n_tokens), send_a=req.send_a))
                for i, (lo, hi) in enumerate(ranges)]

"""Encoder: quantizes the frozen block linears, publishes the manifest, validates and routes.

Pure logic, no broker (STYLE): the RabbitMQ shell and the embedded mode call the same methods.
DESIGN §4: at start the encoder quantizes the weights once, writes the shards the evaluators
hold, and serves the public manifest (shapes, per-channel weight scales, zero-point sums, the
parameter set and the public seeds of ``a``). Per request it validates the message against the
manifest and splits it across the evaluators that hold the layer.
"""

from __future__ import annotations

import os

import numpy as np
from hecommon import params as P
from hecommon.encrypt import EncryptedBatch
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.exact import exact_terms
from hecommon.model import LinearGroup, config_fingerprint, group_weight
from hecommon.quantize import QuantizedWeight, quantize_weight
from hecommon.wire import EncryptedRequest, LayerEntry, Manifest, RequestHead


def quantize_groups(model, groups: list[LinearGroup], bits: int = 8) -> dict[str, QuantizedWeight]:
    """Per-channel quantization of every fused group weight, once (DESIGN §2)."""
    return {g.name: quantize_weight(group_weight(model, g).double().cpu().numpy(), bits) for g in groups}


def build_manifest(
    model, groups: list[LinearGroup], qweights: dict[str, QuantizedWeight],
    params: P.ParamSet = P.DEFAULT, x_bits: int = 8, model_id: str = "",
) -> Manifest:
    """The public manifest. Seeds of ``a`` are fresh public randomness, one per layer and direction
    (the server's half of each owner's ``a``: ``encrypt.owner_a_seed``). Every layer is exact, split
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


class EncoderHandler:
    """Validates requests against the manifest and routes them to the shards that hold the layer."""

    def __init__(self, manifest: Manifest, shard_ranges: dict[str, list[tuple[int, int]]]) -> None:
        self.manifest = manifest
        self.layers = {e.name: e for e in manifest.layers}
        self.shard_ranges = shard_ranges

    def _layer(self, req: EncryptedRequest | RequestHead) -> tuple[LayerEntry, int]:
        """The request's layer (its parameter set checked) and how many ciphertexts it takes."""
        if req.params != self.manifest.params:
            raise ParameterMismatch(f"request uses {req.params.name}, the server {self.manifest.params.name}")
        entry = self.layers.get(req.layer)
        if entry is None:
            raise ParameterMismatch(f"unknown layer {req.layer!r}")
        return entry, entry.d_in if req.direction == "fwd" else entry.d_out

    def validate(self, req: EncryptedRequest | RequestHead) -> LayerEntry:
        """The request's parameter set, layer and width against the manifest (a whole request, or
        the joined head of one: the RabbitMQ encoder checks heads and forwards uncut bodies)."""
        entry, width = self._layer(req)
        if req.parts != 1 or req.row_start != 0 or req.width != width:
            raise MalformedMessage(f"layer {req.layer} {req.direction} takes {width} ciphertexts in one "
                                   f"request, got {req.width} (part {req.part}/{req.parts})")
        return entry

    def validate_part(self, head: RequestHead) -> LayerEntry:
        """One part of a multi-part request against the manifest, alone: parameter set, layer, and
        its rows inside the layer's inputs (the evaluator, which joins the parts, checks that they
        cover them exactly once)."""
        entry, width = self._layer(head)
        if head.parts < 2 or head.row_start + head.width > width:
            raise MalformedMessage(f"layer {head.layer} {head.direction} takes {width} ciphertexts; part "
                                   f"{head.part}/{head.parts} has rows {head.row_start}…{head.row_start + head.width}")
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
                                     batch=EncryptedBatch(b.params, b.b[lo:hi], b.n_tokens), send_a=req.send_a,
                                     owner=req.owner))
                for i, (lo, hi) in enumerate(ranges)]

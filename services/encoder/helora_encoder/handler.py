"""Encoder: quantizes the frozen block linears, publishes the manifest, validates and routes.

Pure logic, no broker (STYLE): the RabbitMQ shell and the embedded mode call the same methods.
DESIGN §4: at start the encoder quantizes the weights once, writes the shards the evaluators
hold, and serves the public manifest (shapes, per-channel weight scales, zero-point sums, the
parameter set and the public seeds of ``a``). Per request it validates the message against the
manifest and splits it across the evaluators that hold the layer.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hecommon import params as P
from hecommon.amqp import Delivery, PartCollector
from hecommon.encrypt import EncryptedBatch
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.exact import exact_terms
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
    terms: int  # the layer's widest exact sum (LayerEntry.exact_terms)
    sums_fwd: int  # sub-sums of the layer's forward outputs (LayerEntry.sums)
    sums_bwd: int

    @classmethod
    def of(cls, e: LayerEntry, lo: int, hi: int, values: np.ndarray) -> Shard:
        """Input columns ``[lo, hi)`` of the layer ``e`` of a manifest."""
        return cls(e.name, lo, hi, values, e.a_seed_fwd, e.a_seed_bwd, e.exact_terms, e.sums("fwd"), e.sums("bwd"))


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
        out[e.name] = [Shard.of(e, lo, hi, np.ascontiguousarray(w[:, lo:hi]))
                       for lo, hi in even_split(e.d_in, plan.get(e.name, 1))]
    return out


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


def _route_of(head: RequestHead) -> tuple[Any, ...]:
    """What every part of one request shares (``wire.join_heads`` checks the same)."""
    return (head.rid, head.layer, head.direction, head.parts, head.lib, head.params.name, head.n_tokens, head.send_a,
            head.owner)


@dataclass
class _Stream:
    route: tuple[Any, ...]
    sent: set[int] = field(default_factory=set)
    seen: float = field(default_factory=lambda: time.monotonic())


class StreamGate:
    """Which parts of multi-part requests the encoder passes on at once (pure; the worker acts).

    Passing every part on as it arrives would let the parts of concurrent requests interleave at an
    evaluator, which holds a request's parts until it has them all, within a bounded prefetch
    window: enough interleaved requests fill it with incomplete ones, and it stalls. So one request
    at a time *streams*: each of its parts is passed on as it arrives, and the evaluator starts on
    it while the client still encrypts the next. Parts of other requests wait here until they are
    complete and then go out whole, one request after another, or until the stream ends, when the
    oldest incomplete one streams next with the parts it has. An evaluator then sees at most one
    request's parts interleaved with others, and each of those others whole.

    ``offer(head, delivery)`` says what to do with an arriving part (``("forward", parts)``,
    ``("whole", (heads, deliveries))``, ``("copy", [delivery])`` or ``("hold", None)``); after
    forwarding a stream's parts the worker calls ``forwarded(heads)``, which returns the parts of
    the next stream to forward, if any. A stream silent for ``timeout_s`` is dropped by
    ``expired()`` (its evaluators time the request out); waiting requests older than that come
    back from ``expired()`` to be dead-lettered.
    """

    #: rids of finished streams remembered, so that a redelivered copy of their parts is acked
    RECENT = 256

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.waiting = PartCollector(timeout_s)
        self._stream: _Stream | None = None
        self._done: deque[bytes] = deque(maxlen=self.RECENT)

    @property
    def streaming(self) -> bytes | None:
        """The request id now streaming, if any."""
        return self._stream.route[0] if self._stream is not None else None

    def offer(self, head: RequestHead, d: Delivery) -> tuple[str, Any]:
        route = _route_of(head)
        s = self._stream
        if s is not None and route[0] == s.route[0]:
            if route != s.route:
                raise MalformedMessage(f"join: part {head.part} does not match the parts before it")
            if head.part in s.sent:
                return "copy", [d]
            s.seen = time.monotonic()
            return "forward", [(head, d)]
        if head.rid in self._done:
            return "copy", [d]
        if s is None and head.rid not in self.waiting:
            self._stream = _Stream(route)
            return "forward", [(head, d)]
        got = self.waiting.add(head.rid, head, d)
        copies = self.waiting.take_copies()
        if got is not None:
            return "whole", got
        if copies:
            return "copy", copies
        return "hold", None

    def forwarded(self, heads: list[RequestHead]) -> list[tuple[RequestHead, Delivery]]:
        """Record the stream's parts as passed on; when that completes it, the next stream's parts."""
        s = self._stream
        if s is None:
            return []
        s.sent.update(h.part for h in heads)
        if len(s.sent) < s.route[3]:
            return []
        return self._next()

    def _next(self) -> list[tuple[RequestHead, Delivery]]:
        if self._stream is not None:
            self._done.append(self._stream.route[0])
        self._stream = None
        rid = self.waiting.oldest()
        if rid is None:
            return []
        heads, ds = self.waiting.pop(rid)
        self._stream = _Stream(_route_of(heads[0]))
        return list(zip(heads, ds, strict=True))

    def expired(self) -> tuple[list[tuple[Any, list[Delivery]]], list[tuple[RequestHead, Delivery]]]:
        """(waiting requests that timed out, to dead-letter; the next stream's parts, to forward,
        when the stream timed out)."""
        late = self.waiting.expired()
        s = self._stream
        if s is not None and time.monotonic() - s.seen > self.timeout_s:
            return late, self._next()
        return late, []

    def __len__(self) -> int:
        """Requests streaming or waiting."""
        return len(self.waiting) + (self._stream is not None)

    def clear(self) -> None:
        self.waiting.clear()
        self._stream = None

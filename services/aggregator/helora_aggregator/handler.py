"""Aggregator: gathers the shards' partials of a request, switches the modulus, replies.

Pure logic (no broker). Forward partials are row shards and are summed mod q; backward
partials are column shards and are joined in output order. A duplicate partial (a redelivered
message) is ignored, so a request is never counted twice (DESIGN §7.5). The switch covers the
request's ``b``; the public ``a`` part, the same for every request of a layer, comes already
switched and packed from an evaluator that holds the whole output (``EncryptedPartial``), and
goes into the reply as it came; row shards' ``a`` parts come mod q and are summed and switched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hecommon.encrypt import EncryptedPartial
from hecommon.errors import MalformedMessage
from hecommon.wire import EncryptedReply, PartialResult


@dataclass
class _Pending:
    shards: int
    parts: dict[int, PartialResult] = field(default_factory=dict)


class AggregatorHandler:
    """``send_a=False``: the clients hold the layers' hints, so replies carry ``b`` alone. A request
    sent with ``send_a=False`` (its client holds the switched ``a`` of an earlier reply) is answered
    with ``b`` alone at ``out_bits`` either way."""

    def __init__(self, max_pending: int = 4096, send_a: bool = True) -> None:
        self.send_a = send_a
        self._pending: dict[tuple[bytes, str, str], _Pending] = {}
        self._done: dict[tuple[bytes, str, str], None] = {}  # recently completed, for duplicates
        self.max_pending = max_pending
        self.switch_seconds = 0.0  # the modulus switch of the last completed request (a metric)

    def add(self, partial: PartialResult) -> EncryptedReply | None:
        """Record one partial; the reply once every shard of the request has arrived."""
        key = (partial.rid, partial.layer, partial.direction)
        if key in self._done:
            return None
        pending = self._pending.setdefault(key, _Pending(partial.shards))
        if pending.shards != partial.shards:
            raise MalformedMessage(f"partial says {partial.shards} shards, earlier ones {pending.shards}")
        pending.parts.setdefault(partial.shard, partial)
        if len(pending.parts) < pending.shards:
            if len(self._pending) > self.max_pending:
                self._pending.pop(next(iter(self._pending)))  # drop the oldest incomplete request
            return None
        del self._pending[key]
        self._done[key] = None
        if len(self._done) > self.max_pending:
            self._done.pop(next(iter(self._done)))
        return self._combine(partial, [pending.parts[i] for i in range(pending.shards)])

    def abandon(self, key: tuple[bytes, str, str]) -> tuple[int, list[int]]:
        """Give up on an incomplete request (its time is up): (its shard count, the shards that never
        answered). Later partials of it count as duplicates."""
        pending = self._pending.pop(key, None)
        self._done[key] = None
        if len(self._done) > self.max_pending:
            self._done.pop(next(iter(self._done)))
        if pending is None:
            return 0, []
        return pending.shards, sorted(set(range(pending.shards)) - set(pending.parts))

    def _combine(self, first: PartialResult, parts: list[PartialResult]) -> EncryptedReply:
        if first.direction == "fwd":
            total = parts[0].partial
            for p in parts[1:]:
                total = total + p.partial
        else:
            ordered = sorted(parts, key=lambda p: p.out_start)
            total = EncryptedPartial.join([p.partial for p in ordered])
        t0 = time.perf_counter()
        a_part = ("send" if self.send_a else "hint") if first.send_a else "held"  # held: the client asked
        result = total.switch(a_part)
        self.switch_seconds = time.perf_counter() - t0
        return EncryptedReply(rid=first.rid, layer=first.layer, direction=first.direction, result=result)

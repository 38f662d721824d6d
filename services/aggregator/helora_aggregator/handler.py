"""Aggregator: gathers the shards' partials of a request, switches the modulus, replies.

Pure logic (no broker). An evaluator sends one partial per request part it received (a
*piece*: the sum over that part's input rows); the pieces of each shard are added mod q. Forward
shards are row shards and are summed mod q; backward shards are column shards and are joined in
output order. Only sharded layers come here: an evaluator that holds a whole layer answers the
client itself (``hecommon.route``); the embedded server sends every layer through this handler. A duplicate partial (a redelivered
message) is ignored, so a request is never counted twice (DESIGN §7.5). The switch covers the
request's ``b``; the public ``a`` part, the same for every request of a layer, comes already
switched and packed from an evaluator that holds the whole output (``EncryptedPartial``), and
goes into the reply as it came; row shards' ``a`` parts come mod q and are summed and switched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hecommon.errors import MalformedMessage
from hecommon.he.encrypt import ClientA, EncryptedPartial
from hecommon.wire import EncryptedReply, PartialResult


@dataclass
class _Pending:
    shards: int
    pieces: dict[int, int] = field(default_factory=dict)  # shard -> its piece count
    got: dict[tuple[int, int], PartialResult] = field(default_factory=dict)  # (shard, piece) -> partial

    def complete(self) -> bool:
        return (len(self.pieces) == self.shards
                and len(self.got) == sum(self.pieces.values()))


class AggregatorHandler:
    """``include_a=False``: the clients hold the layers' hints, so replies carry ``b`` alone. A request
    sent with ``send_a=False`` (its client holds the switched ``a`` of an earlier reply) is answered
    with ``b`` alone at ``out_bits`` either way."""

    def __init__(self, max_pending: int = 4096, include_a: bool = True) -> None:
        self.include_a = include_a
        self._pending: dict[tuple[bytes, str, str], _Pending] = {}
        self._done: dict[tuple[bytes, str, str], None] = {}  # recently completed, for duplicates
        self.max_pending = max_pending
        self.switch_seconds = 0.0  # the modulus switch of the last completed request (a metric)

    def add(self, partial: PartialResult) -> EncryptedReply | None:
        """Record one partial (a whole piece of one shard); the reply once every piece of every
        shard of the request has arrived."""
        key = (partial.rid, partial.layer, partial.direction)
        if key in self._done:
            return None
        pending = self._pending.setdefault(key, _Pending(partial.shards))
        if pending.shards != partial.shards:
            raise MalformedMessage(f"partial says {partial.shards} shards, earlier ones {pending.shards}")
        if pending.pieces.setdefault(partial.shard, partial.pieces) != partial.pieces:
            raise MalformedMessage(f"shard {partial.shard}: a partial says {partial.pieces} pieces, earlier ones "
                                   f"{pending.pieces[partial.shard]}")
        pending.got.setdefault((partial.shard, partial.piece), partial)
        if not pending.complete():
            if len(self._pending) > self.max_pending:
                self._pending.pop(next(iter(self._pending)))  # drop the oldest incomplete request
            return None
        del self._pending[key]
        self._remember(key)
        return self._combine(partial, pending)

    def _remember(self, key: tuple[bytes, str, str]) -> None:
        self._done[key] = None
        if len(self._done) > self.max_pending:
            self._done.pop(next(iter(self._done)))

    def abandon(self, key: tuple[bytes, str, str]) -> tuple[int, list[int]]:
        """Give up on an incomplete request (its time is up): (its shard count, the shards with
        pieces missing). Later partials of it count as duplicates."""
        pending = self._pending.pop(key, None)
        self._remember(key)
        if pending is None:
            return 0, []
        missing = [i for i in range(pending.shards)
                   if i not in pending.pieces or sum(1 for s, _ in pending.got if s == i) < pending.pieces[i]]
        return pending.shards, missing

    def _combine(self, first: PartialResult, pending: _Pending) -> EncryptedReply:
        shards = []
        for shard in range(pending.shards):  # the pieces of each shard: sums over parts of its inputs
            total = pending.got[(shard, 0)].partial
            for piece in range(1, pending.pieces[shard]):
                total = total + pending.got[(shard, piece)].partial
            shards.append((pending.got[(shard, 0)].out_start, total))
        if first.direction == "fwd":  # row shards: summed
            total = shards[0][1]
            for _, p in shards[1:]:
                total = total + p
        else:  # column shards: joined in output order
            total = EncryptedPartial.join([p for _, p in sorted(shards, key=lambda sp: sp[0])])
        t0 = time.perf_counter()
        if not first.send_a:  # the client said it holds the switched a
            client_a = ClientA.SWITCHED
        else:
            client_a = ClientA.NOTHING if self.include_a else ClientA.HINT
        result = total.switch(client_a)
        self.switch_seconds = time.perf_counter() - t0
        return EncryptedReply(rid=first.rid, layer=first.layer, direction=first.direction, result=result)

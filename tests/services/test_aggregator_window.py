"""The aggregator holds every partial message of a sharded request until its reply is out, so its
prefetch window must hold them all; a window full of incomplete requests is reported, with the
fix. The worker is driven without a broker: nothing here is acked or published."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
from hecommon import wire
from hecommon.broker.amqp import Delivery
from hecommon.he import params as P
from hecommon.he.encrypt import EncryptedPartial
from helora_aggregator.config import AggregatorConfig
from helora_aggregator.worker import AggregatorWorker


def _parts(rid: bytes, limit: int) -> list[bytes]:
    params = P.DEFAULT
    rows = np.zeros((3, params.limbs, params.n), dtype=np.uint32)
    partial = wire.PartialResult(rid, "0.qkv", "fwd", 0, 2, 0, 1, EncryptedPartial(params, rows, rows[:, :, :4].copy(), 4))
    return [wire.encode_partial(c, limit) for c in wire.split(partial, limit)]


def _deliver(worker: AggregatorWorker, body: bytes, tag: int) -> None:
    props = SimpleNamespace(reply_to="amq.gen-client", correlation_id="c", headers=None)
    worker.handle(Delivery(worker.topology.partials, tag, props, body, gen=0))


def test_a_window_full_of_incomplete_requests_is_reported(caplog):
    limit = wire.partial_row_bytes(P.DEFAULT, False) + wire.HEADER_ALLOWANCE  # one output row a message
    worker = AggregatorWorker(AggregatorConfig(prefetch=4, max_message_bytes=max(limit, 64 * 1024)))
    worker.limit = limit
    first, second = _parts(os.urandom(16), limit), _parts(os.urandom(16), limit)
    assert len(first) == len(second) == 3
    with caplog.at_level(logging.WARNING, logger="helora.aggregator"):
        for tag, body in enumerate(first[:2] + second[:1]):  # 3 held, under the window of 4
            _deliver(worker, body, tag)
        assert "raise --prefetch" not in caplog.text
        _deliver(worker, second[1], 9)  # 4 held: the window is full and nothing can complete
    assert "holding 4 partial messages of 2 incomplete request(s), the whole --prefetch (4)" in caplog.text
    assert "raise --prefetch" in caplog.text


def test_parts_that_disagree_fail_every_delivery_held_for_them():
    """Two copies of one shard's piece cut at different sizes (an evaluator replaced with another
    --max-message-bytes): the message cannot be put together, and every delivery received for it
    is failed (dead-lettered), the earlier parts too, none left unacked in the window."""
    rows3 = wire.partial_row_bytes(P.DEFAULT, False) + wire.HEADER_ALLOWANCE  # one output row a message
    worker = AggregatorWorker(AggregatorConfig(max_message_bytes=64 * 1024))
    worker.limit = 64 * 1024
    rid = os.urandom(16)
    in_three = _parts(rid, rows3)
    in_two = _parts(rid, 2 * rows3)
    assert len(in_three) == 3 and len(in_two) == 2
    failed: list[tuple[list[int], str]] = []
    worker.fail = lambda ds, exc, **_: failed.append(([d.tag for d in ds], str(exc)))  # type: ignore[method-assign]
    _deliver(worker, in_three[0], 1)
    _deliver(worker, in_two[1], 2)
    assert failed == [([1, 2], "part 1: says 2 parts, the earlier ones 3")]
    assert len(worker.parts) == 0 and worker.parts.held() == 0

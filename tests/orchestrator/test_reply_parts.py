"""The broker client's reply parts: each used once as it arrives, checked like ``join`` checks
them; late copies for an answered request are dropped, not kept."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from hecommon import wire
from hecommon.errors import MalformedMessage
from hecommon.he.encrypt import EncryptedResult, unpacked
from hecommon.he.params import N2048
from helora_orchestrator.broker import BrokerTransport


def _reply_parts(rows: int = 3) -> list[wire.EncryptedReply]:
    k = N2048.out_bits
    values = np.arange(rows * N2048.n, dtype=np.uint64).reshape(rows, N2048.n) % (1 << k)
    reply = wire.EncryptedReply(bytes(16), "0.qkv", "fwd", EncryptedResult(N2048, values, values[::-1, :4].copy(), 4))
    limit = reply._row_bytes() + wire.HEADER_ALLOWANCE  # one row per part
    return wire.split(reply, limit)  # type: ignore[return-value]


def test_every_part_once_completes_whatever_the_order():
    p0, p1, p2 = _reply_parts()
    parts = wire.PartTracker()
    assert parts.add(p2) and not parts.complete
    assert parts.add(p0) and not parts.complete
    assert not parts.add(p0) and not parts.complete  # a copy of part 0 is not part 1
    assert (0, 0) in parts and (0, 1) not in parts
    assert parts.add(p1) and parts.complete
    assert parts.rows == 3


def test_a_reply_in_pieces_completes_once_every_part_of_every_piece_is_in():
    """An evaluator holding a whole layer answers each request part alone: the reply comes in
    pieces, each with the same output rows, and the tracker waits for all of them."""
    pieces = [[dataclasses.replace(p, piece=i, pieces=2) for p in _reply_parts()] for i in range(2)]
    parts = wire.PartTracker()
    for p in pieces[0]:
        assert parts.add(p)
    assert not parts.complete and parts.pieces == 2  # piece 1 still to come
    assert parts.add(pieces[1][2]) and not parts.add(pieces[1][2]) and (1, 2) in parts
    for p in pieces[1][:2]:
        parts.add(p)
    assert parts.complete and parts.rows == 6
    with pytest.raises(MalformedMessage, match="different messages"):  # another piece count: another reply
        parts.add(dataclasses.replace(pieces[0][0], pieces=3))


def test_parts_of_another_message_are_refused():
    p0, p1, _ = _reply_parts()
    parts = wire.PartTracker()
    parts.add(p0)
    with pytest.raises(MalformedMessage, match="different messages"):
        parts.add(dataclasses.replace(p1, rid=bytes(15) + b"\x01"))
    with pytest.raises(MalformedMessage, match="different messages"):
        parts.add(dataclasses.replace(p1, layer="1.qkv"))


def test_parts_whose_offsets_do_not_follow_are_refused():
    p0, p1, p2 = _reply_parts()
    parts = wire.PartTracker()
    for p in (p0, dataclasses.replace(p1, out_start=2), p2):
        parts.add(p)
    with pytest.raises(MalformedMessage, match="not contiguous"):
        _ = parts.complete


def test_the_parts_used_one_by_one_equal_the_joined_reply():
    whole = wire.join(_reply_parts())
    out = np.zeros_like(unpacked(whole.result.b))
    parts = wire.PartTracker()
    for p in reversed(_reply_parts()):
        if parts.add(p):
            out[p.out_start:p.out_start + p.result.width] = unpacked(p.result.b)
    assert parts.complete and np.array_equal(out, unpacked(whole.result.b))


def test_late_copies_for_an_answered_request_are_dropped():
    t = BrokerTransport("amqp://guest:guest@127.0.0.1:5672/%2F")
    t._expect("aa")
    t._on_reply(None, None, SimpleNamespace(correlation_id="aa"), b"part")
    t._on_reply(None, None, SimpleNamespace(correlation_id="bb"), b"late copy")
    assert t._inbox == {"aa": [b"part"]}
    t._expect("cc")  # the next request: what is left of the last one goes
    t._on_reply(None, None, SimpleNamespace(correlation_id="aa"), b"late copy")
    assert t._inbox == {}


def test_request_parts_are_drawn_once_and_sent_again_on_a_retry():
    """A request given part by part (each encrypted when drawn): a retry after a reconnection sends
    the parts already drawn again, without drawing (encrypting) them a second time."""
    from helora_orchestrator.broker import _DrawnParts

    drawn = []

    def source():
        for i in range(3):
            drawn.append(i)
            yield i

    parts = _DrawnParts(source())
    assert parts.first() == 0 and drawn == [0]
    first_attempt = []
    for p in parts:
        first_attempt.append(p)
        if p == 1:
            break  # the connection dropped while part 1 was published
    assert first_attempt == [0, 1] and drawn == [0, 1]
    assert list(parts) == [0, 1, 2] and drawn == [0, 1, 2]  # the retry: 0 and 1 again, 2 drawn now
    assert list(parts) == [0, 1, 2] and drawn == [0, 1, 2]

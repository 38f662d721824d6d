"""``helora_encoder.gate.StreamGate``: which parts of multi-part requests the encoder passes on
at once, so that an evaluator never holds more than one request's parts interleaved with others."""

from __future__ import annotations

import os

import pytest
from hecommon import params as P
from hecommon.amqp import Delivery
from hecommon.errors import MalformedMessage
from hecommon.wire import RequestHead
from helora_encoder.gate import StreamGate

_tags = iter(range(1, 1 << 30))


def _part(rid: bytes, part: int, parts: int = 3, rows: int = 4, layer: str = "0.qkv") -> tuple[RequestHead, Delivery]:
    head = RequestHead(rid, layer, "bwd", P.DEFAULT, 8, rows, part=part, parts=parts, row_start=part * rows)
    return head, Delivery("ingress", next(_tags), None, b"", gen=1)


def _forward_all(gate: StreamGate, parts):
    """What the worker does with a "forward": pass the parts on, tell the gate, and so on."""
    out = []
    while parts:
        out += [h for h, _ in parts]
        parts = gate.forwarded([h for h, _ in parts])
    return out


def test_a_lone_request_streams_part_by_part():
    gate, rid = StreamGate(), os.urandom(16)
    for i in range(3):
        action, what = gate.offer(*_part(rid, i))
        assert action == "forward" and [h.part for h, _ in what] == [i]
        assert gate.streaming == rid and len(gate) == 1
        assert _forward_all(gate, what) == [what[0][0]]
    assert gate.streaming is None and len(gate) == 0


def test_others_wait_whole_while_one_streams_then_the_oldest_streams_next():
    gate = StreamGate()
    a, b, c = (os.urandom(16) for _ in range(3))
    assert gate.offer(*_part(a, 0))[0] == "forward"
    gate.forwarded([_part(a, 0)[0]])
    assert gate.offer(*_part(b, 0))[0] == "hold"
    assert gate.offer(*_part(c, 1, parts=2))[0] == "hold"
    action, (heads, ds) = gate.offer(*_part(c, 0, parts=2))  # complete while a streams: out whole
    assert action == "whole" and [h.part for h in heads] == [0, 1] and len(ds) == 2
    assert gate.offer(*_part(a, 1))[0] == "forward"
    gate.forwarded([_part(a, 1)[0]])
    action, what = gate.offer(*_part(a, 2))
    nxt = gate.forwarded([h for h, _ in what])  # a is done: b streams, with the part it has
    assert [(h.rid, h.part) for h, _ in nxt] == [(b, 0)] and gate.streaming == b
    assert gate.forwarded([h for h, _ in nxt]) == []
    assert gate.offer(*_part(b, 1))[0] == "forward"


def test_copies_are_acked_not_forwarded_twice():
    gate, rid = StreamGate(), os.urandom(16)
    head, d = _part(rid, 0, parts=2)
    gate.forwarded([h for h, _ in gate.offer(head, d)[1]])
    action, what = gate.offer(head, Delivery("ingress", 99, None, b"", gen=1))
    assert action == "copy" and [x.tag for x in what] == [99]
    head1, d1 = _part(rid, 1, parts=2)
    gate.forwarded([h for h, _ in gate.offer(head1, d1)[1]])
    assert gate.streaming is None
    assert gate.offer(head1, Delivery("ingress", 100, None, b"", gen=1))[0] == "copy"  # a finished stream's part
    other = os.urandom(16)
    gate.offer(*_part(other, 0))  # streams
    waiting = os.urandom(16)
    assert gate.offer(*_part(waiting, 0))[0] == "hold"
    assert gate.offer(_part(waiting, 0)[0], Delivery("ingress", 101, None, b"", gen=1)) == (
        "copy", [Delivery("ingress", 101, None, b"", gen=1)])


def test_a_part_unlike_the_streams_first_is_refused():
    gate, rid = StreamGate(), os.urandom(16)
    gate.forwarded([h for h, _ in gate.offer(*_part(rid, 0))[1]])
    with pytest.raises(MalformedMessage, match="does not match"):
        gate.offer(*_part(rid, 1, parts=4))
    with pytest.raises(MalformedMessage, match="does not match"):
        gate.offer(*_part(rid, 1, layer="1.qkv"))


def test_a_silent_stream_gives_way_and_old_waiting_requests_expire(monkeypatch):
    import helora_encoder.gate as gate_module

    now = [1000.0]
    monkeypatch.setattr(gate_module.time, "monotonic", lambda: now[0])
    import hecommon.amqp as amqp

    monkeypatch.setattr(amqp.time, "monotonic", lambda: now[0])
    gate = StreamGate(timeout_s=10)
    a, b = os.urandom(16), os.urandom(16)
    gate.forwarded([h for h, _ in gate.offer(*_part(a, 0))[1]])
    now[0] += 5
    assert gate.offer(*_part(b, 0))[0] == "hold"
    now[0] += 6  # a silent for 11 s: b streams with what it has
    late, nxt = gate.expired()
    assert late == [] and [(h.rid, h.part) for h, _ in nxt] == [(b, 0)]
    gate.forwarded([h for h, _ in nxt])
    c = os.urandom(16)
    assert gate.offer(*_part(c, 0))[0] == "hold"
    now[0] += 11  # c waited 11 s: dead-lettered; b, silent as long, ends
    late, nxt = gate.expired()
    assert [k for k, _ in late] == [c] and nxt == [] and gate.streaming is None

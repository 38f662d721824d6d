"""``parts.PartCollector``: the parts of chunked messages, with the copies a redelivery brings."""

from __future__ import annotations

from dataclasses import dataclass

from hecommon.broker.amqp import Delivery
from hecommon.broker.parts import PartCollector


@dataclass
class Part:
    part: int
    parts: int


def _d(tag: int) -> Delivery:
    return Delivery("q", tag, None, b"", gen=0)


def test_parts_complete_in_order_whatever_their_arrival():
    c = PartCollector()
    assert c.add("k", Part(2, 3), _d(1)) is None
    assert c.add("k", Part(0, 3), _d(2)) is None
    msgs, ds = c.add("k", Part(1, 3), _d(3))
    assert [m.part for m in msgs] == [0, 1, 2] and [d.tag for d in ds] == [2, 3, 1]
    assert len(c) == 0


def test_a_copied_part_is_kept_once_and_its_delivery_acked_with_the_rest():
    """A sender that died after publishing part 0, and its replacement that sent both parts."""
    c = PartCollector()
    assert c.add("k", Part(0, 2), _d(1)) is None
    assert c.add("k", Part(0, 2), _d(2)) is None  # the copy: not an error, not counted
    assert [d.tag for d in c.take_copies()] == [2]  # acked at once: copies never fill the prefetch
    assert c.take_copies() == []
    msgs, ds = c.add("k", Part(1, 2), _d(3))
    assert [m.part for m in msgs] == [0, 1]
    assert sorted(d.tag for d in ds) == [1, 3]  # the originals, acked once the message is used


def test_discard_hands_back_the_deliveries_of_answered_requests():
    c = PartCollector()
    c.add(("r1", 0), Part(1, 2), _d(1))
    c.add(("r2", 0), Part(0, 2), _d(3))
    assert sorted(d.tag for d in c.discard(lambda k: k[0] == "r1")) == [1]
    assert len(c) == 1


def test_expired_hands_back_the_held_parts():
    c = PartCollector(timeout_s=0.0)
    c.add("k", Part(0, 2), _d(1))
    [(key, ds)] = c.expired()
    assert key == "k" and [d.tag for d in ds] == [1]

"""``wire.Gather``: the one reassembly of chunked messages (every family), with the copies a
redelivery brings, the checks that drop a whole message and the bounds on what it holds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hecommon.broker.amqp import Delivery
from hecommon.errors import MalformedMessage, OversizedMessage
from hecommon.wire import Gather, GatherError, Head


@dataclass(frozen=True)
class Part:
    key: object
    part: int
    parts: int
    size: int = 0


def _gather(**kw) -> Gather[Part, Delivery]:
    return Gather(lambda p: Head(p.key, p.part, p.parts, p.size), **kw)


def _d(tag: int) -> Delivery:
    return Delivery("q", tag, None, b"", gen=0)


def test_parts_complete_in_order_whatever_their_arrival():
    c = _gather()
    assert c.add(Part("k", 2, 3), _d(1)) is None
    assert c.add(Part("k", 0, 3), _d(2)) is None
    msgs, ds = c.add(Part("k", 1, 3), _d(3))
    assert [m.part for m in msgs] == [0, 1, 2] and [d.tag for d in ds] == [1, 2, 3]
    assert len(c) == 0


def test_a_copied_part_is_kept_once_and_its_delivery_acked_with_the_rest():
    """A sender that died after publishing part 0, and its replacement that sent both parts."""
    c = _gather()
    assert c.add(Part("k", 0, 2), _d(1)) is None
    assert c.add(Part("k", 0, 2), _d(2)) is None  # the copy: not an error, not counted
    assert [d.tag for d in c.take_copies()] == [2]  # acked at once: copies never fill the prefetch
    assert c.take_copies() == []
    msgs, ds = c.add(Part("k", 1, 2), _d(3))
    assert [m.part for m in msgs] == [0, 1]
    assert sorted(d.tag for d in ds) == [1, 3]  # the originals, acked once the message is used


def test_discard_hands_back_the_deliveries_of_answered_requests():
    c = _gather()
    c.add(Part(("r1", 0), 1, 2), _d(1))
    c.add(Part(("r2", 0), 0, 2), _d(3))
    assert sorted(d.tag for d in c.discard(lambda k: k[0] == "r1")) == [1]
    assert len(c) == 1 and c.keys() == [("r2", 0)] and c.held() == 1


def test_expired_hands_back_the_held_parts():
    c = _gather(timeout_s=0.0)
    c.add(Part("k", 0, 2), _d(1))
    [(key, ds)] = c.expired()
    assert key == "k" and [d.tag for d in ds] == [1] and len(c) == 0


def test_a_part_that_disagrees_drops_the_whole_message_with_every_token():
    """Another part count than the first part's, or a family check that refuses: ``GatherError``
    carries the tokens of every part received for the message, and nothing of it stays held."""
    c = _gather()
    c.add(Part("k", 0, 3), "a")
    with pytest.raises(GatherError, match="says 2 parts, the earlier ones 3") as info:
        c.add(Part("k", 1, 2), "b")
    assert info.value.tokens == ["a", "b"] and "k" not in c
    assert isinstance(info.value, MalformedMessage)

    def odd_parts_only(held, item):
        if item.part % 2:
            raise MalformedMessage(f"part {item.part} refused")

    c = _gather(check=odd_parts_only)
    assert c.add(Part("k", 0, 2), "a") is None
    with pytest.raises(GatherError, match="part 1 refused") as info:
        c.add(Part("k", 1, 2), "b")
    assert info.value.tokens == ["a", "b"] and len(c) == 0


def test_a_join_that_fails_fails_every_token():
    def join(items):
        raise MalformedMessage("cannot join")

    c = _gather(join=join)
    c.add(Part("k", 0, 2), "a")
    with pytest.raises(GatherError, match="cannot join") as info:
        c.add(Part("k", 1, 2), "b")
    assert info.value.tokens == ["a", "b"] and len(c) == 0


def test_bounds_refuse_a_message_on_its_first_part_alone():
    c = _gather(max_bytes=250, max_message_bytes=100)
    with pytest.raises(OversizedMessage, match="over the limit 100"):
        c.add(Part("big", 0, 2, size=101), "x")
    assert len(c) == 0  # nothing held: the caller fails that one part
    assert c.add(Part("a", 0, 2, size=100), 1) is None and c.add(Part("b", 0, 2, size=100), 2) is None
    with pytest.raises(OversizedMessage, match="200 bytes already held"):
        c.add(Part("c", 0, 2, size=60), 3)
    assert c.held_bytes() == 200
    assert c.add(Part("a", 1, 2, size=100), 4) is not None and c.held_bytes() == 100


def test_a_single_part_message_is_complete_at_once():
    c = _gather(timeout_s=math.inf)
    assert c.add(Part("k", 0, 1), "a") == ([Part("k", 0, 1)], ["a"])
    assert len(c) == 0


def test_a_copy_that_disagrees_with_the_rest_drops_the_message():
    """A second copy of a part is checked like any part: one that the family's check refuses (a
    federated chunk of another length) fails the message, its own token included."""
    def one_size(held, item):
        if any(h.size != item.size for h in held.values()):
            raise MalformedMessage("sizes differ")

    c = _gather(check=one_size)
    c.add(Part("k", 0, 2, size=10), "a")
    assert c.add(Part("k", 0, 2, size=10), "copy") is None and c.take_copies() == ["copy"]
    with pytest.raises(GatherError, match="sizes differ") as info:
        c.add(Part("k", 0, 2, size=11), "bad copy")
    assert info.value.tokens == ["a", "bad copy"] and len(c) == 0


def test_a_part_of_a_completed_message_is_a_copy_when_remembered():
    """``remember``: the keys of the last completed messages are kept (a bounded number), so a
    part that comes again after its message was put together is acked, not held as a new one."""
    c = _gather(remember=1)
    c.add(Part("a", 0, 1), 1)
    assert c.add(Part("a", 0, 1), 2) is None and c.take_copies() == [2] and len(c) == 0
    c.add(Part("b", 0, 1), 3)  # "a" is forgotten: only one key is remembered
    assert c.add(Part("a", 0, 1), 4) == ([Part("a", 0, 1)], [4])
    forgetful = _gather()
    assert forgetful.add(Part("a", 0, 2), 1) is None and forgetful.add(Part("a", 1, 2), 2) is not None
    assert forgetful.add(Part("a", 0, 2), 3) is None and forgetful.take_copies() == [] and len(forgetful) == 1


def test_a_part_of_a_refused_message_that_comes_later_is_refused_at_once_when_remembered():
    """A message dropped by ``GatherError`` had every part received failed (dead-lettered): a part of
    it that comes later is refused at once, with its own token (DESIGN §7.4: a malformed message is
    dead-lettered with a reason), not held as the start of a message until it expires."""
    c = _gather(remember=4)
    c.add(Part("k", 0, 3), "a")
    with pytest.raises(GatherError):
        c.add(Part("k", 1, 2), "b")
    with pytest.raises(GatherError, match="refused already") as info:
        c.add(Part("k", 2, 3), "late")
    assert info.value.tokens == ["late"] and c.take_copies() == [] and len(c) == 0

"""The parts of chunked wire messages that a service receives, held with their deliveries until
every part has come (the aggregator's partials)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

D = TypeVar("D")  # a delivery: what the caller acks once the message is whole


class PartCollector(Generic[D]):
    """Parts of chunked wire messages (``wire.split``), gathered by key until all have arrived.

    ``add`` returns ``(chunks, deliveries)`` once complete (the caller joins them and acks the
    deliveries). A part that arrives twice is a copy (its sender died after publishing some parts
    and a replacement sent them all again, or the broker redelivered it): the first is kept, still
    unacked, and the copy's delivery waits in ``take_copies()``, which the caller acks at once, so
    that copies never fill the prefetch window, nothing is counted twice and nothing is lost.
    ``expired`` hands back what waited longer than ``timeout_s`` so the caller can dead-letter it
    instead of holding it unacked forever.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        # key -> (first arrival, part -> (message, delivery), deliveries of duplicate copies)
        self._pending: dict[Any, tuple[float, dict[int, tuple[Any, D]], list[D]]] = {}
        self._copies: list[D] = []

    def take_copies(self) -> list[D]:
        """Deliveries of copies of parts already held: ack them now (the originals stay unacked)."""
        out, self._copies = self._copies, []
        return out

    def add(self, key: Any, msg: Any, d: D) -> tuple[list[Any], list[D]] | None:
        if msg.parts == 1:
            return [msg], [d]
        _, parts, copies = self._pending.setdefault(key, (time.monotonic(), {}, []))
        if msg.part in parts:
            self._copies.append(d)
            return None
        parts[msg.part] = (msg, d)
        if len(parts) < msg.parts:
            return None
        del self._pending[key]
        ordered = [parts[i] for i in sorted(parts)]
        return [m for m, _ in ordered], [dd for _, dd in ordered] + copies

    def __len__(self) -> int:
        """Messages whose parts are still arriving."""
        return len(self._pending)

    def held(self) -> int:
        """Deliveries held for those messages (their parts and redundant copies)."""
        return sum(len(parts) + len(copies) for _, parts, copies in self._pending.values())

    def keys(self) -> list[Any]:
        """The keys of the messages whose parts are still arriving."""
        return list(self._pending)

    def __contains__(self, key: Any) -> bool:
        return key in self._pending

    def expired(self) -> list[tuple[Any, list[D]]]:
        now = time.monotonic()
        old = [k for k, (t0, _, _) in self._pending.items() if now - t0 > self.timeout_s]
        out = []
        for k in old:
            _, parts, copies = self._pending.pop(k)
            out.append((k, [d for _, d in parts.values()] + copies))
        return out

    def discard(self, match: Callable[[Any], bool]) -> list[D]:
        """Drop the pending messages whose key matches (their request is answered); their deliveries."""
        out: list[D] = []
        for k in [k for k in self._pending if match(k)]:
            _, parts, copies = self._pending.pop(k)
            out.extend([d for _, d in parts.values()] + copies)
        return out

    def clear(self) -> None:
        self._pending.clear()
        self._copies.clear()

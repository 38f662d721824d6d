"""Which parts of multi-part requests the encoder passes on at once, and which wait (``StreamGate``).

The RabbitMQ shell's bookkeeping, not the handler's: it holds deliveries (``hecommon.amqp``), so it
lives beside the worker, and ``handler.py`` stays pure (bytes and arrays in, out; no broker).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hecommon.amqp import Delivery, PartCollector
from hecommon.errors import MalformedMessage
from hecommon.wire import RequestHead


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
        route = head.route
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
        self._stream = _Stream(heads[0].route)
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

"""Messages larger than the broker's ``max_message_size``, and their reassembly.

``Gather`` is the one reassembly of chunked messages, for every family: it holds the parts of
each message by key until all are in, keeps the first copy of a part, and bounds what it holds
(time, bytes). What a family adds is how its messages are cut and how complete parts are joined:
the training messages are cut by ciphertext rows (``split``, ``row_ranges``) and joined by
``join``; a client that uses each reply part as it arrives counts them with ``PartTracker`` (a
``Gather`` of offsets); the federated messages are cut by bytes (``fedchunks``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from ..errors import MalformedMessage, OversizedMessage
from ..he.bits import packed_size
from ..he.params import ParamSet
from .codec import fail as _fail
from .fields import HEADER_ALLOWANCE, MAX_MESSAGE_BYTES, _residue_row_bytes
from .heads import RequestHead
from .messages import EncryptedReply, EncryptedRequest, PartialResult, reply_row_bytes

__all__ = ["Chunked", "Gather", "GatherError", "Head", "PartTracker", "join", "payload_bytes", "request_ranges",
           "row_ranges", "split"]

Chunked = EncryptedRequest | PartialResult | EncryptedReply
T = TypeVar("T")  # what a part holds (a message, a span)
D = TypeVar("D")  # a token: what the caller acks (a delivery) once the message is used or failed


class Head(NamedTuple):
    """What ``Gather`` reads from a part: its message's key, its index, the message's part count,
    and the bytes the whole message announces (0 where nothing is announced)."""

    key: Hashable
    part: int
    parts: int
    size: int = 0


class GatherError(MalformedMessage):
    """A chunked message that cannot be put together. ``tokens``: those of every part received for
    it (the failing one included), so that the caller fails them all and none stays unacked."""

    def __init__(self, message: str, tokens: list[Any]) -> None:
        super().__init__(message)
        self.tokens = tokens


class _Pending(Generic[T, D]):
    __slots__ = ("since", "parts", "size", "items", "tokens")

    def __init__(self, parts: int, size: int) -> None:
        self.since, self.parts, self.size = time.monotonic(), parts, size
        self.items: dict[int, T] = {}
        self.tokens: list[D] = []


class Gather(Generic[T, D]):
    """The parts of chunked messages, held by key until every part has come: the one reassembly
    of every message family (DESIGN §4).

    ``head(item)`` says which message a part belongs to (``Head``). ``add(item, token)`` returns
    ``(join(items in part order), tokens)`` once the message is complete, else None; ``token`` is
    what the caller acks once the message is used (a delivery). A part that arrives twice is a copy
    (a sender replaced after publishing some parts sent them all again, or the broker redelivered
    one): the first is kept and the copy's token waits in ``take_copies()``, for the caller to ack
    at once, so that copies never fill a prefetch window, nothing counts twice and nothing is lost.

    ``check(held, item)`` refuses (``MalformedMessage``) a part that disagrees with those already
    held, copies included, as does a part count that differs from the first part's: the whole
    message is dropped and ``GatherError`` carries every token received for it. Bounds: a message
    announcing more than ``max_message_bytes``, or more than ``max_bytes`` with what is held
    already, is refused on its first part (``OversizedMessage``: that part alone fails);
    ``expired()`` hands back the messages still incomplete after ``timeout_s``, so that the
    caller fails them instead of holding them unacked for ever. ``remember``: how many finished
    messages' keys are kept, so that a part of one that comes later (a redelivery) is not the
    start of a message that can never complete: a copy of a joined message's part, or refused at
    once (``GatherError`` with its token alone) for a message that was refused.
    """

    def __init__(self, head: Callable[[T], Head], *, check: Callable[[Mapping[int, T], T], None] | None = None,
                 join: Callable[[list[T]], Any] = list, timeout_s: float = 60.0,
                 max_bytes: int | None = None, max_message_bytes: int | None = None, remember: int = 0) -> None:
        self.head, self.check, self.join, self.timeout_s = head, check, join, timeout_s
        self.max_bytes = math.inf if max_bytes is None else max_bytes
        #: the largest single message (by default ``max_bytes``, the bound on all held)
        self.max_message_bytes = min(self.max_bytes, math.inf if max_message_bytes is None else max_message_bytes)
        self._pending: dict[Hashable, _Pending[T, D]] = {}
        self._copies: list[D] = []
        self.remember = remember
        self._finished: OrderedDict[Hashable, bool] = OrderedDict()  # key -> joined (else refused)

    def add(self, item: T, token: D = None) -> tuple[Any, list[D]] | None:  # type: ignore[assignment]
        key, part, parts, size = self.head(item)
        if key in self._finished:
            if self._finished[key]:  # a part of a message put together already: a copy
                self._copies.append(token)
                return None
            raise GatherError(f"part {part}: its chunked message was refused already", [token])
        entry = self._pending.get(key)
        if entry is None:
            if size > self.max_message_bytes:
                raise OversizedMessage(f"chunked message of {size} bytes: over the limit {self.max_message_bytes}")
            if self.held_bytes() + size > self.max_bytes:
                raise OversizedMessage(f"chunked message of {size} bytes: {self.held_bytes()} bytes already "
                                       f"held, the limit is {self.max_bytes} in all")
            entry = self._pending[key] = _Pending(parts, size)
        try:
            if parts != entry.parts:
                raise MalformedMessage(f"part {part}: says {parts} parts, the earlier ones {entry.parts}")
            if self.check is not None:
                self.check(entry.items, item)
        except MalformedMessage as exc:
            del self._pending[key]
            self._finish(key, joined=False)
            raise GatherError(str(exc), [*entry.tokens, token]) from None
        if part in entry.items:  # a copy that agrees with the rest
            self._copies.append(token)
            return None
        entry.tokens.append(token)
        entry.items[part] = item
        if len(entry.items) < entry.parts:
            return None
        del self._pending[key]
        try:
            whole = self.join([entry.items[i] for i in sorted(entry.items)])
        except MalformedMessage as exc:
            self._finish(key, joined=False)
            raise GatherError(str(exc), entry.tokens) from None
        self._finish(key, joined=True)
        return whole, entry.tokens

    def _finish(self, key: Hashable, joined: bool) -> None:
        """``key``'s message is over, joined or refused with all its parts: remembered, if asked."""
        if self.remember:
            self._finished[key] = joined
            while len(self._finished) > self.remember:
                self._finished.popitem(last=False)

    def take_copies(self) -> list[D]:
        """Tokens of copies of parts already held: ack them now (the originals stay held)."""
        out, self._copies = self._copies, []
        return out

    def has(self, key: Hashable, part: int) -> bool:
        """Whether part ``part`` of the message ``key`` is held."""
        entry = self._pending.get(key)
        return entry is not None and part in entry.items

    def __len__(self) -> int:
        """Messages whose parts are still arriving."""
        return len(self._pending)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pending

    def keys(self) -> list[Hashable]:
        """The keys of the messages whose parts are still arriving."""
        return list(self._pending)

    def held(self) -> int:
        """Tokens held for those messages."""
        return sum(len(e.tokens) for e in self._pending.values())

    def held_bytes(self) -> int:
        """Bytes the messages being gathered announce, in all."""
        return sum(e.size for e in self._pending.values())

    def expired(self) -> list[tuple[Hashable, list[D]]]:
        """``(key, tokens)`` of every message still incomplete after ``timeout_s``, dropped."""
        now = time.monotonic()
        return [(k, self._pending.pop(k).tokens) for k in [k for k, e in self._pending.items()
                                                           if now - e.since > self.timeout_s]]

    def discard(self, match: Callable[[Any], bool]) -> list[D]:
        """Drop the messages whose key matches (their request is answered); their tokens."""
        return [t for k in [k for k in self._pending if match(k)] for t in self._pending.pop(k).tokens]

    def clear(self) -> None:
        self._pending.clear()
        self._copies.clear()
        self._finished.clear()


def split(msg: Chunked, max_bytes: int = MAX_MESSAGE_BYTES) -> list[Chunked]:
    """Cut a whole message (``parts == 1``) by ciphertext rows so each part encodes below
    ``max_bytes``; part ``i`` of ``n`` carries consecutive rows."""
    if type(msg) not in (EncryptedRequest, PartialResult, EncryptedReply):
        raise TypeError(f"{type(msg).__name__} cannot be split")
    if msg.parts != 1:
        raise ValueError("split: the message is already a part")
    ranges = row_ranges(msg._rows(), msg._row_bytes(), max_bytes, msg.TYPE)
    return [dataclasses.replace(msg._slice(lo, hi), part=i, parts=len(ranges)) for i, (lo, hi) in enumerate(ranges)]


def row_ranges(rows: int, row_bytes: int, max_bytes: int = MAX_MESSAGE_BYTES, what: str = "message") -> list[tuple[int, int]]:
    """The rows of each part ``split`` makes of a message of ``rows`` rows of ``row_bytes`` bytes:
    a sender that computes its rows block by block cuts them the same way."""
    per_chunk = (max_bytes - HEADER_ALLOWANCE) // row_bytes
    if per_chunk < 1:
        raise OversizedMessage(f"{what}: one ciphertext row ({row_bytes} bytes) exceeds {max_bytes}")
    return [(lo, min(lo + per_chunk, rows)) for lo in range(0, rows, per_chunk)]


def request_ranges(width: int, params: ParamSet, max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[int, int]]:
    """The ciphertext rows of each part ``split`` makes of a request of ``width`` ciphertexts: a
    client that encrypts and sends a request part by part cuts it the same way. Cut as if every
    request carried all N tokens, so a layer's cut (and the pieces of its replies, whose ``a``
    parts a client holds) does not change with the tokens of a request."""
    return row_ranges(width, _residue_row_bytes(params), max_bytes, EncryptedRequest.TYPE)


def _route(msg: Chunked, piece: bool = True) -> tuple[Any, ...]:
    """What every part of one message shares. ``piece=False``: what every piece of a reply
    shares too (``PartTracker``)."""
    if isinstance(msg, EncryptedRequest):
        return (type(msg), *RequestHead.of(msg).route)
    key: tuple[Any, ...] = (type(msg), msg.rid, msg.layer, msg.direction, msg.parts, msg.lib, msg.params.name,
                            *((msg.piece,) if piece else ()), msg.pieces)
    if isinstance(msg, PartialResult):
        return (*key, msg.send_a, msg.shard, msg.shards, msg.row_start, msg.row_end, msg.partial.n_tokens,
                msg.partial.col0)
    return (*key, msg.result.a is None, msg.result.bits, msg.result.n_tokens, msg.result.col0)


def join(chunks: Sequence[Chunked]) -> Chunked:
    """Reassemble the parts of one message; refuses missing, duplicate or inconsistent parts."""
    if not chunks:
        raise MalformedMessage("join: no parts")
    first = chunks[0]
    if type(first) not in (EncryptedRequest, PartialResult, EncryptedReply):
        raise TypeError(f"{type(first).__name__} cannot be joined")
    if any(_route(c) != _route(first) for c in chunks):
        _fail("join", "parts of different messages or shapes")
    seen = sorted(c.part for c in chunks)
    if len(set(seen)) != len(seen):
        _fail("join", "duplicate part")
    if seen != list(range(first.parts)):
        _fail("join", f"missing parts {sorted(set(range(first.parts)) - set(seen))}")
    ordered = sorted(chunks, key=lambda c: c.part)
    offset = "row_start" if isinstance(first, EncryptedRequest) else "out_start"
    start = getattr(ordered[0], offset)
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if getattr(cur, offset) != getattr(prev, offset) + prev._rows():
            _fail("join", f"part {cur.part}: {offset} is not contiguous with part {prev.part}")
    whole = ordered[0]._with_rows(ordered)  # type: ignore[arg-type]  # all parts share first's type
    return dataclasses.replace(whole, part=0, parts=1, **{offset: start})


class _Span(NamedTuple):
    """Where one part of a tracked message lies (``PartTracker``)."""

    piece: int
    part: int
    parts: int
    offset: int
    rows: int


class PartTracker:
    """The parts of one chunked message as they arrive, for a receiver that uses each part at once
    instead of joining them (the client decrypts reply parts as they come in): a ``Gather`` of
    the parts' offsets, never their arrays.

    A reply may come in ``pieces`` (an evaluator answers each part of a request alone, and the
    client adds them): each piece is a chunked message of its own, with the same outputs.
    ``add`` checks every part against the first as ``join`` does (the piece number aside) and
    says whether the part is new (a copy of a part already seen is dropped: the first copy
    counts); ``complete`` is true once parts ``0 … parts-1`` of every piece ``0 … pieces-1`` are
    in, and refuses parts whose offsets do not follow each other.
    """

    def __init__(self) -> None:
        self._route: tuple[Any, ...] | None = None
        self._pieces = 1
        self._gather: Gather[_Span, None] = Gather(lambda s: Head(s.piece, s.part, s.parts), timeout_s=math.inf)
        self._done: dict[int, list[_Span]] = {}  # piece -> its parts, in order
        self._rows = 0

    @staticmethod
    def key(chunk: Chunked) -> tuple[int, int]:
        """``(piece, part)``: what ``peek_part`` reads from an encoded message."""
        return (0 if isinstance(chunk, EncryptedRequest) else chunk.piece), chunk.part

    def add(self, chunk: Chunked) -> bool:
        if type(chunk) not in (EncryptedRequest, PartialResult, EncryptedReply):
            raise TypeError(f"{type(chunk).__name__} is not a part of a chunked message")
        route = _route(chunk, piece=False)  # every piece of the reply: the same route
        if self._route is None:
            self._route = route
            self._pieces = 1 if isinstance(chunk, EncryptedRequest) else chunk.pieces
        elif route != self._route:
            _fail("join", "parts of different messages or shapes")
        piece, part = self.key(chunk)
        if (piece, part) in self:
            return False
        offset = chunk.row_start if isinstance(chunk, EncryptedRequest) else chunk.out_start
        got = self._gather.add(_Span(piece, part, chunk.parts, offset, chunk._rows()))
        if got is not None:
            self._done[piece] = got[0]
        self._rows += chunk._rows()
        return True

    def __contains__(self, key: object) -> bool:
        """Whether ``(piece, part)`` is in already."""
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        piece, part = key
        return piece in self._done or self._gather.has(piece, part)

    @property
    def pieces(self) -> int:
        return self._pieces

    @property
    def complete(self) -> bool:
        if len(self._done) < self._pieces:
            return False
        for ordered in self._done.values():
            for prev, cur in zip(ordered, ordered[1:], strict=False):
                if cur.offset != prev.offset + prev.rows:
                    _fail("join", f"part {cur.part}: its offset is not contiguous with part {prev.part}")
        return True

    @property
    def rows(self) -> int:
        """Rows (ciphertexts) in the parts seen so far, every piece counted."""
        return self._rows


def payload_bytes(msg: EncryptedRequest | EncryptedReply) -> int:
    """Bytes of the packed ciphertext arrays in ``msg``, exactly as ``encode`` would write them.

    The in-process (embedded) transport counts wire bytes with this instead of encoding: the
    msgpack framing it leaves out is a few hundred bytes per message of megabytes.
    """
    if isinstance(msg, EncryptedRequest):
        values = msg.batch.width * msg.batch.n_tokens
        return sum(packed_size(p.bit_length(), values) for p in msg.params.primes)
    if isinstance(msg, EncryptedReply):
        res = msg.result
        return res.width * reply_row_bytes(res.bits, msg.params.n, res.n_tokens, res.a is not None)
    raise TypeError(f"{type(msg).__name__} carries no ciphertext payload")

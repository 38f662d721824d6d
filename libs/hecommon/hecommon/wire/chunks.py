"""Messages larger than the broker's ``max_message_size``, cut by ciphertext rows (``split``,
``row_ranges``) and put back together (``join``; ``PartTracker`` for a receiver that uses each
part as it arrives): the one reassembly of the training messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..errors import MalformedMessage, OversizedMessage
from ..he.bits import packed_size
from ..he.params import ParamSet
from .codec import fail as _fail
from .fields import HEADER_ALLOWANCE, MAX_MESSAGE_BYTES, _residue_row_bytes
from .heads import RequestHead
from .messages import EncryptedReply, EncryptedRequest, PartialResult

Chunked = EncryptedRequest | PartialResult | EncryptedReply


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
    client that encrypts and sends a request part by part cuts it the same way."""
    return row_ranges(width, _residue_row_bytes(params), max_bytes, EncryptedRequest.TYPE)


def _route(msg: Chunked, piece: bool = True) -> tuple[Any, ...]:
    """What every part of one message shares; ``parts`` is item 4 (``PartTracker.complete``).
    ``piece=False``: what every piece of a reply shares too (``PartTracker``)."""
    if isinstance(msg, EncryptedRequest):
        return (type(msg), *RequestHead.of(msg).route)
    key: tuple[Any, ...] = (type(msg), msg.rid, msg.layer, msg.direction, msg.parts, msg.lib, msg.params.name,
                            *((msg.piece,) if piece else ()), msg.pieces)
    if isinstance(msg, PartialResult):
        return (*key, msg.send_a, msg.shard, msg.shards, msg.row_start, msg.row_end, msg.partial.n_tokens)
    return (*key, msg.result.a is None, msg.result.bits, msg.result.n_tokens)


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


class PartTracker:
    """The parts of one chunked message as they arrive, for a receiver that uses each part at once
    instead of joining them (the client decrypts reply parts as they come in).

    A reply may come in ``pieces`` (an evaluator answers each part of a request alone, and the
    client adds them): each piece is a chunked message of its own, with the same outputs.
    ``add`` checks every part against the first as ``join`` does (the piece number aside) and
    says whether the part is new (a copy of a part already seen is dropped: the first copy
    counts); ``complete`` is true once parts ``0 … parts-1`` of every piece ``0 … pieces-1`` are
    in, and refuses parts whose offsets do not follow each other. Only offsets are kept, never
    arrays.
    """

    def __init__(self) -> None:
        self._route: tuple[Any, ...] | None = None
        self._pieces = 1
        self._spans: dict[tuple[int, int], tuple[int, int]] = {}  # (piece, part) -> (offset, rows)

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
        key = self.key(chunk)
        if key in self._spans:
            return False
        offset = chunk.row_start if isinstance(chunk, EncryptedRequest) else chunk.out_start
        self._spans[key] = (offset, chunk._rows())
        return True

    def __contains__(self, key: object) -> bool:
        """Whether ``(piece, part)`` is in already."""
        return key in self._spans

    @property
    def pieces(self) -> int:
        return self._pieces

    @property
    def complete(self) -> bool:
        if self._route is None:
            return False
        parts = self._route[4]  # _route()[4]: parts
        if len(self._spans) < parts * self._pieces:
            return False
        for piece in range(self._pieces):
            ordered = [self._spans[(piece, i)] for i in range(parts)]
            for i, (prev, cur) in enumerate(zip(ordered, ordered[1:], strict=False), start=1):
                if cur[0] != prev[0] + prev[1]:
                    _fail("join", f"part {i}: its offset is not contiguous with part {i - 1}")
        return True

    @property
    def rows(self) -> int:
        """Rows (ciphertexts) in the parts seen so far, every piece counted."""
        return sum(rows for _, rows in self._spans.values())


def payload_bytes(msg: EncryptedRequest | EncryptedReply) -> int:
    """Bytes of the packed ciphertext arrays in ``msg``, exactly as ``encode`` would write them.

    The in-process (embedded) transport counts wire bytes with this instead of encoding: the
    msgpack framing it leaves out is a few hundred bytes per message of megabytes.
    """
    if isinstance(msg, EncryptedRequest):
        rows = msg.batch.width * msg.params.n
        return sum(packed_size(p.bit_length(), rows) for p in msg.params.primes)
    if isinstance(msg, EncryptedReply):
        res = msg.result
        return (1 if res.a is None else 2) * packed_size(res.bits, res.width * msg.params.n)
    raise TypeError(f"{type(msg).__name__} carries no ciphertext payload")

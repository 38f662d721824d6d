"""Federated messages above the broker's ``max_message_size``: cut into ``federated.Chunk``
messages (``split_bytes``) and joined again, bounded and checked, by the receiver (``Reassembler``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..errors import MalformedMessage, OversizedMessage
from .federated import Chunk, encode
from .fedfields import CHUNK_OVERHEAD, MAX_CHUNKS, MAX_JOINED_BYTES


def split_bytes(data: bytes, max_bytes: int, mid: bytes) -> list[bytes]:
    """``data`` itself when it fits in ``max_bytes``, else encoded ``Chunk``s of it (id ``mid``)."""
    if len(data) <= max_bytes:
        return [data]
    piece = max_bytes - CHUNK_OVERHEAD
    if piece < 1:
        raise OversizedMessage(f"message: a limit of {max_bytes} bytes leaves no room for a chunk's data "
                               f"(each chunk carries {CHUNK_OVERHEAD} bytes of header)")
    parts = -(-len(data) // piece)
    if parts > MAX_CHUNKS:
        raise OversizedMessage(f"message: {len(data)} bytes do not fit in {MAX_CHUNKS} chunks of {max_bytes}")
    return [encode(Chunk(mid, i, parts, len(data), data[i * piece:(i + 1) * piece]), max_bytes) for i in range(parts)]


class ChunkError(MalformedMessage):
    """A chunked message that cannot be joined. ``tokens``: every chunk of it received so far (the
    one that failed included), so that the caller fails them all and none stays unacked."""

    def __init__(self, message: str, tokens: list[Any]) -> None:
        super().__init__(message)
        self.tokens = tokens


class Reassembler:
    """Joins chunks by message id. Bounded: at most ``max_message_bytes`` per joined message and
    ``max_bytes`` in all, and a message still incomplete after ``timeout_s`` is handed back by ``expired``.

    Every part but the last has the same length (``split_bytes``' piece) and the last one the
    rest of ``total``; a chunk that breaks this, or disagrees with the earlier ones on ``parts`` or
    ``total``, drops the whole message: ``ChunkError`` carries every token received for it.
    """

    def __init__(self, max_bytes: int = MAX_JOINED_BYTES, timeout_s: float = 600.0,
                 max_message_bytes: int | None = None) -> None:
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        #: the largest single joined message (``max_bytes``, the bound on all held, by default)
        self.max_message_bytes = max_bytes if max_message_bytes is None else min(max_message_bytes, max_bytes)
        self._pending: dict[bytes, tuple[float, Chunk, dict[int, bytes], list[Any]]] = {}

    def held_bytes(self) -> int:
        return sum(first.total for _, first, _, _ in self._pending.values())

    def add(self, c: Chunk, token: Any = None) -> tuple[bytes, list[Any]] | None:
        """Record one chunk (``token``: e.g. its delivery); the joined bytes and every token once complete."""
        entry = self._pending.get(c.rid)
        if entry is None:
            if c.total > self.max_message_bytes:
                raise OversizedMessage(f"chunked message of {c.total} bytes: over the limit {self.max_message_bytes}")
            if self.held_bytes() + c.total > self.max_bytes:
                raise OversizedMessage(f"chunked message of {c.total} bytes: {self.held_bytes()} bytes already "
                                       f"held, the limit is {self.max_bytes} in all")
            entry = self._pending[c.rid] = (time.monotonic(), c, {}, [])
        _, first, parts, tokens = entry
        tokens.append(token)
        try:
            if (c.parts, c.total) != (first.parts, first.total):
                raise MalformedMessage(f"chunk {c.part}: says {c.parts} parts and {c.total} bytes, "
                                       f"earlier ones {first.parts} and {first.total}")
            _check_piece(c, parts)
        except MalformedMessage as exc:
            del self._pending[c.rid]
            raise ChunkError(str(exc), tokens) from None
        parts.setdefault(c.part, c.data)  # a redelivered chunk is counted once
        if len(parts) < first.parts:
            return None
        del self._pending[c.rid]
        data = b"".join(parts[i] for i in range(first.parts))
        if len(data) != first.total:  # unreachable after _check_piece; kept as the final word
            raise ChunkError(f"chunked message: {len(data)} bytes joined, {first.total} announced", tokens)
        return data, tokens

    def expired(self) -> list[list[Any]]:
        now = time.monotonic()
        old = [k for k, (t0, _, _, _) in self._pending.items() if now - t0 > self.timeout_s]
        return [self._pending.pop(k)[3] for k in old]

    def clear(self) -> None:
        self._pending.clear()


def _check_piece(c: Chunk, parts: Mapping[int, bytes]) -> None:
    """``c``'s length agrees with the parts already in: one piece length, the last part the rest."""
    pieces = {len(d) for i, d in parts.items() if i < c.parts - 1}
    if c.part < c.parts - 1:
        pieces.add(len(c.data))
    if len(pieces) > 1:
        raise MalformedMessage(f"chunk part {c.part}: {len(c.data)} bytes, the other parts {sorted(pieces)}")
    if not pieces:
        return
    piece = pieces.pop()
    rest = c.total - (c.parts - 1) * piece
    if not 1 <= rest <= piece:
        raise MalformedMessage(f"chunk part {c.part}: parts of {piece} bytes cannot make {c.total} bytes "
                               f"in {c.parts} parts")
    last = c.data if c.part == c.parts - 1 else parts.get(c.parts - 1)
    if last is not None and len(last) != rest:
        raise MalformedMessage(f"chunk part {c.parts - 1}: {len(last)} bytes, {rest} expected "
                               f"for {c.total} bytes in {c.parts} parts")

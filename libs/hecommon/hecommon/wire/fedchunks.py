"""Federated messages above the broker's ``max_message_size``: cut into ``federated.Chunk``
messages (``split_bytes``) and joined again, bounded and checked, by the receiver (``gather``: the
one reassembly, ``chunks.Gather``, with the federated family's checks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MalformedMessage, OversizedMessage
from .chunks import Gather, Head
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


#: finished messages whose ids ``gather`` remembers: a late chunk of one is acked (joined) or
#: refused at once (refused), not held until the round timeout
REMEMBER_FINISHED = 4096


def gather(max_bytes: int = MAX_JOINED_BYTES, timeout_s: float = 600.0,
           max_message_bytes: int | None = None) -> Gather[Chunk, Any]:
    """The reassembly of federated chunks (``chunks.Gather``): by message id, at most
    ``max_message_bytes`` per joined message and ``max_bytes`` in all. ``add(chunk, token)`` returns
    ``(the joined bytes, tokens)`` once complete.

    Every part but the last has the same length (``split_bytes``' piece) and the last one the rest
    of ``total``; a chunk that breaks this, or disagrees with the earlier ones on ``parts`` or
    ``total``, drops the whole message (``chunks.GatherError``, with every token received for it).
    A chunk of one of the last ``REMEMBER_FINISHED`` messages is a copy (``take_copies``) if it
    was joined, refused at once if it was refused.
    """
    return Gather(lambda c: Head(c.rid, c.part, c.parts, c.total), check=_check_chunk, join=_join,
                  timeout_s=timeout_s, max_bytes=max_bytes, max_message_bytes=max_message_bytes,
                  remember=REMEMBER_FINISHED)


def _join(parts: list[Chunk]) -> bytes:
    data = b"".join(c.data for c in parts)
    if len(data) != parts[0].total:  # unreachable after _check_chunk; kept as the final word
        raise MalformedMessage(f"chunked message: {len(data)} bytes joined, {parts[0].total} announced")
    return data


def _check_chunk(held: Mapping[int, Chunk], c: Chunk) -> None:
    first = next(iter(held.values()), c)
    if c.total != first.total:
        raise MalformedMessage(f"chunk {c.part}: says {c.total} bytes, the earlier ones {first.total}")
    _check_piece(c, {i: h.data for i, h in held.items()})


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

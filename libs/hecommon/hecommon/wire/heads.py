"""Messages read without their arrays: a request's or a reply's head (every field checked as
``decode`` checks it, the packed arrays for size and padding only), and the ``(piece, part)`` a receiver asks of every arrival (``peek_part``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..he.bits import packed_size
from ..he.params import ParamSet
from ..he.params import get as get_params
from .codec import check_blob as _blob
from .codec import check_int as _int
from .codec import check_keys as _keys
from .codec import check_text as _text
from .codec import fail as _fail
from .fields import (
    _HEADER,
    LIB_VERSION,
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
    MAX_PARTS,
    OWNER_BYTES,
    RID_BYTES,
    _check_bool,
    _check_chunk,
    _check_piece,
    _check_route,
    _check_window,
    _residue_row_bytes,
    _shape,
)
from .messages import EncryptedReply, EncryptedRequest, PartialResult, _packed_rows, _reply_bits
from .serde import _BODY_KEYS, _BY_TYPE, _parse


@dataclass(frozen=True)
class _Head:
    """What a message's map says about it, checked without unpacking its arrays."""

    rid: bytes
    layer: str
    direction: str
    params: ParamSet
    n_tokens: int
    width: int
    part: int = 0
    parts: int = 1
    lib: str = LIB_VERSION
    col0: int = 0


@dataclass(frozen=True)
class RequestHead(_Head):
    """A request message checked without unpacking its residues (a cheap look at a request).

    Everything but the residues' ranges is validated as ``decode`` would (version, type, keys,
    parameter set, route, part numbers, shape against the size limit, every limb's exact byte
    length and zero padding); the evaluator, which unpacks the residues to compute, checks
    that each is below its prime. ``width``: the input ciphertexts this message carries.
    """

    row_start: int = 0
    send_a: bool = True
    owner: bytes = b""

    @classmethod
    def of(cls, req: EncryptedRequest) -> RequestHead:
        """The head of a decoded request (its residues left out)."""
        return cls(req.rid, req.layer, req.direction, req.params, req.batch.n_tokens, req.width, part=req.part,
                   parts=req.parts, lib=req.lib, col0=req.batch.col0, row_start=req.row_start, send_a=req.send_a,
                   owner=req.owner)

    @property
    def route(self) -> tuple[Any, ...]:
        """What every part of one request shares (``join``, ``PartTracker``); the owner too: parts
        under two owners' ``a`` never make one request."""
        return (self.rid, self.layer, self.direction, self.parts, self.lib, self.params.name, self.n_tokens,
                self.col0, self.send_a, self.owner)


def _packed_blob(where: str, blob: Any, bits: int, count: int) -> None:
    """``blob`` holds exactly ``count`` packed values of ``bits`` bits, its padding bits zero."""
    size = packed_size(bits, count)
    _blob(where, blob, size)
    pad = size * 8 - count * bits
    if pad and blob[-1] >> (8 - pad):
        _fail(where, "packed data: non-zero padding bits")


def decode_request_head(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> RequestHead:
    """The head of a request message, its residues checked for size and padding only."""
    m = _parse(data, max_bytes)
    if m.get("type") != EncryptedRequest.TYPE:
        _fail("type", f"{EncryptedRequest.TYPE!r} expected")
    _keys(EncryptedRequest.TYPE, m, _HEADER + _BODY_KEYS[EncryptedRequest])
    params = get_params(_text("pset", m["pset"], MAX_NAME_CHARS))
    t, col0 = _check_window(m, params)
    rows = _shape("shape", m["shape"], (params.limbs, t), _residue_row_bytes(params, t), max_bytes)
    blobs = m["b"]
    if not isinstance(blobs, list) or len(blobs) != params.limbs:
        _fail("b", f"a list of {params.limbs} limbs is required")
    for i, (blob, p) in enumerate(zip(blobs, params.primes, strict=True)):
        _packed_blob(f"b[{i}]", blob, p.bit_length(), rows * t)
    head = RequestHead(_blob("rid", m["rid"], RID_BYTES), m["layer"], m["direction"], params, t, rows,
                       part=m["part"], parts=m["parts"], lib=m["lib"], col0=col0, row_start=m["row_start"],
                       send_a=_check_bool("send_a", m["send_a"]), owner=_blob("owner", m["owner"], OWNER_BYTES))
    _check_route(head)
    _check_chunk(head, "row_start")
    return head


@dataclass(frozen=True)
class ReplyHead(_Head):
    """A reply part checked without unpacking its arrays: the aggregator's view of a reply part
    that an evaluator holding a whole layer made itself, which the aggregator forwards as it came.

    Checked as ``decode`` would: version, type, keys, parameter set, route, part numbers, shape
    against the size limit, the exact byte length of ``a`` and ``b`` and ``b``'s zero padding.
    Every bit pattern of packed ``out_bits`` values is a valid value, so nothing else is left.
    """

    out_start: int = 0
    with_a: bool = True
    bits: int = 0
    piece: int = 0
    pieces: int = 1


def _reply_head(m: dict[str, Any], max_bytes: int) -> ReplyHead:
    if m.get("type") != EncryptedReply.TYPE:
        _fail("type", f"{EncryptedReply.TYPE!r} expected")
    _keys(EncryptedReply.TYPE, m, _HEADER + _BODY_KEYS[EncryptedReply])
    params = get_params(_text("pset", m["pset"], MAX_NAME_CHARS))
    with_a, k = _reply_bits(m, params)
    n = params.n
    t, col0 = _check_window(m, params)
    rows = _shape("shape", m["shape"], (t,), (packed_size(k, n) if with_a else 0) + packed_size(k, t), max_bytes)
    if with_a:
        _blob("a", m["a"], rows * packed_size(k, n))
    _packed_rows("b", k, t, _blob("b", m["b"], rows * packed_size(k, t)))  # each row's padding zero
    head = ReplyHead(_blob("rid", m["rid"], RID_BYTES), m["layer"], m["direction"], params, t, rows,
                     part=m["part"], parts=m["parts"], lib=m["lib"], col0=col0, out_start=m["out_start"], with_a=with_a, bits=k,
                     piece=m["piece"], pieces=m["pieces"])
    _check_route(head)
    _check_chunk(head, "out_start")
    _check_piece(head)
    return head


def decode_reply_head(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> ReplyHead:
    """The head of a reply message, its arrays checked for size and padding only."""
    return _reply_head(_parse(data, max_bytes), max_bytes)


def peek_part(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[int, int] | None:
    """``(piece, part)`` of the message ``data`` (``PartTracker``'s key; a request is its own piece
    0), from its map alone, without decoding its arrays (a client waiting for reply parts asks
    this of every arrival); None for messages that are not chunked (an error reply). Raises like
    ``decode`` on what is not a message."""
    m = _parse(data, max_bytes)
    kind = m.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls not in (EncryptedRequest, PartialResult, EncryptedReply):
        return None
    parts = _int("parts", m.get("parts"), 1, MAX_PARTS)
    part = _int("part", m.get("part"), 0, parts - 1)
    if cls is EncryptedRequest:
        return 0, part
    pieces = _int("pieces", m.get("pieces"), 1, MAX_PARTS)
    return _int("piece", m.get("piece"), 0, pieces - 1), part

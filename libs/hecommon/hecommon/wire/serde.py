"""Encoding and decoding of the training messages (``messages``, ``error_reply``, ``manifest``):
one ``encode``/``decode`` pair for each type, in the discipline ``messages`` describes; only the
classes in ``_BODY_KEYS`` have an encoder (a ``SecretKey``, or anything else, raises ``TypeError``)."""

from __future__ import annotations

from typing import Any

from ..he.params import get as get_params
from .codec import Pieces, construct, message_class, pack_pieces, unpack
from .codec import check_blob as _blob
from .codec import check_text as _text
from .codec import expect as _expect
from .error_reply import ErrorReply
from .fields import (
    _HEADER,
    MAX_LAYERS,
    MAX_MESSAGE_BYTES,
    MAX_META_ENTRIES,
    MAX_NAME_CHARS,
    RID_BYTES,
    WIRE_VERSION,
)
from .manifest import Manifest
from .messages import EncryptedReply, EncryptedRequest, PartialResult

_BODY_KEYS: dict[Any, tuple[str, ...]] = {
    EncryptedRequest: ("layer", "direction", "part", "parts", "row_start", "send_a", "owner", "n_tokens", "col0", "shape",
                       "b"),
    PartialResult: ("layer", "direction", "shard", "shards", "row_start", "row_end", "part", "parts",
                    "out_start", "send_a", "piece", "pieces", "n_tokens", "col0", "shape", "a_bits", "a", "b"),
    EncryptedReply: ("layer", "direction", "part", "parts", "out_start", "piece", "pieces", "n_tokens", "col0", "shape",
                     "bits", "a", "b"),
    ErrorReply: ("reason", "message"),
    Manifest: ("model", "x_bits", "w_bits", "metadata", "layers"),
}
Message = EncryptedRequest | PartialResult | EncryptedReply | ErrorReply | Manifest
_BY_TYPE: dict[str, Any] = {cls.TYPE: cls for cls in _BODY_KEYS}


# -- encode / decode -----------------------------------------------------------------------
def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialize an allow-listed message; anything else (a ``SecretKey``…) raises ``TypeError``."""
    return bytes(encode_pieces(msg, max_bytes))


def encode_pieces(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> Pieces:
    """``encode``'s bytes as ``Pieces``, its arrays not copied: for a transport that writes them
    itself (a broker connection, ``pikaframes``)."""
    if type(msg) not in _BODY_KEYS:
        raise TypeError(f"{type(msg).__name__} has no wire encoder")
    pset = msg.pset if isinstance(msg, ErrorReply) else msg.params.name
    head = {"v": WIRE_VERSION, "type": msg.TYPE, "pset": pset, "rid": msg.rid, "lib": msg.lib}
    return pack_pieces({**head, **msg._body()}, max_bytes, msg.TYPE, "; split it")


def _parse(data: Any, max_bytes: int) -> dict[str, Any]:
    return unpack(data, max_bytes, version=WIRE_VERSION, protocol="wire", max_array_len=MAX_LAYERS,
                  max_map_len=2 * MAX_META_ENTRIES, views=True)  # the residues: views of data


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES, expect: Any = None) -> Message:
    """Parse and validate one message of any allow-listed type (or of type ``expect``)."""
    return _decode_map(_parse(data, max_bytes), max_bytes, expect)


def _decode_map(m: dict[str, Any], max_bytes: int, expect: Any = None) -> Message:
    cls = message_class(m, _BY_TYPE, _BODY_KEYS, _HEADER, expect)
    pset = _text("pset", m["pset"], MAX_NAME_CHARS, empty=cls is ErrorReply)
    _blob("rid", m["rid"], RID_BYTES)
    return construct(cls, lambda: cls._from(m, pset if cls is ErrorReply else get_params(pset), max_bytes))


def encode_request(msg: EncryptedRequest, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, EncryptedRequest), max_bytes)


def encode_request_pieces(msg: EncryptedRequest, max_bytes: int = MAX_MESSAGE_BYTES) -> Pieces:
    """``encode_request`` in ``Pieces`` (``encode_pieces``): what the client's transports send."""
    return encode_pieces(_expect(msg, EncryptedRequest), max_bytes)


def decode_request(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> EncryptedRequest:
    return decode(data, max_bytes, EncryptedRequest)  # type: ignore[return-value]


def encode_partial(msg: PartialResult, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, PartialResult), max_bytes)


def decode_partial(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> PartialResult:
    return decode(data, max_bytes, PartialResult)  # type: ignore[return-value]


def encode_reply(msg: EncryptedReply, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, EncryptedReply), max_bytes)


def decode_reply(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> EncryptedReply:
    return decode(data, max_bytes, EncryptedReply)  # type: ignore[return-value]


def encode_error(msg: ErrorReply, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, ErrorReply), max_bytes)


def decode_error(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> ErrorReply:
    return decode(data, max_bytes, ErrorReply)  # type: ignore[return-value]


def encode_manifest(msg: Manifest, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, Manifest), max_bytes)


def decode_manifest(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Manifest:
    return decode(data, max_bytes, Manifest)  # type: ignore[return-value]

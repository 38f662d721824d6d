"""Strict msgpack codec helpers shared by ``wire`` (the split protocol) and ``fedwire`` (the
federated mode): field checks, the safe ``unpackb`` call (string keys, no duplicates, no ext
types, bounded lengths), and the version check. Every failure is a ``MalformedMessage`` (an
``OversizedMessage`` for a size, ``UnsupportedVersion`` for a version) whose text names the
field, never its data.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import msgpack
import numpy as np

from ..errors import HeloraError, MalformedMessage, OversizedMessage, UnsupportedVersion


# -- field checks (shared by construction and decoding) -------------------------------------
def fail(where: str, what: str) -> NoReturn:
    raise MalformedMessage(f"{where}: {what}")


def check_int(where: str, value: Any, lo: int, hi: int) -> int:
    """A Python ``int`` (never ``bool``) in ``lo..hi``, returned as it is."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(where, "an integer is required")
    if not lo <= value <= hi:
        fail(where, f"{value} outside {lo}..{hi}")
    return value


def check_int_like(where: str, value: Any, lo: int, hi: int) -> int:
    """As ``check_int``, numpy integers accepted too (construction from arrays); a Python ``int``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        fail(where, "an integer is required")
    if not lo <= value <= hi:
        fail(where, f"{value} outside {lo}..{hi}")
    return int(value)


def check_text(where: str, value: Any, max_chars: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        fail(where, "a string is required")
    if len(value) > max_chars or (not value and not empty):
        fail(where, f"length {len(value)} outside {0 if empty else 1}..{max_chars}")
    return value


def _byte_view(value: Any) -> bool:
    """A one-dimensional contiguous memoryview of bytes (format ``B``: its ``len`` is its size)."""
    return isinstance(value, memoryview) and value.format == "B" and value.ndim == 1 and value.c_contiguous


def _is_blob(value: Any) -> bool:
    """``bytes``, or a byte view of immutable ``bytes`` as ``unpack`` gives large bins (``_Views``)."""
    return isinstance(value, bytes) or (_byte_view(value) and isinstance(value.obj, bytes))


def check_blob(where: str, value: Any, size: int) -> bytes:
    """``bytes`` (or a view of bytes: ``_is_blob``, typed as bytes) of exactly ``size``."""
    if not _is_blob(value):
        fail(where, "bytes are required")
    if len(value) != size:
        fail(where, f"{len(value)} bytes, expected {size}")
    return value


def check_blob_range(where: str, value: Any, lo: int, hi: int) -> bytes:
    """``bytes`` (or a view of bytes: ``_is_blob``, typed as bytes) of ``lo..hi``."""
    if not _is_blob(value):
        fail(where, "bytes are required")
    if not lo <= len(value) <= hi:
        fail(where, f"{len(value)} bytes outside {lo}..{hi}")
    return value


def names(keys: Sequence[Any]) -> str:
    """Field names for an error message, bounded: keys come from the sender."""
    shown = ", ".join(repr(str(k)[:32]) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_keys(where: str, m: Any, expected: Any) -> None:
    """``m`` is a map with exactly the ``expected`` keys."""
    if not isinstance(m, dict):
        fail(where, "a map is required")
    missing, extra = sorted(set(expected) - m.keys()), sorted(m.keys() - set(expected))
    if missing:
        fail(where, f"missing field(s) {names(missing)}")
    if extra:
        fail(where, f"unexpected field(s) {names(extra)}")


def message_class(m: dict[str, Any], by_type: Mapping[str, Any], body_keys: Mapping[Any, tuple[str, ...]],
                  header: tuple[str, ...], expect: Any = None) -> Any:
    """The message class (``by_type[TYPE]``, a key of ``body_keys``) that the decoded map ``m``
    names, of type ``expect`` when given, with exactly the keys ``header`` and its body's."""
    kind = m.get("type")
    cls = by_type.get(kind) if isinstance(kind, str) else None
    if cls is None:
        fail("type", f"one of {sorted(by_type)} is required")
    if expect is not None and cls is not expect:
        fail("type", f"{expect.TYPE!r} expected, got {cls.TYPE!r}")
    check_keys(cls.TYPE, m, header + body_keys[cls])
    return cls


def construct(cls: Any, make: Callable[[], Any]) -> Any:
    """``make()``, a decoded message's constructor: a field it refuses (``ValueError``, ``TypeError``)
    makes the message malformed; helora's own errors pass as they are."""
    try:
        return make()
    except HeloraError:
        raise
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"{cls.TYPE}: invalid field ({type(exc).__name__})") from None


def expect(msg: Any, cls: type) -> Any:
    if type(msg) is not cls:
        raise TypeError(f"{cls.__name__} expected, got {type(msg).__name__}")
    return msg


# -- msgpack -------------------------------------------------------------------------------
def pairs(items: list[tuple[Any, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: string keys only, no duplicate."""
    out: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str):
            fail("map", "keys must be strings")
        if key in out:
            fail(names([key]), "duplicate key")
        out[key] = value
    return out


def no_ext(code: int, data: bytes) -> NoReturn:
    fail("msgpack", f"ext type {code} is not allowed")


#: Byte fields at least this long are not copied into msgpack's buffer: ``pack_pieces`` writes
#: their header itself and keeps each as a piece of its own (``pack`` joins them: one copy of each
#: array instead of three), and ``unpack(views=True)`` reads them as views (``_Views``).
_LARGE_BIN = 1 << 12


def _bin_header(size: int) -> bytes:
    """msgpack's header of a bin of ``size`` bytes (bin 8, 16 or 32, as msgpack packs it)."""
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


_BINS = (bytes, memoryview)


def _pack_value(packer: msgpack.Packer, value: Any, pieces: list[bytes]) -> None:
    """``value``'s msgpack onto ``pieces``: a large bin (bytes, or a byte view such as a
    ``PackedRows`` row range: joined in without a copy of its own) as its header and itself, a
    list of values (the limbs of an array) element by element, anything else through ``packer``."""
    if type(value) in _BINS and len(value) >= _LARGE_BIN:
        pieces += (_bin_header(len(value)), value)
    elif type(value) is list and any(type(v) in _BINS and len(v) >= _LARGE_BIN for v in value):
        pieces.append(packer.pack_array_header(len(value)))
        for v in value:
            _pack_value(packer, v, pieces)
    else:
        pieces.append(packer.pack(value))


class Pieces:
    """One message's bytes as pieces to write one after the other (``pack_pieces``): ``bytes``, and
    read-only views of the arrays, which are not copied into a message of their own. ``len`` is the
    message's size and ``bytes()`` joins them. A broker connection writes them as its body frames
    (``hecommon.broker.pikaframes``): the sender's copy of every array into one ``bytes`` is gone.

    pika's ``basic_publish`` calls ``encode`` on a body that is not ``bytes`` (``pika.compat.as_bytes``):
    it returns the pieces themselves, which reach ``pikaframes``' ``_send_message``."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self.parts = tuple(parts)
        if not all(type(p) is bytes or _byte_view(p) for p in self.parts):  # len counts their bytes
            raise TypeError("Pieces: bytes or one-dimensional contiguous byte views are required")
        self.size = sum(map(len, self.parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def encode(self, *_: Any) -> Pieces:
        return self


def pack_pieces(m: dict[str, Any], max_bytes: int, what: str, hint: str = "") -> Pieces:
    """msgpack of ``m`` (strict types: only what the caller built), at most ``max_bytes``, in
    pieces: together the bytes of ``msgpack.packb``, each large byte field (an array) a piece of its
    own, not copied."""
    packer = msgpack.Packer(use_bin_type=True, strict_types=True)
    pieces = [packer.pack_map_header(len(m))]
    for key, value in m.items():
        pieces.append(packer.pack(key))
        _pack_value(packer, value, pieces)
    out = Pieces(pieces)
    if out.size > max_bytes:
        raise OversizedMessage(f"{what}: {out.size} bytes exceed the limit {max_bytes}{hint}")
    return out


def pack(m: dict[str, Any], max_bytes: int, what: str, hint: str = "") -> bytes:
    """``pack_pieces`` joined: the arrays copied once, into the message."""
    return bytes(pack_pieces(m, max_bytes, what, hint))


class _Unusual(Exception):
    """What ``_Views`` leaves to msgpack: anything but a well-formed map of the usual types."""


_FIXED = {0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d"), 0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"),
          0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q"), 0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"),
          0xD2: struct.Struct(">i"), 0xD3: struct.Struct(">q")}
_LENGTH = {0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I"),  # bin 8, 16, 32
           0xD9: struct.Struct(">B"), 0xDA: struct.Struct(">H"), 0xDB: struct.Struct(">I"),  # str 8, 16, 32
           0xDC: struct.Struct(">H"), 0xDD: struct.Struct(">I"),  # array 16, 32
           0xDE: struct.Struct(">H"), 0xDF: struct.Struct(">I")}  # map 16, 32


class _Views:
    """msgpack's ``unpackb`` of a message, as ``unpack`` calls it, but with every bin of at least
    ``_LARGE_BIN`` bytes a read-only view of ``data`` (immutable ``bytes``) instead of a copy: the
    residues of a request or a reply are read once, where they are unpacked, instead of twice.

    It reads the types helora's messages are made of (nil, booleans, integers, floats, strings,
    bins, arrays, maps with distinct string keys) within ``unpack``'s limits, and raises
    ``_Unusual`` at anything else (an ext type, a truncation, trailing bytes, invalid UTF-8, a
    limit, a key that is not a string or repeats, deep nesting, many small items): ``unpack`` then
    gives the message to msgpack, which accepts or refuses it as it always did. So whatever this
    returns, msgpack returns too, with bytes where this has views (``tests/hecommon/test_codec.py``)."""

    MAX_ITEMS = 4096  # a manifest of thousands of fields is read faster by msgpack's C
    MAX_DEPTH = 8

    def __init__(self, data: bytes, max_bin_len: int, max_str_len: int, max_array_len: int, max_map_len: int) -> None:
        self.data, self.view, self.pos, self.items = data, memoryview(data), 0, 0
        self.limits = {"bin": max_bin_len, "str": max_str_len, "array": max_array_len, "map": max_map_len}

    def message(self) -> Any:
        out = self.value(0)
        if self.pos != len(self.data):
            raise _Unusual("trailing bytes")
        return out

    def _take(self, size: int) -> int:
        lo = self.pos
        if size > len(self.data) - lo:
            raise _Unusual("truncated")
        self.pos = lo + size
        return lo

    def _length(self, kind: str, size: int) -> int:
        if size > self.limits[kind]:
            raise _Unusual("limit")
        return size

    def value(self, depth: int) -> Any:
        self.items += 1
        if self.items > self.MAX_ITEMS or depth > self.MAX_DEPTH:
            raise _Unusual("large or deep")
        tag = self.data[self._take(1)]
        if tag <= 0x7F:
            return tag
        if tag >= 0xE0:
            return tag - 0x100
        if 0xA0 <= tag <= 0xBF:
            return self._str(tag & 0x1F)
        if 0x90 <= tag <= 0x9F:
            return self._array(tag & 0x0F, depth)
        if 0x80 <= tag <= 0x8F:
            return self._map(tag & 0x0F, depth)
        if tag == 0xC0:
            return None
        if tag in (0xC2, 0xC3):
            return tag == 0xC3
        fixed = _FIXED.get(tag)
        if fixed is not None:
            return fixed.unpack_from(self.data, self._take(fixed.size))[0]
        length = _LENGTH.get(tag)
        if length is None:  # ext types and the unused 0xc1
            raise _Unusual("type")
        size = length.unpack_from(self.data, self._take(length.size))[0]
        if tag <= 0xC6:
            lo = self._take(self._length("bin", size))
            return self.view[lo : lo + size] if size >= _LARGE_BIN else self.data[lo : lo + size]
        if tag <= 0xDB:
            return self._str(size)
        return self._array(size, depth) if tag <= 0xDD else self._map(size, depth)

    def _str(self, size: int) -> str:
        lo = self._take(self._length("str", size))
        try:
            return self.data[lo : lo + size].decode("utf-8")
        except UnicodeDecodeError:
            raise _Unusual("utf-8") from None

    def _array(self, size: int, depth: int) -> list[Any]:
        return [self.value(depth + 1) for _ in range(self._length("array", size))]

    def _map(self, size: int, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(self._length("map", size)):
            key = self.value(depth + 1)
            if type(key) is not str or key in out:  # msgpack and ``pairs`` say what is wrong
                raise _Unusual("key")
            out[key] = self.value(depth + 1)
        return out


def unpack(data: Any, max_bytes: int, *, version: int, protocol: str, max_array_len: int,
           max_map_len: int, views: bool = False) -> dict[str, Any]:
    """The top-level map of one message, its ``v`` checked against ``version`` (``protocol``
    names the wire in the error: "wire", "federated wire"). ``views``: its large bins are read-only
    views of ``data`` where it is ``bytes`` (``_Views``), which then stays alive while they do."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"message: bytes are required, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise OversizedMessage(f"message: {len(data)} bytes exceed the limit {max_bytes}")
    m: Any = None
    if views and type(data) is bytes and len(data) >= _LARGE_BIN:
        try:
            m = _Views(data, max_bytes, 1 << 16, max_array_len, max_map_len).message()
        except _Unusual:
            m = None  # msgpack reads it, or says what is wrong with it
    if m is not None:
        return _versioned(m, version, protocol)
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True, object_pairs_hook=pairs,
                            ext_hook=no_ext, max_bin_len=max_bytes, max_str_len=1 << 16,
                            max_array_len=max_array_len, max_map_len=max_map_len, max_ext_len=0)
    except HeloraError:
        raise
    except Exception as exc:  # msgpack's errors: truncated, trailing bytes, bad format, limits
        # msgpack's texts name limits and offsets, never the data: keep them, bounded
        raise MalformedMessage(f"message: not valid msgpack ({type(exc).__name__}: {str(exc)[:120]})") from None
    return _versioned(m, version, protocol)


def _versioned(m: Any, version: int, protocol: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        fail("message", "a map is required at the top level")
    if m.get("v") != version or isinstance(m.get("v"), bool):
        raise UnsupportedVersion(f"v: this build speaks {protocol} version {version}")
    return m

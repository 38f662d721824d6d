"""The wire's shared ground: its version and limits, the field checks every training message
makes, and the codecs of its arrays (bit-packed residues, raw residues, packed words)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

import numpy as np

from ..errors import MalformedMessage, OversizedMessage, ParameterMismatch
from ..he import parallel
from ..he.bits import pack_bits_view, packed_size, unpack_bits_into
from ..he.encrypt import concat_rows
from ..he.params import ParamSet
from .codec import check_blob as _blob
from .codec import check_int as _int
from .codec import check_text as _text
from .codec import fail as _fail

WIRE_VERSION = 6  # 6: token windows (col0, n_tokens): b carries the request's T columns, not N;
#                  5: shard counts in the manifest, pieces in partials and replies (the direct path);
#                  4: owner seeds in requests, exact_terms per layer; 3: send_a, replies say their bits;
#                  2: raw uint32 residues in partials (1: packed)
try:  # from the installed metadata: hecommon/__init__ may be shadowed by tests/hecommon under pytest
    LIB_VERSION = _dist_version("hecommon")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    LIB_VERSION = "0+unknown"
#: RabbitMQ 4.x default ``max_message_size``; set the broker's limit explicitly to match.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
RID_BYTES = 16
#: The data owner's public contribution to every ``a`` it uses (``sampling.owner_a_seed``).
OWNER_BYTES = 16
DIRECTIONS = ("fwd", "bwd")
MAX_NAME_CHARS = 128
MAX_ERROR_CHARS = 1024
MAX_LIB_CHARS = 64
MAX_ROWS = 1 << 24  # ciphertext indices and layer widths
MAX_PARTS = 1 << 16
MAX_LAYERS = 4096
MAX_META_ENTRIES = 256
MAX_META_CHARS = 4096
#: Room left for the map, the small fields and the bin headers when ``split`` sizes chunks.
HEADER_ALLOWANCE = 4096
_HEADER = ("v", "type", "pset", "rid", "lib")


# -- field checks (the generic ones: hecommon.wire.codec, shared with fedwire) ------------------
def _check_route(msg: Any) -> None:
    _blob("rid", msg.rid, RID_BYTES)
    _text("layer", msg.layer, MAX_NAME_CHARS)
    if msg.direction not in DIRECTIONS:
        _fail("direction", f"one of {DIRECTIONS} is required")
    _text("lib", msg.lib, MAX_LIB_CHARS)


def _check_chunk(msg: Any, offset: str) -> None:
    _int("parts", msg.parts, 1, MAX_PARTS)
    _int("part", msg.part, 0, msg.parts - 1)
    _int(offset, getattr(msg, offset), 0, MAX_ROWS)


def _check_piece(msg: Any) -> None:
    """``piece`` of ``pieces``: which request part a partial or a reply sums over."""
    _int("pieces", msg.pieces, 1, MAX_PARTS)
    _int("piece", msg.piece, 0, msg.pieces - 1)


def _max_value(arr: np.ndarray) -> int:
    """The largest value of a (rows, N) array, ranges of rows in parallel."""
    return parallel.reduce_rows(lambda lo, hi: int(arr[lo:hi].max()), arr.shape[0], max, row_size=arr[0].size)


def _check_residues(where: str, arr: Any, params: ParamSet, cols: int | None = None, ranges: bool = True) -> None:
    """``arr``: (rows >= 1, L, cols) uint32 (cols: N, or a request's T tokens), every residue of limb
    i below p_i (``ranges=False``: the shape and type only)."""
    cols = params.n if cols is None else cols
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint32 or arr.ndim != 3:
        _fail(where, "a (rows, L, columns) uint32 array is required")
    if arr.shape[0] < 1 or arr.shape[1:] != (params.limbs, cols):
        _fail(where, f"shape {arr.shape} is not (rows >= 1, {params.limbs}, {cols})")
    if not ranges:
        return
    top = parallel.reduce_rows(lambda lo, hi: arr[lo:hi].max(axis=(0, 2)), arr.shape[0], np.maximum,  # per limb
                               row_size=arr[0].size)
    bad = top >= np.asarray(params.primes, dtype=np.uint32)
    if bad.any():
        _fail(where, f"limb {int(np.argmax(bad))} has a residue not below its prime")


def _check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false is required")
    return value


def _check_tokens(where: str, n_tokens: Any, params: ParamSet) -> int:
    return _int(where, n_tokens, 1, params.n)


def _check_window(m: Any, params: ParamSet) -> tuple[int, int]:
    """(n_tokens, col0) of a message map: ``n_tokens`` coefficients from ``col0`` inside the ring."""
    t = _check_tokens("n_tokens", m["n_tokens"], params)
    return t, _int("col0", m["col0"], 0, params.n - t)


# -- array codecs ----------------------------------------------------------------------
def _residue_row_bytes(params: ParamSet, cols: int | None = None) -> int:
    """Bytes of one ciphertext row of bit-packed residues, ``cols`` coefficients (default N) per limb."""
    cols = params.n if cols is None else cols
    return sum(packed_size(p.bit_length(), cols) for p in params.primes)


def _pack_residues(arr: np.ndarray, params: ParamSet, packed: tuple[np.ndarray, ...] | None = None,
                   ) -> list[bytes | memoryview]:
    """(rows, L, T) -> one bit-packed blob per limb, each (rows, T) in C order (views: pieces of
    the message, ``codec.pack_pieces``); ``packed``: those limbs' words already
    (``EncryptedBatch.packed``)."""
    if packed is not None:
        return [memoryview(w.reshape(-1).view(np.uint8)).toreadonly() for w in packed]  # type: ignore[arg-type]
    return [pack_bits_view(arr[:, i, :], p.bit_length()) for i, p in enumerate(params.primes)]


def _unpack_residues(where: str, blobs: Any, params: ParamSet, rows: int, cols: int) -> np.ndarray:
    if not isinstance(blobs, list) or len(blobs) != params.limbs:
        _fail(where, f"a list of {params.limbs} limbs is required")
    out = np.empty((rows, params.limbs, cols), dtype=np.uint32)
    for i, (blob, p) in enumerate(zip(blobs, params.primes, strict=True)):
        bits, count = p.bit_length(), rows * cols
        _blob(f"{where}[{i}]", blob, packed_size(bits, count))
        try:
            unpack_bits_into(blob, bits, out[:, i, :])
        except MalformedMessage as exc:
            _fail(f"{where}[{i}]", str(exc))
    return out


def _raw_residues(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<u4").tobytes()


def _read_raw_residues(where: str, blob: Any, params: ParamSet, rows: int, cols: int) -> np.ndarray:
    """(rows, L, cols) uint32 from raw little-endian bytes, read-only, without copying on a
    little-endian host; the message's constructor checks every residue against its prime."""
    _blob(where, blob, 4 * rows * params.limbs * cols)
    arr = np.frombuffer(blob, dtype="<u4").reshape(rows, params.limbs, cols)
    return arr if arr.dtype == np.uint32 else arr.astype(np.uint32)


def _shape(where: str, value: Any, fixed: tuple[int, ...], row_bytes: int, max_bytes: int) -> int:
    """Validate ``[rows, *fixed]``; return rows. A claim beyond ``max_bytes`` is oversized."""
    if not isinstance(value, list) or len(value) != 1 + len(fixed):
        _fail(where, f"a list of {1 + len(fixed)} integers is required")
    rows = _int(f"{where}[0]", value[0], 1, MAX_ROWS)
    for k, (got, want) in enumerate(zip(value[1:], fixed, strict=True), start=1):
        if _int(f"{where}[{k}]", got, 0, MAX_ROWS) != want:
            _fail(f"{where}[{k}]", f"{got} does not match the parameter set ({want})")
    if rows * row_bytes > max_bytes:
        raise OversizedMessage(f"{where}: claims {rows * row_bytes} payload bytes, limit {max_bytes}")
    return rows


def _array_bytes(arr: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def _array(where: str, blob: Any, dtype: str, count: int) -> np.ndarray:
    _blob(where, blob, 8 * count)
    return np.frombuffer(blob, dtype=dtype).astype(dtype[1:])


def _join_rows(parts: list[Any]) -> Any:
    """Row ranges of an ``a`` or ``b`` part (``encrypt.concat_rows``); a mix of packed and not
    packed is a malformed join."""
    try:
        return concat_rows(parts)
    except ParameterMismatch:
        _fail("join", "parts with a switched (packed) and a mod-q part")


def partial_row_bytes(params: ParamSet, a_switched: bool, cols: int | None = None) -> int:
    """Bytes of one output row of a partial: raw uint32 ``b`` over ``cols`` tokens (default N), and
    ``a`` (all N coefficients) raw or switched and packed."""
    raw = 4 * params.limbs * params.n
    b = raw if cols is None else 4 * params.limbs * cols
    return b + (packed_size(params.out_bits, params.n) if a_switched else raw)


"""helora's messages on the wire (DESIGN §3 Transport, §4 RabbitMQ practice, §7 invariant 4).

Every message is one msgpack map of allow-listed types only (int, str, bytes, list, map with
str keys): no ext types, no floats, never pickle. Each carries ``v`` (``WIRE_VERSION``),
``type``, ``pset`` (parameter-set id), ``rid`` (16-byte request id) and ``lib`` (the sender's
hecommon version), plus the shapes of its arrays. Arrays travel as raw little-endian bytes.
What crosses the network to or from the data owner is bit-packed (``bits.py``): request residues
of limb ``i`` at ``p_i.bit_length()`` bits, switched outputs at ``params.out_bits`` bits. Partials
(evaluator → aggregator, inside the cluster) carry raw little-endian uint32 residues: 18.5 %
more bytes than packed 27-bit limbs, but no packing on the evaluator and no unpacking on the
aggregator, which were the largest CPU costs of that hop (wire version 2).

One plain dataclass per message type, validated at construction, with an encode/decode pair
(as Flower's ``serde.py``). Decoding checks the size before parsing, then the version, the
type, the exact set of keys, every type, range and length; it raises ``OversizedMessage``,
``UnsupportedVersion``, ``ParameterMismatch`` or ``MalformedMessage``, naming the field and
never showing payload contents. Only the classes in ``_BODY_KEYS`` have an encoder: a
``SecretKey`` (or anything else) raises ``TypeError``.

Payloads larger than the broker's ``max_message_size`` are cut by ciphertext rows with
``split`` and reassembled with ``join``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any, ClassVar

import numpy as np

from ..errors import HeloraError, InexactLayer, MalformedMessage, OversizedMessage, ParameterMismatch
from ..he import parallel
from ..he.bits import PackedRows, pack_bits, packed_size, unpack_bits, unpack_bits_into
from ..he.encrypt import EncryptedBatch, EncryptedPartial, EncryptedResult, concat_a
from ..he.exact import exact_terms, sub_sums
from ..he.params import ParamSet
from ..he.params import get as get_params
from ..he.sampling import SEED_BYTES
from .codec import check_blob as _blob
from .codec import check_int as _int
from .codec import check_keys as _keys
from .codec import check_text as _text
from .codec import expect as _expect
from .codec import fail as _fail
from .codec import pack, unpack

WIRE_VERSION = 5  # 5: shard counts in the manifest, pieces in partials and replies (the direct path);
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
    return parallel.reduce_rows(lambda lo, hi: int(arr[lo:hi].max()), arr.shape[0], max)


def _check_residues(where: str, arr: Any, params: ParamSet) -> None:
    """``arr``: (rows >= 1, L, N) uint32, every residue of limb i below p_i."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint32 or arr.ndim != 3:
        _fail(where, "a (rows, L, N) uint32 array is required")
    if arr.shape[0] < 1 or arr.shape[1:] != (params.limbs, params.n):
        _fail(where, f"shape {arr.shape} is not (rows >= 1, {params.limbs}, {params.n})")
    top = parallel.reduce_rows(lambda lo, hi: arr[lo:hi].max(axis=(0, 2)), arr.shape[0], np.maximum)  # per limb
    bad = top >= np.asarray(params.primes, dtype=np.uint32)
    if bad.any():
        _fail(where, f"limb {int(np.argmax(bad))} has a residue not below its prime")


def _check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false is required")
    return value


def _check_tokens(where: str, n_tokens: Any, params: ParamSet) -> None:
    _int(where, n_tokens, 1, params.n)


# -- array codecs ----------------------------------------------------------------------
def _residue_row_bytes(params: ParamSet) -> int:
    return sum(packed_size(p.bit_length(), params.n) for p in params.primes)


def _pack_residues(arr: np.ndarray, params: ParamSet) -> list[bytes]:
    # (rows, L, N) -> one bit-packed blob per limb, each (rows, N) in C order
    return [pack_bits(arr[:, i, :], p.bit_length()) for i, p in enumerate(params.primes)]


def _unpack_residues(where: str, blobs: Any, params: ParamSet, rows: int) -> np.ndarray:
    if not isinstance(blobs, list) or len(blobs) != params.limbs:
        _fail(where, f"a list of {params.limbs} limbs is required")
    out = np.empty((rows, params.limbs, params.n), dtype=np.uint32)
    for i, (blob, p) in enumerate(zip(blobs, params.primes, strict=True)):
        bits, count = p.bit_length(), rows * params.n
        _blob(f"{where}[{i}]", blob, packed_size(bits, count))
        try:
            unpack_bits_into(blob, bits, out[:, i, :])
        except MalformedMessage as exc:
            _fail(f"{where}[{i}]", str(exc))
    return out


def _raw_residues(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<u4").tobytes()


def _read_raw_residues(where: str, blob: Any, params: ParamSet, rows: int) -> np.ndarray:
    """(rows, L, N) uint32 from raw little-endian bytes, read-only, without copying on a
    little-endian host; the message's constructor checks every residue against its prime."""
    _blob(where, blob, 4 * rows * params.limbs * params.n)
    arr = np.frombuffer(blob, dtype="<u4").reshape(rows, params.limbs, params.n)
    return arr if arr.dtype == np.uint32 else arr.astype(np.uint32)


def _unpack_words(where: str, blob: Any, bits: int, shape: tuple[int, int]) -> np.ndarray:
    _blob(where, blob, packed_size(bits, shape[0] * shape[1]))
    try:
        return unpack_bits(blob, bits, shape[0] * shape[1]).reshape(shape)
    except MalformedMessage as exc:
        _fail(where, str(exc))


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


def _join_a(parts: list[Any]) -> Any:
    """Row ranges of an ``a`` part (``encrypt.concat_a``); a mix is a malformed join."""
    try:
        return concat_a(parts)
    except ParameterMismatch:
        _fail("join", "parts with a switched and a mod-q a part")


def partial_row_bytes(params: ParamSet, a_switched: bool) -> int:
    """Bytes of one output row of a partial: raw uint32 ``b``, and ``a`` raw or switched and packed."""
    raw = 4 * params.limbs * params.n
    return raw + (packed_size(params.out_bits, params.n) if a_switched else raw)


# -- messages ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EncryptedRequest:
    """Client → encoder: input ciphertexts ``row_start …`` of one layer call (part of ``parts``).

    ``send_a=False``: the client holds the layer's switched public part from an earlier reply,
    so the reply carries ``b`` alone (at ``out_bits``). ``owner``: the data owner's public seed,
    drawn once per session; with the manifest's seed of the layer it fixes the ``a`` the batch was
    encrypted against (``sampling.owner_a_seed``), and the evaluator keeps a hint per owner."""

    TYPE: ClassVar[str] = "request"
    rid: bytes
    layer: str
    direction: str
    batch: EncryptedBatch  # b: (d, L, N) uint32 residues
    part: int = 0
    parts: int = 1
    row_start: int = 0
    send_a: bool = True
    owner: bytes = b""
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _check_route(self)
        _check_chunk(self, "row_start")
        _check_bool("send_a", self.send_a)
        _blob("owner", self.owner, OWNER_BYTES)
        if not isinstance(self.batch, EncryptedBatch):
            _fail("batch", "an EncryptedBatch is required")
        _check_residues("b", self.batch.b, self.batch.params)

    @property
    def params(self) -> ParamSet:
        return self.batch.params

    @property
    def width(self) -> int:
        """Input ciphertexts in this message."""
        return self.batch.width

    def _body(self) -> dict[str, Any]:
        b = self.batch.b
        return {"layer": self.layer, "direction": self.direction, "part": self.part, "parts": self.parts,
                "row_start": self.row_start, "send_a": self.send_a, "owner": self.owner,
                "n_tokens": self.batch.n_tokens, "shape": list(b.shape), "b": _pack_residues(b, self.params)}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> EncryptedRequest:
        rows = _shape("shape", m["shape"], (params.limbs, params.n), _residue_row_bytes(params), max_bytes)
        _check_tokens("n_tokens", m["n_tokens"], params)
        batch = EncryptedBatch(params, _unpack_residues("b", m["b"], params, rows), m["n_tokens"])
        return cls(m["rid"], m["layer"], m["direction"], batch, m["part"], m["parts"], m["row_start"],
                   _check_bool("send_a", m["send_a"]), m["owner"], m["lib"])

    def _rows(self) -> int:
        return self.batch.width

    def _row_bytes(self) -> int:
        return _residue_row_bytes(self.params)

    def _slice(self, lo: int, hi: int) -> EncryptedRequest:
        batch = EncryptedBatch(self.params, self.batch.b[lo:hi], self.batch.n_tokens)
        return dataclasses.replace(self, batch=batch, row_start=self.row_start + lo)

    def _with_rows(self, chunks: Sequence[EncryptedRequest]) -> EncryptedRequest:
        b = np.concatenate([c.batch.b for c in chunks])
        return dataclasses.replace(self, batch=EncryptedBatch(self.params, b, self.batch.n_tokens))


@dataclass(frozen=True, eq=False)
class PartialResult:
    """Evaluator → aggregator: the product of input rows ``row_start … row_end-1`` (request part
    ``piece`` of ``pieces`` that shard ``shard`` received), for output ciphertexts ``out_start …``
    (part ``part`` of ``parts``), mod q. The aggregator adds the pieces of each shard, then sums
    (forward) or joins (backward) the shards. ``send_a``: the request's (False: the reply goes
    without ``a``)."""

    TYPE: ClassVar[str] = "partial"
    rid: bytes
    layer: str
    direction: str
    shard: int
    shards: int
    row_start: int
    row_end: int
    partial: EncryptedPartial  # a, b: (d_out, L, N) uint32 residues
    part: int = 0
    parts: int = 1
    out_start: int = 0
    send_a: bool = True
    piece: int = 0
    pieces: int = 1
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _check_route(self)
        _check_chunk(self, "out_start")
        _check_bool("send_a", self.send_a)
        _check_piece(self)
        _int("shards", self.shards, 1, MAX_PARTS)
        _int("shard", self.shard, 0, self.shards - 1)
        _int("row_start", self.row_start, 0, MAX_ROWS)
        _int("row_end", self.row_end, self.row_start + 1, MAX_ROWS)
        if not isinstance(self.partial, EncryptedPartial):
            _fail("partial", "an EncryptedPartial is required")
        _check_residues("b", self.partial.b, self.params)
        a = self.partial.a
        if isinstance(a, PackedRows):  # switched once by the evaluator: any bytes are valid values
            if (a.bits, a.n) != (self.params.out_bits, self.params.n):
                _fail("a_bits", f"a switched a part is {self.params.n} values of {self.params.out_bits} bits")
            if a.rows != self.partial.b.shape[0]:
                _fail("a", f"{a.rows} rows, b has {self.partial.b.shape[0]}")
        else:
            _check_residues("a", a, self.params)
            if a.shape != self.partial.b.shape:
                _fail("b", "shape differs from a")
        _check_tokens("n_tokens", self.partial.n_tokens, self.params)

    @property
    def params(self) -> ParamSet:
        return self.partial.params

    def _body(self) -> dict[str, Any]:
        pa = self.partial
        return {"layer": self.layer, "direction": self.direction, "shard": self.shard, "shards": self.shards,
                "row_start": self.row_start, "row_end": self.row_end, "part": self.part, "parts": self.parts,
                "out_start": self.out_start, "send_a": self.send_a, "piece": self.piece, "pieces": self.pieces,
                "n_tokens": pa.n_tokens,
                "shape": list(pa.b.shape), "a_bits": pa.a.bits if isinstance(pa.a, PackedRows) else 0,
                "a": pa.a.data if isinstance(pa.a, PackedRows) else _raw_residues(pa.a), "b": _raw_residues(pa.b)}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> PartialResult:
        a_bits = _int("a_bits", m["a_bits"], 0, 64)
        if a_bits not in (0, params.out_bits):
            _fail("a_bits", f"0 (residues mod q) or {params.out_bits} (switched) is required")
        row_bytes = partial_row_bytes(params, a_switched=bool(a_bits))
        rows = _shape("shape", m["shape"], (params.limbs, params.n), row_bytes, max_bytes)
        _check_tokens("n_tokens", m["n_tokens"], params)
        if a_bits:
            a: np.ndarray | PackedRows = PackedRows(a_bits, params.n, _blob("a", m["a"], rows * packed_size(a_bits, params.n)))
        else:
            a = _read_raw_residues("a", m["a"], params, rows)
        b = _read_raw_residues("b", m["b"], params, rows)
        return cls(m["rid"], m["layer"], m["direction"], m["shard"], m["shards"], m["row_start"], m["row_end"],
                   EncryptedPartial(params, a, b, m["n_tokens"]), m["part"], m["parts"], m["out_start"],
                   _check_bool("send_a", m["send_a"]), m["piece"], m["pieces"], m["lib"])

    def _rows(self) -> int:
        return int(self.partial.b.shape[0])

    def _row_bytes(self) -> int:
        return partial_row_bytes(self.params, isinstance(self.partial.a, PackedRows))

    def _slice(self, lo: int, hi: int) -> PartialResult:
        pa = self.partial
        sliced = EncryptedPartial(self.params, pa.a[lo:hi], pa.b[lo:hi], pa.n_tokens)
        return dataclasses.replace(self, partial=sliced, out_start=self.out_start + lo)

    def _with_rows(self, chunks: Sequence[PartialResult]) -> PartialResult:
        a = _join_a([c.partial.a for c in chunks])
        b = np.concatenate([c.partial.b for c in chunks])
        return dataclasses.replace(self, partial=EncryptedPartial(self.params, a, b, self.partial.n_tokens))


@dataclass(frozen=True, eq=False)
class EncryptedReply:
    """Evaluator or aggregator → client: switched outputs ``out_start …`` (part ``part`` of
    ``parts``) of the sum over request part ``piece`` of ``pieces``. An evaluator that holds a
    whole layer answers each request part alone (``pieces`` = the request's parts), and the client
    adds the decrypted pieces, exact integers like sub-sums (``hecommon.he.exact``); the aggregator
    answers with the whole sum (``pieces`` = 1)."""

    TYPE: ClassVar[str] = "reply"
    rid: bytes
    layer: str
    direction: str
    result: EncryptedResult  # a, b: (d_out, N) uint64 < 2^out_bits; or a None, b < 2^bits (held or hint)
    part: int = 0
    parts: int = 1
    out_start: int = 0
    piece: int = 0
    pieces: int = 1
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _check_route(self)
        _check_chunk(self, "out_start")
        _check_piece(self)
        res = self.result
        if not isinstance(res, EncryptedResult):
            _fail("result", "an EncryptedResult is required")
        k, n = res.bits, res.params.n
        packed = isinstance(res.a, PackedRows)  # as the evaluator packed it: any bytes are valid values
        parts = (("b", res.b),) if res.a is None or packed else (("b", res.b), ("a", res.a))
        for name, arr in parts:
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint64 or arr.ndim != 2:
                _fail(name, "a (rows, N) uint64 array is required")
            if arr.shape[0] < 1 or arr.shape != (res.b.shape[0], n):
                _fail(name, f"shape {arr.shape} is not (rows >= 1, {n}) or differs from b")
            if arr.size and _max_value(arr) >> k:
                _fail(name, f"a value does not fit in {k} bits")
        if isinstance(res.a, PackedRows) and (res.a.bits, res.a.n, res.a.rows) != (k, n, res.b.shape[0]):
            _fail("a", f"packed a must be {res.b.shape[0]} rows of {n} values of {k} bits")
        _check_tokens("n_tokens", res.n_tokens, res.params)

    @property
    def params(self) -> ParamSet:
        return self.result.params

    def _body(self) -> dict[str, Any]:
        res, k = self.result, self.result.bits
        return {"layer": self.layer, "direction": self.direction, "part": self.part, "parts": self.parts,
                "out_start": self.out_start, "piece": self.piece, "pieces": self.pieces, "n_tokens": res.n_tokens,
                "shape": list(res.b.shape), "bits": k,
                "a": None if res.a is None else res.a.data if isinstance(res.a, PackedRows) else pack_bits(res.a, k),
                "b": pack_bits(res.b, k)}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> EncryptedReply:
        with_a, k = _reply_bits(m, params)
        n = params.n
        rows = _shape("shape", m["shape"], (n,), (2 if with_a else 1) * packed_size(k, n), max_bytes)
        _check_tokens("n_tokens", m["n_tokens"], params)
        # a stays packed (any bytes are valid values): decrypt unpacks it, row range by row range
        a = PackedRows(k, n, _blob("a", m["a"], rows * packed_size(k, n))) if with_a else None
        b = _unpack_words("b", m["b"], k, (rows, n))
        return cls(m["rid"], m["layer"], m["direction"], EncryptedResult(params, a, b, m["n_tokens"], k),
                   m["part"], m["parts"], m["out_start"], m["piece"], m["pieces"], m["lib"])

    def _rows(self) -> int:
        return self.result.width

    def _row_bytes(self) -> int:
        res = self.result
        return (1 if res.a is None else 2) * packed_size(res.bits, self.params.n)

    def _slice(self, lo: int, hi: int) -> EncryptedReply:
        res = self.result
        sliced = EncryptedResult(self.params, None if res.a is None else res.a[lo:hi], res.b[lo:hi], res.n_tokens,
                                 res.b_bits)
        return dataclasses.replace(self, result=sliced, out_start=self.out_start + lo)

    def _with_rows(self, chunks: Sequence[EncryptedReply]) -> EncryptedReply:
        # join's _route has checked that every part has (or lacks) its a part and has the same bits
        a = None if self.result.a is None else _join_a([c.result.a for c in chunks])
        b = np.concatenate([c.result.b for c in chunks])
        result = EncryptedResult(self.params, a, b, self.result.n_tokens, self.result.b_bits)
        return dataclasses.replace(self, result=result)


@dataclass(frozen=True)
class ErrorReply:
    """Any service → the sender: why a request failed (``reason`` as in ``errors.py``).

    ``pset`` is carried as text and not resolved: an error must stay readable even when it
    reports an unknown parameter set. Build it with ``from_exception``.
    """

    TYPE: ClassVar[str] = "error"
    rid: bytes
    reason: str
    message: str
    pset: str = ""
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES)
        reason = _text("reason", self.reason, 64)
        if not all(c.isascii() and (c.islower() or c.isdigit() or c == "_") for c in reason):
            _fail("reason", "lowercase letters, digits and '_' only")
        _text("message", self.message, MAX_ERROR_CHARS, empty=True)
        _text("pset", self.pset, MAX_NAME_CHARS, empty=True)
        _text("lib", self.lib, MAX_LIB_CHARS)

    @classmethod
    def from_exception(cls, rid: bytes, exc: BaseException, pset: str = "") -> ErrorReply:
        """helora's errors keep their text (they never hold payload); others only their class."""
        if isinstance(exc, HeloraError):
            return cls(rid, exc.reason, str(exc)[:MAX_ERROR_CHARS], pset)
        return cls(rid, "internal", type(exc).__name__, pset)

    def _body(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message}

    @classmethod
    def _from(cls, m: dict[str, Any], pset: str, max_bytes: int) -> ErrorReply:
        return cls(m["rid"], m["reason"], m["message"], pset, m["lib"])


@dataclass(frozen=True, eq=False)
class LayerEntry:
    """One server-side linear layer in the manifest; fused layers list their members."""

    name: str
    block: int
    d_in: int
    d_out: int
    members: tuple[tuple[str, int], ...]  # (member name, its output width), in output order
    a_seed_fwd: bytes
    a_seed_bwd: bytes
    weight_scale: np.ndarray  # (d_out,) float64, per output channel
    row_sums: np.ndarray  # (d_out,) int64: Σ_j q_w[o, j], for the zero-point correction
    col_sums: np.ndarray  # (d_in,) int64: Σ_o q_w[o, j], for the backward correction
    #: the widest exact sum (``exact.exact_terms`` of the manifest's bits and parameter set); wider
    #: sums (``d_in`` forward, ``d_out`` backward) are split into sub-sums (``sums``)
    exact_terms: int
    #: evaluators that share the layer's inputs (``shards.even_split`` of ``d_in``): the client sends
    #: each shard its requests directly (``hecommon.route``), the aggregator combines more than one
    shards: int = 1
    KEYS: ClassVar[frozenset[str]] = frozenset(
        ("name", "block", "d_in", "d_out", "members", "a_seed_fwd", "a_seed_bwd", "weight_scale",
         "row_sums", "col_sums", "exact_terms", "shards"))

    def __post_init__(self) -> None:
        _text("layer.name", self.name, MAX_NAME_CHARS)
        _int("layer.block", self.block, 0, MAX_LAYERS)
        _int("layer.d_in", self.d_in, 1, MAX_ROWS)
        _int("layer.d_out", self.d_out, 1, MAX_ROWS)
        if not isinstance(self.members, tuple) or not 1 <= len(self.members) <= 16:
            _fail("layer.members", "a tuple of 1..16 (name, width) pairs is required")
        for name, width in self.members:
            _text("layer.members.name", name, MAX_NAME_CHARS)
            _int("layer.members.width", width, 1, MAX_ROWS)
        if sum(w for _, w in self.members) != self.d_out:
            _fail("layer.members", "widths do not sum to d_out")
        _blob("layer.a_seed_fwd", self.a_seed_fwd, SEED_BYTES)
        _blob("layer.a_seed_bwd", self.a_seed_bwd, SEED_BYTES)
        for name, arr, dtype, size in (("weight_scale", self.weight_scale, np.float64, self.d_out),
                                       ("row_sums", self.row_sums, np.int64, self.d_out),
                                       ("col_sums", self.col_sums, np.int64, self.d_in)):
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (size,):
                _fail(f"layer.{name}", f"a ({size},) {np.dtype(dtype).name} array is required")
        if not np.isfinite(self.weight_scale).all() or (self.weight_scale < 0).any():
            _fail("layer.weight_scale", "finite non-negative scales are required")
        _int("layer.exact_terms", self.exact_terms, 1, MAX_ROWS)
        _int("layer.shards", self.shards, 1, min(self.d_in, MAX_PARTS))
        for direction in DIRECTIONS:
            self.sums(direction)  # InexactLayer, naming the layer, if it cannot be made exact

    def summed_width(self, direction: str) -> int:
        """Terms of each output's sum: the inputs forward, every fused output backward."""
        return self.d_in if direction == "fwd" else self.d_out

    def sums(self, direction: str) -> int:
        """Sub-sums each output of ``direction`` is returned in (1: one exact sum)."""
        return sub_sums(self.name, direction, self.summed_width(direction), self.exact_terms)

    def out_rows(self, direction: str) -> int:
        """Output ciphertexts of a request: each output once per sub-sum (``exact.spread``'s order)."""
        return (self.d_out if direction == "fwd" else self.d_in) * self.sums(direction)

    def _map(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "d_in": self.d_in, "d_out": self.d_out,
                "members": [[n, w] for n, w in self.members], "a_seed_fwd": self.a_seed_fwd,
                "a_seed_bwd": self.a_seed_bwd, "weight_scale": _array_bytes(self.weight_scale, "<f8"),
                "row_sums": _array_bytes(self.row_sums, "<i8"), "col_sums": _array_bytes(self.col_sums, "<i8"),
                "exact_terms": self.exact_terms, "shards": self.shards}

    @classmethod
    def _from(cls, m: Any) -> LayerEntry:
        _keys("layer", m, cls.KEYS)
        d_in = _int("layer.d_in", m["d_in"], 1, MAX_ROWS)
        d_out = _int("layer.d_out", m["d_out"], 1, MAX_ROWS)
        members = m["members"]
        if not isinstance(members, list) or not all(isinstance(p, list) and len(p) == 2 for p in members):
            _fail("layer.members", "a list of [name, width] pairs is required")
        return cls(m["name"], m["block"], d_in, d_out, tuple((n, w) for n, w in members), m["a_seed_fwd"],
                   m["a_seed_bwd"], _array("layer.weight_scale", m["weight_scale"], "<f8", d_out),
                   _array("layer.row_sums", m["row_sums"], "<i8", d_out),
                   _array("layer.col_sums", m["col_sums"], "<i8", d_in), m["exact_terms"], m["shards"])


@dataclass(frozen=True, eq=False)
class Manifest:
    """Encoder → clients: the public description of the served model (DESIGN §4)."""

    TYPE: ClassVar[str] = "manifest"
    rid: bytes
    model: str
    params: ParamSet
    layers: tuple[LayerEntry, ...]
    x_bits: int = 8
    w_bits: int = 8
    metadata: dict[str, str] = field(default_factory=dict)
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES)
        _text("model", self.model, MAX_META_CHARS)
        if not isinstance(self.params, ParamSet):
            _fail("params", "a ParamSet is required")
        if not isinstance(self.layers, tuple) or len(self.layers) > MAX_LAYERS:
            _fail("layers", f"a tuple of at most {MAX_LAYERS} LayerEntry is required")
        if not all(isinstance(e, LayerEntry) for e in self.layers):
            _fail("layers", "LayerEntry items are required")
        if len({e.name for e in self.layers}) != len(self.layers):
            _fail("layers", "layer names must be unique")
        _int("x_bits", self.x_bits, 1, 16)
        _int("w_bits", self.w_bits, 1, 16)
        terms = exact_terms(self.params, self.x_bits, self.w_bits)
        for e in self.layers:  # every receiver refuses, before anything is encrypted, a manifest that
            if e.exact_terms > terms:  # would decode wrongly (each layer's sub-sums: LayerEntry)
                raise InexactLayer(f"layer {e.name}: the manifest sums up to {e.exact_terms} terms at once, but "
                                   f"{self.x_bits}-bit inputs and {self.w_bits}-bit weights on {self.params.name} "
                                   f"decode exactly only up to {terms}")
        if not isinstance(self.metadata, dict) or len(self.metadata) > MAX_META_ENTRIES:
            _fail("metadata", f"a map of at most {MAX_META_ENTRIES} entries is required")
        for key, value in self.metadata.items():
            _text("metadata key", key, MAX_NAME_CHARS)
            _text(f"metadata[{key!r}]", value, MAX_META_CHARS, empty=True)
        _text("lib", self.lib, MAX_LIB_CHARS)

    def _body(self) -> dict[str, Any]:
        return {"model": self.model, "x_bits": self.x_bits, "w_bits": self.w_bits,
                "metadata": dict(self.metadata), "layers": [e._map() for e in self.layers]}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> Manifest:
        if not isinstance(m["layers"], list):
            _fail("layers", "a list is required")
        layers = tuple(LayerEntry._from(e) for e in m["layers"])
        return cls(m["rid"], m["model"], params, layers, m["x_bits"], m["w_bits"], m["metadata"], m["lib"])


_BODY_KEYS: dict[Any, tuple[str, ...]] = {
    EncryptedRequest: ("layer", "direction", "part", "parts", "row_start", "send_a", "owner", "n_tokens", "shape",
                       "b"),
    PartialResult: ("layer", "direction", "shard", "shards", "row_start", "row_end", "part", "parts",
                    "out_start", "send_a", "piece", "pieces", "n_tokens", "shape", "a_bits", "a", "b"),
    EncryptedReply: ("layer", "direction", "part", "parts", "out_start", "piece", "pieces", "n_tokens", "shape",
                     "bits", "a", "b"),
    ErrorReply: ("reason", "message"),
    Manifest: ("model", "x_bits", "w_bits", "metadata", "layers"),
}
Message = EncryptedRequest | PartialResult | EncryptedReply | ErrorReply | Manifest
_BY_TYPE: dict[str, Any] = {cls.TYPE: cls for cls in _BODY_KEYS}


# -- encode / decode -----------------------------------------------------------------------
def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialize an allow-listed message; anything else (a ``SecretKey``…) raises ``TypeError``."""
    if type(msg) not in _BODY_KEYS:
        raise TypeError(f"{type(msg).__name__} has no wire encoder")
    pset = msg.pset if isinstance(msg, ErrorReply) else msg.params.name
    head = {"v": WIRE_VERSION, "type": msg.TYPE, "pset": pset, "rid": msg.rid, "lib": msg.lib}
    return pack({**head, **msg._body()}, max_bytes, msg.TYPE, "; split it")


def _parse(data: Any, max_bytes: int) -> dict[str, Any]:
    return unpack(data, max_bytes, version=WIRE_VERSION, protocol="wire", max_array_len=MAX_LAYERS,
                  max_map_len=2 * MAX_META_ENTRIES)


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES, expect: Any = None) -> Message:
    """Parse and validate one message of any allow-listed type (or of type ``expect``)."""
    return _decode_map(_parse(data, max_bytes), max_bytes, expect)


def _decode_map(m: dict[str, Any], max_bytes: int, expect: Any = None) -> Message:
    kind = m.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        _fail("type", f"one of {sorted(_BY_TYPE)} is required")
    if expect is not None and cls is not expect:
        _fail("type", f"{expect.TYPE!r} expected, got {cls.TYPE!r}")
    _keys(cls.TYPE, m, _HEADER + _BODY_KEYS[cls])
    pset = _text("pset", m["pset"], MAX_NAME_CHARS, empty=cls is ErrorReply)
    _blob("rid", m["rid"], RID_BYTES)
    try:
        return cls._from(m, pset if cls is ErrorReply else get_params(pset), max_bytes)
    except HeloraError:
        raise
    except (ValueError, TypeError) as exc:  # a constructor below refused a field: still malformed
        raise MalformedMessage(f"{cls.TYPE}: invalid field ({type(exc).__name__})") from None


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


@dataclass(frozen=True)
class RequestHead(_Head):
    """A request message checked without unpacking its residues (the encoder's view).

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
                   parts=req.parts, lib=req.lib, row_start=req.row_start, send_a=req.send_a, owner=req.owner)

    @property
    def route(self) -> tuple[Any, ...]:
        """What every part of one request shares (``join``, ``join_heads``, the encoder's gate); the
        owner too: parts under two owners' ``a`` never make one request."""
        return (self.rid, self.layer, self.direction, self.parts, self.lib, self.params.name, self.n_tokens,
                self.send_a, self.owner)


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
    rows = _shape("shape", m["shape"], (params.limbs, params.n), _residue_row_bytes(params), max_bytes)
    _check_tokens("n_tokens", m["n_tokens"], params)
    blobs = m["b"]
    if not isinstance(blobs, list) or len(blobs) != params.limbs:
        _fail("b", f"a list of {params.limbs} limbs is required")
    for i, (blob, p) in enumerate(zip(blobs, params.primes, strict=True)):
        _packed_blob(f"b[{i}]", blob, p.bit_length(), rows * params.n)
    head = RequestHead(_blob("rid", m["rid"], RID_BYTES), m["layer"], m["direction"], params, m["n_tokens"], rows,
                       part=m["part"], parts=m["parts"], lib=m["lib"], row_start=m["row_start"],
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


def _reply_bits(m: dict[str, Any], params: ParamSet) -> tuple[bool, int]:
    """(whether ``a`` is there, ``b``'s bits): with ``a``, ``out_bits``; without, ``out_bits`` (the
    client holds a switched ``a``) or ``hint_out_bits`` (it holds the hint)."""
    with_a = m["a"] is not None
    allowed = (params.out_bits,) if with_a else (params.out_bits, params.hint_out_bits)
    k = _int("bits", m["bits"], 1, 64)
    if k not in allowed:
        _fail("bits", f"one of {allowed} is required {'with' if with_a else 'without'} an a part")
    return with_a, k


def _reply_head(m: dict[str, Any], max_bytes: int) -> ReplyHead:
    if m.get("type") != EncryptedReply.TYPE:
        _fail("type", f"{EncryptedReply.TYPE!r} expected")
    _keys(EncryptedReply.TYPE, m, _HEADER + _BODY_KEYS[EncryptedReply])
    params = get_params(_text("pset", m["pset"], MAX_NAME_CHARS))
    with_a, k = _reply_bits(m, params)
    n = params.n
    rows = _shape("shape", m["shape"], (n,), (2 if with_a else 1) * packed_size(k, n), max_bytes)
    _check_tokens("n_tokens", m["n_tokens"], params)
    if with_a:
        _blob("a", m["a"], rows * packed_size(k, n))
    _packed_blob("b", m["b"], k, rows * n)
    head = ReplyHead(_blob("rid", m["rid"], RID_BYTES), m["layer"], m["direction"], params, m["n_tokens"], rows,
                     part=m["part"], parts=m["parts"], lib=m["lib"], out_start=m["out_start"], with_a=with_a, bits=k,
                     piece=m["piece"], pieces=m["pieces"])
    _check_route(head)
    _check_chunk(head, "out_start")
    _check_piece(head)
    return head


def decode_reply_head(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> ReplyHead:
    """The head of a reply message, its arrays checked for size and padding only."""
    return _reply_head(_parse(data, max_bytes), max_bytes)


def reply_part(partial: PartialResult) -> EncryptedReply:
    """The reply for one part of a one-shard partial whose ``a`` part is switched: ``b`` switched,
    ``a`` as it came (or left out, if the request said ``send_a=False``), the same rows, part and
    piece numbers (each part is answered alone, as it comes)."""
    result = partial.partial.switch("send" if partial.send_a else "held")
    return EncryptedReply(rid=partial.rid, layer=partial.layer, direction=partial.direction, result=result,
                          part=partial.part, parts=partial.parts, out_start=partial.out_start,
                          piece=partial.piece, pieces=partial.pieces)


def join_heads(heads: Sequence[RequestHead]) -> RequestHead:
    """The head of the whole request from its parts' heads, with ``join``'s checks."""
    if not heads:
        raise MalformedMessage("join: no parts")
    first = heads[0]
    if any(h.route != first.route for h in heads):
        _fail("join", "parts of different messages or shapes")
    ordered = sorted(heads, key=lambda h: h.part)
    if [h.part for h in ordered] != list(range(first.parts)):
        _fail("join", f"parts {[h.part for h in ordered]} are not 0..{first.parts - 1} once each")
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.row_start != prev.row_start + prev.width:
            _fail("join", f"part {cur.part}: row_start is not contiguous with part {prev.part}")
    return dataclasses.replace(ordered[0], part=0, parts=1, width=sum(h.width for h in ordered))


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


def encode_request(msg: EncryptedRequest, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, EncryptedRequest), max_bytes)


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


# -- chunking ------------------------------------------------------------------------------
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


def _route(msg: Chunked) -> tuple[Any, ...]:
    """What every part of one message shares; ``parts`` is item 4 (``PartTracker.complete``)."""
    if isinstance(msg, EncryptedRequest):
        return (type(msg), *RequestHead.of(msg).route)
    key: tuple[Any, ...] = (type(msg), msg.rid, msg.layer, msg.direction, msg.parts, msg.lib, msg.params.name,
                            msg.piece, msg.pieces)
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
        route = _route(chunk)
        if not isinstance(chunk, EncryptedRequest):
            route = route[:7] + route[8:]  # every piece: _route()[7] is the piece number
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

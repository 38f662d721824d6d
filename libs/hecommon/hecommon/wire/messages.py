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

One plain dataclass per message type, validated at construction, with an encode/decode pair in
``serde`` (as Flower's ``serde.py``). Decoding checks the size before parsing, then the version, the
type, the exact set of keys, every type, range and length; it raises ``OversizedMessage``,
``UnsupportedVersion``, ``ParameterMismatch`` or ``MalformedMessage``, naming the field and
never showing payload contents. Only the classes in ``_BODY_KEYS`` have an encoder: a
``SecretKey`` (or anything else) raises ``TypeError``.

Payloads larger than the broker's ``max_message_size`` are cut by ciphertext rows with
``chunks.split`` and reassembled with ``chunks.join`` (or used part by part: ``chunks.PartTracker``);
``heads`` reads a message's fields without unpacking its arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import MalformedMessage
from ..he.bits import PackedRows, packed_size
from ..he.encrypt import EncryptedBatch, EncryptedPartial, EncryptedResult
from ..he.params import ParamSet
from .codec import check_blob as _blob
from .codec import check_int as _int
from .codec import fail as _fail
from .fields import (
    LIB_VERSION,
    MAX_PARTS,
    MAX_ROWS,
    OWNER_BYTES,
    _check_bool,
    _check_chunk,
    _check_piece,
    _check_residues,
    _check_route,
    _check_tokens,
    _check_window,
    _join_rows,
    _max_value,
    _pack_residues,
    _raw_residues,
    _read_raw_residues,
    _residue_row_bytes,
    _shape,
    _unpack_residues,
    partial_row_bytes,
)


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
    batch: EncryptedBatch  # b: (d, L, T) uint32 residues, coefficients col0 … col0+T-1
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
        # the shape always; the residues unless encrypt wrote them reduced (EncryptedBatch.reduced)
        _check_residues("b", self.batch.b, self.batch.params, self.batch.n_tokens, ranges=not self.batch.reduced)

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
                "n_tokens": self.batch.n_tokens, "col0": self.batch.col0, "shape": list(b.shape),
                "b": _pack_residues(b, self.params, self.batch.packed)}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> EncryptedRequest:
        t, col0 = _check_window(m, params)
        rows = _shape("shape", m["shape"], (params.limbs, t), _residue_row_bytes(params, t), max_bytes)
        batch = EncryptedBatch(params, _unpack_residues("b", m["b"], params, rows, t), t, col0)
        return cls(m["rid"], m["layer"], m["direction"], batch, m["part"], m["parts"], m["row_start"],
                   _check_bool("send_a", m["send_a"]), m["owner"], m["lib"])

    def _rows(self) -> int:
        return self.batch.width

    def _row_bytes(self) -> int:
        """Bytes of a row with all N tokens: a layer is cut the same way whatever the request's
        tokens (``chunks.request_ranges``), so its reply pieces, whose ``a`` parts a client holds,
        stay the same."""
        return _residue_row_bytes(self.params)

    def _slice(self, lo: int, hi: int) -> EncryptedRequest:
        return dataclasses.replace(self, batch=self.batch.rows(self.batch.b[lo:hi]), row_start=self.row_start + lo)

    def _with_rows(self, chunks: Sequence[EncryptedRequest]) -> EncryptedRequest:
        return dataclasses.replace(self, batch=self.batch.rows(np.concatenate([c.batch.b for c in chunks])))


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
    partial: EncryptedPartial  # a: (d_out, L, N) uint32 residues (or switched, packed); b: (d_out, L, T)
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
        _check_residues("b", self.partial.b, self.params, self.partial.n_tokens)
        a = self.partial.a
        if isinstance(a, PackedRows):  # switched once by the evaluator: any bytes are valid values
            if (a.bits, a.n) != (self.params.out_bits, self.params.n):
                _fail("a_bits", f"a switched a part is {self.params.n} values of {self.params.out_bits} bits")
            if a.rows != self.partial.b.shape[0]:
                _fail("a", f"{a.rows} rows, b has {self.partial.b.shape[0]}")
        else:  # its ranges are checked where it is decoded (``_from``): in-process, it is the
            # evaluator's own hint (the same for every request), whose check cost more than a
            # one-token request's product
            _check_residues("a", a, self.params, ranges=False)
            if a.shape[0] != self.partial.b.shape[0]:
                _fail("b", "rows differ from a's")
        _check_tokens("n_tokens", self.partial.n_tokens, self.params)

    @property
    def params(self) -> ParamSet:
        return self.partial.params

    def _body(self) -> dict[str, Any]:
        pa = self.partial
        return {"layer": self.layer, "direction": self.direction, "shard": self.shard, "shards": self.shards,
                "row_start": self.row_start, "row_end": self.row_end, "part": self.part, "parts": self.parts,
                "out_start": self.out_start, "send_a": self.send_a, "piece": self.piece, "pieces": self.pieces,
                "n_tokens": pa.n_tokens, "col0": pa.col0,
                "shape": list(pa.b.shape), "a_bits": pa.a.bits if isinstance(pa.a, PackedRows) else 0,
                "a": pa.a.data if isinstance(pa.a, PackedRows) else _raw_residues(pa.a), "b": _raw_residues(pa.b)}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> PartialResult:
        a_bits = _int("a_bits", m["a_bits"], 0, 64)
        if a_bits not in (0, params.out_bits):
            _fail("a_bits", f"0 (residues mod q) or {params.out_bits} (switched) is required")
        t, col0 = _check_window(m, params)
        row_bytes = partial_row_bytes(params, a_switched=bool(a_bits), cols=t)
        rows = _shape("shape", m["shape"], (params.limbs, t), row_bytes, max_bytes)
        if a_bits:
            a: np.ndarray | PackedRows = PackedRows(a_bits, params.n, _blob("a", m["a"], rows * packed_size(a_bits, params.n)))
        else:
            a = _read_raw_residues("a", m["a"], params, rows, params.n)
            _check_residues("a", a, params)
        b = _read_raw_residues("b", m["b"], params, rows, t)
        return cls(m["rid"], m["layer"], m["direction"], m["shard"], m["shards"], m["row_start"], m["row_end"],
                   EncryptedPartial(params, a, b, t, col0), m["part"], m["parts"], m["out_start"],
                   _check_bool("send_a", m["send_a"]), m["piece"], m["pieces"], m["lib"])

    def _rows(self) -> int:
        return int(self.partial.b.shape[0])

    def _row_bytes(self) -> int:
        """As ``EncryptedRequest._row_bytes``: N tokens a row, whatever the window."""
        return partial_row_bytes(self.params, isinstance(self.partial.a, PackedRows))

    def _slice(self, lo: int, hi: int) -> PartialResult:
        pa = self.partial
        return dataclasses.replace(self, partial=pa.rows(pa.a[lo:hi], pa.b[lo:hi]), out_start=self.out_start + lo)

    def _with_rows(self, chunks: Sequence[PartialResult]) -> PartialResult:
        a = _join_rows([c.partial.a for c in chunks])
        b = np.concatenate([c.partial.b for c in chunks])
        return dataclasses.replace(self, partial=self.partial.rows(a, b))


def _reply_bits(m: dict[str, Any], params: ParamSet) -> tuple[bool, int]:
    """(whether ``a`` is there, ``b``'s bits): with ``a``, ``out_bits``; without, ``out_bits`` (the
    client holds a switched ``a``) or ``hint_out_bits`` (it holds the hint)."""
    with_a = m["a"] is not None
    allowed = (params.out_bits,) if with_a else (params.out_bits, params.hint_out_bits)
    k = _int("bits", m["bits"], 1, 64)
    if k not in allowed:
        _fail("bits", f"one of {allowed} is required {'with' if with_a else 'without'} an a part")
    return with_a, k


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
    result: EncryptedResult  # a (d_out, N), b (d_out, T): uint64 < 2^out_bits; or a None, b < 2^bits (held or hint)
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
        k = res.bits
        rows = res.b.shape[0]
        for name, arr, n in (("b", res.b, res.n_tokens), ("a", res.a, res.params.n)):
            if arr is None:
                continue
            if isinstance(arr, PackedRows):  # as it was packed at k bits: any bytes are valid values
                if (arr.bits, arr.n, arr.rows) != (k, n, rows) or rows < 1:
                    _fail(name, f"packed {name} must be {max(rows, 1)} rows of {n} values of {k} bits")
                continue
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint64 or arr.ndim != 2:
                _fail(name, "a (rows, N) uint64 array is required")
            if arr.shape[0] < 1 or arr.shape != (rows, n):
                _fail(name, f"shape {arr.shape} is not (rows >= 1, {n}) or differs from b")
            if arr.size and _max_value(arr) >> k:
                _fail(name, f"a value does not fit in {k} bits")
        _check_tokens("n_tokens", res.n_tokens, res.params)

    @property
    def params(self) -> ParamSet:
        return self.result.params

    def _body(self) -> dict[str, Any]:
        res, k = self.result, self.result.bits
        return {"layer": self.layer, "direction": self.direction, "part": self.part, "parts": self.parts,
                "out_start": self.out_start, "piece": self.piece, "pieces": self.pieces, "n_tokens": res.n_tokens,
                "col0": res.col0, "shape": list(res.b.shape), "bits": k,
                "a": None if res.a is None else _packed(res.a, k), "b": _packed(res.b, k)}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> EncryptedReply:
        with_a, k = _reply_bits(m, params)
        n = params.n
        t, col0 = _check_window(m, params)
        rows = _shape("shape", m["shape"], (t,), reply_row_bytes(k, n, t, with_a), max_bytes)
        # a and b stay packed (any bytes are valid values): decrypt unpacks them, block by block
        a = PackedRows(k, n, _blob("a", m["a"], rows * packed_size(k, n))) if with_a else None
        b = _packed_rows("b", k, t, _blob("b", m["b"], rows * packed_size(k, t)))
        return cls(m["rid"], m["layer"], m["direction"], EncryptedResult(params, a, b, t, k, col0),
                   m["part"], m["parts"], m["out_start"], m["piece"], m["pieces"], m["lib"])

    def _rows(self) -> int:
        return self.result.width

    def _row_bytes(self) -> int:
        """As ``EncryptedRequest._row_bytes``: N tokens a row, whatever the window."""
        res = self.result
        return (1 if res.a is None else 2) * packed_size(res.bits, self.params.n)

    def _slice(self, lo: int, hi: int) -> EncryptedReply:
        res = self.result
        sliced = res.rows(None if res.a is None else res.a[lo:hi], res.b[lo:hi])
        return dataclasses.replace(self, result=sliced, out_start=self.out_start + lo)

    def _with_rows(self, chunks: Sequence[EncryptedReply]) -> EncryptedReply:
        # join's _route has checked that every part has (or lacks) its a part and has the same bits
        a = None if self.result.a is None else _join_rows([c.result.a for c in chunks])
        b = _join_rows([c.result.b for c in chunks])
        return dataclasses.replace(self, result=self.result.rows(a, b))


def _packed_rows(where: str, bits: int, n: int, data: bytes) -> PackedRows:
    """Received packed rows, their padding checked (rows of a token window need not end on a byte)."""
    try:
        return PackedRows(bits, n, data)
    except (ValueError, MalformedMessage) as exc:
        _fail(where, str(exc))


def reply_row_bytes(bits: int, n: int, t: int, with_a: bool) -> int:
    """Wire bytes of one reply row: its ``a`` part (N values) when sent, and its ``b`` (T tokens),
    each packed at ``bits`` and padded to whole bytes."""
    return (packed_size(bits, n) if with_a else 0) + packed_size(bits, t)


def _packed(rows: np.ndarray | PackedRows, bits: int) -> bytes | memoryview:
    """The wire bytes of switched rows: as they are if still packed, else packed at ``bits``."""
    return rows.data if isinstance(rows, PackedRows) else PackedRows.pack(rows, bits).data

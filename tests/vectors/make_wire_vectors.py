"""Regenerate the wire-format known-answer vectors (``wire_*.msgpack`` + ``wire_vN.json``).

    .venv/bin/python tests/vectors/make_wire_vectors.py          # write the files
    .venv/bin/python tests/vectors/make_wire_vectors.py --check  # exit 1 if they differ

Everything is deterministic: arrays come from fixed arithmetic formulas, not from a random
generator and not from ``encrypt()``, and ``lib`` is pinned, so a regeneration is byte-identical.
Negative vectors are positive ones edited at the msgpack level (or hand-made bytes); the index
lists the exception each must raise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hecommon import wire
from hecommon.he.bits import PackedRows, pack_bits, unpack_bits
from hecommon.he.encrypt import EncryptedBatch, EncryptedPartial, EncryptedResult
from hecommon.he.params import N2048

HERE = Path(__file__).resolve().parent
INDEX = f"wire_v{wire.WIRE_VERSION}.json"
P = N2048
RID = bytes(range(16))
OWNER = bytes(range(100, 116))
LIB = "0.1.0"  # pinned: vectors must not change when the library version does
TOKENS, COL0 = 5, 3  # every ciphertext message carries a window of 5 tokens, coefficients 3 … 7
_MIX = 2654435761  # Knuth's multiplicative constant: spreads values over the whole range


def residues(rows: int, salt: int, cols: int = P.n) -> np.ndarray:
    """(rows, L, cols) uint32 residues; coefficient 0 is 0 and coefficient 1 is p - 1 (edges)."""
    k = np.arange(rows * P.limbs * cols, dtype=np.uint64).reshape(rows, P.limbs, cols)
    primes = np.asarray(P.primes, dtype=np.uint64)[None, :, None]
    out = (k * np.uint64(_MIX) + np.uint64(salt)) % primes
    out[:, :, 0] = 0
    out[:, :, 1] = primes[:, :, 0] - 1
    return out.astype(np.uint32)


def words(rows: int, salt: int, cols: int = P.n) -> np.ndarray:
    """(rows, cols) uint64 values below 2^out_bits, with 0 and 2^k - 1 at the front."""
    k = np.arange(rows * cols, dtype=np.uint64).reshape(rows, cols)
    out = (k * np.uint64(_MIX) * np.uint64(_MIX) + np.uint64(salt)) % np.uint64(1 << P.out_bits)
    out[:, 0], out[:, 1] = 0, (1 << P.out_bits) - 1
    return out


def request() -> wire.EncryptedRequest:
    batch = EncryptedBatch(P, residues(1, 1, TOKENS), TOKENS, COL0)
    return wire.EncryptedRequest(RID, "3.qkv", "fwd", batch, part=1, parts=3, row_start=288, owner=OWNER, lib=LIB)


def partial() -> wire.PartialResult:
    pa = EncryptedPartial(P, residues(1, 2), residues(1, 3, TOKENS), TOKENS, COL0)
    return wire.PartialResult(RID, "3.qkv", "bwd", 1, 2, 288, 576, pa, part=0, parts=1, out_start=0, lib=LIB)


def reply() -> wire.EncryptedReply:
    res = EncryptedResult(P, words(1, 4), words(1, 5, TOKENS), TOKENS, col0=COL0)
    return wire.EncryptedReply(RID, "3.qkv", "fwd", res, part=2, parts=4, out_start=3, lib=LIB)


def reply_held() -> wire.EncryptedReply:
    """A reply to a client that holds the layer's switched a part: b alone, at out_bits."""
    res = EncryptedResult(P, None, words(2, 6, TOKENS), TOKENS, P.out_bits, COL0)
    return wire.EncryptedReply(RID, "3.qkv", "fwd", res, part=0, parts=1, out_start=0, lib=LIB)


def error() -> wire.ErrorReply:
    return wire.ErrorReply(RID, "parameter_mismatch", "unknown parameter set 'n1024-q27'", "n2048-q54", LIB)


def manifest() -> wire.Manifest:
    qkv = wire.LayerEntry(
        "0.qkv", 0, 4, 6, (("q_proj", 2), ("k_proj", 2), ("v_proj", 2)), bytes(range(16, 32)),
        bytes(range(32, 48)), np.array([0.5, 0.25, 1e-3, 3.0, 0.0, 2.0**-20]),
        np.array([-3, 0, 127, -128 * 4, 5, 1 << 40], dtype=np.int64), np.array([1, -2, 3, -4], dtype=np.int64), 16_384)
    down = wire.LayerEntry(
        "0.down", 0, 3, 2, (("down_proj", 2),), bytes(16), bytes([255] * 16), np.array([1.5, 0.125]),
        np.array([7, -7], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64), 2)  # 2 terms: sub-sums
    meta = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "note": "ünïcödé ok"}
    return wire.Manifest(RID, "smollm2-135m", P, (qkv, down), 8, 8, meta, LIB)


POSITIVE = {"request": request, "partial": partial, "reply": reply, "reply_held": reply_held, "error": error,
            "manifest": manifest}


def _inexact(base: bytes) -> bytes:
    """The down layer with 9 inputs summed 1 term at a time: 9 sub-sums, more than MAX_SUB_SUMS."""
    m = msgpack.unpackb(base, raw=False)
    m["layers"][1]["exact_terms"] = 1
    m["layers"][1]["d_in"] = 9
    m["layers"][1]["col_sums"] = np.arange(9, dtype="<i8").tobytes()
    return msgpack.packb(m, use_bin_type=True)


def _bound(base: bytes) -> bytes:
    m = msgpack.unpackb(base, raw=False)
    m["layers"][0]["exact_terms"] = 20_000  # 8 x 8 bits decode exactly up to 16,384 terms
    return msgpack.packb(m, use_bin_type=True)


def _edit(base: bytes, **changes: Any) -> bytes:
    """Re-pack ``base`` with fields changed (``None`` deletes a field)."""
    m = msgpack.unpackb(base, raw=False)
    for key, value in changes.items():
        if value is None:
            del m[key]
        else:
            m[key] = value
    return msgpack.packb(m, use_bin_type=True)


def _residue_ge_prime(base: bytes) -> bytes:
    m = msgpack.unpackb(base, raw=False)
    bits = P.primes[0].bit_length()
    limb = unpack_bits(m["b"][0], bits, TOKENS)
    limb[3] = P.primes[0]  # fits in the bit width, but is not a residue
    m["b"][0] = pack_bits(limb, bits)
    return msgpack.packb(m, use_bin_type=True)


def _partial_residue_ge_prime(base: bytes) -> bytes:
    m = msgpack.unpackb(base, raw=False)
    raw = np.frombuffer(m["a"], dtype="<u4").copy()
    raw[P.n + 3] = P.primes[1]  # limb 1: fits in 32 bits, but is not a residue
    m["a"] = raw.tobytes()
    return msgpack.packb(m, use_bin_type=True)


def negatives(pos: dict[str, bytes]) -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected exception class, what is wrong)."""
    # header-level faults are made on the small manifest; payload faults on the request
    rq, mf, m = pos["request"], pos["manifest"], msgpack.unpackb(pos["request"], raw=False)
    short_b = [m["b"][0][:-1], m["b"][1]]
    return {
        "truncated": (rq[: len(rq) // 2], "MalformedMessage", "request cut in half"),
        "wrong_version": (_edit(mf, v=wire.WIRE_VERSION + 1), "UnsupportedVersion", "a newer version"),
        "old_version": (_edit(mf, v=1), "UnsupportedVersion", "v = 1 (bit-packed partials)"),
        "missing_version": (_edit(mf, v=None), "UnsupportedVersion", "no v field"),
        "unknown_pset": (_edit(mf, pset="n1024-q27"), "ParameterMismatch", "pset not registered"),
        "ext_type": (_edit(mf, model=msgpack.ExtType(42, b"x")), "MalformedMessage", "ext type as model"),
        "timestamp_ext": (_edit(mf, model=msgpack.Timestamp(0)), "MalformedMessage", "ext -1 as model"),
        "extra_key": (_edit(mf, debug="x"), "MalformedMessage", "unexpected field"),
        "missing_key": (_edit(mf, x_bits=None), "MalformedMessage", "no x_bits"),
        "trailing_bytes": (mf + b"\x00", "MalformedMessage", "one byte after the map"),
        "rid_short": (_edit(mf, rid=bytes(15)), "MalformedMessage", "15-byte rid"),
        "unknown_type": (_edit(mf, type="query"), "MalformedMessage", "no such message type"),
        "float_bits": (_edit(mf, x_bits=8.0), "MalformedMessage", "float x_bits"),
        "bin_claims_4gb": (b"\x81\xa3rid\xc6\xff\xff\xff\xf0" + bytes(4), "MalformedMessage", "bin32 header lies"),
        "not_msgpack": (b"\xc1helora", "MalformedMessage", "0xc1 is never used by msgpack"),
        "top_level_list": (msgpack.packb([1, "request"]), "MalformedMessage", "not a map"),
        "duplicate_key": (b"\x82\xa1v\x01\xa1v\x01", "MalformedMessage", "v twice"),
        "residue_ge_prime": (_residue_ge_prime(rq), "MalformedMessage", "limb 0 holds p_0"),
        "length_mismatch": (_edit(rq, b=short_b), "MalformedMessage", "limb 0 one byte short"),
        "shape_claims_oversized": (_edit(rq, shape=[1 << 20, 2, TOKENS]), "OversizedMessage", "shape claims 14 GB"),
        "shape_wrong_limbs": (_edit(rq, shape=[1, 3, TOKENS]), "MalformedMessage", "3 limbs for a 2-limb set"),
        "shape_not_tokens": (_edit(rq, shape=[1, 2, P.n]), "MalformedMessage", "N columns for a 5-token window"),
        "col0_past_n": (_edit(rq, col0=P.n - TOKENS + 1), "MalformedMessage", "window ends past N"),
        "col0_negative": (_edit(rq, col0=-1), "MalformedMessage", "window before coefficient 0"),
        "col0_missing": (_edit(rq, col0=None), "MalformedMessage", "no col0 (a v5 request)"),
        "reply_b_full_width": (_edit(pos["reply"], shape=[1, P.n]), "MalformedMessage",
                               "a reply's b claims N columns for a 5-token window"),
        "partial_col0_past_n": (_edit(pos["partial"], col0=P.n), "MalformedMessage", "partial window past N"),
        "part_as_string": (_edit(rq, part="1"), "MalformedMessage", "part is a string"),
        "part_as_bool": (_edit(rq, part=True), "MalformedMessage", "part is a bool"),
        "part_out_of_range": (_edit(rq, part=3), "MalformedMessage", "part = parts"),
        "n_tokens_above_n": (_edit(rq, n_tokens=P.n + 1), "MalformedMessage", "n_tokens > N"),
        "bad_direction": (_edit(rq, direction="sideways"), "MalformedMessage", "direction"),
        "reply_short_a": (_edit(pos["reply"], a=b"\x00" * 8), "MalformedMessage", "a too short"),
        "send_a_as_int": (_edit(rq, send_a=1), "MalformedMessage", "send_a is an int"),
        "owner_short": (_edit(rq, owner=bytes(15)), "MalformedMessage", "owner seed of 15 bytes"),
        "owner_missing": (_edit(rq, owner=None), "MalformedMessage", "no owner seed (a v3 request)"),
        "manifest_inexact": (_inexact(mf), "InexactLayer", "a layer's sums need more sub-sums than allowed"),
        "manifest_bound_too_wide": (_bound(mf), "InexactLayer", "exact_terms above the bound of its bits"),
        "reply_bits_hint_with_a": (_edit(pos["reply"], bits=P.hint_out_bits), "MalformedMessage",
                                   "b at hint_out_bits beside an a part"),
        "reply_held_bad_bits": (_edit(pos["reply_held"], bits=P.out_bits - 1), "MalformedMessage",
                                "b at neither out_bits nor hint_out_bits"),
        "partial_residue_ge_prime": (_partial_residue_ge_prime(pos["partial"]), "MalformedMessage",
                                     "raw partial residue = p_1"),
        "partial_short_b": (_edit(pos["partial"], b=msgpack.unpackb(pos["partial"], raw=False)["b"][:-4]),
                            "MalformedMessage", "raw b one residue short"),
        "partial_rows_inverted": (_edit(pos["partial"], row_end=288), "MalformedMessage", "row_end = row_start"),
        "error_bad_reason": (_edit(pos["error"], reason="Bad Reason!"), "MalformedMessage", "reason charset"),
        "manifest_nan_scale": (_nan_scale(mf), "MalformedMessage", "weight_scale holds a NaN"),
        "manifest_widths": (_widths(mf), "MalformedMessage", "member widths do not sum to d_out"),
    }


def _nan_scale(base: bytes) -> bytes:
    m = msgpack.unpackb(base, raw=False)
    m["layers"][1]["weight_scale"] = np.array([1.0, np.nan]).astype("<f8").tobytes()
    return msgpack.packb(m, use_bin_type=True)


def _widths(base: bytes) -> bytes:
    m = msgpack.unpackb(base, raw=False)
    m["layers"][0]["members"][0][1] = 3
    return msgpack.packb(m, use_bin_type=True)


def _array_summary(arr: np.ndarray) -> dict[str, Any]:
    flat = arr.reshape(-1)
    little = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "sha256": hashlib.sha256(little).hexdigest(),
            "head": [v.item() for v in flat[:4]], "sum": float(flat.sum()) if arr.dtype.kind == "f"
            else int(flat.astype(object).sum())}


def describe(msg: Any) -> dict[str, Any]:
    """Field-by-field summary of a message: scalars as they are, arrays summarized. Fields outside a
    dataclass's value (``compare=False``: ``EncryptedBatch.reduced``, how it was made) are left out."""
    out: dict[str, Any] = {"class": type(msg).__name__}
    not_value = {f.name for f in dataclasses.fields(msg) if not f.compare} if dataclasses.is_dataclass(msg) else set()
    for name, value in vars(msg).items():
        if name in not_value:
            continue
        if isinstance(value, bytes):
            out[name] = value.hex()
        elif isinstance(value, np.ndarray):
            out[name] = _array_summary(value)
        elif isinstance(value, PackedRows):  # kept packed after decoding: summarized as its values
            out[name] = _array_summary(value.unpack())
        elif isinstance(value, (EncryptedBatch, EncryptedPartial, EncryptedResult)):
            out[name] = describe(value)
        elif isinstance(value, tuple) and value and isinstance(value[0], wire.LayerEntry):
            out[name] = [describe(e) for e in value]
        elif hasattr(value, "primes"):  # ParamSet: its id is what travels
            out[name] = value.name
        elif isinstance(value, tuple):
            out[name] = [list(v) if isinstance(v, tuple) else v for v in value]
        else:
            out[name] = value
    return out


def build() -> dict[str, bytes]:
    """Every vector file and the index, by file name."""
    pos = {name: wire.encode(make()) for name, make in POSITIVE.items()}
    files: dict[str, bytes] = {}
    index: dict[str, Any] = {"wire_version": wire.WIRE_VERSION, "positive": [], "negative": []}
    for name, data in pos.items():
        fname = f"wire_{name}_v{wire.WIRE_VERSION}.msgpack"
        files[fname] = data
        index["positive"].append({"file": fname, "name": name, "type": POSITIVE[name]().TYPE, "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest(),
                                  "fields": describe(POSITIVE[name]())})
    for name, (data, error, why) in negatives(pos).items():
        fname = f"wire_bad_{name}.msgpack"
        files[fname] = data
        index["negative"].append({"file": fname, "error": error, "why": why,
                                  "sha256": hashlib.sha256(data).hexdigest()})
    files[INDEX] = (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode()
    return files


def main(argv: list[str]) -> int:
    files = build()
    if "--check" in argv:
        stale = [n for n, d in files.items() if not (HERE / n).is_file() or (HERE / n).read_bytes() != d]
        print("stale: " + ", ".join(stale) if stale else f"{len(files)} vector files up to date")
        return 1 if stale else 0
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(files)} files, {sum(map(len, files.values()))} bytes, to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

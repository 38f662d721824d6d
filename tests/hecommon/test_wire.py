"""Wire format: bit packing, round trips, known-answer vectors, chunking, refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import random
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hecommon import errors, wire
from hecommon.he import bits
from hecommon.he.bits import pack_bits, packed_size, unpack_bits
from hecommon.he.encrypt import EncryptedBatch, EncryptedPartial, EncryptedResult, decrypt, encrypt, unpacked
from hecommon.he.evaluate import MatrixProduct
from hecommon.he.keys import SecretKey
from hecommon.he.params import N2048, N4096
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
_spec = importlib.util.spec_from_file_location("make_wire_vectors", VECTORS / "make_wire_vectors.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
INDEX = json.loads((VECTORS / gen.INDEX).read_text())
RID = bytes(range(100, 116))
OWNER = bytes(range(200, 216))


def residues(params, rows: int, seed: int = 0, cols: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cols = params.n if cols is None else cols
    limbs = [rng.integers(0, p, size=(rows, cols), dtype=np.uint32) for p in params.primes]
    return np.stack(limbs, axis=1)  # (rows, L, cols)


def words(params, rows: int, seed: int = 0, cols: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cols = params.n if cols is None else cols
    return rng.integers(0, 1 << params.out_bits, size=(rows, cols), dtype=np.uint64)


def same(a, b) -> bool:
    return gen.describe(a) == gen.describe(b)


# -- bit packing ------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pack_unpack_round_trip(data):
    width = data.draw(st.integers(1, 64), label="bits")
    values = data.draw(st.lists(st.integers(0, (1 << width) - 1), max_size=300), label="values")
    arr = np.array(values, dtype=np.uint64)
    packed = pack_bits(arr, width)
    assert len(packed) == packed_size(width, len(values))
    assert unpack_bits(packed, width, len(values)).tolist() == values
    # the same bits as a plain little-endian bit stream, computed with Python integers
    stream = sum(v << (i * width) for i, v in enumerate(values))
    assert packed == stream.to_bytes(len(packed), "little")


@pytest.mark.parametrize("width", [1, 7, 8, 13, 27, 34, 38, 45, 56, 57, 63, 64])
def test_long_and_short_paths_agree(width, monkeypatch):
    count = 3 * bits._SMALL + 17  # long path, with a partial last group
    top = (1 << width) - 1
    arr = np.random.default_rng(width).integers(0, top, size=count, dtype=np.uint64, endpoint=True)
    arr[:2] = (0, top)
    long_bytes = pack_bits(arr, width)
    assert np.array_equal(unpack_bits(long_bytes, width, count), arr)
    monkeypatch.setattr(bits, "_WINDOW_BITS", (0, 0))  # the 64-value groups, for every width
    assert pack_bits(arr, width) == long_bytes
    assert np.array_equal(unpack_bits(long_bytes, width, count), arr)
    monkeypatch.setattr(bits, "_SMALL", count + 1)  # the bit matrix
    assert pack_bits(arr, width) == long_bytes
    assert np.array_equal(unpack_bits(long_bytes, width, count), arr)


def test_pack_layout_is_little_endian():
    assert pack_bits(np.array([1, 2], dtype=np.uint32), 3) == bytes([0b010001])
    assert pack_bits(np.array([0x1FF], dtype=np.uint64), 9) == b"\xff\x01"
    assert pack_bits(np.zeros(0, dtype=np.uint64), 5) == b""


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="fit in 4 bits"):
        pack_bits(np.array([16], dtype=np.uint64), 4)
    with pytest.raises(TypeError):
        pack_bits(np.array([1], dtype=np.int64), 4)
    for width in (0, 65, True):
        with pytest.raises(ValueError):
            pack_bits(np.array([1], dtype=np.uint64), width)
    with pytest.raises(errors.MalformedMessage, match="bytes, expected"):
        unpack_bits(b"\x00\x00", 3, 2)
    with pytest.raises(errors.MalformedMessage, match="padding"):
        unpack_bits(b"\xff", 3, 2)


# -- round trips ------------------------------------------------------------------------
def _messages(params):
    n, col0 = 7, params.n - 7  # a window of 7 tokens at the ring's end
    yield wire.EncryptedRequest(RID, "0.qkv", "fwd", EncryptedBatch(params, residues(params, 3, 1, n), n, col0), 1, 2,
                                40, owner=OWNER)
    pa = EncryptedPartial(params, residues(params, 2, 2), residues(params, 2, 3, n), n, col0)
    yield wire.PartialResult(RID, "5.down", "bwd", 2, 3, 10, 20, pa, part=1, parts=2, out_start=2)
    yield wire.EncryptedReply(RID, "5.down", "bwd", EncryptedResult(params, words(params, 2, 4), words(params, 2, 5, n),
                                                                    n, col0=col0))
    full = params.n  # and requests of N tokens, as before windows
    yield wire.EncryptedRequest(RID, "0.qkv", "fwd", EncryptedBatch(params, residues(params, 2, 6), full), owner=OWNER)
    yield wire.EncryptedReply(RID, "5.down", "bwd", EncryptedResult(params, words(params, 2, 7), words(params, 2, 8),
                                                                    full))
    yield wire.ErrorReply(RID, "malformed", "b: limb 0 has a residue not below its prime", params.name)
    yield gen.manifest() if params is N2048 else dataclasses.replace(gen.manifest(), params=params)


@pytest.mark.parametrize("params", [N2048, N4096], ids=lambda p: p.name)
def test_round_trip_every_type(params):
    for msg in _messages(params):
        data = wire.encode(msg)
        back = wire.decode(data)
        assert type(back) is type(msg) and same(back, msg)
        assert wire.encode(back) == data
        typed = {"request": wire.decode_request, "partial": wire.decode_partial, "reply": wire.decode_reply,
                 "error": wire.decode_error, "manifest": wire.decode_manifest}[msg.TYPE]
        assert same(typed(data), msg)


@pytest.mark.parametrize("params", [N2048, N4096], ids=lambda p: p.name)
def test_every_type_in_pieces_is_its_encoding(params):
    """``encode_pieces`` is ``encode`` unjoined: its pieces joined are the message's bytes, each
    array a piece of its own; the limbs ``encrypt`` packed are pieces without a copy."""
    for msg in _messages(params):
        pieces = wire.encode_pieces(msg)
        assert bytes(pieces) == wire.encode(msg) and len(pieces) == len(wire.encode(msg))
    secret = SecretKey.generate().request_secret(params, bytes(16))
    m = np.random.default_rng(0).integers(-128, 128, size=(params.n, 3))
    batch = encrypt(secret, m, bytes(16), pack=True)
    request = wire.EncryptedRequest(RID, "0.qkv", "fwd", batch, owner=OWNER)
    pieces = wire.encode_request_pieces(request)
    assert bytes(pieces) == wire.encode_request(request)
    for limb in batch.packed:
        assert any(isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), limb)
                   for p in pieces.parts)
    with pytest.raises(TypeError):
        wire.encode_request_pieces(gen.manifest())  # a request only
    with pytest.raises(errors.OversizedMessage):
        wire.encode_pieces(request, 1000)


def test_request_size_is_bit_packed():
    msg = next(_messages(N2048))  # 3 ciphertexts, 2 limbs of 27 bits
    assert len(wire.encode(msg)) - 3 * 2 * 2048 * 27 // 8 < 300


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(1, 2048), st.integers(0, 2**32))
def test_real_encryption_through_the_wire(d, tokens, seed):
    """encrypt → wire → evaluate → wire → switch → wire → decrypt equals the clear product."""
    rng = np.random.default_rng(seed)
    secret = SecretKey.generate().request_secret(N2048, bytes(16))
    m = rng.integers(-128, 128, size=(tokens, d))
    w = rng.integers(-128, 128, size=(3, d))
    a_seed = bytes(range(16))
    batch = encrypt(secret, m, a_seed)
    req = wire.decode_request(wire.encode(wire.EncryptedRequest(RID, "0.qkv", "fwd", batch, owner=OWNER)))
    assert np.array_equal(req.batch.b, batch.b) and req.batch.n_tokens == tokens
    partial = MatrixProduct(w, N2048, a_seed)(req.batch)
    pr = wire.decode_partial(wire.encode(wire.PartialResult(RID, "0.qkv", "fwd", 0, 1, 0, d, partial)))
    reply = wire.EncryptedReply(RID, "0.qkv", "fwd", pr.partial.switch())
    back = wire.decode_reply(wire.encode(reply))
    assert np.array_equal(decrypt(secret, back.result), m @ w.T)


# -- known-answer vectors -----------------------------------------------------------------
@pytest.mark.parametrize("entry", INDEX["positive"], ids=lambda e: e["file"])
def test_positive_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    assert wire.encode(gen.POSITIVE[entry["name"]]()) == data  # byte for byte
    msg = wire.decode(data)
    assert json.loads(json.dumps(gen.describe(msg), ensure_ascii=False)) == entry["fields"]  # field by field
    assert msg.TYPE == entry["type"] and wire.encode(msg) == data


@pytest.mark.parametrize("entry", INDEX["negative"], ids=lambda e: e["file"])
def test_negative_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    expected = getattr(errors, entry["error"])
    with pytest.raises(expected) as info:
        wire.decode(data)
    assert type(info.value) is expected, str(info.value)
    assert len(str(info.value)) < 200  # names the field; never dumps the payload


def test_vectors_regenerate_identically():
    for name, data in gen.build().items():
        assert (VECTORS / name).read_bytes() == data, f"{name} is stale: run make_wire_vectors.py"


def test_every_prefix_of_a_message_is_refused():
    data = wire.encode(gen.manifest())
    for cut in range(len(data)):
        with pytest.raises(errors.MalformedMessage):
            wire.decode(data[:cut])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 10_000), st.integers(1, 255))
def test_garbage_raises_only_helora_errors(junk, pos, flip):
    with pytest.raises(errors.HeloraError):
        wire.decode(junk)
    data = bytearray(wire.encode(gen.error()))
    data[pos % len(data)] ^= flip
    try:
        wire.decode(bytes(data))
    except errors.HeloraError:
        pass


# -- refusals -------------------------------------------------------------------------------
def test_secret_material_has_no_encoder():
    key = SecretKey.generate()
    for obj in (key, key.request_secret(N2048, bytes(16)), {"v": 1}, b"raw", gen.request().batch):
        with pytest.raises(TypeError, match="no wire encoder"):
            wire.encode(obj)
    with pytest.raises(TypeError):
        wire.encode_request(gen.error())


def test_oversized_is_refused_before_parsing():
    with pytest.raises(errors.OversizedMessage):
        wire.decode(b"\xc1" * (wire.MAX_MESSAGE_BYTES + 1))
    data = wire.encode(gen.request())
    with pytest.raises(errors.OversizedMessage):
        wire.decode(data, max_bytes=len(data) - 1)
    with pytest.raises(errors.OversizedMessage, match="split it"):
        wire.encode(gen.request(), max_bytes=100)


def test_wrong_type_for_the_decoder():
    with pytest.raises(errors.MalformedMessage, match="'request' expected"):
        wire.decode_request(wire.encode(gen.error()))
    with pytest.raises(errors.MalformedMessage):
        wire.decode(bytearray(b"\x80"))  # an empty map
    with pytest.raises(errors.MalformedMessage):
        wire.decode("not bytes")


def _raw(msg, **changes) -> bytes:
    m = msgpack.unpackb(wire.encode(msg), raw=False)
    m.update(changes)
    return msgpack.packb(m, use_bin_type=True)


@pytest.mark.parametrize(("changes", "field"), [
    ({"layer": ""}, "layer"), ({"layer": "x" * 129}, "layer"), ({"lib": 1}, "lib"),
    ({"parts": 0}, "parts"), ({"row_start": -1}, "row_start"), ({"b": b"xx"}, "b"),
    ({"b": [b"", b""]}, r"b\[0\]"), ({"shape": [0, 2, 2048]}, r"shape\[0\]"), ({"shape": "1"}, "shape"),
    ({"n_tokens": 0}, "n_tokens"), ({"pset": 5}, "pset"), ({"rid": "x" * 16}, "rid"), ({"v": True}, "v"),
])
def test_request_field_errors_name_the_field(changes, field):
    with pytest.raises(errors.MalformedMessage, match=f"^{field}"):
        wire.decode(_raw(gen.request(), **changes))


def test_reply_and_partial_shapes_checked():
    m = msgpack.unpackb(wire.encode(gen.reply()), raw=False)
    m["shape"] = [2, gen.TOKENS]  # claims two rows, carries one
    with pytest.raises(errors.MalformedMessage, match="^a: "):
        wire.decode(msgpack.packb(m, use_bin_type=True))
    m = msgpack.unpackb(wire.encode(gen.partial()), raw=False)
    m["a"] = [m["a"][: len(m["a"]) // 2], m["a"][len(m["a"]) // 2 :]]  # version 1's per-limb list
    with pytest.raises(errors.MalformedMessage, match="^a: bytes are required"):
        wire.decode(msgpack.packb(m, use_bin_type=True))
    m["a"] = m["b"] + m["b"]  # two rows of the window's residues where a needs one row of N
    with pytest.raises(errors.MalformedMessage, match="^a: 80 bytes, expected 16384"):
        wire.decode(msgpack.packb(m, use_bin_type=True))


def test_partials_carry_raw_little_endian_residues():
    """Since wire version 2: a partial's a and b are the (rows, L, N) uint32 residues, little-endian."""
    msg = gen.partial()
    m = msgpack.unpackb(wire.encode(msg), raw=False)
    assert m["v"] == wire.WIRE_VERSION >= 2
    assert m["a"] == msg.partial.a.astype("<u4").tobytes() and m["b"] == msg.partial.b.astype("<u4").tobytes()
    back = wire.decode_partial(wire.encode(msg))
    assert np.array_equal(back.partial.a, msg.partial.a) and back.partial.b.dtype == np.uint32


@pytest.mark.parametrize("mode", ["numba", "numpy"])
def test_only_batches_encrypt_wrote_skip_the_residue_scan(mode, monkeypatch):
    """``encrypt`` marks its batch ``reduced`` (its loop reduced every residue mod p), so the
    request built on it checks the shape and does not scan the residues again; a batch built any
    other way, a slice of rows, one from ``dataclasses.replace`` and the request as decoded from
    the wire are scanned, and a residue at its prime is refused there."""
    from hecommon.wire import messages

    monkeypatch.setenv("HELORA_KERNELS", mode)
    scans: list[bool] = []  # the ranges argument of every residue check of a request's b
    check = messages._check_residues

    def recorded(where, arr, *args, ranges=True, **kwargs):
        scans.append(ranges)
        return check(where, arr, *args, ranges=ranges, **kwargs)

    monkeypatch.setattr(messages, "_check_residues", recorded)
    secret = SecretKey.generate().request_secret(N2048, os.urandom(16))
    batch = encrypt(secret, np.arange(12, dtype=np.int64).reshape(4, 3), os.urandom(16))
    assert batch.reduced and (batch.b < np.asarray(N2048.primes, dtype=np.uint32)[None, :, None]).all()
    req = wire.EncryptedRequest(RID, "l", "fwd", batch, owner=OWNER)
    assert scans == [False]  # the shape only
    assert wire.decode_request(wire.encode(req)).batch.reduced is False and scans[-1] is True
    (field,) = [f for f in dataclasses.fields(EncryptedBatch) if f.name == "reduced"]
    assert not field.init and not field.compare  # not an argument, not part of the value
    bad = batch.b.copy()
    bad[1, 0, 2] = N2048.primes[0]
    for other in (batch.rows(batch.b[:2]), EncryptedBatch(N2048, bad, 4), dataclasses.replace(batch, b=bad)):
        assert not other.reduced
    forged = EncryptedBatch(N2048, bad, 4)
    object.__setattr__(forged, "reduced", True)  # not through the API: the receiving side still scans
    with pytest.raises(errors.MalformedMessage, match="limb 0"):
        wire.decode_request(wire.encode(wire.EncryptedRequest(RID, "l", "fwd", forged, owner=OWNER)))
    for unmarked in (EncryptedBatch(N2048, bad, 4), dataclasses.replace(batch, b=bad)):
        with pytest.raises(errors.MalformedMessage, match="limb 0"):
            wire.EncryptedRequest(RID, "l", "fwd", unmarked, owner=OWNER)


@pytest.mark.parametrize("mode", ["numba", "numpy"])
def test_encrypts_packed_limbs_are_the_requests_bytes(mode, monkeypatch):
    """Asked to (``pack``, a batch for the wire), the compiled path packs ``b``'s limbs as it
    encrypts them, for windows whose rows fill whole 64-bit words (T a multiple of 64 at 27 bits),
    and not otherwise: a request on that batch encodes to the bytes of the same request packed
    anew, and decodes to ``b``; other windows, the numpy path, slices and replaced batches carry
    no packing. ``encrypt``'s ``b`` is read-only, so what
    travels is what it wrote."""
    monkeypatch.setenv("HELORA_KERNELS", mode)
    secret = SecretKey.generate().request_secret(N2048, os.urandom(16))
    gen_ = np.random.default_rng(3)
    for t, d, col0 in ((128, 70, 0), (2048, 3, 0), (64, 33, 1000), (100, 5, 0), (1, 2, 7)):
        m = gen_.integers(-100, 100, size=(t, d))
        assert encrypt(secret, m, os.urandom(16), col0=col0).packed is None  # not asked for: in process
        batch = encrypt(secret, m, os.urandom(16), col0=col0, pack=True)
        assert (batch.packed is not None) == (mode == "numba" and t % 64 == 0)
        with pytest.raises(ValueError, match="read-only"):
            batch.b[0, 0, 0] = 1
        fresh = batch.rows(batch.b)  # the same residues, packed anew by the wire
        assert fresh.packed is None and dataclasses.replace(batch).packed is None
        sent = wire.encode(wire.EncryptedRequest(RID, "l", "fwd", batch, owner=OWNER))
        assert sent == wire.encode(wire.EncryptedRequest(RID, "l", "fwd", fresh, owner=OWNER))
        np.testing.assert_array_equal(wire.decode_request(sent).batch.b, batch.b)
    (field,) = [f for f in dataclasses.fields(EncryptedBatch) if f.name == "packed"]
    assert not field.init and not field.compare  # not an argument, not part of the value


def test_construction_validates():
    bad = residues(N2048, 1)
    bad[0, 1, 5] = N2048.primes[1]
    with pytest.raises(errors.MalformedMessage, match="limb 1"):
        wire.EncryptedRequest(RID, "l", "fwd", EncryptedBatch(N2048, bad, N2048.n), owner=OWNER)
    big = words(N2048, 1)
    big[0, 3] = 1 << N2048.out_bits
    with pytest.raises(errors.MalformedMessage, match="does not fit in 38 bits"):
        wire.EncryptedReply(RID, "l", "fwd", EncryptedResult(N2048, big, words(N2048, 1, cols=1), 1))
    with pytest.raises(errors.MalformedMessage, match="unique"):
        m = gen.manifest()
        dataclasses.replace(m, layers=(m.layers[0], m.layers[0]))
    with pytest.raises(errors.MalformedMessage, match="message"):
        wire.ErrorReply(RID, "malformed", "x" * (wire.MAX_ERROR_CHARS + 1))


def test_error_reply_from_exception_does_not_leak():
    e = wire.ErrorReply.from_exception(RID, errors.ParameterMismatch("unknown parameter set 'x'"), "n2048-q54")
    assert (e.reason, e.message) == ("parameter_mismatch", "unknown parameter set 'x'")
    e = wire.ErrorReply.from_exception(RID, KeyError("plaintext 1234"))
    assert (e.reason, e.message) == ("internal", "KeyError")
    assert wire.decode(wire.encode(dataclasses.replace(e, pset="no-such-set"))) == dataclasses.replace(e, pset="no-such-set")


# -- chunking --------------------------------------------------------------------------------
LIMIT = 100_000  # 13,824 bytes per request row: 6 rows per part


def _chunked_messages():
    n = N2048.n
    yield wire.EncryptedRequest(RID, "0.down", "fwd", EncryptedBatch(N2048, residues(N2048, 29, 7), n), row_start=100,
                                owner=OWNER)
    pa = EncryptedPartial(N2048, residues(N2048, 13, 8), residues(N2048, 13, 9, 9), 9, 4)
    yield wire.PartialResult(RID, "0.down", "fwd", 1, 2, 64, 128, pa)
    yield wire.EncryptedReply(RID, "0.down", "fwd", EncryptedResult(N2048, words(N2048, 17, 1), words(N2048, 17, 2), n))


@pytest.mark.parametrize("msg", list(_chunked_messages()), ids=lambda m: m.TYPE)
def test_split_join_round_trip(msg):
    parts = wire.split(msg, LIMIT)
    assert len(parts) > 2 and [p.part for p in parts] == list(range(len(parts)))
    encoded = [wire.encode(p, LIMIT) for p in parts]
    assert all(len(e) <= LIMIT for e in encoded)
    received = [wire.decode(e, LIMIT) for e in encoded]
    random.Random(0).shuffle(received)
    assert same(wire.join(received), msg)


def test_split_whole_message_under_the_real_limit():
    msg = wire.EncryptedRequest(RID, "0.down", "fwd", EncryptedBatch(N2048, residues(N2048, 1536), N2048.n), owner=OWNER)
    with pytest.raises(errors.OversizedMessage):
        wire.encode(msg)
    parts = wire.split(msg)
    assert len(parts) == 2 and all(len(wire.encode(p)) <= wire.MAX_MESSAGE_BYTES for p in parts)
    assert same(wire.join(parts), msg)
    assert len(wire.split(gen.request().__class__(RID, "l", "fwd", gen.request().batch, owner=OWNER))) == 1


def test_join_refuses_incomplete_or_inconsistent_sets():
    parts = wire.split(next(_chunked_messages()), LIMIT)
    with pytest.raises(errors.MalformedMessage, match="missing parts"):
        wire.join(parts[:-1])
    with pytest.raises(errors.MalformedMessage, match="duplicate"):
        wire.join(parts + parts[:1])
    with pytest.raises(errors.MalformedMessage, match="different"):
        wire.join(parts[:-1] + [dataclasses.replace(parts[-1], rid=bytes(16))])
    with pytest.raises(errors.MalformedMessage, match="contiguous"):
        wire.join(parts[:-1] + [dataclasses.replace(parts[-1], row_start=parts[-1].row_start + 1)])
    with pytest.raises(errors.MalformedMessage, match="no parts"):
        wire.join([])
    with pytest.raises(ValueError, match="already a part"):
        wire.split(parts[0], LIMIT)
    with pytest.raises(errors.OversizedMessage, match="one ciphertext row"):
        wire.split(next(_chunked_messages()), 10_000)
    with pytest.raises(TypeError):
        wire.split(gen.error())


def test_reply_without_a_round_trips_at_hint_bits():
    """When the client holds the layer's hint, replies carry b alone, at hint_out_bits."""
    k = N2048.hint_out_bits
    b = words(N2048, 3, 7) & np.uint64((1 << k) - 1)
    msg = wire.EncryptedReply(RID, "1.qkv", "fwd", EncryptedResult(N2048, None, b, N2048.n))
    data = wire.encode_reply(msg)
    back = wire.decode_reply(data)
    assert back.result.a is None and np.array_equal(unpacked(back.result.b), b) and back.result.bits == k
    assert isinstance(back.result.b, bits.PackedRows) and wire.encode_reply(back) == data  # kept as it came
    wrong = bits.PackedRows(k, N2048.n, bits.pack_bits(b[:2], k))  # two rows packed, three declared by a
    with pytest.raises(ValueError, match="a: 2 rows"):  # a's rows against b's, where the result is made
        EncryptedResult(N2048, bits.PackedRows.pack(b, k), wrong, N2048.n)
    assert wire.payload_bytes(msg) == packed_size(k, 3 * N2048.n) < len(data)
    parts = wire.split(msg, max_bytes=30_000)
    assert len(parts) > 1 and np.array_equal(unpacked(wire.join(parts).result.b), b)
    with pytest.raises(errors.MalformedMessage, match="does not fit"):
        wire.EncryptedReply(RID, "1.qkv", "fwd", EncryptedResult(N2048, None, b | np.uint64(1 << k), N2048.n))


def test_peek_part_reads_the_piece_and_part_without_the_arrays():
    res = EncryptedResult(N2048, np.vstack([gen.words(1, 4)] * 3), np.vstack([gen.words(1, 5, 5)] * 3), 5)
    reply = wire.EncryptedReply(RID, "3.qkv", "fwd", res)
    chunks = wire.split(reply, reply._row_bytes() + wire.HEADER_ALLOWANCE)  # one row per chunk
    assert len(chunks) > 1
    assert [wire.peek_part(wire.encode(c)) for c in chunks] == [(0, i) for i in range(len(chunks))]
    piece = dataclasses.replace(chunks[1], piece=2, pieces=3)
    assert wire.peek_part(wire.encode(piece)) == (2, 1) == wire.PartTracker.key(piece)
    assert wire.peek_part(wire.encode(gen.error())) is None
    m = msgpack.unpackb(wire.encode(chunks[0]), raw=False)
    m["parts"] = "2"
    with pytest.raises(errors.MalformedMessage, match="^parts"):
        wire.peek_part(msgpack.packb(m, use_bin_type=True))
    with pytest.raises(errors.UnsupportedVersion):
        wire.peek_part(msgpack.packb({**m, "v": 1}, use_bin_type=True))


def test_packed_rows_slice_and_join_as_bytes():
    from hecommon.he.bits import PackedRows

    values = np.random.default_rng(3).integers(0, 1 << 38, size=(5, 2048), dtype=np.uint64)
    packed = PackedRows.pack(values, 38)
    assert packed.shape == (5, 2048) and packed.row_bytes == 2048 * 38 // 8
    assert np.array_equal(packed[1:4].unpack(), values[1:4])
    assert PackedRows.concat([packed[:2], packed[2:]]) == packed
    assert packed[4:9].rows == 1 and packed[3:1].rows == 0
    # rows of a token window need not end on a byte: each is padded with zero bits
    window = PackedRows.pack(values[:, :3], 38)
    assert window.row_bytes == 15 and window.rows == 5 and np.array_equal(window.unpack(), values[:, :3])
    assert np.array_equal(window[2:4].unpack(), values[2:4, :3])
    assert window.data[:15] == pack_bits(values[0, :3], 38)  # a row is pack_bits of its values
    bad = bytearray(window.data)
    bad[14] |= 0x80  # a padding bit of row 0
    with pytest.raises(errors.MalformedMessage, match="padding"):
        PackedRows(38, 3, bytes(bad))
    with pytest.raises(ValueError, match="whole number"):
        PackedRows(38, 2048, packed.data[:-1])
    with pytest.raises(TypeError):
        packed[::2]  # noqa: B018
    with pytest.raises(ValueError, match="one width"):
        PackedRows.concat([packed, PackedRows.pack(values[:, :1024], 38)])


def test_partial_with_a_switched_part_round_trips_and_is_checked():
    from hecommon.he.bits import PackedRows

    rows, params = 3, N2048
    a = PackedRows.pack(words(params, rows, 7), params.out_bits)
    b = gen.residues(rows, 8, 7)
    msg = wire.PartialResult(RID, "2.o", "bwd", 1, 2, 0, 4, EncryptedPartial(params, a, b, 7), out_start=5)
    data = wire.encode(msg)
    m = msgpack.unpackb(data, raw=False)
    assert m["a_bits"] == params.out_bits and m["a"] == a.data  # the packed bytes as they are
    back = wire.decode_partial(data)
    assert back.partial.a == a and np.array_equal(back.partial.b, b)
    # cut into one-row messages and joined: the same packed rows
    limit = msg._row_bytes() + wire.HEADER_ALLOWANCE
    parts = [wire.decode_partial(wire.encode(c, limit), limit) for c in wire.split(msg, limit)]
    assert len(parts) == rows and wire.join(parts).partial.a == a
    for bad, field in (({"a_bits": 34}, "a_bits"), ({"a_bits": -1}, "a_bits"), ({"a": a.data[:-1]}, "a")):
        with pytest.raises(errors.MalformedMessage, match=f"^{field}"):
            wire.decode(msgpack.packb({**m, **bad}, use_bin_type=True))
    mixed = [parts[0], dataclasses.replace(parts[1], partial=EncryptedPartial(params, gen.residues(1, 9), b[1:2], 7))]
    with pytest.raises(errors.MalformedMessage, match="join"):
        wire.join([mixed[0], mixed[1], parts[2]])


def test_request_head_matches_the_full_decode_without_unpacking():
    """A request's head: every field but the residues' ranges, as ``decode``."""
    req = gen.request()
    data = wire.encode(req)
    head = wire.decode_request_head(data)
    assert (head.rid, head.layer, head.direction, head.params, head.n_tokens, head.width, head.part, head.parts,
            head.row_start, head.lib) == (req.rid, req.layer, req.direction, req.params, req.batch.n_tokens,
                                          req.width, req.part, req.parts, req.row_start, req.lib)
    # the parts of a split request: each head says where its rows are
    whole = wire.EncryptedRequest(RID, "0.qkv", "fwd", EncryptedBatch(N2048, gen.residues(5, 1), N2048.n),
                                  owner=OWNER)
    limit = 2 * whole._row_bytes() + wire.HEADER_ALLOWANCE
    heads = [wire.decode_request_head(wire.encode(c, limit), limit) for c in wire.split(whole, limit)]
    assert len(heads) == 3
    assert [(h.part, h.parts, h.row_start, h.width) for h in heads] == [(0, 3, 0, 2), (1, 3, 2, 2), (2, 3, 4, 1)]


@pytest.mark.parametrize("entry", INDEX["negative"], ids=lambda e: e["file"])
def test_request_head_refuses_what_decode_refuses(entry):
    """Every bad vector is refused by the head decoder too, with the same error class, except a
    residue not below its prime, which only unpacking finds (the evaluator's full decode)."""
    data = (VECTORS / entry["file"]).read_bytes()
    expected = getattr(errors, entry["error"])
    if entry["file"] == "wire_bad_residue_ge_prime.msgpack":
        assert wire.decode_request_head(data).width == 1
        return
    try:
        is_request = msgpack.unpackb(data, raw=False).get("type") == "request"
    except Exception:  # noqa: BLE001 - not even msgpack
        is_request = False
    with pytest.raises(expected if is_request else (expected, errors.MalformedMessage)) as info:
        wire.decode_request_head(data)
    assert len(str(info.value)) < 200


def test_reply_head_matches_the_full_decode_without_unpacking():
    """A reply part's head: every field, no arrays unpacked."""
    for reply in (gen.reply(), wire.EncryptedReply(RID, "3.down", "bwd",
                                                   EncryptedResult(N2048, None, words(N2048, 2) >> 4, N2048.n),
                                                   part=1, parts=3, out_start=7)):
        data = wire.encode(reply)
        head = wire.decode_reply_head(data)
        res = reply.result
        assert (head.rid, head.layer, head.direction, head.params, head.n_tokens, head.width, head.with_a,
                head.part, head.parts, head.out_start, head.lib) == (
            reply.rid, reply.layer, reply.direction, reply.params, res.n_tokens, res.width, res.a is not None,
            reply.part, reply.parts, reply.out_start, reply.lib)
    with pytest.raises(errors.MalformedMessage, match="type"):
        wire.decode_reply_head(wire.encode(gen.request()))


@pytest.mark.parametrize("entry", INDEX["negative"], ids=lambda e: e["file"])
def test_reply_head_refuses_what_decode_refuses(entry):
    """Every bad vector is refused by the reply head decoder (a reply's packed values have no range
    to check: any bits are a value), with decode's error class."""
    data = (VECTORS / entry["file"]).read_bytes()
    expected = getattr(errors, entry["error"])
    try:
        kind = msgpack.unpackb(data, raw=False).get("type")
    except Exception:  # noqa: BLE001 - not even msgpack
        kind = None
    with pytest.raises(expected if kind == "reply" else (expected, errors.MalformedMessage)) as info:
        wire.decode_reply_head(data)
    assert len(str(info.value)) < 200


def test_reply_head_refuses_bad_sizes_and_fields():
    reply = wire.EncryptedReply(RID, "0.o", "fwd", EncryptedResult(N2048, None, words(N2048, 1) >> 4, N2048.n))
    m = msgpack.unpackb(wire.encode(reply), raw=False)
    size = packed_size(N2048.hint_out_bits, N2048.n)
    for bad, field in (({"b": m["b"][:-1]}, "b"), ({"a": bytes(size)}, "bits"), ({"bits": 40}, "bits"),
                       ({"bits": True}, "bits"), ({"shape": [2, N2048.n]}, "b"), ({"part": 1}, "part"),
                       ({"direction": "up"}, "direction")):
        with pytest.raises(errors.MalformedMessage, match=f"^{field}: "):
            wire.decode_reply_head(msgpack.packb({**m, **bad}, use_bin_type=True))


def test_send_a_travels_with_a_request_and_its_parts_must_agree():
    """A client that holds a layer's switched a asks for b alone; every part of one request says so."""
    req = dataclasses.replace(gen.request(), part=0, parts=1, row_start=0, send_a=False)
    data = wire.encode(req)
    assert wire.decode_request(data).send_a is False and wire.decode_request_head(data).send_a is False
    two = dataclasses.replace(req, batch=EncryptedBatch(N2048, residues(N2048, 2, 5), N2048.n))
    parts = wire.split(two, two._row_bytes() + wire.HEADER_ALLOWANCE)
    assert len(parts) == 2 and all(p.send_a is False for p in parts)
    assert wire.join(parts).send_a is False
    mixed = [parts[0], dataclasses.replace(parts[1], send_a=True)]
    with pytest.raises(errors.MalformedMessage, match="join"):
        wire.join(mixed)
    heads = [wire.decode_request_head(wire.encode(p)) for p in mixed]
    assert heads[0].route != heads[1].route  # the heads say so too
    with pytest.raises(errors.MalformedMessage, match="send_a"):
        dataclasses.replace(req, send_a=None)


def test_the_parts_of_one_request_must_name_one_owner():
    """The owner seed fixes the a a request was encrypted against: parts of two owners never join,
    by the whole-message path (``join``, ``PartTracker``), and their heads' routes differ."""
    req = dataclasses.replace(gen.request(), part=0, parts=1, row_start=0)
    two = dataclasses.replace(req, batch=EncryptedBatch(N2048, residues(N2048, 2, 5), N2048.n))
    parts = wire.split(two, two._row_bytes() + wire.HEADER_ALLOWANCE)
    assert len(parts) == 2 and wire.join(parts).owner == req.owner
    mixed = [parts[0], dataclasses.replace(parts[1], owner=bytes(16))]
    with pytest.raises(errors.MalformedMessage, match="join"):
        wire.join(mixed)
    tracker = wire.PartTracker()
    tracker.add(mixed[0])
    with pytest.raises(errors.MalformedMessage, match="join"):
        tracker.add(mixed[1])
    assert len({wire.decode_request_head(wire.encode(p)).route for p in mixed}) == 2


def test_reply_parts_with_and_without_a_do_not_join():
    """join's route check refuses a reply whose parts disagree on carrying a (or on b's bits)."""
    full = dataclasses.replace(gen.reply(), part=0, parts=2, out_start=0)
    held = gen.reply_held().result
    rest = dataclasses.replace(full, part=1, out_start=full.result.width,
                               result=EncryptedResult(held.params, None, held.b, full.result.n_tokens, held.b_bits))
    with pytest.raises(errors.MalformedMessage, match="join"):
        wire.join([full, rest])


def test_pack_gives_msgpacks_bytes_with_arrays_joined_in():
    """``codec.pack`` writes the large byte fields' headers itself: its bytes are ``msgpack.packb``'s
    for every bin size class (8, 16, 32 bits of length, either side of the joining threshold),
    alone or in a list (an array's limbs), maps of up to 16 keys and more, and nested values;
    the size limit counts the whole."""
    from hecommon.wire import codec

    for size in (0, 1, 255, 256, 4095, 4096, 65535, 65536, (1 << 20) + 3):
        m = {"v": 5, "big": os.urandom(size), "nested": [{"x": b"ab", "y": None}], "t": "text", "f": True,
             "limbs": [os.urandom(size), b"", os.urandom(size // 3), 7]}
        m.update({f"k{i}": i for i in range(size % 17)})
        data = codec.pack(m, 1 << 22, "test")
        assert data == msgpack.packb(m, use_bin_type=True, strict_types=True)
        with pytest.raises(errors.OversizedMessage, match="exceed the limit"):
            codec.pack(m, len(data) - 1, "test")


def test_token_windows_count_their_bytes_and_never_mix():
    """A reply's b rows are padded to whole bytes each: ``payload_bytes`` counts what ``encode``
    writes (the embedded mode's byte counter); parts and pieces of one message share one window:
    ``join``, ``PartTracker``, sums and joins of partials refuse two."""
    k = N2048.out_bits
    b = words(N2048, 8, 9, cols=1)  # one token: 38 bits a row, 5 bytes (8 rows as one stream: 38)
    reply = wire.EncryptedReply(RID, "1.qkv", "fwd", EncryptedResult(N2048, None, b, 1, k, 77))
    data = wire.encode_reply(reply)
    assert wire.payload_bytes(reply) == 8 * 5 == len(msgpack.unpackb(data, raw=False)["b"])
    req = wire.EncryptedRequest(RID, "0.qkv", "fwd", EncryptedBatch(N2048, residues(N2048, 4, 1, 3), 3, 10),
                                owner=OWNER)
    parts = wire.split(req, req._row_bytes() + wire.HEADER_ALLOWANCE)
    assert len(parts) == 4 and same(wire.join(parts), req)
    moved = dataclasses.replace(parts[1], batch=EncryptedBatch(N2048, parts[1].batch.b, 3, 11))  # another window
    with pytest.raises(errors.MalformedMessage, match="join"):
        wire.join([parts[0], moved, *parts[2:]])
    tracker = wire.PartTracker()
    tracker.add(parts[0])
    with pytest.raises(errors.MalformedMessage, match="join"):
        tracker.add(moved)
    one = EncryptedPartial(N2048, residues(N2048, 2, 3), residues(N2048, 2, 4, 3), 3, 10)
    other = EncryptedPartial(N2048, residues(N2048, 2, 3), residues(N2048, 2, 4, 3), 3, 11)
    with pytest.raises(errors.ParameterMismatch, match="window"):
        one + other  # noqa: B018
    with pytest.raises(errors.ParameterMismatch, match="window"):
        EncryptedPartial.join([one, other])

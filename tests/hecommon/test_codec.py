"""``codec.unpack`` with views: large bins read as views of the message, the same values and the
same refusals as msgpack's own ``unpackb``."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hecommon import errors, wire
from hecommon.he.bits import PackedRows
from hecommon.he.encrypt import decrypt, encrypt
from hecommon.he.evaluate import MatrixProduct
from hecommon.he.keys import SecretKey
from hecommon.he.params import N2048
from hecommon.wire import codec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIMITS = dict(version=1, protocol="wire", max_array_len=64, max_map_len=64)
BIG = codec._LARGE_BIN
RID = bytes(range(100, 116))
OWNER = bytes(range(200, 216))


def _unpack(data, views: bool, max_bytes: int = 1 << 24):
    """``codec.unpack``'s map, or the error it raised as (type, text)."""
    try:
        return codec.unpack(data, max_bytes, views=views, **LIMITS)
    except errors.HeloraError as exc:
        return type(exc), str(exc)


def _plain(value):
    """``value`` with every view as bytes."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _views(value) -> list[memoryview]:
    if isinstance(value, memoryview):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [v for item in items for v in _views(item)]


_SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False, width=32)  # single or double on the wire
            | st.text(max_size=300) | st.binary(max_size=300)
            | st.integers(0, 70_000).map(lambda k: bytes(range(256)) * (k // 256) + bytes(k % 256)))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=6)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=6), max_leaves=24)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), _VALUES, max_size=8), st.booleans())
def test_views_read_what_msgpack_reads(body, single_float):
    data = msgpack.packb({"v": 1, **body}, use_bin_type=True, use_single_float=single_float)
    got, want = _unpack(data, True), _unpack(data, False)
    assert _plain(got) == want
    for view in _views(got):  # every view is of the message, read-only, and only of a large bin
        assert view.readonly and view.obj is data and len(view) >= BIG
    assert all(not isinstance(v, memoryview) for v in _views(want))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_views_refuse_what_msgpack_refuses(data):
    """Damaged messages (a byte changed, bytes cut or added) give the same value or the same error
    either way: whatever the fast reader does not know is left to msgpack."""
    body = {"v": 1, "layer": "q", "shape": [3, 2, 2048], "send_a": True, "x": 1.5, "n": -7, "big": 1 << 40,
            "b": [bytes(range(256)) * 20, b"\x01" * 5000], "meta": {"k": "v"}, "none": None}
    raw = bytearray(msgpack.packb(body, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        kind = data.draw(st.sampled_from(["set", "cut", "add"]), label="kind")
        if kind == "set":
            raw[at] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        if not raw:
            raw = bytearray(b"\xc0")
    message = bytes(raw)
    got, want = _unpack(message, True), _unpack(message, False)
    assert _plain(got) == want


@pytest.mark.parametrize("message", [
    msgpack.packb({"v": 1, "a": b"x" * BIG}, use_bin_type=True) + b"\x00",  # trailing bytes
    msgpack.packb({"v": 1, "a": b"x" * BIG}, use_bin_type=True)[:-1],  # cut short
    msgpack.packb({"v": 1, "a": b"x" * BIG, "e": msgpack.ExtType(1, b"12")}, use_bin_type=True),  # ext
    msgpack.packb({"v": 1, "a": b"x" * BIG, 3: 4}, use_bin_type=True, strict_types=False),  # an int key
    msgpack.packb({"v": 1, "a": b"x" * BIG}, use_bin_type=True) + b"",  # well formed: views
    b"\x83\xa1v\x01\xa1a\xc6" + BIG.to_bytes(4, "big") + b"x" * BIG + b"\xa1v\x01",  # a repeated key
    b"\x82\xa1v\x01\xa1s\xa2\xff\xfe" + b"",  # invalid UTF-8 (small: msgpack alone)
    b"\x82\xa1v\x01\xa1s\xda\x00\x02\xff\xfe" + msgpack.packb(b"x" * BIG)[:0] + b"",
    msgpack.packb({"v": 1, "a": b"x" * BIG, "l": list(range(65))}, use_bin_type=True),  # past max_array_len
    msgpack.packb({"v": 1, "a": b"x" * BIG, "d": [[[[[[[[[[1]]]]]]]]]]}, use_bin_type=True),  # deep
    msgpack.packb({"v": 2, "a": b"x" * BIG}, use_bin_type=True),  # another version
    msgpack.packb([1, b"x" * BIG], use_bin_type=True),  # not a map
    b"\xc1" + b"\x00" * BIG,  # never used
])
def test_unusual_messages_are_left_to_msgpack(message):
    assert _plain(_unpack(message, True)) == _unpack(message, False)


def test_views_only_of_immutable_bytes():
    data = msgpack.packb({"v": 1, "a": b"x" * BIG, "s": b"y" * (BIG - 1)}, use_bin_type=True)
    m = codec.unpack(data, 1 << 20, views=True, **LIMITS)
    assert isinstance(m["a"], memoryview) and m["a"].obj is data and isinstance(m["s"], bytes)
    for other in (bytearray(data), memoryview(data)):  # a mutable buffer could change under a view: copied
        assert isinstance(codec.unpack(other, 1 << 20, views=True, **LIMITS)["a"], bytes)
    assert isinstance(codec.unpack(data, 1 << 20, **LIMITS)["a"], bytes)  # the federated wire: no views


def test_blob_checks_take_read_only_byte_views_only():
    data = b"z" * 64
    assert codec.check_blob("f", memoryview(data), 64) is not None
    for bad in (memoryview(bytearray(data)), memoryview(bytearray(data)).toreadonly(),  # not of immutable bytes
                memoryview(np.zeros(8)).cast("B"), memoryview(data)[::2], memoryview(np.zeros(16, np.uint32))):
        with pytest.raises(errors.MalformedMessage, match="bytes are required"):
            codec.check_blob("f", bad, len(bad) if bad.format == "B" else bad.nbytes)
    assert codec.check_blob_range("f", memoryview(data), 1, 64) is not None


def test_a_reply_read_through_views_decrypts_as_one_read_through_copies():
    """A real request, partial and reply: the decoded residues are views of the messages, equal to
    what msgpack's copies give, and the reply decrypts to the clear product either way; a held
    ``a`` part is joined into bytes of its own (``PackedRows.concat``): it keeps no reply alive."""
    rng = np.random.default_rng(0)
    secret = SecretKey.generate().request_secret(N2048, bytes(16))
    m = rng.integers(-128, 128, size=(N2048.n, 24))
    w = rng.integers(-128, 128, size=(40, 24))
    a_seed = bytes(range(16))
    data = wire.encode(wire.EncryptedRequest(RID, "0.qkv", "fwd", encrypt(secret, m, a_seed), owner=OWNER))
    req = wire.decode_request(data)
    assert np.array_equal(req.batch.b, wire.decode(bytearray(data)).batch.b)  # the copies' path
    partial = MatrixProduct(w, N2048, a_seed)(req.batch)
    data = wire.encode(wire.PartialResult(RID, "0.qkv", "fwd", 0, 1, 0, 24, partial))
    pr = wire.decode_partial(data)
    assert isinstance(pr.partial.b, np.ndarray) and pr.partial.b.base is not None and not pr.partial.b.flags.writeable
    copies = wire.decode(bytearray(data)).partial
    assert np.array_equal(pr.partial.b, copies.b) and np.array_equal(pr.partial.a, copies.a)
    body = wire.encode(wire.EncryptedReply(RID, "0.qkv", "fwd", pr.partial.switch()))
    got, copied = wire.decode_reply(body), wire.decode(bytearray(body))
    assert isinstance(got.result.a, PackedRows) and isinstance(got.result.b, PackedRows)
    assert got.result.a.data.obj is body and got.result.b.data.obj is body
    # decryption unpacks them from the message's words wherever the fields put them (unaligned too)
    assert got.result.a.words() is not None and got.result.b.words() is not None
    assert isinstance(copied.result.a.data, bytes)
    assert got.result.a.data == copied.result.a.data and got.result.b.data == copied.result.b.data
    assert np.array_equal(decrypt(secret, got.result), m @ w.T)
    assert np.array_equal(decrypt(secret, copied.result), m @ w.T)
    held = PackedRows.concat([got.result.a])
    assert isinstance(held.data, bytes) and held.data == bytes(got.result.a.data)

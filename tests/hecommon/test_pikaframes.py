"""``hecommon.broker.pikaframes``: pika's body frames without its copies, byte for byte pika's own."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pika
import pytest
from hecommon import wire
from hecommon.broker import connection, pikaframes
from pika import exceptions as pex
from pika import frame, spec

URL = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
MAX_PAYLOAD = 131072 - 8  # RabbitMQ's default frame_max less a frame's header and end marker


@pytest.mark.parametrize("size", [1, 7, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD + 5])
def test_body_pieces_are_the_bytes_of_pikas_own_body_frames(size):
    body = os.urandom(size)
    pika_frames = b"".join(frame.Body(3, body[lo : lo + MAX_PAYLOAD]).marshal() for lo in range(0, size, MAX_PAYLOAD))
    pieces = pikaframes.body_pieces(3, body, MAX_PAYLOAD)
    assert b"".join(pieces) == pika_frames
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert len(views) == -(-size // MAX_PAYLOAD) and all(v.obj is body for v in views)  # the body is not copied


def test_an_empty_body_has_no_body_frames():
    assert pikaframes.body_pieces(1, b"", MAX_PAYLOAD) == []
    assert pikaframes.body_pieces(1, wire.Pieces([b"", memoryview(b"")]), MAX_PAYLOAD) == []


@pytest.mark.parametrize("sizes", [[5], [1, 1, 1], [MAX_PAYLOAD - 1, 1, MAX_PAYLOAD], [3, 2 * MAX_PAYLOAD + 7, 0, 9],
                                   [MAX_PAYLOAD], [MAX_PAYLOAD + 1, MAX_PAYLOAD - 1], [100, 5 << 20, 33]])
def test_a_message_in_pieces_is_framed_as_its_joined_bytes(sizes):
    """Frames cut across the pieces of a ``wire.Pieces`` body (bytes and views of arrays) are
    pika's frames of the joined body, and their payloads are views of the pieces, not copies."""
    array = np.frombuffer(os.urandom(max(sizes)), dtype=np.uint8)
    parts = [os.urandom(n) if i % 2 == 0 else memoryview(array[:n]).toreadonly() for i, n in enumerate(sizes)]
    body = wire.Pieces(parts)
    joined = bytes(body)
    assert len(body) == len(joined) == sum(sizes)
    pika_frames = b"".join(frame.Body(3, joined[lo : lo + MAX_PAYLOAD]).marshal()
                           for lo in range(0, len(joined), MAX_PAYLOAD))
    pieces = pikaframes.body_pieces(3, body, MAX_PAYLOAD)
    assert b"".join(pieces) == pika_frames
    owners = {id(p if isinstance(p, bytes) else p.obj) for p in parts}
    assert all(id(v.obj) in owners for v in pieces if isinstance(v, memoryview))
    assert sum(len(v) for v in pieces if isinstance(v, memoryview)) == len(joined)  # every body byte a view


def test_pieces_are_bytes_or_flat_byte_views():
    """A piece's ``len`` must be its size in bytes (the header frame says the body's size)."""
    for bad in (memoryview(np.zeros(3, np.uint32)), memoryview(np.zeros((2, 4), np.uint8)),
                memoryview(bytes(8))[::2], bytearray(4), "text"):
        with pytest.raises(TypeError, match="Pieces"):
            wire.Pieces([b"ok", bad])


def _stream(bodies: list[bytes]) -> tuple[bytes, list[frame.Frame]]:
    """What a broker sends for deliveries of ``bodies`` on channel 1, with a heartbeat between two,
    and the frames pika's own ``decode_frame`` finds in it."""
    out = []
    for i, body in enumerate(bodies):
        out.append(frame.Method(1, spec.Basic.Deliver("ctag", i + 1, False, "", "q")).marshal())
        out.append(frame.Header(1, len(body), spec.BasicProperties(correlation_id=f"c{i}")).marshal())
        out += [frame.Body(1, body[lo : lo + MAX_PAYLOAD]).marshal() for lo in range(0, len(body), MAX_PAYLOAD)]
        if i == 0:
            out.append(frame.Heartbeat().marshal())
    data = b"".join(out)
    frames, rest = [], data
    while rest:
        used, value = frame.decode_frame(rest)
        frames.append(value)
        rest = rest[used:]
    return data, frames


def _same(a, b) -> bool:
    if type(a) is not type(b) or a.channel_number != b.channel_number:
        return False
    if isinstance(a, frame.Body):
        return bytes(a.fragment) == bytes(b.fragment)
    if isinstance(a, frame.Header):
        return a.body_size == b.body_size and a.properties.correlation_id == b.properties.correlation_id
    if isinstance(a, frame.Method):
        return a.method.NAME == b.method.NAME and a.method.delivery_tag == b.method.delivery_tag
    return True  # heartbeats


class _Receiver:
    """The attributes ``Connection._on_data_available`` uses, and the frames it processes."""

    def __init__(self) -> None:
        self._frame_buffer = b""
        self.bytes_received = 0
        self.frames: list[frame.Frame] = []

    def _process_frame(self, value) -> None:
        self.frames.append(value)


@pytest.mark.parametrize("read", [1, 7, 1000, 131072, 1 << 20])
def test_reads_of_any_size_give_pikas_frames_and_count_every_byte(read):
    data, expected = _stream([os.urandom(5), os.urandom(3 * MAX_PAYLOAD + 11), b"", os.urandom(MAX_PAYLOAD)])
    r = _Receiver()
    for lo in range(0, len(data), read):
        pikaframes._on_data_available(r, data[lo : lo + read])
    assert r._frame_buffer == b"" and r.bytes_received == len(data)
    assert len(r.frames) == len(expected) and all(_same(a, b) for a, b in zip(r.frames, expected, strict=True))
    assert any(isinstance(f.fragment, memoryview) for f in r.frames if isinstance(f, frame.Body))


def test_a_read_that_ends_inside_a_frame_keeps_only_that_frame():
    data, expected = _stream([os.urandom(2 * MAX_PAYLOAD)])  # ... its last body frame, then a heartbeat
    r = _Receiver()
    cut = len(data) - 100  # 92 bytes into the last body frame's end
    pikaframes._on_data_available(r, data[:cut])
    assert len(r.frames) == len(expected) - 2 and len(r._frame_buffer) == MAX_PAYLOAD + 8 - 92
    pikaframes._on_data_available(r, data[cut:])
    assert len(r.frames) == len(expected) and r._frame_buffer == b""


def test_a_wrong_end_marker_is_refused_as_pika_refuses_it():
    body = bytearray(frame.Body(1, b"abc").marshal())
    body[-1] = 0
    with pytest.raises(pex.InvalidFrameError):
        pikaframes.split_frames(bytes(body))
    with pytest.raises(pex.InvalidFrameError):
        frame.decode_frame(bytes(body))


def test_the_protocol_header_is_decoded_by_pika():
    frames, used = pikaframes.split_frames(b"AMQP\x00\x00\x09\x01")
    assert used == 8 and isinstance(frames[0], frame.ProtocolHeader)


def test_messages_through_the_real_broker_arrive_whole():
    """Empty, one-byte, frame-sized and multi-frame bodies, and one in ``wire.Pieces``, published
    and consumed over one connection (``connection.connect`` installs the frame code)."""
    conn = connection.connect(URL, "helora-test-pikaframes", deadline_s=30)
    try:
        assert pika.connection.Connection._send_message is pikaframes._send_message
        ch = conn.channel()
        ch.confirm_delivery()
        q = ch.queue_declare(f"helora-test-frames-{secrets.token_hex(4)}", exclusive=True).method.queue
        big = np.frombuffer(os.urandom(3 << 20), dtype=np.uint8)
        sent = [b"", b"x", os.urandom(MAX_PAYLOAD), os.urandom(MAX_PAYLOAD + 1), os.urandom(5 << 20),
                wire.Pieces([b"head", memoryview(big).toreadonly(), os.urandom(MAX_PAYLOAD + 3)])]  # in pieces
        bodies = [bytes(b) for b in sent]
        for i, body in enumerate(sent):
            ch.basic_publish("", q, body, pika.BasicProperties(correlation_id=str(i)), mandatory=True)
        got = {}
        for method, props, body in ch.consume(q, auto_ack=True, inactivity_timeout=10):
            if method is None:
                break
            got[int(props.correlation_id)] = body
            if len(got) == len(bodies):
                break
        assert got == dict(enumerate(bodies))
    finally:
        conn.close()

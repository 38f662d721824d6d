"""AMQP body frames without pika's copies (``install()``; every helora connection calls it).

helora's messages are megabytes, cut by the broker's ``frame_max`` (128 KiB) into body frames.
pika 1.x handles those frames as immutable ``bytes`` and copies each byte several times:

- receiving, ``Connection._on_data_available`` appends every read to the frame buffer
  (``buffer += data``) and cuts each decoded frame off its front (``buffer = buffer[n:]``), so a
  1 MiB read of eight frames is copied about five times before the body's fragments are joined;
- sending, ``Connection._send_message`` slices the body per frame, and ``Frame._marshal`` joins
  the slice and then concatenates header, payload and end marker: four copies of every byte, each
  into a fresh 128 KiB object, just above glibc's default ``mmap`` threshold, so every frame also
  costs page faults.

``install()`` replaces those two methods of ``pika.connection.Connection``. A body frame is then
read as a ``memoryview`` of the bytes received (the fragments are joined once, by pika's content
assembler, into the message body), the rest of a read is kept only when a frame is cut by the
read's end, and a body frame is written as three pieces, its header, a view of the body and its
end marker (the socket copies the view; nothing else does). A body given as ``hecommon.wire.Pieces``
(a client's request, its arrays not joined into one ``bytes``) is framed from its pieces the same
way. Method, header and heartbeat frames still go through pika's own code. The bytes
on the wire and the bodies delivered are the same; ``tests/hecommon/test_pikaframes.py`` checks
both against pika's own functions, and every broker test runs through them.
"""

from __future__ import annotations

import struct

import pika
from pika import connection as _connection
from pika import exceptions as _exceptions
from pika import frame as _frame
from pika import spec as _spec

from ..errors import ConfigError
from ..wire.codec import Pieces

_HEAD = struct.Struct(">BHL")  # frame type, channel, payload size
_HEAD_SIZE = _HEAD.size
_END = bytes([_spec.FRAME_END])
_installed = False


def body_pieces(channel: int, body: bytes | Pieces, max_payload: int) -> list[bytes | memoryview]:
    """The body frames of ``body`` (payloads of at most ``max_payload`` bytes) as pieces to write
    one after the other: each frame's header, views of its payload, its end marker (joined with
    the next frame's header). Together they are the bytes of pika's ``Body(...).marshal()`` for
    each slice of the body (of ``bytes(body)`` for a message in ``Pieces``, whose frames take their
    payloads from its pieces in turn), and no byte of the body is copied."""
    parts = [memoryview(p) for p in (body.parts if isinstance(body, Pieces) else (body,)) if len(p)]
    size = sum(map(len, parts))
    pieces: list[bytes | memoryview] = []
    end = b""
    k, offset = 0, 0  # the part and the offset in it where the next payload starts
    for lo in range(0, size, max_payload):
        left = min(max_payload, size - lo)
        pieces.append(end + _HEAD.pack(_spec.FRAME_BODY, channel, left))
        while left:
            take = min(left, len(parts[k]) - offset)
            pieces.append(parts[k][offset : offset + take])
            offset, left = offset + take, left - take
            if offset == len(parts[k]):
                k, offset = k + 1, 0
        end = _END
    if end:
        pieces.append(end)
    return pieces


def split_frames(data: bytes) -> tuple[list[_frame.Frame | _frame.ProtocolHeader], int]:
    """The complete frames at the start of ``data`` and the bytes they take.

    Body frames come as ``pika.frame.Body`` whose fragment is a ``memoryview`` of ``data``; every
    other frame is decoded by ``pika.frame.decode_frame`` from its own bytes alone. Raises
    ``pika.exceptions.InvalidFrameError`` on a wrong end marker, as pika does."""
    frames: list[_frame.Frame | _frame.ProtocolHeader] = []
    view = memoryview(data)
    size, offset = len(data), 0
    while size - offset >= _HEAD_SIZE:
        if data[offset : offset + 4] == b"AMQP":  # a protocol header (8 bytes), not a frame
            used, value = _frame.decode_frame(data[offset : offset + 8])
        else:
            kind, channel, payload = _HEAD.unpack_from(data, offset)
            end = offset + _HEAD_SIZE + payload + 1
            if end > size:
                break
            if data[end - 1] != _spec.FRAME_END:
                raise _exceptions.InvalidFrameError("Invalid FRAME_END marker")
            if kind == _spec.FRAME_BODY:
                used, value = end - offset, _frame.Body(channel, view[offset + _HEAD_SIZE : end - 1])
            else:
                used, value = _frame.decode_frame(data[offset:end])
        if not value:
            break
        frames.append(value)
        offset += used
    return frames, offset


def _on_data_available(self, data_in: bytes) -> None:
    data = self._frame_buffer + data_in if self._frame_buffer else data_in
    frames, used = split_frames(data)
    self._frame_buffer = data[used:] if used < len(data) else b""  # only a frame cut by the read's end
    self.bytes_received += used
    for value in frames:
        self._process_frame(value)


def _send_message(self, channel_number: int, method_frame, content) -> None:
    properties, body = content
    # the frames below are views of the body: immutable bytes, or Pieces, whose arrays the sender
    # leaves alone until the publish returns (a blocking publish writes them before it does)
    if not isinstance(body, bytes | Pieces):
        body = bytes(body)
    pieces: list[bytes | memoryview] = [_frame.Method(channel_number, method_frame).marshal(),
                                        _frame.Header(channel_number, len(body), properties).marshal()]
    if len(body):
        pieces.extend(body_pieces(channel_number, body, self._body_max_length))
    self.frames_sent += 2 + -(-len(body) // self._body_max_length)
    for piece in pieces:  # what _output_marshaled_frames does per frame, here per piece
        self.bytes_sent += len(piece)
        self._adapter_emit_data(piece)


def install() -> None:
    """Replace pika's body-frame handling (idempotent). The methods replaced are checked, so that
    a pika release that renames them fails loudly instead of silently losing the change."""
    global _installed
    if _installed:
        return
    conn = _connection.Connection
    for name in ("_on_data_available", "_send_message", "_process_frame", "_adapter_emit_data",
                 "_trim_frame_buffer"):
        if not callable(getattr(conn, name, None)):
            raise ConfigError(f"pika {pika.__version__}: Connection.{name} is gone; update hecommon.broker.pikaframes")
    conn._on_data_available = _on_data_available
    conn._send_message = _send_message
    _installed = True

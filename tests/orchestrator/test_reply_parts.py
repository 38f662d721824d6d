"""The broker client's reply assembly: parts counted once, copies dropped, errors end the wait."""

from __future__ import annotations

import numpy as np
from hecommon import wire
from hecommon.encrypt import EncryptedResult
from hecommon.params import N2048
from helora_orchestrator.broker import _ReplyParts


def _reply_parts(rows: int = 3) -> list[bytes]:
    k = N2048.out_bits
    values = np.arange(rows * N2048.n, dtype=np.uint64).reshape(rows, N2048.n) % (1 << k)
    reply = wire.EncryptedReply(bytes(16), "0.qkv", "fwd", EncryptedResult(N2048, values, values[::-1].copy(), 4))
    limit = reply._row_bytes() + wire.HEADER_ALLOWANCE  # one row per part
    return [wire.encode_reply(c, limit) for c in wire.split(reply, limit)]


def test_every_part_once_completes_whatever_the_order():
    p0, p1, p2 = _reply_parts()
    done = _ReplyParts()
    assert not done([p2])
    assert not done([p2, p0])
    assert not done([p2, p0, p0])  # a copy of part 0 is not part 1
    assert done([p2, p0, p0, p1])


def test_an_error_reply_ends_the_wait():
    p0, _, _ = _reply_parts()
    error = wire.encode_error(wire.ErrorReply(bytes(16), "timeout", "shard 1/2 never answered", "n2048-q54"))
    assert _ReplyParts()([p0, error])
    assert _ReplyParts()([b"not msgpack"])  # the caller decodes it and reports why

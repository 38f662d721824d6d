"""The direct path's addressing (``hecommon.route``): every input row sent once per shard that
multiplies it, parts below the message limit and inside one shard, pieces as the reply comes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hecommon import route, wire
from hecommon.errors import MalformedMessage
from hecommon.he.encrypt import EncryptedBatch
from hecommon.he.params import N2048
from hecommon.shards import even_split

ROW = 13824  # one request row of N2048, packed


def _entry(d_in: int, d_out: int, shards: int) -> wire.LayerEntry:
    z = np.zeros
    return wire.LayerEntry("0.down", 0, d_in, d_out, (("mlp.down_proj", d_out),), bytes(16), bytes(16),
                           z(d_out), z(d_out, np.int64), z(d_in, np.int64), 16_000, shards=shards)


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_pieces_cover_every_row_once_per_receiving_shard(shards, direction):
    entry = _entry(1536, 576, shards)
    limit = 500 * ROW + wire.HEADER_ALLOWANCE  # 500 rows per message
    plan = route.pieces(entry, direction, N2048, limit)
    width = route.width(entry, direction)
    got = np.zeros((shards, width), dtype=int)
    for p in plan:
        assert 0 < p.hi - p.lo <= 500
        for s in p.shards:
            got[s, p.lo:p.hi] += 1
    if direction == "fwd":  # row shards: each shard its own rows, each row once
        for s, (lo, hi) in enumerate(even_split(1536, shards)):
            assert got[s, lo:hi].tolist() == [1] * (hi - lo) and got[s].sum() == hi - lo
    else:  # column shards: every shard every row
        assert (got == 1).all()
    for s in range(shards):  # each shard's parts are numbered 0..parts-1
        mine = [p for p in plan if s in p.shards]
        assert sorted(p.part for p in mine) == list(range(mine[0].parts)) and {p.parts for p in mine} == {len(mine)}
    assert route.reply_pieces(entry, direction, N2048, limit) == (len(plan) if shards == 1 else 1)


def test_targets_follow_the_rows_and_refuse_a_part_across_a_shard_edge():
    entry = _entry(10, 4, 2)
    b = np.zeros((3, N2048.limbs, 1), dtype=np.uint32)
    part = wire.EncryptedRequest(os.urandom(16), "0.down", "fwd", EncryptedBatch(N2048, b, 1), row_start=5,
                                 owner=bytes(16))
    assert route.targets(entry, part) == (1,)
    assert route.targets(entry, dataclasses.replace(part, row_start=2)) == (0,)
    assert route.targets(entry, dataclasses.replace(part, direction="bwd")) == (0, 1)
    with pytest.raises(MalformedMessage, match="cross the edge"):
        route.targets(entry, dataclasses.replace(part, row_start=3))
    with pytest.raises(MalformedMessage, match="outside"):
        route.targets(entry, dataclasses.replace(part, row_start=10))


def test_cut_gives_each_row_shard_its_rows_and_refuses_parts():
    entry = _entry(10, 4, 3)
    b = np.arange(10 * N2048.limbs * 3, dtype=np.uint32).reshape(10, N2048.limbs, 3) % 7
    req = wire.EncryptedRequest(os.urandom(16), "0.down", "fwd", EncryptedBatch(N2048, b, 3, 11), owner=bytes(16))
    subs = route.cut(entry, req)
    assert [(i, s.row_start, s.width) for i, s in subs] == [(0, 0, 3), (1, 3, 4), (2, 7, 3)]
    assert np.array_equal(np.concatenate([s.batch.b for _, s in subs]), b)
    assert {(s.batch.n_tokens, s.batch.col0) for _, s in subs} == {(3, 11)}  # each keeps the token window
    with pytest.raises(MalformedMessage, match="takes 10"):
        route.cut(entry, dataclasses.replace(req, batch=EncryptedBatch(N2048, b[:4], 3)))


def test_the_manifest_carries_the_shard_counts_and_refuses_more_shards_than_inputs():
    entry = _entry(10, 4, 3)
    m = wire.Manifest(os.urandom(16), "m", N2048, (entry,))
    assert wire.decode_manifest(wire.encode_manifest(m)).layers[0].shards == 3
    with pytest.raises(MalformedMessage, match="shards"):
        _entry(2, 4, 3)

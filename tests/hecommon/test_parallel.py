"""Row ranges on the shared pool: coverage, alignment, no nesting; packing in pieces is exact."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hecommon.he import bits, parallel


@pytest.mark.parametrize("count,minimum,align", [(10, 3, 1), (1000, 100, 64), (1 << 20, 1 << 19, 64), (5, 10, 1)])
def test_chunks_cover_every_index_once_on_aligned_starts(count, minimum, align, monkeypatch):
    monkeypatch.setenv("HELORA_THREADS", "3")
    ranges = parallel.chunks(count, minimum, align)
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(prev[1] == cur[0] for prev, cur in zip(ranges, ranges[1:], strict=False))
    assert all(lo % align == 0 and hi > lo for lo, hi in ranges)
    assert len(ranges) <= 3 and all(hi - lo >= min(minimum, count) for lo, hi in ranges[:-1])


def test_work_asked_for_on_a_pool_thread_runs_there_in_one_piece(monkeypatch):
    monkeypatch.setenv("HELORA_THREADS", "2")
    seen: list[tuple[str, list[tuple[int, int]]]] = []

    def outer(lo: int, hi: int) -> None:
        inner = parallel.chunks(1000, 10)  # from a pool thread: not split (no waiting on the pool)
        seen.append((threading.current_thread().name, inner))

    parallel.map_ranges(outer, parallel.chunks(1000, 10))
    assert len(seen) == 2 and all(name.startswith("hecommon") and inner == [(0, 1000)] for name, inner in seen)


@pytest.mark.parametrize("width", [5, 27, 38, 61])
def test_packing_in_pieces_gives_the_bytes_of_one_piece(width, monkeypatch):
    count = (1 << 20) + 4099  # pieces, and a last one that is not a multiple of 64 values
    values = np.random.default_rng(width).integers(0, 1 << width, size=count, dtype=np.uint64)
    monkeypatch.setenv("HELORA_THREADS", "1")
    assert parallel.chunks(count, bits._PARALLEL, align=64) == [(0, count)]
    whole = bits.pack_bits(values, width)
    monkeypatch.setenv("HELORA_THREADS", "3")
    assert len(parallel.chunks(count, bits._PARALLEL, align=64)) == 2
    assert bits.pack_bits(values, width) == whole
    np.testing.assert_array_equal(bits.unpack_bits(whole, width, count), values)
    with pytest.raises(ValueError, match="does not fit"):
        bits.pack_bits(np.concatenate([values, [np.uint64(1) << np.uint64(width)]]), width)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_cast_equals_astype(monkeypatch, threads):
    """The product's casts (uint32 residues to float64 for the GEMMs, float64 sums back to uint32),
    by row ranges on the pool: the same values and layout as ``astype``, contiguous or not."""
    monkeypatch.setenv("HELORA_THREADS", threads)
    rng = np.random.default_rng(7)
    residues = rng.integers(0, 2**27, size=(300, 2, 64), dtype=np.uint32)
    residues[0, 0, :2] = (0, 2**27 - 1)
    for src, dtype in ((residues, np.float64), (residues[::2], np.float64),
                       (residues.astype(np.float64), np.uint32), (residues.astype(np.float64)[5:200], np.uint32)):
        got = parallel.cast(src, dtype)
        want = src.astype(dtype)
        assert got.dtype == want.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)

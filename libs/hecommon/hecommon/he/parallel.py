"""Row ranges of numpy work on a small shared thread pool (numpy, the FFT and bit packing release
the GIL, so ranges of independent rows run in parallel).

``HELORA_THREADS`` sets the pool's size (default: the CPU count). Work asked for from inside a
pool thread runs there, in one piece: a pool thread that waited for the pool could wait forever.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

_PREFIX = "hecommon"
_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()
T = TypeVar("T")
#: The least work (array elements) worth a range of its own when the caller says how much a row
#: holds: below it a pool task costs more than it saves (a one-token request's rows).
MIN_WORK = 1 << 15


_CPUS = os.cpu_count() or 1


def workers() -> int:
    return max(1, int(os.environ.get("HELORA_THREADS", _CPUS)))


def chunks(count: int, minimum: int, align: int = 1, row_size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges covering ``0 … count``, one per worker, each at least ``minimum`` long (and,
    given the elements of a row, ``row_size``, at least ``MIN_WORK`` elements) and starting at a
    multiple of ``align`` (a single range when the work is small or runs on a pool thread already)."""
    parts = max(1, min(workers(), count // max(minimum, 1)))
    if row_size is not None:
        parts = max(1, min(parts, count * row_size // MIN_WORK))
    if parts == 1 or threading.current_thread().name.startswith(_PREFIX):
        return [(0, count)] if count else []
    step = -(-count // parts)
    step = -(-step // align) * align
    return [(lo, min(lo + step, count)) for lo in range(0, count, step)]


def map_ranges(fn: Callable[[int, int], T], ranges: list[tuple[int, int]]) -> list[T]:
    """``[fn(lo, hi) for lo, hi in ranges]``, in parallel when there are several."""
    global _POOL
    if len(ranges) <= 1:
        return [fn(lo, hi) for lo, hi in ranges]
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix=_PREFIX)
    return [f.result() for f in [_POOL.submit(fn, lo, hi) for lo, hi in ranges]]


def map_rows(fn: Callable[[int, int], object], rows: int, minimum: int = 128, row_size: int | None = None) -> None:
    """Run ``fn(lo, hi)`` over ranges of ``rows`` rows, in parallel when there are several
    (``row_size``: see ``chunks``)."""
    map_ranges(fn, chunks(rows, minimum, row_size=row_size))


def cast(src: np.ndarray, dtype: Any, minimum: int = 64) -> np.ndarray:
    """``src.astype(dtype)`` (C order, the same values), converted by ranges of its first axis in
    parallel: numpy's casts release the GIL, and a large cast is memory-bound work one core leaves
    half done."""
    out = np.empty(src.shape, dtype=dtype)
    row = src[0].size if src.ndim and src.shape[0] else 1
    map_ranges(lambda lo, hi: np.copyto(out[lo:hi], src[lo:hi], casting="unsafe"),
               chunks(src.shape[0], minimum, row_size=row))
    return out


def reduce_rows(fn: Callable[[int, int], T], rows: int, combine: Callable[[T, T], T], minimum: int = 64,
                row_size: int | None = None) -> T:
    """``combine`` over ``fn(lo, hi)`` for ranges covering ``rows`` (>= 1) rows, computed in parallel
    (a bound checked over a large array: each range's max, then the max of those)."""
    return functools.reduce(combine, map_ranges(fn, chunks(rows, minimum, row_size=row_size)))

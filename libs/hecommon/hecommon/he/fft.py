"""Batched complex FFTs of rows, in place or between a thread's pair of buffers (``pair``): FFTW
(through pyFFTW) where it is installed, numpy's pocketfft otherwise.

Every product ``a·s`` of the client and of a federated owner is a forward and an inverse FFT of
size N/2 over blocks of 16 to 32 rows (``ring``, ``fedsum``). Measured on this project's 2-core
VM, a (16, 1024) complex128 block costs 3.8 µs a row through ``numpy.fft`` and 1.9 µs through an
FFTW plan made with ``FFTW_MEASURE`` (``torch.fft``, MKL: 3.3; ``scipy.fft``: 5.5); FFTW's
``execute`` lets go of the GIL, so the pool's threads transform at once.

Exactness does not depend on the library: every transform here feeds a product that is rounded
to integers, and ``ring.MAX_EXACT_INPUT`` keeps those products 2^16 below the precision of a
float64, far more than the error of either FFT (tests compare both with the schoolbook product).
The two libraries' floats may differ in their last bits; the integers they round to do not.

``HELORA_FFT=numpy`` selects numpy's FFT. pyFFTW is a dependency of the client only (the
``fft`` extra of hecommon); it bundles FFTW, which is GPL-2.0-or-later: a deployment that cannot
take GPL code leaves it out and keeps numpy's FFT, with the same results.

Plans are made once per shape and thread (pyFFTW's plan objects hold their arrays, so two threads
never share one), under a lock (FFTW's planner is not thread-safe); FFTW's wisdom makes a shape's
second plan immediate. Blocks of at least ``MEASURE_VALUES`` values are planned with
``FFTW_MEASURE`` (about 0.1 s, once per process), smaller ones with ``FFTW_ESTIMATE``.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConfigError

#: Blocks at least this large (rows × N/2) are worth a measured plan.
MEASURE_VALUES = 1 << 14
#: Buffers from ``empty`` start at a multiple of this many bytes (FFTW's SIMD loads need 32).
ALIGNMENT = 64

_PLANS = threading.local()
_PLANNER = threading.Lock()


@functools.cache
def _pyfftw() -> Any:
    """pyFFTW, or None where it is not installed. Two threads may both import it on first use
    (imports are locked per module): both get the same module."""
    try:
        import pyfftw
    except ImportError:  # pragma: no cover - where pyFFTW is absent
        return None
    return pyfftw


def backend() -> str:
    """``"fftw"`` or ``"numpy"``: the library ``forward`` and ``inverse`` use now (``HELORA_FFT``,
    default ``fftw``, which falls back to numpy where pyFFTW is not installed)."""
    choice = os.environ.get("HELORA_FFT", "fftw")
    if choice not in ("fftw", "numpy"):
        raise ConfigError(f"HELORA_FFT={choice!r}: fftw or numpy expected")
    if choice == "numpy" or _pyfftw() is None:
        return "numpy"
    return "fftw"


def empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialized complex128 C-order array whose start is ``ALIGNMENT``-aligned (slices of
    whole rows of N/2 ≥ 4 values stay aligned)."""
    count = int(np.prod(shape))
    raw = np.empty(count * 16 + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + count * 16].view(np.complex128).reshape(shape)


def _new_plan(src: np.ndarray, dst: np.ndarray, direction: str, *extra: str) -> Any:
    """An FFTW plan of the rows of ``src`` into ``dst`` (the same array: in place), made under the
    planner's lock; ``FFTW_MEASURE`` for blocks of ``MEASURE_VALUES`` values or more."""
    flags = ("FFTW_MEASURE" if src.size >= MEASURE_VALUES else "FFTW_ESTIMATE", *extra)
    with _PLANNER:
        return _pyfftw().FFTW(src, dst, axes=(1,), direction=direction, flags=flags, threads=1)


def _plan(shape: tuple[int, int], direction: str, aligned: bool) -> Any:
    """This thread's in-place plan for arrays of ``shape`` (aligned or 16 bytes off, as numpy's
    allocations may be), made once on a scratch array."""
    cache = getattr(_PLANS, "plans", None)
    if cache is None:
        cache = _PLANS.plans = {}
    key = (shape, direction, aligned)
    if key not in cache:
        scratch = empty(shape) if aligned else empty((shape[0] * shape[1] + 1,))[1:].reshape(shape)
        cache[key] = _new_plan(scratch, scratch, direction, *(() if aligned else ("FFTW_UNALIGNED",)))
    return cache[key]


def _run(x: np.ndarray, direction: str) -> None:
    if x.dtype != np.complex128:
        raise TypeError(f"fft: complex128 rows expected, not {x.dtype}")
    if x.size == 0:
        return
    if not x.flags.c_contiguous:
        if x.ndim > 2 and x[0].flags.c_contiguous:  # a stack of blocks sliced along their rows
            for part in x:
                _run(part, direction)
            return
        raise ValueError("fft: rows must be C-contiguous (transformed in place)")
    rows = x.reshape(-1, x.shape[-1])
    plan = _plan(rows.shape, direction, rows.ctypes.data % ALIGNMENT == 0)
    plan.update_arrays(rows, rows)
    plan.execute()


def bound(x: np.ndarray, inverse: bool = False, out: np.ndarray | None = None) -> Callable[[], None]:
    """The transform of ``x``'s rows (``forward``, or ``inverse`` with ``inverse``), in place or
    into ``out`` (the same shape; ``x`` is then left undefined), as a call without arguments, for
    buffers transformed again and again (a thread's block): under FFTW, a plan of their own made
    once, which then costs no lookup or check a call (out of place: 1.6 µs a row of a (16, 1024)
    block here, against 1.85 in place). ``x`` and ``out``: ``empty`` buffers, 2-D; their contents
    are lost at binding (``FFTW_MEASURE`` times the plan on them)."""
    out = x if out is None else out
    if out.shape != x.shape:
        raise ValueError(f"fft.bound: {x.shape} into {out.shape}")
    if backend() == "numpy":
        step = inverse_numpy if inverse else forward_numpy
        if out is x:
            return functools.partial(step, x)

        def copied() -> None:
            np.copyto(out, x)
            step(out)

        return copied
    for y in (x, out):
        if y.ndim != 2 or y.dtype != np.complex128 or not y.flags.c_contiguous or y.ctypes.data % ALIGNMENT:
            raise ValueError("fft.bound: aligned, C-contiguous (rows, n) complex128 buffers are required")
    extra = () if out is x else ("FFTW_DESTROY_INPUT",)
    return _new_plan(x, out, "FFTW_BACKWARD" if inverse else "FFTW_FORWARD", *extra).execute


class Pair:
    """``inputs`` ``empty`` buffers of one (rows, n) shape (``xs``; ``x`` is the first), one more
    for their spectra (``y``), and the out-of-place plans between them, for products' two
    transforms (``bound``): ``forwards[i]`` xs[i] → y (xs[i] is then undefined), ``inverses[i]``
    y → xs[i]; ``forward`` and ``inverse`` are the first input's. Out of place is faster than in
    place (a (32, 1024) block's product, both transforms: 4.45 → 3.96 µs a row here), and a bound
    plan costs no lookup a call; inputs share ``y``, transformed one after the other (three
    buffers for two inputs, not four)."""

    def __init__(self, shape: tuple[int, int], inputs: int = 1) -> None:
        self.xs, self.y = tuple(empty(shape) for _ in range(inputs)), empty(shape)
        self.x = self.xs[0]
        self.forwards = tuple(bound(x, out=self.y) for x in self.xs)
        self.inverses = tuple(bound(self.y, inverse=True, out=x) for x in self.xs)
        self.forward, self.inverse = self.forwards[0], self.inverses[0]


_PAIRS = threading.local()


def pair(shape: tuple[int, int], inputs: int = 1) -> Pair:
    """This thread's ``Pair`` of ``shape`` and ``inputs`` under the library ``backend`` names now,
    made once (with its measured plans) and reused by every block the thread transforms."""
    cache = getattr(_PAIRS, "pairs", None)
    if cache is None:
        cache = _PAIRS.pairs = {}
    key = (shape, inputs, backend())
    if key not in cache:
        cache[key] = Pair(shape, inputs)
    return cache[key]


def forward_numpy(x: np.ndarray) -> None:
    np.fft.fft(x, axis=-1, out=x)


def inverse_numpy(x: np.ndarray) -> None:
    np.fft.ifft(x, axis=-1, out=x, norm="forward")


def forward(x: np.ndarray) -> None:
    """In place: the unnormalized forward FFT of each row (last axis) of complex128 ``x``
    (``np.fft.fft``)."""
    if backend() == "numpy":
        forward_numpy(x)
    else:
        _run(x, "FFTW_FORWARD")


def inverse(x: np.ndarray) -> None:
    """In place: the unnormalized inverse FFT of each row of complex128 ``x`` (``np.fft.ifft`` with
    ``norm="forward"``: no division by the length)."""
    if backend() == "numpy":
        inverse_numpy(x)
    else:
        _run(x, "FFTW_BACKWARD")

"""The client's fused encryption and decryption loops (issue 17): whether they are used, and where.

The client's cost per value is a few FFTs (``ring.SmallSecretMultiplier``) and the element-wise
work around them: expanding ``a`` from its keystream, centering and folding it into the
transform's input, then rounding the product, adding message and noise and reducing mod p (up);
unpacking, splitting and rounding, adding ``b``, reducing mod ``2^k`` and decoding (down). In
numpy each of those steps is a pass over memory; ``hecommon.he._fused`` (compiled with numba) does
each side in one loop before the forward FFT and one after the inverse FFT, over blocks of rows
small enough to stay in cache.

The loops are written so that the compiler vectorizes them (AVX-512 on this machine's CPUs:
``inspect_asm`` shows ``vcvttpd2qq``, ``vpmullq``, ``vpopcntq``): contiguous 1-D views of a row,
indices from ``range`` (numba checks nothing then), no branch inside a loop but selects, and no
float reduction (a row's range is an integer min and max over the floats' bits). A reduction mod p
corrects a float quotient estimate once each way (``_mod``); a division by a power of 2 is a
product with its inverse, which gives the same floats. Measured on this 2-core VM per value of a
(32, 2048) block: ``finish_encrypt`` 3.5 → 1.4 ns; decryption's end 5.2 → 2.7 ns (the decoding
loop, ``finish_decrypt_wide``, about 1.7; placing the messages into the caller's token rows,
``place_columns``, the rest); ``quantize_rows`` 2.6 → 1.6 ns; the noise (AES and
``sampling.plane_binomial``'s counts) 2.4 → 1.4 ns; ``fold_words`` 1.4 → 0.9 ns (0.46 a
coefficient once it counted a row's rejected words first: ``_fused.fold_words``).

The same module holds the loops around them: bit packing that moves 64-bit words
(``bits.pack_bits``; written out per width for the parameter sets' widths, ``_packing``),
quantization that takes each row's range and then its values while the row is in cache and
writes them transposed, one feature per row, as ``encrypt`` reads them
(``quantize.quantize_rows``), and dequantization in one pass into the caller's float32 rows
(``quantize.dequantize_forward``).

A buffer that a loop reads down its columns (the decrypted messages ``place_columns`` puts into
each token's row, quantization's tile before it is written transposed) gets rows of an odd number
of 64-byte cache lines (``_fused.spread_row``): rows of a power of 2 of bytes (2048 tokens of
int64, 8192 features of uint8) all start in the same set of the L1 cache, so such a walk evicted
its own lines. Measured here, same process: placing the messages 3.2 → 1.0–1.2 ns a value,
quantizing 8192 features 4.2 → 1.5–2.0 ns. Taking a row's range just before its values (x read
from memory once, not twice) took 576 features, whose tile rows were already spread, from 1.5 to
1.1–1.3 ns.

The loops compute the numpy path's exact integers and floats (``encrypt._encrypt_with``,
``decrypt``, ``quantize``), so both give the same ciphertexts, messages and values bit for bit
(``tests/hecommon/test_kernels.py``).
``HELORA_KERNELS=numpy`` selects the numpy path; without numba (the servers' images) it is the
only one. numba is imported on first use only: the services, which never encrypt, do not load it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import ModuleType

import numpy as np

#: Rows handled per block: a block's buffers (a few complex (rows, N/2) arrays) stay in L2.
BLOCK_ROWS = 32
_LOOPS: ModuleType | None = None
_TRIED = False
_LOAD = threading.Lock()


def loops() -> ModuleType:
    """The compiled loops (``hecommon.he._fused``); only where ``enabled()``. Loaded once, under a
    lock: the encryption's threads may make the first call together."""
    global _LOOPS, _TRIED
    if not _TRIED:
        with _LOAD:
            if not _TRIED:
                try:
                    from . import _fused

                    _LOOPS = _fused
                except ImportError:  # pragma: no cover - where numba is absent
                    _LOOPS = None
                _TRIED = True
    if _LOOPS is None:
        raise RuntimeError("hecommon.he.kernels: numba is not installed (pip install 'hecommon[kernels]')")
    return _LOOPS


def enabled() -> bool:
    """Whether the compiled loops are used: numba importable, not turned off by ``HELORA_KERNELS``."""
    if os.environ.get("HELORA_KERNELS", "numba") == "numpy":
        return False
    try:
        loops()
    except RuntimeError:
        return False
    return True


def pack_loop(bits: int) -> Callable:
    """The compiled loop that packs rows of ``bits``-bit values (``_fused.pack_rows``' arguments):
    written out for the parameter sets' widths (``hecommon.he._packing``), ``pack_rows`` for others."""
    loops()
    from . import _packing

    return _packing.pack_loop(bits)


def unpack_loop(bits: int) -> Callable:
    """``pack_loop``'s inverse (``_fused.unpack_rows``' arguments)."""
    loops()
    from . import _packing

    return _packing.unpack_loop(bits)


def centered_binomial(raw: np.ndarray, eta: int) -> np.ndarray:
    """``sampling.centered_binomial``'s samples from the same bytes (``raw``: (count, eta/4) uint8)."""
    out = np.empty(raw.shape[0], dtype=np.int64)
    loops().centered_binomial(raw, eta, out)
    return out

"""A session's ``a·s`` products, computed once for a window of coefficients (issue 18).

Under one request secret ``s`` a layer's public ``a`` is fixed, so the client's part of every
ciphertext of the layer is fixed too: ``-a·s mod p`` for the inputs and, for the outputs, ``a'·s``
mod ``2^bits`` where ``a'`` is the switched ``a`` part of the replies (or the layer's hint). A
generation session encrypts step i's tokens in coefficients ``i …`` under one secret
(``docs/threat-model.md``, "Column windows"), so it computes these products for a window of
coefficients with whole-ring transforms once, and each step only adds its messages and noise to
its columns (inputs) or its columns to the reply (outputs): work in proportion to its tokens.

The ciphertexts and messages are those of ``encrypt`` and ``decrypt`` bit for bit (tests): the
same ``b = -a·s + Δ·m + e mod p`` with noise from the same sampler, the same ``a·s`` integers
decoded by the same rule.
"""

from __future__ import annotations

import numpy as np

from .encrypt import (
    EncryptedBatch,
    EncryptedResult,
    _check_message,
    _decode,
    _encrypt_with,
    a_s_rows,
    check_client_a,
    check_window,
    unpacked,
)
from .keys import RequestSecret
from .parallel import map_rows
from .params import ParamSet
from .ring import reduce_float
from .sampling import sample_noise


def input_masks(secret: RequestSecret, a_seed: bytes, width: int, col0: int, cols: int) -> np.ndarray:
    """``-a·s mod p`` of the layer's inputs ``0 … width-1`` at coefficients ``col0 … col0+cols-1``:
    (width, L, cols) uint32, ``encrypt``'s ``b`` for a message and noise of zeros."""
    zeros = np.zeros((cols, width), dtype=np.int8)
    return _encrypt_with(secret, zeros, a_seed, np.zeros((width, cols), dtype=np.int64), 0, col0).b


def encrypt_masked(params: ParamSet, m: np.ndarray, mask: np.ndarray, col0: int,
                   noise: np.ndarray | None = None) -> EncryptedBatch:
    """``encrypt`` of ``m`` (T tokens × d features) from its columns of ``input_masks`` (d, L, T):
    ``b = mask + Δ·m + e mod p`` per limb, ``e`` fresh (or ``noise``, (d, T), for tests)."""
    m = _check_message(m, params)
    t, d = m.shape
    check_window("encrypt", params, t, col0)
    if mask.shape != (d, params.limbs, t):
        raise ValueError(f"encrypt_masked: a ({d}, {params.limbs}, {t}) mask is required, got {mask.shape}")
    e = sample_noise(params, (d, t)) if noise is None else noise.reshape(d, t)
    mt = m.T.astype(np.int64)
    b = np.empty((d, params.limbs, t), dtype=np.uint32)
    for i, p in enumerate(params.primes):
        x = mask[:, i].astype(np.int64) + (mt % p) * (params.delta % p) % p + e  # < 2^28 + 2^27 + noise
        b[:, i] = x % p
    return EncryptedBatch(params, b, t, col0)


def output_masks(secret: RequestSecret, result: EncryptedResult, hint: np.ndarray | None,
                 cols: tuple[int, int]) -> np.ndarray:
    """``a·s mod 2^bits`` of a reply's rows at coefficients ``cols`` (lo, hi): (rows, hi - lo) float64
    integers, from the ``a`` part it carries (sent, or held from an earlier reply:
    ``EncryptedResult.with_held_a``) or the layer's hint mod q (``hint``, rows, L, N), as ``decrypt``
    computes it."""
    check_client_a(result, hint)
    rows = result.width
    out = np.empty((rows, cols[1] - cols[0]), dtype=np.float64)

    def block(r0: int, r1: int) -> None:
        out[r0:r1] = a_s_rows(secret.multiplier, result, hint, r0, r1, cols)

    map_rows(block, rows)
    return out


def decrypt_masked(result: EncryptedResult, masks: np.ndarray, out: np.ndarray, add: bool = False) -> np.ndarray:
    """``decrypt`` of ``result`` from its columns of ``output_masks`` (rows, T): the messages
    (T, rows) written into ``out`` (or added to it: pieces of one sum)."""
    params = result.params
    if masks.shape != (result.width, result.n_tokens) or out.shape != (result.n_tokens, result.width):
        raise ValueError(f"decrypt_masked: masks ({result.width}, {result.n_tokens}) and out "
                         f"({result.n_tokens}, {result.width}) are required")
    modulus = float(1 << result.bits)
    x = masks + unpacked(result.b)
    x = reduce_float(x, modulus)
    x /= modulus
    messages = _decode(x, params)
    if add:
        out += messages
    else:
        out[...] = messages
    return out

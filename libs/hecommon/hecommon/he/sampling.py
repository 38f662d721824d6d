"""Every random draw of the scheme, from one seekable AES-256-CTR stream (DESIGN §2).

- ``aes_ctr``: the keystream of a 32-byte key from any counter block;
- ``derive_key``: domain-separated keys (SHAKE-256 over length-prefixed parts);
- the request secret's ternary coefficients (``ternary_from_stream``, rejection of 255);
- the noise: centered binomial of ``params.noise_eta`` (``centered_binomial``, ``sample_noise``)
  from a stream keyed by fresh ``os.urandom`` bytes (``noise_stream``);
- the public ``a``: ``expand_a`` (and its raw words ``a_words``, for the compiled client loops)
  from a seed that ``owner_a_seed`` derives from the manifest's and the owner's halves.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import kernels
from .params import ParamSet

#: Bytes of a public seed of ``a`` (the manifest's per layer and direction, the owner's per session).
SEED_BYTES = 16


def aes_ctr(key: bytes, nbytes: int, block: int = 0) -> np.ndarray:
    """``nbytes`` of the AES-256-CTR keystream of ``key`` from counter block ``block`` (seekable:
    any segment is made alone), as uint8. The one stream every sampler here draws from."""
    if len(key) != 32:
        raise ValueError("aes_ctr: a 32-byte key is required")
    enc = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    return np.frombuffer(enc.update(bytes(nbytes)), dtype=np.uint8)


def derive_key(*parts: bytes) -> bytes:
    """Domain-separated 32-byte key from its parts (SHAKE-256 over length-prefixed parts)."""
    h = hashlib.shake_256()
    for p in parts:
        h.update(len(p).to_bytes(4, "little") + p)
    return h.digest(32)


def ternary_from_stream(key: bytes, n: int) -> np.ndarray:
    """Uniform ternary polynomial of length n from the keystream of ``key`` (rejection of 255)."""
    need = n + n // 8 + 64
    while True:
        raw = aes_ctr(key, need)
        ok = raw[raw < 255]
        if ok.size >= n:
            return (ok[:n] % 3).astype(np.int8) - 1
        need *= 2


def centered_binomial(stream: np.ndarray, count: int, eta: int) -> np.ndarray:
    """``count`` samples of the centered binomial of parameter eta (variance eta/2) as int64.

    Each sample takes ``2·eta`` bits; eta must be a multiple of 4 (whole nibbles).
    """
    if eta % 4:
        raise ValueError("centered_binomial: eta must be a multiple of 4")
    nbytes = eta // 4  # eta bits = eta/8 bytes per half; two halves
    raw = stream[: count * nbytes].reshape(count, nbytes)
    if kernels.enabled():
        return kernels.centered_binomial(raw, eta)
    bits = np.bitwise_count(raw)  # uint8 per byte; column adds below beat a reduce over axis 1
    half = nbytes // 2
    if nbytes % 2:  # the middle byte is split into its two nibbles
        mid = raw[:, half]
        pos = np.bitwise_count(mid & 0x0F).astype(np.int16)
        neg = np.bitwise_count(mid >> 4).astype(np.int16)
        skip = 1
    else:
        pos = np.zeros(count, dtype=np.int16)
        neg = np.zeros(count, dtype=np.int16)
        skip = 0
    for j in range(half):
        pos += bits[:, j]
        neg += bits[:, half + skip + j]
    return (pos - neg).astype(np.int64)


def noise_stream(nbytes: int) -> np.ndarray:
    """Fresh secret randomness: AES-256-CTR keyed by 32 bytes of ``os.urandom``."""
    return aes_ctr(os.urandom(32), nbytes)


def sample_noise(params: ParamSet, shape: tuple[int, ...]) -> np.ndarray:
    """Centered-binomial noise of ``params.noise_eta``, shape ``shape``, int64."""
    count = int(np.prod(shape))
    nbytes = count * params.noise_eta // 4
    return centered_binomial(noise_stream(nbytes), count, params.noise_eta).reshape(shape)


#: Words drawn per row of ``a``: N plus slack for rejections (a prime just below 2^27 rejects
#: ~3e-4 of the words, so a row runs short with probability far below 2^-100).
_ROW_SLACK = 64


def owner_a_seed(layer_seed: bytes, owner: bytes) -> bytes:
    """The seed of the ``a`` one owner's requests of one layer and direction use: SHAKE-256 over the
    layer's seed (the manifest's, the server's contribution) and the owner's seed, domain-separated.
    Either party alone, choosing its seed after seeing the other's, still gets a fresh ``a``."""
    if len(layer_seed) != SEED_BYTES or len(owner) != SEED_BYTES:
        raise ValueError(f"owner_a_seed: two {SEED_BYTES}-byte seeds are required")
    return derive_key(b"helora/owner-a", layer_seed, owner)[:SEED_BYTES]


def expand_a(seed: bytes, params: ParamSet, rows: int, start: int = 0) -> np.ndarray:
    """Public uniform residues ``a`` for ciphertexts ``start … start+rows-1``: (rows, L, N) uint32.

    One AES-256-CTR stream per limb; row r owns the fixed keystream segment of
    ``N + _ROW_SLACK`` words at counter ``r·(N + _ROW_SLACK)/4``, so any range of rows is made
    alone (a shard regenerates only its rows) in one cipher call. Words are masked to the prime's
    bit length and rejected above it: exactly uniform mod p.
    """
    n = params.n
    out = np.empty((rows, params.limbs, n), dtype=np.uint32)
    for i, p in enumerate(params.primes):
        words = a_words(seed, params, i, rows, start) & np.uint32(a_mask(p))
        out[:, i] = words[:, :n]
        short = np.flatnonzero((words[:, :n] >= p).any(axis=1))  # rows with a rejection
        if short.size:
            valid = words[short] < p
            keep = valid & (np.cumsum(valid, axis=1) <= n)
            if not (keep.sum(axis=1) == n).all():  # pragma: no cover - probability < 2^-100
                raise RuntimeError("expand_a: a row ran out of keystream; widen _ROW_SLACK")
            out[short, i] = words[short][keep].reshape(short.size, n)
    return out


def a_mask(p: int) -> int:
    """The mask applied to each keystream word of ``a`` mod ``p`` before rejection."""
    return (1 << p.bit_length()) - 1


def a_words(seed: bytes, params: ParamSet, limb: int, rows: int, start: int = 0) -> np.ndarray:
    """The raw keystream words behind rows ``start … start+rows-1`` of ``a``'s limb ``limb``:
    (rows, N + _ROW_SLACK) uint32, before masking and rejection (``expand_a``)."""
    width = params.n + _ROW_SLACK
    key = derive_key(b"helora/a", seed, limb.to_bytes(2, "little"))
    return aes_ctr(key, rows * width * 4, start * width // 4).view("<u4").reshape(rows, width)

"""Every random draw of the scheme, from one seekable AES-256-CTR stream (DESIGN §2).

- ``aes_ctr``: the keystream of a 32-byte key from any counter block;
- ``derive_key``: domain-separated keys (SHAKE-256 over length-prefixed parts);
- the request secret's ternary coefficients (``ternary_from_stream``, rejection of 255);
- the noise: centered binomial of ``params.noise_eta`` (``sample_noise``: ``plane_binomial``'s
  layout up to eta = 32, ``centered_binomial``'s above) from a stream keyed by fresh
  ``os.urandom`` bytes (``noise_stream``);
- the public ``a``: ``expand_a`` (and its raw words ``a_words``, for the compiled client loops)
  from a seed that ``owner_a_seed`` derives from the manifest's and the owner's halves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    any segment is made alone; the 128-bit counter is big-endian), as uint8. The one stream every
    sampler here draws from.

    Through the system's OpenSSL (``libcrypto``) called by ``ctypes``, which lets go of the GIL:
    the client's threads draw their keystreams at once (``cryptography`` holds the GIL during a
    cipher update, so its calls run one at a time); ``cryptography``, which runs the same OpenSSL
    cipher, where no ``libcrypto`` is found. Both give the same bytes (``tests/hecommon``)."""
    if len(key) != 32:
        raise ValueError("aes_ctr: a 32-byte key is required")
    if not 0 <= block < 1 << 128:
        raise ValueError("aes_ctr: the counter block is a 128-bit unsigned integer")
    lib = _libcrypto()
    if lib is None:
        return _aes_ctr_cryptography(key, nbytes, block)
    return _aes_ctr_openssl(lib, key, nbytes, block)


def _aes_ctr_cryptography(key: bytes, nbytes: int, block: int) -> np.ndarray:
    enc = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    return np.frombuffer(enc.update(bytes(nbytes)), dtype=np.uint8)


#: Bytes of zeros that OpenSSL encrypts into the keystream, a piece at a time (read only).
_ZEROS = np.zeros(1 << 20, dtype=np.uint8)
_LIB: list[ctypes.CDLL | None] = []


def _libcrypto() -> ctypes.CDLL | None:
    """The system's libcrypto with the EVP calls typed, once; None where there is none (or
    ``HELORA_AES=cryptography`` asks for the fallback)."""
    if os.environ.get("HELORA_AES") == "cryptography":
        return None
    if not _LIB:
        lib = None
        name = ctypes.util.find_library("crypto")
        try:
            lib = ctypes.CDLL(name) if name else None
            if lib is not None:
                lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
                lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
                lib.EVP_aes_256_ctr.restype = ctypes.c_void_p
                lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                   ctypes.c_char_p, ctypes.c_char_p]
                lib.EVP_EncryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                                  ctypes.c_void_p, ctypes.c_int]
        except (OSError, AttributeError):  # pragma: no cover - depends on the machine's OpenSSL
            lib = None
        _LIB.append(lib)
    return _LIB[0]


def _aes_ctr_openssl(lib: ctypes.CDLL, key: bytes, nbytes: int, block: int) -> np.ndarray:
    out = np.empty(nbytes, dtype=np.uint8)
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:  # pragma: no cover - out of memory
        raise MemoryError("aes_ctr: OpenSSL could not make a cipher context")
    try:
        if lib.EVP_EncryptInit_ex(ctx, lib.EVP_aes_256_ctr(), None, key, block.to_bytes(16, "big")) != 1:
            raise RuntimeError("aes_ctr: OpenSSL refused the AES-256-CTR key")  # pragma: no cover
        written = ctypes.c_int()
        for lo in range(0, nbytes, _ZEROS.size):
            size = min(_ZEROS.size, nbytes - lo)
            ok = lib.EVP_EncryptUpdate(ctx, out.ctypes.data + lo, ctypes.byref(written), _ZEROS.ctypes.data, size)
            if ok != 1 or written.value != size:  # pragma: no cover - a stream cipher writes what it reads
                raise RuntimeError("aes_ctr: OpenSSL's AES-256-CTR failed")
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)
    return out


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


#: Largest eta of ``plane_binomial``: a sample's 2·eta bits fit one 64-bit word.
MAX_PLANE_ETA = 32


def plane_width(eta: int) -> np.dtype:
    """The word of ``plane_binomial``'s planes for ``eta``: 16 bits where they divide a sample's
    ``2·eta``, else bytes (eta is a multiple of 4)."""
    return np.dtype("<u2") if eta % 8 == 0 else np.dtype("u1")


def noise_planes(stream: np.ndarray, rows: int, n: int, eta: int) -> np.ndarray:
    """The first ``rows·n·eta/4`` bytes of ``stream`` (uint8) as ``plane_binomial``'s planes:
    (rows, 2·eta/w, n) w-bit words (``plane_width``), a view."""
    if eta % 4 or not 4 <= eta <= MAX_PLANE_ETA:
        raise ValueError(f"plane_binomial: eta must be a multiple of 4 in 4..{MAX_PLANE_ETA}")
    word = plane_width(eta)
    return np.asarray(stream)[: rows * n * eta // 4].view(word).reshape(rows, 2 * eta // (8 * word.itemsize), n)


def plane_binomial(stream: np.ndarray, rows: int, n: int, eta: int) -> np.ndarray:
    """``rows`` × ``n`` samples of the centered binomial of parameter eta (variance eta/2), int64,
    from ``rows·n·eta/4`` bytes of ``stream`` (uint8) in planes (the federated sum's noise,
    ``hecommon.he.fedsum``): each row's bytes are ``2·eta/w`` planes of ``n`` little-endian w-bit
    words (``plane_width``), sample c's ``2·eta`` bits are word c of every plane, plane p at bit
    ``p·w``, and it counts the set bits among its first eta less those among the next eta. The
    same distribution as ``centered_binomial`` (each sample has 2·eta bits of its own); the
    layout lets a compiled loop read the samples of a row side by side."""
    planes = noise_planes(stream, rows, n, eta)
    if kernels.enabled():
        out = np.empty((rows, n), dtype=np.int64)
        kernels.loops().plane_binomial(planes, eta, out)
        return out
    fields = np.zeros((rows, n), dtype=np.uint64)
    for p in range(planes.shape[1]):
        fields |= planes[:, p].astype(np.uint64) << np.uint64(8 * planes.itemsize * p)
    low = fields & np.uint64((1 << eta) - 1)
    return np.bitwise_count(low).astype(np.int64) - np.bitwise_count(fields >> np.uint64(eta)).astype(np.int64)


def noise_stream(nbytes: int) -> np.ndarray:
    """Fresh secret randomness: AES-256-CTR keyed by 32 bytes of ``os.urandom``."""
    return aes_ctr(os.urandom(32), nbytes)


def sample_noise(params: ParamSet, shape: tuple[int, ...]) -> np.ndarray:
    """Centered-binomial noise of ``params.noise_eta``, shape ``shape``, int64: through
    ``plane_binomial`` (rows of the last axis; the layout a compiled loop reads side by side) for
    eta up to 32, ``centered_binomial`` above. The same distribution either way."""
    count = int(np.prod(shape))
    eta = params.noise_eta
    stream = noise_stream(count * eta // 4)
    if eta <= MAX_PLANE_ETA and len(shape) and shape[-1]:
        return plane_binomial(stream, count // shape[-1], shape[-1], eta).reshape(shape)
    return centered_binomial(stream, count, eta).reshape(shape)


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

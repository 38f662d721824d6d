"""Secret keys and the randomness behind them (DESIGN §3, invariant 3).

- The master ``SecretKey`` is 32 bytes from the OS CSPRNG (``secrets.token_bytes``).
- Each encrypted batch uses a fresh ternary secret ``s_r``, derived from the master key and a
  random per-request nonce (SHAKE-256 → AES-256-CTR stream). The public ``a`` of a layer is
  fixed (see ``encrypt.py``), so a secret must never encrypt two batches against the same ``a``;
  a fresh ``s_r`` per request guarantees that.
- Noise comes from ``noise_stream``: AES-256-CTR keyed with 32 fresh bytes of ``os.urandom`` per
  batch (a CTR-DRBG seeded by the OS, ~10x faster here than reading ``os.urandom`` directly).

A ``SecretKey`` has no wire encoder and refuses pickling; it reaches a file only through
``save`` with an explicit path, written 0600.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import kernels
from .errors import ConfigError
from .params import ParamSet
from .ring import SmallSecretMultiplier

KEY_BYTES = 32
NONCE_BYTES = 16
_KEY_FILE_MAGIC = b"helora-secret-key-v1\n"


def aes_ctr_stream(key: bytes, nbytes: int) -> np.ndarray:
    """``nbytes`` of the AES-256-CTR keystream for ``key`` (counter from 0), as uint8."""
    if len(key) != 32:
        raise ValueError("aes_ctr_stream: a 32-byte key is required")
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
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
        raw = aes_ctr_stream(key, need)
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
    return aes_ctr_stream(os.urandom(32), nbytes)


def sample_noise(params: ParamSet, shape: tuple[int, ...]) -> np.ndarray:
    """Centered-binomial noise of ``params.noise_eta``, shape ``shape``, int64."""
    count = int(np.prod(shape))
    nbytes = count * params.noise_eta // 4
    return centered_binomial(noise_stream(nbytes), count, params.noise_eta).reshape(shape)


class RequestSecret:
    """The ternary secret ``s_r`` of one encrypted batch, with its FFT precomputed."""

    __slots__ = ("params", "s", "_mul")

    def __init__(self, params: ParamSet, s: np.ndarray) -> None:
        if s.shape != (params.n,) or np.abs(s).max(initial=0) > 1:
            raise ValueError("RequestSecret: a ternary polynomial of length N is required")
        self.params = params
        self.s = s.astype(np.int8)
        self._mul: SmallSecretMultiplier | None = None

    @property
    def multiplier(self) -> SmallSecretMultiplier:
        if self._mul is None:
            self._mul = SmallSecretMultiplier(self.s)
        return self._mul

    def __repr__(self) -> str:
        return f"RequestSecret(params={self.params.name}, <hidden>)"

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("secret material is not serializable")


class SecretKey:
    """The data owner's master secret. Never sent; saved only to an explicit 0600 file."""

    __slots__ = ("_master",)

    def __init__(self, master: bytes) -> None:
        if not isinstance(master, bytes) or len(master) != KEY_BYTES:
            raise ConfigError(f"SecretKey: exactly {KEY_BYTES} bytes are required")
        self._master = master

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def request_secret(self, params: ParamSet, nonce: bytes) -> RequestSecret:
        """The secret of the batch identified by ``nonce`` (fresh random per request)."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
        key = derive_key(b"helora/request-secret", self._master, params.name.encode(), nonce)
        return RequestSecret(params, ternary_from_stream(key, params.n))

    def fingerprint(self) -> str:
        """A public identifier of the key (a hash), safe to log and to put in checkpoints."""
        return derive_key(b"helora/key-fingerprint", self._master).hex()[:16]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to ``path`` with permissions 0600; refuses to overwrite."""
        p = Path(path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_KEY_FILE_MAGIC + self._master.hex().encode() + b"\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecretKey:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"key file {p} does not exist")
        if stat.S_IMODE(p.stat().st_mode) & 0o077:
            raise ConfigError(f"key file {p} is readable by others; chmod 600 it first")
        raw = p.read_bytes()
        if not raw.startswith(_KEY_FILE_MAGIC):
            raise ConfigError(f"{p} is not a helora key file")
        try:
            return cls(bytes.fromhex(raw[len(_KEY_FILE_MAGIC) :].strip().decode()))
        except ValueError:
            raise ConfigError(f"{p}: corrupt key file") from None

    def __repr__(self) -> str:
        return f"SecretKey(fingerprint={self.fingerprint()})"

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("secret material is not serializable")

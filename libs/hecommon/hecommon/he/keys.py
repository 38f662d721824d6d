"""Secret keys and the randomness behind them (DESIGN §3, invariant 3).

- The master ``SecretKey`` is 32 bytes from the OS CSPRNG (``secrets.token_bytes``).
- Each encrypted batch uses a fresh ternary secret ``s_r``, derived from the master key and a
  random per-request nonce (SHAKE-256 → AES-256-CTR stream). The public ``a`` of a layer is
  fixed (see ``encrypt.py``), so a secret must never encrypt two batches against the same ``a``;
  a fresh ``s_r`` per request guarantees that.
- Noise comes from ``sampling.noise_stream``: AES-256-CTR keyed with 32 fresh bytes of ``os.urandom`` per
  batch (a CTR-DRBG seeded by the OS, ~10x faster here than reading ``os.urandom`` directly).

A ``SecretKey`` has no wire encoder and refuses pickling; it reaches a file only through
``save`` with an explicit path, written 0600.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .params import ParamSet
from .ring import SmallSecretMultiplier
from .sampling import derive_key, ternary_from_stream

KEY_BYTES = 32
NONCE_BYTES = 16
_KEY_FILE_MAGIC = b"helora-secret-key-v1\n"


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

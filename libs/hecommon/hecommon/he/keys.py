"""Secret keys and the randomness behind them (DESIGN §3, invariant 3).

- The master ``SecretKey`` is 32 bytes from the OS CSPRNG (``secrets.token_bytes``).
- Each encrypted batch uses a fresh ternary secret ``s_r``, derived from the master key and a
  random per-request nonce (SHAKE-256 → AES-256-CTR stream). The public ``a`` of a layer is
  fixed (see ``encrypt.py``), so a secret must never encrypt two batches against the same ``a``;
  a fresh ``s_r`` per request guarantees that.
- An encrypted federated sum (``fedsum``) uses a sequence of independent ternary secrets instead
  (``RowSecrets``; ``fedsum`` gives each to a group of rows): secret j from its own segment of one
  stream keyed by the master key and the round, so every owner of a federation derives the same
  secrets, and any range of them alone.
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
from . import kernels
from .params import ParamSet
from .ring import SmallSecretMultiplier
from .sampling import aes_ctr, derive_key, ternary_from_stream

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


#: Keystream bytes behind one row's secret in ``RowSecrets``: N kept bytes plus slack for the
#: rejected ones (each byte is 255 with probability 1/256: about 9 a row, never 256).
_TERNARY_SLACK = 256


class RowSecrets:
    """Independent ternary secrets ``s_0, s_1, …`` of one encrypted federated sum
    (``hecommon.he.fedsum``, which gives each to a group of rows). Secret j takes its N
    coefficients from bytes ``j·W … (j+1)·W − 1``
    (``W = N + 256``, a whole number of AES blocks) of one AES-256-CTR stream: bytes of 255 are
    rejected, the rest taken mod 3, minus 1 (``sampling.ternary_from_stream``'s rule)."""

    __slots__ = ("params", "_key")

    def __init__(self, params: ParamSet, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("RowSecrets: a 32-byte stream key is required")
        self.params = params
        self._key = key

    def _raw(self, lo: int, hi: int) -> np.ndarray:
        width = self.params.n + _TERNARY_SLACK
        return aes_ctr(self._key, (hi - lo) * width, block=lo * width // 16).reshape(hi - lo, width)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Secrets ``lo … hi−1``: (count, N) int8 in {−1, 0, 1}."""
        raw = self._raw(lo, hi)
        kept = raw != 255
        if (kept.sum(axis=1) < self.params.n).any():  # pragma: no cover - probability below 2^-1000
            raise RuntimeError("RowSecrets: a row ran out of keystream; widen _TERNARY_SLACK")
        first = kept & (np.cumsum(kept, axis=1) <= self.params.n)  # each row's first N kept bytes
        return (raw[first].reshape(hi - lo, self.params.n) % 3).astype(np.int8) - 1

    def folded(self, lo: int, hi: int, twist: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Secrets ``lo … hi−1`` folded and twisted as ``ring.SmallSecretMultiplier`` transforms its
        inputs: (count, N/2) complex (into ``out`` when given), ready for the forward FFT."""
        n, half = self.params.n, self.params.n // 2
        if out is None:
            out = np.empty((hi - lo, half), dtype=np.complex128)
        if kernels.enabled():
            if not kernels.loops().fold_ternary(self._raw(lo, hi), n, twist, out):  # pragma: no cover
                raise RuntimeError("RowSecrets: a row ran out of keystream; widen _TERNARY_SLACK")
            return out
        s = self.rows(lo, hi).astype(np.float64)
        out[:] = (s[:, :half] + 1j * s[:, half:]) * twist
        return out

    def __repr__(self) -> str:
        return f"RowSecrets(params={self.params.name}, <hidden>)"

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

    def row_secrets(self, params: ParamSet, nonce: bytes) -> RowSecrets:
        """The secrets of the encrypted sum identified by ``nonce`` (a federated round's id)."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
        return RowSecrets(params, derive_key(b"helora/row-secrets", self._master, params.name.encode(), nonce))

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

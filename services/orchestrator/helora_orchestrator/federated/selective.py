"""Selective encryption of LoRA ``A`` columns with CKKS through TenSEAL (SHE-LoRA §4.2–4.3).

Key material: one shared CKKS context for all owners of a federation, made by one owner
(``helora federate keygen``) and handed to the others out of band. ``CkksKeys`` holds the
context WITH its secret key and never serializes it by default: ``public_bytes()`` is the
context without the secret key (``serialize(save_secret_key=False)``), the only thing the
server gets. ``save`` writes the full context to a 0600 file for the owners.

CKKS parameters (``hecommon.wire.federated``): N = 4096 (2048 slots), coefficient moduli 60 + 49 bits
(109 bits, the HomomorphicEncryption.org 128-bit bound for N = 4096), scale 2^40. The server only
ADDS ciphertexts (each owner multiplies its vectors by its own weight before encrypting), so one
data prime suffices: no rescaling, no relinearisation or Galois keys. Values keep 60 − 40 = 20
bits of integer headroom (|x| < 2^19); the measured error after decrypting a sum of three owners
is ~1e-8 absolute for values of order 1e-2 (tests assert 1e-6).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tenseal as ts
from hecommon.errors import ConfigError, DecryptionError
from hecommon.he.keys import KEY_BYTES, SecretKey
from hecommon.he.sampling import derive_key
from hecommon.wire.fedfields import (
    CKKS_COEFF_BITS,
    CKKS_POLY_DEGREE,
    CKKS_SCALE_BITS,
    CKKS_SLOTS,
    ciphertext_count,
    context_digest,
    swap_layout,
)


class CkksKeys:
    """The federation's shared CKKS context (secret key included); owners only."""

    def __init__(self, context: ts.Context):
        if not context.is_private():
            raise ConfigError("federated key: this context has no secret key (an owner needs the private one)")
        self._ctx = context
        self._public = context.serialize(save_public_key=True, save_secret_key=False,
                                          save_galois_keys=False, save_relin_keys=False)
        self._public_ctx = ts.context_from(self._public)
        self._sum_key: SecretKey | None = None

    @classmethod
    def generate(cls) -> CkksKeys:
        # SEAL samples the secret key and the noise from its own CSPRNG (Blake2-seeded from the OS)
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, CKKS_POLY_DEGREE, -1, list(CKKS_COEFF_BITS))
        ctx.global_scale = 2.0 ** CKKS_SCALE_BITS
        return cls(ctx)

    def save(self, path: str | Path) -> Path:
        """Write the full context (secret key included) to a new 0600 file."""
        p = Path(path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._ctx.serialize(save_public_key=True, save_secret_key=True,
                                        save_galois_keys=False, save_relin_keys=False))
        return p

    @classmethod
    def load(cls, path: str | Path) -> CkksKeys:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"federated key: no such file: {p}")
        if p.stat().st_mode & 0o077:
            raise ConfigError(f"federated key: {p} is readable by others; chmod 600 it")
        try:
            ctx = ts.context_from(p.read_bytes())
        except Exception:
            raise ConfigError(f"federated key: {p} is not a TenSEAL context") from None
        keys = cls(ctx)
        if ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() != CKKS_POLY_DEGREE:
            raise ConfigError(f"federated key: {p} does not use N = {CKKS_POLY_DEGREE}")
        return keys

    def public_bytes(self) -> bytes:
        """The context without its secret key: what the server may hold."""
        return self._public

    @property
    def digest(self) -> bytes:
        return context_digest(self._public)

    def secret_key_bytes(self) -> bytes:
        """The secret key's own serialization (SEAL's; written to a private temporary directory on
        the owner's machine and removed at once): the source of ``sum_key``, and what tests check
        never reaches the server."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sk")
            self._ctx.secret_key().data.save(path)
            return Path(path).read_bytes()

    def sum_key(self) -> SecretKey:
        """The RLWE master key of ``--scheme full`` (``encsum``): SHAKE-256 of the CKKS secret key's
        serialization, domain-separated, so the one key file from ``keygen`` carries both and the
        server, holding the public context only, holds neither."""
        if self._sum_key is None:
            self._sum_key = SecretKey(derive_key(b"helora/federated-sum-key", self.secret_key_bytes())[:KEY_BYTES])
        return self._sum_key

    def encrypt_flat(self, values: np.ndarray) -> tuple[bytes, ...]:
        """Encrypt a flat float vector as ``ceil(len/slots)`` ciphertexts, public key only."""
        values = np.asarray(values, dtype=np.float64).ravel()
        # every ciphertext holds a full CKKS_SLOTS vector (zero-padded): TenSEAL adds equal sizes only
        padded = np.zeros(ciphertext_count(len(values), 1) * CKKS_SLOTS)
        padded[:len(values)] = values
        return tuple(ts.ckks_vector(self._public_ctx, padded[i:i + CKKS_SLOTS].tolist()).serialize()
                     for i in range(0, len(padded), CKKS_SLOTS))

    def decrypt_flat(self, blobs: tuple[bytes, ...], count: int) -> np.ndarray:
        """The first ``count`` values of the concatenated plaintexts of ``blobs``."""
        out = []
        try:
            for b in blobs:
                out.append(np.asarray(ts.ckks_vector_from(self._ctx, b).decrypt(), dtype=np.float64))
        except Exception:
            raise DecryptionError("federated aggregate: a ciphertext does not decrypt under this key") from None
        flat = np.concatenate(out) if out else np.zeros(0)
        if len(flat) < count:
            raise DecryptionError("federated aggregate: fewer encrypted values than announced")
        return flat[:count]


def select_and_encrypt(keys: CkksKeys, a: np.ndarray, b_eff: np.ndarray, order: tuple[int, ...], k: int,
                       weight: int) -> tuple[np.ndarray, tuple[bytes, ...]]:
    """(``A`` swapped with its chosen columns zeroed, ciphertexts of ``weight·b_eff·a_j``).

    ``a`` (r, d_in), ``b_eff`` = ``s·B`` (d_out, r). The encrypted vectors are (k, d_out) in list
    order, flattened: vector ``t`` is ``weight · b_eff @ a[:, order[t]]`` (SHE-LoRA: Enc(B_i·a_ij)).
    """
    r, d_in = a.shape
    if not 0 <= k <= min(len(order), d_in):
        raise ConfigError(f"budget: {k} columns, but the plan lists {len(order)}")
    perm = swap_layout(d_in, order, k)
    swapped = np.ascontiguousarray(a[:, perm], dtype=np.float32)
    if k:
        swapped[:, d_in - k:] = 0.0
    cols = np.asarray(order[:k], dtype=np.int64)
    vectors = (weight * (b_eff.astype(np.float64) @ a[:, cols].astype(np.float64))).T  # (k, d_out)
    enc = keys.encrypt_flat(vectors.ravel()) if k else ()
    assert len(enc) == ciphertext_count(k, b_eff.shape[0])
    return swapped, enc

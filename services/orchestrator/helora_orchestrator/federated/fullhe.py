"""The full-HE baseline (SHE-LoRA's "HE" comparison): every owner encrypts its whole update.

Each owner sends ``Enc(w_i·s_i·B_i·A_i)`` for every layer (the (d_out, d_in) product flattened
row-major over ``ceil(d_out·d_in / slots)`` ciphertexts) and nothing in clear; the server adds
ciphertexts; owners decrypt and divide by ``Σ w_i``. SHE-LoRA with a budget of 1.0 must give the
same ``ΔW`` (tests), at a far higher cost than a small budget (``benchmarks/federated.py``).
"""

from __future__ import annotations

import time

import numpy as np
import tenseal as ts

from .selective import CkksKeys


def encrypt_full(keys: CkksKeys, delta: dict[str, np.ndarray], weight: int) -> tuple[dict[str, tuple[bytes, ...]], float]:
    """(layer → ciphertexts of ``weight·ΔW_i``, encryption seconds)."""
    t0 = time.perf_counter()
    out = {name: keys.encrypt_flat(weight * np.asarray(dw, dtype=np.float64).ravel()) for name, dw in delta.items()}
    return out, time.perf_counter() - t0


def sum_full(public_context: bytes, contributions: list[dict[str, tuple[bytes, ...]]]) -> dict[str, tuple[bytes, ...]]:
    """The server's side: ciphertext-wise sums per layer, under the public context only."""
    ctx = ts.context_from(public_context)
    if ctx.is_private():
        raise ValueError("full-HE baseline: the server must not hold a secret key")
    out = {}
    for name in contributions[0]:
        sums = [ts.ckks_vector_from(ctx, b) for b in contributions[0][name]]
        for c in contributions[1:]:
            for i, b in enumerate(c[name]):
                sums[i] += ts.ckks_vector_from(ctx, b)
        out[name] = tuple(s.serialize() for s in sums)
    return out


def decrypt_full(keys: CkksKeys, summed: dict[str, tuple[bytes, ...]], shapes: dict[str, tuple[int, int]],
                 total: int) -> dict[str, np.ndarray]:
    return {name: keys.decrypt_flat(summed[name], d_out * d_in).reshape(d_out, d_in) / total
            for name, (d_out, d_in) in shapes.items()}

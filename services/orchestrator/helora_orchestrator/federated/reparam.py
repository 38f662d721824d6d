"""The owner's side of the aggregate (SHE-LoRA §4.4): decrypt, reassemble ``ΔW``, back to its own rank.

``ΔW = (clear + Σ_t Dec(enc)_t placed at column order[t]) / Σ w_i``: FlexLoRA's sample-weighted
average of the owners' ``s_i·B_i·A_i``. Then the truncated SVD ``ΔW ≈ U_r S_r V_rᵀ`` gives the
owner's adapter at its own rank ``r`` and scaling ``s``: ``A = V_rᵀ`` (orthonormal rows), ``B = U_r·S_r/s``,
so that ``s·B·A`` is the best rank-``r`` approximation of ``ΔW`` (Eckart–Young; FlexLoRA §3). ``A``
keeps unit rows even where ``ΔW`` has fewer than ``r`` directions (round 1, small batches): like
LoRA's own ``B = 0`` start, those directions still train, which a symmetric split (``√S`` on both
factors) would freeze at zero.
"""

from __future__ import annotations

import numpy as np
from hecommon.errors import DecryptionError
from hecommon.wire.federated import LayerAggregate

from .selective import CkksKeys


def reconstruct(layer: LayerAggregate, total: int, keys: CkksKeys) -> np.ndarray:
    """The aggregated ``ΔW`` (d_out, d_in) float64 of one layer."""
    k = sum(1 for c in layer.counts if c > 0)
    dw = layer.clear.astype(np.float64)
    if k:
        enc = keys.decrypt_flat(layer.enc, k * layer.d_out).reshape(k, layer.d_out)  # (k, d_out), list order
        dw[:, list(layer.order[:k])] += enc.T
    if not np.isfinite(dw).all():
        raise DecryptionError("federated aggregate: the decrypted update is not finite")
    return dw / total


def svd_to_rank(dw: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, d_in), B (d_out, r)) with ``scaling · B @ A`` the best rank-``r`` approximation of ``dw``."""
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    q = min(r, len(s))
    a = np.zeros((r, dw.shape[1]))
    b = np.zeros((dw.shape[0], r))
    a[:q] = vt[:q]
    b[:, :q] = u[:, :q] * (s[:q] / scaling)[None, :]
    return a, b

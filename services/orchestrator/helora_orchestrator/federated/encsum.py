"""Every coordinate encrypted (``--scheme full``, the default): one owner's side of a round.

Each owner sends its whole update, FlexLoRA's ``w_i·ΔW_i`` for every LoRA layer (``ΔW_i = s_i·B_i·A_i``,
so ranks may differ) followed by its sample weight ``w_i`` and a 1 (summed: the owner count, which
tells a sum opened under another key), as exact fixed point (``2^frac_bits``),
encrypted with helora's RLWE under a secret the owners share (``hecommon.he.fedsum``). The
aggregator adds ciphertexts mod ``2^bits`` and answers the sum; each owner decrypts it, divides by
``Σ w_i`` (itself decrypted from the sum) and goes back to its own rank by SVD (``reparam``).
No negotiation, no clear part, no per-position counts: the server learns the owners' names and
number, the layers' shapes, and the public ``size``/``frac_bits``/``bits`` every owner uses.

Key: the RLWE master key is derived from the federation's shared CKKS key file
(``CkksKeys.sum_key``), so ``helora federate keygen`` still makes the one key the owners share and
the server never holds. The round's secrets are ``sum_key.row_secrets(params, rid)``: the same for
every owner of a round, fresh per round.

Fixed point: ``frac_bits`` is the largest ``f`` with ``update_range·2^f ≤ per_owner_max``
(``per_owner_max = ⌊max_message / size⌋``), where ``update_range`` bounds ``|w_i·ΔW_i|`` per
coordinate and ``size`` is the federation's number of owners; both are the federation's settings,
the same for every owner. An update past the range is refused with an error that names the layer,
never wrapped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping

import numpy as np
from hecommon import heap
from hecommon.errors import ConfigError, DecryptionError, ParameterMismatch
from hecommon.he.bits import PackedRows
from hecommon.he.fedsum import SumScheme, encode_fixed
from hecommon.he.params import DEFAULT
from hecommon.he.sampling import SEED_BYTES
from hecommon.wire.federated import SumAggregate, SumContribution, SumLayer, sum_values

from .schemes import DEFAULT_UPDATE_RANGE
from .selective import CkksKeys


def frac_bits(scheme: SumScheme, update_range: float) -> int:
    """The fixed-point bits every owner of a federation of ``scheme.owners`` uses for ``update_range``."""
    if not (isinstance(update_range, int | float) and math.isfinite(update_range) and update_range > 0):
        raise ConfigError(f"update_range: {update_range!r} must be a positive number")
    f = math.floor(math.log2(scheme.per_owner_max / update_range))
    if not 0 <= f <= scheme.params.msg_bits:
        raise ConfigError(f"update_range: {update_range:g} leaves {f} fractional bits for {scheme.owners} owners "
                          f"(0..{scheme.params.msg_bits} needed); choose a range in "
                          f"{scheme.per_owner_max / 2.0 ** scheme.params.msg_bits:.3g}..{scheme.per_owner_max:.3g}")
    return f


#: An update as the caller holds it: ``ΔW`` (d_out, d_in), or its factors ``(A (r, d_in), s·B (d_out, r))``.
Update = np.ndarray | tuple[np.ndarray, np.ndarray]


def _update_rows(name: str, update: Update, d_out: int, d_in: int) -> Callable[[int, int], np.ndarray]:
    """Rows ``lo … hi−1`` of ``ΔW`` as float64: a slice of ``ΔW``, or ``s·B[lo:hi] @ A`` (the
    whole ``ΔW`` is never formed)."""
    if isinstance(update, tuple):
        a, sb = (np.asarray(x, dtype=np.float64) for x in update)
        if a.ndim != 2 or sb.ndim != 2 or a.shape[1] != d_in or sb.shape != (d_out, a.shape[0]):
            raise ConfigError(f"{name}: factors of shapes {a.shape} and {sb.shape}, the layer is {(d_out, d_in)}")
        return lambda lo, hi: sb[lo:hi] @ a
    dw = np.asarray(update)
    if dw.shape != (d_out, d_in):
        raise ConfigError(f"{name}: update of shape {dw.shape}, the layer is {(d_out, d_in)}")
    return lambda lo, hi: dw[lo:hi].astype(np.float64)


class UpdateRows:
    """One owner's fixed-point update as ciphertext rows, formed on demand: row block ``r0 … r1−1``
    holds values ``r0·N … r1·N − 1`` of ``round(w·ΔW·2^f)`` of every layer, row-major in ``layers``
    order, then ``w``, then 1, then zeros to the last whole row. The encryption asks for a block at a
    time (``SumScheme.encrypt_rows``), so neither ``ΔW`` nor the encoded update is held whole."""

    def __init__(self, updates: Mapping[str, Update], weight: int, layers: tuple[SumLayer, ...], f: int,
                 scheme: SumScheme) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= scheme.per_owner_max:
            raise ConfigError(f"weight: {weight!r} must be a sample count in 1..{scheme.per_owner_max}")
        self.n, self.f, self.weight, self.limit = scheme.params.n, f, weight, scheme.per_owner_max
        self.scale = weight * 2.0**f
        self.values = sum_values(layers)
        self.rows = scheme.rows(self.values)
        self._parts, start = [], 0
        for lay in layers:
            self._parts.append((lay, start, _update_rows(lay.name, updates[lay.name], lay.d_out, lay.d_in)))
            start += lay.d_out * lay.d_in

    def __call__(self, r0: int, r1: int) -> np.ndarray:
        p0, p1 = r0 * self.n, r1 * self.n
        out = np.zeros(p1 - p0, dtype=np.int64)
        for lay, start, rows_of in self._parts:
            s, e = max(p0, start) - start, min(p1, start + lay.d_out * lay.d_in) - start  # within the layer
            if s >= e:
                continue
            lo, hi = s // lay.d_in, -(-e // lay.d_in)  # the rows of ΔW that hold them
            x = rows_of(lo, hi).reshape(-1)[s - lo * lay.d_in:e - lo * lay.d_in]
            if not encode_fixed(x, self.scale, self.limit, out[start + s - p0:start + e - p0]):
                y = x * self.scale
                if not np.isfinite(y).all():
                    raise ConfigError(f"{lay.name}: the update is not finite")
                raise ConfigError(f"{lay.name}: |samples × ΔW| reaches {np.abs(y).max() / 2.0**self.f:.4g}, past "
                                  f"the federation's update range {self.limit / 2.0**self.f:.4g}; raise "
                                  f"--update-range for every owner (the sum would wrap, so nothing was sent)")
        for pos, value in ((self.values - 2, self.weight), (self.values - 1, 1)):  # summed: Σ w, the owner count
            if p0 <= pos < p1:
                out[pos - p0] = value
        return out.reshape(r1 - r0, self.n)


def encode_update(updates: Mapping[str, Update], weight: int, layers: tuple[SumLayer, ...], f: int,
                  scheme: SumScheme) -> np.ndarray:
    """The whole of ``UpdateRows``, flat int64 (what the owners' sum decrypts to; tests)."""
    rows = UpdateRows(updates, weight, layers, f, scheme)
    return rows(0, rows.rows).reshape(-1)


def contribute(keys: CkksKeys, rid: bytes, owner: str, updates: Mapping[str, Update],
               shapes: Mapping[str, tuple[int, int]], weight: int, size: int,
               update_range: float = DEFAULT_UPDATE_RANGE) -> SumContribution:
    """One owner's ``SumContribution`` for round ``rid`` of a federation of ``size`` owners; ``updates``
    as ``encode_update`` takes them. The process keeps its freed memory for reuse from here on
    (``hecommon.heap``): a round's ciphertext rows and message are tens of MB of fresh pages
    otherwise (SmolLM2's first block: 44 against 32 ms on one thread, 50 against 29 ms on two,
    measured on the 2-core VM)."""
    heap.reuse_freed_memory()
    scheme = SumScheme(size, DEFAULT)
    f = frac_bits(scheme, update_range)
    layers = tuple(SumLayer(name, d_out, d_in) for name, (d_out, d_in) in shapes.items())
    source = UpdateRows(updates, weight, layers, f, scheme)
    seed = os.urandom(SEED_BYTES)  # fresh per owner and round: no two owners share an a
    packed = scheme.encrypt_rows(keys.sum_key().row_secrets(DEFAULT, rid), source.rows, source, seed)
    return SumContribution(rid, owner, keys.digest, DEFAULT.name, size, f, scheme.bits, key_id(keys), layers,
                           seed, packed.data)


def key_id(keys: CkksKeys) -> bytes:
    """The sum key's public fingerprint, as every contribution and aggregate carries it."""
    return bytes.fromhex(keys.sum_key().fingerprint())


def open_aggregate(keys: CkksKeys, agg: SumAggregate) -> tuple[dict[str, np.ndarray], int]:
    """(layer → the sample-weighted average ``ΔW`` (d_out, d_in) float64, total weight ``Σ w_i``)."""
    if agg.ctx != keys.digest:
        raise ParameterMismatch("aggregate: summed under another federation's key than this owner's")
    if agg.key != key_id(keys):
        raise ParameterMismatch("aggregate: its owners derived another sum key from the same key file (a "
                                "different TenSEAL/SEAL build serializes the secret key differently)")
    scheme = SumScheme(agg.size, DEFAULT)
    if agg.params != DEFAULT.name:
        raise ParameterMismatch(f"aggregate: parameter set {agg.params!r}, this owner uses {DEFAULT.name!r}")
    count = sum_values(agg.layers)
    total = PackedRows(agg.bits, DEFAULT.n, agg.b)
    m = scheme.decrypt(keys.sum_key().row_secrets(DEFAULT, agg.rid), total, list(agg.seeds), count)
    weight, owners = int(m[-2]), int(m[-1])
    if owners != len(agg.owners) or not owners <= weight <= owners * scheme.per_owner_max:
        raise DecryptionError(f"aggregate: it counts {owners} owners (total weight {weight}) where "
                              f"{len(agg.owners)} contributed: not a sum under this key")
    out, pos = {}, 0
    scale = weight * 2.0**agg.frac_bits
    for lay in agg.layers:
        size = lay.d_out * lay.d_in
        out[lay.name] = m[pos:pos + size].reshape(lay.d_out, lay.d_in) / scale
        pos += size
    return out, weight


def timed_contribute(*args, **kwargs) -> tuple[SumContribution, float]:
    """``contribute`` and its seconds (the round report's encryption time)."""
    t0 = time.perf_counter()
    c = contribute(*args, **kwargs)
    return c, time.perf_counter() - t0

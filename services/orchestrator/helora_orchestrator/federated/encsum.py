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
the server never holds. The round's secret is ``sum_key.request_secret(params, rid)``: the same for
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
from collections.abc import Mapping

import numpy as np
from hecommon.errors import ConfigError, DecryptionError, ParameterMismatch
from hecommon.he.bits import PackedRows
from hecommon.he.fedsum import SumScheme
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


def encode_update(delta: Mapping[str, np.ndarray], weight: int, layers: tuple[SumLayer, ...], f: int,
                  scheme: SumScheme) -> np.ndarray:
    """``round(w·ΔW·2^f)`` of every layer, row-major in ``layers`` order, then ``w``, then 1: int64,
    flat, zero-padded to whole ciphertext rows (``scheme.rows``) so that encryption takes it as it is."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= scheme.per_owner_max:
        raise ConfigError(f"weight: {weight!r} must be a sample count in 1..{scheme.per_owner_max}")
    values = sum_values(layers)
    out = np.zeros(scheme.rows(values) * scheme.params.n, dtype=np.int64)
    limit = scheme.per_owner_max
    scale = weight * 2.0**f
    buf = np.empty(max(lay.d_out * lay.d_in for lay in layers), dtype=np.float64)
    pos = 0
    for lay in layers:
        dw = np.asarray(delta[lay.name], dtype=np.float64)
        if dw.shape != (lay.d_out, lay.d_in):
            raise ConfigError(f"{lay.name}: update of shape {dw.shape}, the layer is {(lay.d_out, lay.d_in)}")
        x = buf[: dw.size]
        np.multiply(dw.reshape(-1), scale, out=x)
        hi, lo = float(x.max()), float(x.min())  # a NaN anywhere makes both NaN
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise ConfigError(f"{lay.name}: the update is not finite")
        worst = max(hi, -lo)
        if worst > limit:
            raise ConfigError(f"{lay.name}: |samples × ΔW| reaches {worst / 2.0**f:.4g}, past the federation's "
                              f"update range {limit / 2.0**f:.4g}; raise --update-range for every owner "
                              f"(the sum would wrap, so nothing was sent)")
        np.rint(x, out=x)
        out[pos:pos + x.size] = x
        pos += x.size
    out[pos] = weight
    out[pos + 1] = 1  # summed: the number of owners, which a sum opened under the right key must show
    return out


def contribute(keys: CkksKeys, rid: bytes, owner: str, delta: Mapping[str, np.ndarray],
               shapes: Mapping[str, tuple[int, int]], weight: int, size: int,
               update_range: float = DEFAULT_UPDATE_RANGE) -> SumContribution:
    """One owner's ``SumContribution`` for round ``rid`` of a federation of ``size`` owners."""
    scheme = SumScheme(size, DEFAULT)
    f = frac_bits(scheme, update_range)
    layers = tuple(SumLayer(name, d_out, d_in) for name, (d_out, d_in) in shapes.items())
    m = encode_update(delta, weight, layers, f, scheme)
    seed = os.urandom(SEED_BYTES)  # fresh per owner and round: no two owners share an a
    packed = scheme.encrypt(keys.sum_key().request_secret(DEFAULT, rid), m, seed)
    return SumContribution(rid, owner, keys.digest, DEFAULT.name, size, f, scheme.bits, key_id(keys), layers,
                           seed, bytes(packed.data))


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
    m = scheme.decrypt(keys.sum_key().request_secret(DEFAULT, agg.rid), total, list(agg.seeds), count)
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

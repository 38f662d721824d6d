"""The federated mode's constants, its public CKKS layout (shared by owners and aggregator) and
the field checks of its messages (``federated``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .codec import check_blob_range as _blob
from .codec import check_int_like as _int
from .codec import fail as _fail

#: 2: the encrypted sum's rows use one secret each and a power-of-two modulus (``fedsum``); a
#: version-1 contribution would decrypt to noise, so it is refused by version instead.
FEDWIRE_VERSION = 2
#: CKKS parameters of the shared context (see docs/federated.md): N = 4096, one 60-bit data
#: prime and a 49-bit special prime (109 bits: the 128-bit bound for N = 4096), scale 2^40.
CKKS_POLY_DEGREE = 4096
CKKS_COEFF_BITS = (60, 49)
CKKS_SCALE_BITS = 40
CKKS_SLOTS = CKKS_POLY_DEGREE // 2
DIGEST_BYTES = 32
MAX_OWNERS = 1024
MAX_OWNER_CHARS = 64
MAX_DIM = 1 << 16
MAX_LAYERS = 4096
#: one serialized CKKS ciphertext of this context is ~66 KB; anything far larger is not one
MAX_CIPHERTEXT_BYTES = 1 << 20
MAX_CONTEXT_BYTES = 8 << 20
MAX_SAMPLES = 1 << 40
MAX_CHUNKS = 1 << 12
#: the largest message reassembled from chunks (a whole adapter's contribution or aggregate)
MAX_JOINED_BYTES = 1 << 31
#: room for the chunk's map and small fields when ``split_bytes`` sizes its pieces
CHUNK_OVERHEAD = 1024


def context_digest(public_context: bytes) -> bytes:
    """SHA-256 of the serialized public context: names the round's key in every message."""
    return hashlib.sha256(public_context).digest()


def ciphertext_count(k: int, d_out: int) -> int:
    """Ciphertexts holding ``k`` encrypted vectors of ``d_out`` values (flat packing)."""
    return -(-k * d_out // CKKS_SLOTS)


def swap_layout(d_in: int, order: Sequence[int], k: int) -> np.ndarray:
    """Column permutation of an owner's ``A`` in a ``LayerContribution``: the clear columns in
    their order, then the ``k`` chosen columns right-aligned (position ``t`` of ``order`` at column
    ``d_in - 1 - t``). Public: owner and server both derive it from the plan and ``k``, here only,
    so their layouts cannot diverge (swapped ``= a[:, perm]``, original ``[:, perm] = swapped``)."""
    chosen = [int(j) for j in order[:k]]
    chosen_set = set(chosen)
    return np.array([j for j in range(d_in) if j not in chosen_set] + chosen[::-1], dtype=np.int64)


def global_order(tops: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """One ordered list from the owners' ranked top-k lists, the aggregator's plan of a layer: a Borda
    count (position ``p`` of a list of the longest length ``L`` scores ``L - p``), ties to the column
    more owners proposed, then to the lower index; as long as the longest list."""
    longest = max((len(t) for t in tops), default=0)
    score: dict[int, int] = {}
    votes: dict[int, int] = {}
    for top in tops:
        for p, j in enumerate(top):
            score[j] = score.get(j, 0) + longest - p
            votes[j] = votes.get(j, 0) + 1
    ranked = sorted(score, key=lambda j: (-score[j], -votes[j], j))
    return tuple(ranked[:longest])


def unswap(a_swapped: np.ndarray, order: Sequence[int], k: int) -> np.ndarray:
    """``A`` in its original column order from the swapped layout (``swap_layout``)."""
    out = np.empty_like(a_swapped)
    out[:, swap_layout(a_swapped.shape[1], order, k)] = a_swapped
    return out


# -- field checks of the federated messages (the generic ones: hecommon.wire.codec) ------------
def check_ints(where: str, value: Any, hi: int, max_len: int) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > max_len:
        _fail(where, f"a list of at most {max_len} integers is required")
    return tuple(_int(f"{where}[{i}]", v, 0, hi) for i, v in enumerate(value))


def check_matrix(where: str, value: Any, shape: tuple[int, int]) -> np.ndarray:
    """float32 ``shape`` from an array (construction) or raw little-endian bytes (decoding)."""
    if isinstance(value, bytes):
        if len(value) != 4 * shape[0] * shape[1]:
            _fail(where, f"{len(value)} bytes, expected {4 * shape[0] * shape[1]} for shape {shape}")
        value = np.frombuffer(value, dtype="<f4").reshape(shape).astype(np.float32)
    if not isinstance(value, np.ndarray) or value.shape != shape:
        _fail(where, f"a {shape} array is required")
    value = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(value).all():
        _fail(where, "non-finite values")
    return value


def check_ciphertexts(where: str, value: Any, count: int) -> tuple[bytes, ...]:
    if not isinstance(value, list | tuple) or len(value) != count:
        _fail(where, f"{count} ciphertexts expected, got "
                     f"{len(value) if isinstance(value, list | tuple) else type(value).__name__}")
    return tuple(_blob(f"{where}[{i}]", c, 1, MAX_CIPHERTEXT_BYTES) for i, c in enumerate(value))


def check_layers(where: str, layers: Any) -> None:
    if not isinstance(layers, tuple) or not 1 <= len(layers) <= MAX_LAYERS:
        _fail(where, f"a tuple of 1..{MAX_LAYERS} layers is required")
    names = [lay.name for lay in layers]
    if len(set(names)) != len(names):
        _fail(where, "duplicate layer name")


def check_dims(where: str, d_out: Any, d_in: Any) -> None:
    _int(f"{where}.d_out", d_out, 1, MAX_DIM)
    _int(f"{where}.d_in", d_in, 1, MAX_DIM)

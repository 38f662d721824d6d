"""Messages of the federated mode (SHE-LoRA, arXiv 2505.21051; DESIGN §5), same discipline as ``wire.py``.

Every message is one msgpack map of allow-listed types (int, str, bytes, list, map with str
keys; no floats, no ext types, never pickle) carrying ``v`` (``FEDWIRE_VERSION``), ``type``,
``rid`` (the 16-byte round id) and ``lib``. Arrays travel as raw little-endian float32 bytes
with their shapes; CKKS ciphertexts as TenSEAL's own serialized bytes (opaque here; the
aggregator deserializes them against the round's public context). Decoding checks the size
first, then the version, the type, the exact key set of every map, every type, range, length
and that every float is finite; it raises ``OversizedMessage``, ``UnsupportedVersion`` or
``MalformedMessage`` naming the field, never showing payload contents.

A round: one owner publishes the shared **public** context (``PublicContext``; never a secret
key: the aggregator checks); every owner sends a ``Proposal`` (its top-k column positions per
layer, no scores); the aggregator answers one ``RoundPlan`` (a global ordered list per layer);
every owner sends a ``Contribution``; the aggregator answers one ``Aggregate``. With every
coordinate encrypted (``--scheme full``) there is no negotiation: every owner sends one
``SumContribution`` and the aggregator answers one ``SumAggregate``.

CKKS layout (shared by both sides): an owner's encrypted vectors of one layer,
``w_i·s_i·B_i·a_ij`` for ``j`` = the first ``k_i`` positions of the global list, in list order,
are concatenated into one flat vector of ``k_i·d_out`` values and cut into ciphertexts of
``CKKS_SLOTS`` slots (the last one zero-padded). Position ``t`` of the list is right-aligned
column ``d_in - 1 - t`` of the owner's swapped ``A`` (SHE-LoRA §4.3), whatever its rank and budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..he import params as he_params
from ..he.bits import packed_size
from ..he.fedsum import sum_bits
from ..he.sampling import SEED_BYTES as SUM_SEED_BYTES
from .codec import check_blob_range as _blob
from .codec import check_int as _strict_int
from .codec import check_int_like as _int
from .codec import check_keys as _keys
from .codec import check_text as _text
from .codec import construct, message_class, pack, unpack
from .codec import expect as _expect
from .codec import fail as _fail
from .fedfields import (
    DIGEST_BYTES,
    FEDWIRE_VERSION,
    MAX_CHUNKS,
    MAX_CONTEXT_BYTES,
    MAX_DIM,
    MAX_JOINED_BYTES,
    MAX_OWNER_CHARS,
    MAX_OWNERS,
    MAX_SAMPLES,
    ciphertext_count,
    context_digest,
)
from .fedfields import check_ciphertexts as _cts
from .fedfields import check_dims as _dims
from .fedfields import check_ints as _ints
from .fedfields import check_layers as _check_layers
from .fedfields import check_matrix as _matrix
from .fields import LIB_VERSION, MAX_LIB_CHARS, MAX_MESSAGE_BYTES, MAX_NAME_CHARS, RID_BYTES

_HEADER = ("v", "type", "rid", "lib")
#: the sum key's public fingerprint (``SecretKey.fingerprint``: 16 hex characters, as bytes)
SUM_KEY_ID_BYTES = 8
# -- messages ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PublicContext:
    """The round's CKKS context, serialized WITHOUT its secret key (the aggregator checks)."""

    TYPE: ClassVar[str] = "fed-context"
    rid: bytes
    context: bytes
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _blob("context", self.context, 1, MAX_CONTEXT_BYTES)

    @property
    def digest(self) -> bytes:
        return context_digest(self.context)

    def _body(self) -> dict[str, Any]:
        return {"context": self.context}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> PublicContext:
        return cls(m["rid"], m["context"], m["lib"])


@dataclass(frozen=True)
class ProposalLayer:
    """One layer's top-k column positions, best first (scores never leave the owner)."""

    name: str
    d_out: int
    d_in: int
    top: tuple[int, ...]

    def __post_init__(self) -> None:
        _text("layer", self.name, MAX_NAME_CHARS)
        _dims(self.name, self.d_out, self.d_in)
        top = _ints(f"{self.name}.top", self.top, self.d_in - 1, self.d_in)
        if len(set(top)) != len(top):
            _fail(f"{self.name}.top", "duplicate column")
        object.__setattr__(self, "top", top)


@dataclass(frozen=True, eq=False)
class Proposal:
    TYPE: ClassVar[str] = "fed-proposal"
    rid: bytes
    owner: str
    ctx: bytes
    layers: tuple[ProposalLayer, ...]
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _text("owner", self.owner, MAX_OWNER_CHARS)
        _blob("ctx", self.ctx, DIGEST_BYTES, DIGEST_BYTES)
        _check_layers("layers", self.layers)

    def _body(self) -> dict[str, Any]:
        return {"owner": self.owner, "ctx": self.ctx,
                "layers": [{"name": x.name, "d_out": x.d_out, "d_in": x.d_in, "top": list(x.top)} for x in self.layers]}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> Proposal:
        layers = []
        for i, x in enumerate(_list("layers", m["layers"])):
            _keys(f"layers[{i}]", x, ("name", "d_out", "d_in", "top"))
            layers.append(ProposalLayer(x["name"], x["d_out"], x["d_in"], x["top"]))
        return cls(m["rid"], m["owner"], m["ctx"], tuple(layers), m["lib"])


@dataclass(frozen=True)
class PlanLayer:
    """The global ordered list of one layer: position ``t`` is the ``t``-th column to encrypt."""

    name: str
    d_out: int
    d_in: int
    order: tuple[int, ...]

    def __post_init__(self) -> None:
        ProposalLayer(self.name, self.d_out, self.d_in, self.order)  # same checks
        object.__setattr__(self, "order", tuple(int(j) for j in self.order))


@dataclass(frozen=True, eq=False)
class RoundPlan:
    TYPE: ClassVar[str] = "fed-plan"
    rid: bytes
    ctx: bytes
    layers: tuple[PlanLayer, ...]
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _blob("ctx", self.ctx, DIGEST_BYTES, DIGEST_BYTES)
        _check_layers("layers", self.layers)

    def layer(self, name: str) -> PlanLayer:
        for x in self.layers:
            if x.name == name:
                return x
        raise KeyError(name)

    def _body(self) -> dict[str, Any]:
        return {"ctx": self.ctx, "layers": [{"name": x.name, "d_out": x.d_out, "d_in": x.d_in, "order": list(x.order)}
                                            for x in self.layers]}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> RoundPlan:
        layers = []
        for i, x in enumerate(_list("layers", m["layers"])):
            _keys(f"layers[{i}]", x, ("name", "d_out", "d_in", "order"))
            layers.append(PlanLayer(x["name"], x["d_out"], x["d_in"], x["order"]))
        return cls(m["rid"], m["ctx"], tuple(layers), m["lib"])


@dataclass(frozen=True, eq=False)
class LayerContribution:
    """What the server receives of one layer: ``b`` = ``s_i·B_i`` (d_out, r); ``a`` = ``A_i`` with
    the ``k`` chosen columns swapped to the end (right-aligned) and zeroed (r, d_in); ``enc`` =
    the ciphertexts of ``w_i·s_i·B_i·a_ij`` (flat packing, see the module docstring)."""

    name: str
    d_out: int
    d_in: int
    r: int
    k: int
    b: np.ndarray
    a: np.ndarray
    enc: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _text("layer", self.name, MAX_NAME_CHARS)
        _dims(self.name, self.d_out, self.d_in)
        _int(f"{self.name}.r", self.r, 1, MAX_DIM)
        _int(f"{self.name}.k", self.k, 0, self.d_in)
        object.__setattr__(self, "b", _matrix(f"{self.name}.b", self.b, (self.d_out, self.r)))
        object.__setattr__(self, "a", _matrix(f"{self.name}.a", self.a, (self.r, self.d_in)))
        object.__setattr__(self, "enc", _cts(f"{self.name}.enc", self.enc, ciphertext_count(self.k, self.d_out)))

    def _body(self) -> dict[str, Any]:
        return {"name": self.name, "d_out": self.d_out, "d_in": self.d_in, "r": self.r, "k": self.k,
                "b": self.b.astype("<f4").tobytes(), "a": self.a.astype("<f4").tobytes(), "enc": list(self.enc)}


@dataclass(frozen=True, eq=False)
class Contribution:
    TYPE: ClassVar[str] = "fed-contribution"
    rid: bytes
    owner: str
    samples: int
    ctx: bytes
    layers: tuple[LayerContribution, ...]
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _text("owner", self.owner, MAX_OWNER_CHARS)
        _int("samples", self.samples, 1, MAX_SAMPLES)
        _blob("ctx", self.ctx, DIGEST_BYTES, DIGEST_BYTES)
        _check_layers("layers", self.layers)

    def _body(self) -> dict[str, Any]:
        return {"owner": self.owner, "samples": self.samples, "ctx": self.ctx,
                "layers": [x._body() for x in self.layers]}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> Contribution:
        layers = []
        for i, x in enumerate(_list("layers", m["layers"])):
            _keys(f"layers[{i}]", x, ("name", "d_out", "d_in", "r", "k", "b", "a", "enc"))
            layers.append(LayerContribution(x["name"], x["d_out"], x["d_in"], x["r"], x["k"], x["b"], x["a"],
                                            x["enc"]))
        return cls(m["rid"], m["owner"], m["samples"], m["ctx"], tuple(layers), m["lib"])


@dataclass(frozen=True, eq=False)
class LayerAggregate:
    """``clear`` = Σ_i w_i·s_i·B_i·A_i over the clear columns (d_out, d_in), original column order;
    ``enc`` = Σ_i of the owners' flat ciphertexts; ``counts[t]`` = Σ w_i over the owners that
    encrypted position ``t`` of ``order``. Owners decrypt, add and divide by the total weight."""

    name: str
    d_out: int
    d_in: int
    clear: np.ndarray
    order: tuple[int, ...]
    counts: tuple[int, ...]
    enc: tuple[bytes, ...]

    def __post_init__(self) -> None:
        PlanLayer(self.name, self.d_out, self.d_in, self.order)
        object.__setattr__(self, "order", tuple(int(j) for j in self.order))
        object.__setattr__(self, "clear", _matrix(f"{self.name}.clear", self.clear, (self.d_out, self.d_in)))
        counts = _ints(f"{self.name}.counts", self.counts, MAX_SAMPLES, self.d_in)
        if len(counts) != len(self.order):
            _fail(f"{self.name}.counts", f"{len(counts)} counts for {len(self.order)} positions")
        object.__setattr__(self, "counts", counts)
        k = sum(1 for c in counts if c > 0)
        object.__setattr__(self, "enc", _cts(f"{self.name}.enc", self.enc, ciphertext_count(k, self.d_out)))

    def _body(self) -> dict[str, Any]:
        return {"name": self.name, "d_out": self.d_out, "d_in": self.d_in, "clear": self.clear.astype("<f4").tobytes(),
                "order": list(self.order), "counts": list(self.counts), "enc": list(self.enc)}


@dataclass(frozen=True, eq=False)
class Aggregate:
    TYPE: ClassVar[str] = "fed-aggregate"
    rid: bytes
    ctx: bytes
    total: int
    owners: tuple[str, ...]
    layers: tuple[LayerAggregate, ...]
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _blob("ctx", self.ctx, DIGEST_BYTES, DIGEST_BYTES)
        _int("total", self.total, 1, MAX_SAMPLES * MAX_OWNERS)
        if not isinstance(self.owners, tuple) or not 1 <= len(self.owners) <= MAX_OWNERS:
            _fail("owners", f"a tuple of 1..{MAX_OWNERS} names is required")
        for o in self.owners:
            _text("owners[]", o, MAX_OWNER_CHARS)
        _check_layers("layers", self.layers)

    def layer(self, name: str) -> LayerAggregate:
        for x in self.layers:
            if x.name == name:
                return x
        raise KeyError(name)

    def _body(self) -> dict[str, Any]:
        return {"ctx": self.ctx, "total": self.total, "owners": list(self.owners),
                "layers": [x._body() for x in self.layers]}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> Aggregate:
        layers = []
        for i, x in enumerate(_list("layers", m["layers"])):
            _keys(f"layers[{i}]", x, ("name", "d_out", "d_in", "clear", "order", "counts", "enc"))
            layers.append(LayerAggregate(x["name"], x["d_out"], x["d_in"], x["clear"], x["order"], x["counts"],
                                         x["enc"]))
        owners = _list("owners", m["owners"])
        return cls(m["rid"], m["ctx"], m["total"], tuple(owners), tuple(layers), m["lib"])


# -- every coordinate encrypted (``--scheme full``; ``hecommon.he.fedsum``) ------------------
@dataclass(frozen=True)
class SumLayer:
    """One layer of an encrypted sum: its ``d_out·d_in`` values follow the previous layer's, row-major
    (``fedfields.sum_values``: every layer, then the owner's sample weight)."""

    name: str
    d_out: int
    d_in: int

    def __post_init__(self) -> None:
        _text("layer", self.name, MAX_NAME_CHARS)
        _dims(self.name, self.d_out, self.d_in)


def _sum_fields(where: str, params: str, size: int, frac_bits: int, bits: int, key: bytes, layers: Any,
                b: Any) -> None:
    """The checks a contribution and an aggregate share: a known parameter set, a federation size,
    the bits its sums need (``fedsum.sum_bits``), the sum key's public fingerprint, and ``b``
    exactly the packed rows of the layers. Integers must be ``int`` (msgpack also carries floats)."""
    _text(f"{where}.params", params, MAX_NAME_CHARS)
    if params not in he_params.REGISTRY:
        _fail(f"{where}.params", f"unknown parameter set (known: {sorted(he_params.REGISTRY)})")
    ps = he_params.REGISTRY[params]
    _strict_int(f"{where}.size", size, 1, MAX_OWNERS)
    _strict_int(f"{where}.frac_bits", frac_bits, 0, ps.msg_bits)
    _strict_int(f"{where}.bits", bits, 1, 64)
    _blob(f"{where}.key", key, SUM_KEY_ID_BYTES, SUM_KEY_ID_BYTES)
    if bits != sum_bits(ps, size):
        _fail(f"{where}.bits", f"{bits!r}, but sums of {size} owners under {params} take {sum_bits(ps, size)}")
    _check_layers(f"{where}.layers", layers)
    rows = -(-sum_values(layers) // ps.n)
    size = rows * packed_size(bits, ps.n)
    if isinstance(b, memoryview):  # an owner's own rows as encrypted (read-only bytes), sent without a copy
        if not (b.readonly and b.format == "B" and b.ndim == 1 and b.contiguous):
            _fail(f"{where}.b", "a read-only, contiguous byte view is required")
        if b.nbytes != size:
            _fail(f"{where}.b", f"{b.nbytes} bytes, expected {size}")
    else:
        _blob(f"{where}.b", b, size, size)


def sum_values(layers: Sequence[SumLayer]) -> int:
    """Values of one owner's encrypted update: every layer's ``d_out·d_in``, then its sample weight,
    then a 1 (summed, the number of owners: a sum opened under another key fails that check)."""
    return sum(x.d_out * x.d_in for x in layers) + 2


def _sum_layer_maps(layers: Sequence[SumLayer]) -> list[dict[str, Any]]:
    return [{"name": x.name, "d_out": x.d_out, "d_in": x.d_in} for x in layers]


def _sum_layers(where: str, value: Any) -> tuple[SumLayer, ...]:
    layers = []
    for i, x in enumerate(_list(where, value)):
        _keys(f"{where}[{i}]", x, ("name", "d_out", "d_in"))
        layers.append(SumLayer(x["name"], x["d_out"], x["d_in"]))
    return tuple(layers)


@dataclass(frozen=True, eq=False)
class SumContribution:
    """One owner's whole update, every coordinate encrypted (``fedsum``): ``b`` the packed switched
    rows at ``bits``, ``seed`` its public ``a``. In the clear only the owner's name, the federation's
    ``size`` and fixed-point ``frac_bits`` (the same for every owner), and the layers' shapes."""

    TYPE: ClassVar[str] = "fed-sum-contribution"
    rid: bytes
    owner: str
    ctx: bytes
    params: str
    size: int
    frac_bits: int
    bits: int
    key: bytes  # the sum key's public fingerprint: owners whose keys differ are refused, not summed
    layers: tuple[SumLayer, ...]
    seed: bytes
    b: bytes | memoryview  # decoded: bytes; built by its owner: the encryption's read-only view
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _text("owner", self.owner, MAX_OWNER_CHARS)
        _blob("ctx", self.ctx, DIGEST_BYTES, DIGEST_BYTES)
        _sum_fields("contribution", self.params, self.size, self.frac_bits, self.bits, self.key, self.layers,
                    self.b)
        _blob("seed", self.seed, SUM_SEED_BYTES, SUM_SEED_BYTES)

    def _body(self) -> dict[str, Any]:
        return {"owner": self.owner, "ctx": self.ctx, "params": self.params, "size": self.size,
                "frac_bits": self.frac_bits, "bits": self.bits, "key": self.key, "seed": self.seed, "b": self.b,
                "layers": _sum_layer_maps(self.layers)}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> SumContribution:
        return cls(m["rid"], m["owner"], m["ctx"], m["params"], m["size"], m["frac_bits"], m["bits"], m["key"],
                   _sum_layers("layers", m["layers"]), m["seed"], m["b"], m["lib"])


@dataclass(frozen=True, eq=False)
class SumAggregate:
    """The sum of the ``owners``' contributions mod ``2^bits`` and their ``seeds`` (in the same
    order), which every owner needs for ``Σ a_i``; nothing of any single owner."""

    TYPE: ClassVar[str] = "fed-sum-aggregate"
    rid: bytes
    ctx: bytes
    params: str
    size: int
    frac_bits: int
    bits: int
    key: bytes
    layers: tuple[SumLayer, ...]
    owners: tuple[str, ...]
    seeds: tuple[bytes, ...]
    b: bytes
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _blob("ctx", self.ctx, DIGEST_BYTES, DIGEST_BYTES)
        _sum_fields("aggregate", self.params, self.size, self.frac_bits, self.bits, self.key, self.layers, self.b)
        if not isinstance(self.owners, tuple) or not 1 <= len(self.owners) <= self.size:
            _fail("owners", f"a tuple of 1..{self.size} names is required")
        for o in self.owners:
            _text("owners[]", o, MAX_OWNER_CHARS)
        if not isinstance(self.seeds, tuple) or len(self.seeds) != len(self.owners):
            _fail("seeds", f"one seed per owner ({len(self.owners)}) is required")
        for s in self.seeds:
            _blob("seeds[]", s, SUM_SEED_BYTES, SUM_SEED_BYTES)
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.owners)) != len(self.owners):
            _fail("seeds", "a repeated owner or seed")

    def _body(self) -> dict[str, Any]:
        return {"ctx": self.ctx, "params": self.params, "size": self.size, "frac_bits": self.frac_bits,
                "bits": self.bits, "key": self.key, "owners": list(self.owners), "seeds": list(self.seeds), "b": self.b,
                "layers": _sum_layer_maps(self.layers)}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> SumAggregate:
        return cls(m["rid"], m["ctx"], m["params"], m["size"], m["frac_bits"], m["bits"], m["key"],
                   _sum_layers("layers", m["layers"]), tuple(_list("owners", m["owners"])),
                   tuple(_list("seeds", m["seeds"])), m["b"], m["lib"])


@dataclass(frozen=True, eq=False)
class Chunk:
    """Part ``part`` of ``parts`` of one encoded message larger than the broker's limit; ``rid``
    here is the message's own random id, ``total`` its length in bytes (``split_bytes``)."""

    TYPE: ClassVar[str] = "fed-chunk"
    rid: bytes
    part: int
    parts: int
    total: int
    data: bytes
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES, RID_BYTES)
        _int("parts", self.parts, 2, MAX_CHUNKS)
        _int("part", self.part, 0, self.parts - 1)
        _int("total", self.total, 1, MAX_JOINED_BYTES)
        _blob("data", self.data, 1, self.total)

    def _body(self) -> dict[str, Any]:
        return {"part": self.part, "parts": self.parts, "total": self.total, "data": self.data}

    @classmethod
    def _from(cls, m: dict[str, Any]) -> Chunk:
        return cls(m["rid"], m["part"], m["parts"], m["total"], m["data"], m["lib"])


Message = PublicContext | Proposal | RoundPlan | Contribution | Aggregate | SumContribution | SumAggregate | Chunk
_BODY_KEYS: dict[Any, tuple[str, ...]] = {
    Chunk: ("part", "parts", "total", "data"),
    PublicContext: ("context",),
    Proposal: ("owner", "ctx", "layers"),
    RoundPlan: ("ctx", "layers"),
    Contribution: ("owner", "samples", "ctx", "layers"),
    Aggregate: ("ctx", "total", "owners", "layers"),
    SumContribution: ("owner", "ctx", "params", "size", "frac_bits", "bits", "key", "layers", "seed", "b"),
    SumAggregate: ("ctx", "params", "size", "frac_bits", "bits", "key", "layers", "owners", "seeds", "b"),
}
_BY_TYPE: dict[str, Any] = {cls.TYPE: cls for cls in _BODY_KEYS}


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, "a list is required")
    return value


# -- encode / decode ---------------------------------------------------------------------
def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialize an allow-listed message; anything else (a TenSEAL context object…) raises ``TypeError``."""
    if type(msg) not in _BODY_KEYS:
        raise TypeError(f"{type(msg).__name__} has no federated wire encoder")
    head = {"v": FEDWIRE_VERSION, "type": msg.TYPE, "rid": msg.rid, "lib": msg.lib}
    return pack({**head, **msg._body()}, max_bytes, msg.TYPE)


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES, expect: Any = None) -> Message:
    """Parse and validate one federated message (of type ``expect`` when given)."""
    m = unpack(data, max_bytes, version=FEDWIRE_VERSION, protocol="federated wire", max_array_len=MAX_DIM,
               max_map_len=64)
    cls = message_class(m, _BY_TYPE, _BODY_KEYS, _HEADER, expect)
    _blob("rid", m["rid"], RID_BYTES, RID_BYTES)
    _text("lib", m["lib"], MAX_LIB_CHARS)
    return construct(cls, lambda: cls._from(m))


def encode_contribution(msg: Contribution, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(_expect(msg, Contribution), max_bytes)


def decode_contribution(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Contribution:
    return decode(data, max_bytes, Contribution)  # type: ignore[return-value]

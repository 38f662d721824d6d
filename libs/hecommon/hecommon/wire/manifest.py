"""The manifest (encoder → clients): the public description of the served model, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InexactLayer
from ..he.exact import exact_terms, sub_sums
from ..he.params import ParamSet
from ..he.sampling import SEED_BYTES
from .codec import check_blob as _blob
from .codec import check_int as _int
from .codec import check_keys as _keys
from .codec import check_text as _text
from .codec import fail as _fail
from .fields import (
    DIRECTIONS,
    LIB_VERSION,
    MAX_LAYERS,
    MAX_LIB_CHARS,
    MAX_META_CHARS,
    MAX_META_ENTRIES,
    MAX_NAME_CHARS,
    MAX_PARTS,
    MAX_ROWS,
    RID_BYTES,
    _array,
    _array_bytes,
)


@dataclass(frozen=True, eq=False)
class LayerEntry:
    """One server-side linear layer in the manifest; fused layers list their members."""

    name: str
    block: int
    d_in: int
    d_out: int
    members: tuple[tuple[str, int], ...]  # (member name, its output width), in output order
    a_seed_fwd: bytes
    a_seed_bwd: bytes
    weight_scale: np.ndarray  # (d_out,) float64, per output channel
    row_sums: np.ndarray  # (d_out,) int64: Σ_j q_w[o, j], for the zero-point correction
    col_sums: np.ndarray  # (d_in,) int64: Σ_o q_w[o, j], for the backward correction
    #: the widest exact sum (``exact.exact_terms`` of the manifest's bits and parameter set); wider
    #: sums (``d_in`` forward, ``d_out`` backward) are split into sub-sums (``sums``)
    exact_terms: int
    #: evaluators that share the layer's inputs (``shards.even_split`` of ``d_in``): the client sends
    #: each shard its requests directly (``hecommon.route``), the aggregator combines more than one
    shards: int = 1
    KEYS: ClassVar[frozenset[str]] = frozenset(
        ("name", "block", "d_in", "d_out", "members", "a_seed_fwd", "a_seed_bwd", "weight_scale",
         "row_sums", "col_sums", "exact_terms", "shards"))

    def __post_init__(self) -> None:
        _text("layer.name", self.name, MAX_NAME_CHARS)
        _int("layer.block", self.block, 0, MAX_LAYERS)
        _int("layer.d_in", self.d_in, 1, MAX_ROWS)
        _int("layer.d_out", self.d_out, 1, MAX_ROWS)
        if not isinstance(self.members, tuple) or not 1 <= len(self.members) <= 16:
            _fail("layer.members", "a tuple of 1..16 (name, width) pairs is required")
        for name, width in self.members:
            _text("layer.members.name", name, MAX_NAME_CHARS)
            _int("layer.members.width", width, 1, MAX_ROWS)
        if sum(w for _, w in self.members) != self.d_out:
            _fail("layer.members", "widths do not sum to d_out")
        _blob("layer.a_seed_fwd", self.a_seed_fwd, SEED_BYTES)
        _blob("layer.a_seed_bwd", self.a_seed_bwd, SEED_BYTES)
        for name, arr, dtype, size in (("weight_scale", self.weight_scale, np.float64, self.d_out),
                                       ("row_sums", self.row_sums, np.int64, self.d_out),
                                       ("col_sums", self.col_sums, np.int64, self.d_in)):
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (size,):
                _fail(f"layer.{name}", f"a ({size},) {np.dtype(dtype).name} array is required")
        if not np.isfinite(self.weight_scale).all() or (self.weight_scale < 0).any():
            _fail("layer.weight_scale", "finite non-negative scales are required")
        _int("layer.exact_terms", self.exact_terms, 1, MAX_ROWS)
        _int("layer.shards", self.shards, 1, min(self.d_in, MAX_PARTS))
        for direction in DIRECTIONS:
            self.sums(direction)  # InexactLayer, naming the layer, if it cannot be made exact

    def summed_width(self, direction: str) -> int:
        """Terms of each output's sum: the inputs forward, every fused output backward."""
        return self.d_in if direction == "fwd" else self.d_out

    def sums(self, direction: str) -> int:
        """Sub-sums each output of ``direction`` is returned in (1: one exact sum)."""
        return sub_sums(self.name, direction, self.summed_width(direction), self.exact_terms)

    def out_rows(self, direction: str) -> int:
        """Output ciphertexts of a request: each output once per sub-sum (``exact.spread``'s order)."""
        return (self.d_out if direction == "fwd" else self.d_in) * self.sums(direction)

    def _map(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "d_in": self.d_in, "d_out": self.d_out,
                "members": [[n, w] for n, w in self.members], "a_seed_fwd": self.a_seed_fwd,
                "a_seed_bwd": self.a_seed_bwd, "weight_scale": _array_bytes(self.weight_scale, "<f8"),
                "row_sums": _array_bytes(self.row_sums, "<i8"), "col_sums": _array_bytes(self.col_sums, "<i8"),
                "exact_terms": self.exact_terms, "shards": self.shards}

    @classmethod
    def _from(cls, m: Any) -> LayerEntry:
        _keys("layer", m, cls.KEYS)
        d_in = _int("layer.d_in", m["d_in"], 1, MAX_ROWS)
        d_out = _int("layer.d_out", m["d_out"], 1, MAX_ROWS)
        members = m["members"]
        if not isinstance(members, list) or not all(isinstance(p, list) and len(p) == 2 for p in members):
            _fail("layer.members", "a list of [name, width] pairs is required")
        return cls(m["name"], m["block"], d_in, d_out, tuple((n, w) for n, w in members), m["a_seed_fwd"],
                   m["a_seed_bwd"], _array("layer.weight_scale", m["weight_scale"], "<f8", d_out),
                   _array("layer.row_sums", m["row_sums"], "<i8", d_out),
                   _array("layer.col_sums", m["col_sums"], "<i8", d_in), m["exact_terms"], m["shards"])


@dataclass(frozen=True, eq=False)
class Manifest:
    """Encoder → clients: the public description of the served model (DESIGN §4)."""

    TYPE: ClassVar[str] = "manifest"
    rid: bytes
    model: str
    params: ParamSet
    layers: tuple[LayerEntry, ...]
    x_bits: int = 8
    w_bits: int = 8
    metadata: dict[str, str] = field(default_factory=dict)
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES)
        _text("model", self.model, MAX_META_CHARS)
        if not isinstance(self.params, ParamSet):
            _fail("params", "a ParamSet is required")
        if not isinstance(self.layers, tuple) or len(self.layers) > MAX_LAYERS:
            _fail("layers", f"a tuple of at most {MAX_LAYERS} LayerEntry is required")
        if not all(isinstance(e, LayerEntry) for e in self.layers):
            _fail("layers", "LayerEntry items are required")
        if len({e.name for e in self.layers}) != len(self.layers):
            _fail("layers", "layer names must be unique")
        _int("x_bits", self.x_bits, 1, 16)
        _int("w_bits", self.w_bits, 1, 16)
        terms = exact_terms(self.params, self.x_bits, self.w_bits)
        for e in self.layers:  # every receiver refuses, before anything is encrypted, a manifest that
            if e.exact_terms > terms:  # would decode wrongly (each layer's sub-sums: LayerEntry)
                raise InexactLayer(f"layer {e.name}: the manifest sums up to {e.exact_terms} terms at once, but "
                                   f"{self.x_bits}-bit inputs and {self.w_bits}-bit weights on {self.params.name} "
                                   f"decode exactly only up to {terms}")
        if not isinstance(self.metadata, dict) or len(self.metadata) > MAX_META_ENTRIES:
            _fail("metadata", f"a map of at most {MAX_META_ENTRIES} entries is required")
        for key, value in self.metadata.items():
            _text("metadata key", key, MAX_NAME_CHARS)
            _text(f"metadata[{key!r}]", value, MAX_META_CHARS, empty=True)
        _text("lib", self.lib, MAX_LIB_CHARS)

    def _body(self) -> dict[str, Any]:
        return {"model": self.model, "x_bits": self.x_bits, "w_bits": self.w_bits,
                "metadata": dict(self.metadata), "layers": [e._map() for e in self.layers]}

    @classmethod
    def _from(cls, m: dict[str, Any], params: ParamSet, max_bytes: int) -> Manifest:
        if not isinstance(m["layers"], list):
            _fail("layers", "a list is required")
        layers = tuple(LayerEntry._from(e) for e in m["layers"])
        return cls(m["rid"], m["model"], params, layers, m["x_bits"], m["w_bits"], m["metadata"], m["lib"])


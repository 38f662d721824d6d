"""The shard layout: what the encoder writes for the evaluators and they read (DESIGN §4).

The encoder quantizes the model once and writes, into one shard directory, the manifest
(``MANIFEST_FILE``, the wire encoding of ``wire.Manifest``) and, per layer and evaluator shard, the
int8 weight columns that shard holds (``shard_file``). Forward, a shard is a *row shard* of the
request (its inputs ``lo…hi``; the aggregator sums the partials); backward, a *column shard* (all
inputs, its outputs ``lo…hi``; the aggregator joins them). Model-free: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .he.quantize import QuantizedWeight
from .wire import LayerEntry, Manifest

#: The manifest's file in a shard directory.
MANIFEST_FILE = "manifest.bin"


def shard_file(shard_dir: str | Path, layer: str, index: int, count: int) -> Path:
    """The ``.npy`` file of shard ``index`` of ``count`` of ``layer``."""
    return Path(shard_dir) / f"{layer}.{index}of{count}.npy"


@dataclass(frozen=True)
class Shard:
    """What one evaluator holds of one layer: input columns ``[lo, hi)`` of the fused weight.

    Forward, the shard is a *row shard* of the request (its inputs ``lo…hi``; partials summed);
    backward, it is a *column shard* (all inputs, its outputs ``lo…hi``; partials joined).
    """

    layer: str
    lo: int
    hi: int
    values: np.ndarray  # (d_out, hi - lo) int8: W[:, lo:hi]
    a_seed_fwd: bytes
    a_seed_bwd: bytes
    terms: int  # the layer's widest exact sum (LayerEntry.exact_terms)
    sums_fwd: int  # sub-sums of the layer's forward outputs (LayerEntry.sums)
    sums_bwd: int

    @classmethod
    def of(cls, e: LayerEntry, lo: int, hi: int, values: np.ndarray) -> Shard:
        """Input columns ``[lo, hi)`` of the layer ``e`` of a manifest."""
        return cls(e.name, lo, hi, values, e.a_seed_fwd, e.a_seed_bwd, e.exact_terms, e.sums("fwd"), e.sums("bwd"))


def even_split(width: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``0…width``, sizes differing by at most one."""
    if not 1 <= parts <= width:
        raise ValueError(f"cannot split {width} columns into {parts} shards")
    cuts = np.linspace(0, width, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def make_shards(manifest: Manifest, qweights: dict[str, QuantizedWeight], plan: dict[str, int]) -> dict[str, list[Shard]]:
    """Cut each layer into ``plan.get(layer, 1)`` shards of input columns."""
    out: dict[str, list[Shard]] = {}
    for e in manifest.layers:
        w = qweights[e.name].values
        out[e.name] = [Shard.of(e, lo, hi, np.ascontiguousarray(w[:, lo:hi]))
                       for lo, hi in even_split(e.d_in, plan.get(e.name, 1))]
    return out

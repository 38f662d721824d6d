"""Evaluator configuration: CLI flags with environment defaults, validated (STYLE: config)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hecommon.broker import config as broker_config
from hecommon.broker import metrics, topology
from hecommon.errors import ConfigError

BACKENDS = ("auto", "numpy", "cupy")
GEMMS = ("auto", "int8", "float64")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"1/2"`` → (1, 2)."""
    index, sep, count = str(spec).partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise ConfigError(f"shard: {spec!r} is not I/N with 0 <= I < N, e.g. '0/1' or '1/2'")
    return int(index), int(count)


@dataclass(frozen=True)
class EvaluatorConfig(broker_config.ServiceConfig):
    prefetch: int = 1  # DESIGN §4: prefetch 1 on GPU consumers
    blocks: str = "0"  # e.g. "0-14" or "0-3,7"
    shard: str = "0/1"  # this evaluator's shard of every layer of its blocks
    shard_dir: str = "helora-shards"
    backend: str = "auto"
    #: the GPU product's GEMM (hecommon.he.evaluate.resolve_gemm): auto = int8 tensor cores when possible
    gemm: str = "auto"
    #: this evaluator's layer-group name, the ``group`` metric label; "" = ``blocks-{blocks}``
    group: str = ""
    #: how long to wait at start for the encoder to write the shards
    wait_shards_s: float = 600.0
    #: data owners whose hints are kept at once; the least recently served is dropped beyond that
    max_owners: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        topology.parse_blocks(self.blocks)
        parse_shard(self.shard)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of {BACKENDS}")
        if self.gemm not in GEMMS:
            raise ConfigError(f"gemm: {self.gemm!r} is not one of {GEMMS} (flag --gemm, env HELORA_GPU_GEMM)")
        if self.gemm == "int8" and self.backend == "numpy":
            raise ConfigError("gemm: 'int8' runs on a GPU only; use --backend cupy or auto")
        metrics.config_label("group", self.metrics_group)
        if not self.shard_dir:
            raise ConfigError("shard_dir: a directory is required")
        if not isinstance(self.max_owners, int) or not 1 <= self.max_owners <= 1024:
            raise ConfigError(f"max_owners: {self.max_owners!r} is not a count in 1..1024")
        if not self.wait_shards_s > 0:
            raise ConfigError(f"wait_shards_s: {self.wait_shards_s} must be positive")

    @property
    def block_list(self) -> tuple[int, ...]:
        return topology.parse_blocks(self.blocks)

    @property
    def metrics_group(self) -> str:
        """The ``group`` label: ``--group``, else derived from the block spec (``blocks-0-14``)."""
        return self.group or f"blocks-{topology.blocks_label(self.block_list)}"

    @property
    def shard_pair(self) -> tuple[int, int]:
        return parse_shard(self.shard)

    @property
    def queue_name(self) -> str:
        i, n = self.shard_pair
        return topology.Topology(self.namespace).evaluator_queue(topology.blocks_label(self.block_list), i, n)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] = os.environ) -> EvaluatorConfig:
        p = cls.parser("helora-evaluator", "helora evaluator service (DESIGN §4)", environ)
        p.add_argument("--blocks", default=environ.get("HELORA_BLOCKS", "0"),
                       help="decoder blocks whose layers this evaluator holds, e.g. 0-14 (env HELORA_BLOCKS)")
        p.add_argument("--shard", default=environ.get("HELORA_SHARD", "0/1"),
                       help="I/N: this evaluator's shard of those layers (env HELORA_SHARD)")
        p.add_argument("--group", default=environ.get("HELORA_GROUP", ""),
                       help="layer-group name for the metrics' group label, e.g. blocks-0-14 "
                            "(env HELORA_GROUP; default: blocks-<BLOCKS>)")
        p.add_argument("--shard-dir", default=environ.get("HELORA_SHARD_DIR", "helora-shards"))
        p.add_argument("--backend", default=environ.get("HELORA_BACKEND", "auto"), choices=BACKENDS)
        p.add_argument("--gemm", default=environ.get("HELORA_GPU_GEMM", "auto"),
                       help="GPU product: auto (int8 tensor cores where the shape allows), int8 or float64 "
                            "(env HELORA_GPU_GEMM)")
        p.add_argument("--wait-shards-s", type=float, default=float(environ.get("HELORA_WAIT_SHARDS_S", 600)))
        p.add_argument("--max-owners", type=int, default=int(environ.get("HELORA_MAX_OWNERS", 4)),
                       help="data owners whose hints (W·A of each owner's a) are kept at once; the least "
                            "recently served is dropped beyond that (env HELORA_MAX_OWNERS)")
        return cls.from_mapping(vars(p.parse_args(argv)))

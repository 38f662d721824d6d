"""Encoder configuration: CLI flags with environment defaults, validated (STYLE: config)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hecommon.broker import config as broker_config
from hecommon.broker import topology
from hecommon.errors import ConfigError
from hecommon.he import params as P

TINY = "tiny"


def parse_plan(spec: str) -> tuple[tuple[tuple[int, ...], int], ...]:
    """``"0-14:1,15-29:2"`` → ((blocks, shard count), …); empty: every layer whole."""
    plan = []
    for item in filter(None, re.split(r"[;\s]+", spec)):
        blocks, sep, count = item.rpartition(":")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"shards: {item!r} is not BLOCKS:COUNT, e.g. '0-14:2'")
        plan.append((topology.parse_blocks(blocks), int(count)))
    return tuple(plan)


@dataclass(frozen=True)
class EncoderConfig(broker_config.ServiceConfig):
    model: str | None = None  # a .gguf / HF directory, None for the bundled model, "tiny"
    seed: int = 0  # the tiny model's seed
    bits: int = 8
    param_set: str = P.DEFAULT.name
    shard_dir: str = "helora-shards"
    #: "BLOCKS:COUNT BLOCKS:COUNT…": how many evaluators share each block's layers (default 1)
    shards: str = ""
    model_id: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits: {self.bits} outside 2..8")
        P.get(self.param_set)  # ParameterMismatch names the known sets
        if not self.shard_dir:
            raise ConfigError("shard_dir: a directory is required")
        parse_plan(self.shards)

    @property
    def plan(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        return parse_plan(self.shards)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> EncoderConfig:
        p = cls.parser("helora-encoder", "helora encoder service (DESIGN §4)", environ)
        p.add_argument("--model", default=environ.get("HELORA_MODEL"),
                       help="base model (.gguf or HF dir; 'tiny' for tests; default: bundled SmolLM2)")
        p.add_argument("--seed", type=int, default=int(environ.get("HELORA_SEED", 0)))
        p.add_argument("--bits", type=int, default=int(environ.get("HELORA_BITS", 8)))
        p.add_argument("--param-set", default=environ.get("HELORA_PARAM_SET", P.DEFAULT.name))
        p.add_argument("--shard-dir", default=environ.get("HELORA_SHARD_DIR", "helora-shards"))
        p.add_argument("--shards", default=environ.get("HELORA_SHARDS", ""), metavar="PLAN",
                       help="e.g. '0-14:1 15-29:2': evaluators sharing each block's layers (env HELORA_SHARDS)")
        p.add_argument("--model-id", default=environ.get("HELORA_MODEL_ID", ""))
        return cls.from_mapping(vars(p.parse_args(argv)))

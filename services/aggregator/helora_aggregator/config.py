"""Aggregator configuration: CLI flags with environment defaults, validated (STYLE: config)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hecommon.broker import config as broker_config
from hecommon.errors import ConfigError


@dataclass(frozen=True)
class AggregatorConfig(broker_config.ServiceConfig):
    #: partials are held unacked until their request's reply is out: room for many requests
    prefetch: int = 256
    max_pending: int = 4096
    #: an incomplete multi-part partial is dropped (dead-lettered) after this long
    part_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ConfigError(f"max_pending: {self.max_pending} must be a positive integer")
        if not self.part_timeout_s > 0:
            raise ConfigError(f"part_timeout_s: {self.part_timeout_s} must be positive")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] = os.environ) -> AggregatorConfig:
        p = cls.parser("helora-aggregator", "helora aggregator service (DESIGN §4)", environ)
        p.add_argument("--max-pending", type=int, default=int(environ.get("HELORA_MAX_PENDING", 4096)))
        p.add_argument("--part-timeout-s", type=float, default=float(environ.get("HELORA_PART_TIMEOUT_S", 60)))
        return cls.from_mapping(vars(p.parse_args(argv)))

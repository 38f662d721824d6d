"""What every service's configuration shares: the broker flags (``--broker``, ``--namespace``,
``--max-message-bytes``, ``--prefetch``, ``--log-level``, each with its ``HELORA_*`` environment
variable), the metrics endpoint's flags, their checks, and the base class ``ServiceConfig``."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..wire import MAX_MESSAGE_BYTES
from . import metrics
from .topology import DEFAULT_NAMESPACE, DEFAULT_URL, MAX_BROKER_MESSAGE_BYTES, MIN_MESSAGE_BYTES, Topology


def env_default(environ: Mapping[str, str], name: str, default: Any) -> Any:
    return environ.get(name, default)


def add_broker_flags(p: argparse.ArgumentParser, environ: Mapping[str, str], prefetch: int) -> None:
    p.add_argument("--broker", dest="broker_url", default=env_default(environ, "HELORA_BROKER_URL", DEFAULT_URL),
                   metavar="URL", help="RabbitMQ URL (env HELORA_BROKER_URL)")
    p.add_argument("--namespace", default=env_default(environ, "HELORA_NAMESPACE", DEFAULT_NAMESPACE),
                   help="prefix of every exchange and queue (env HELORA_NAMESPACE)")
    p.add_argument("--max-message-bytes", type=int,
                   default=int(env_default(environ, "HELORA_MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES)),
                   help="the broker's max_message_size; payloads are split below it (env HELORA_MAX_MESSAGE_BYTES)")
    p.add_argument("--prefetch", type=int, default=int(env_default(environ, "HELORA_PREFETCH", prefetch)),
                   help="unacknowledged deliveries held at once (env HELORA_PREFETCH)")
    p.add_argument("--log-level", default=env_default(environ, "HELORA_LOG_LEVEL", "INFO"))


def check_broker_fields(cfg: Any) -> None:
    """Validate the fields ``add_broker_flags`` fills; raise ``ConfigError`` naming the field."""
    if not isinstance(cfg.broker_url, str) or not cfg.broker_url.startswith(("amqp://", "amqps://")):
        raise ConfigError("broker_url: an amqp:// or amqps:// URL is required")
    Topology(cfg.namespace)
    if not isinstance(cfg.max_message_bytes, int) or not (
            MIN_MESSAGE_BYTES <= cfg.max_message_bytes <= MAX_BROKER_MESSAGE_BYTES):
        raise ConfigError(f"max_message_bytes: {cfg.max_message_bytes} outside "
                          f"{MIN_MESSAGE_BYTES}..{MAX_BROKER_MESSAGE_BYTES}")
    if not isinstance(cfg.prefetch, int) or not 1 <= cfg.prefetch <= 65535:
        raise ConfigError(f"prefetch: {cfg.prefetch} outside 1..65535")
    if str(cfg.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: {cfg.log_level!r} is not DEBUG, INFO, WARNING or ERROR")


def config_from_mapping(cls: type, values: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a mapping; unknown keys are refused by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values) - known)
    if extra:
        raise ConfigError(f"unknown config key(s) {extra}; known: {sorted(known)}")
    return cls(**values)


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """The fields every service's configuration starts with (the broker and the metrics endpoint),
    checked on construction. A service's configuration subclasses it: its own fields (with
    defaults; ``prefetch`` may take another default), its checks in ``__post_init__`` after
    ``super().__post_init__()``, and its flags added to ``parser()``."""

    broker_url: str = DEFAULT_URL
    namespace: str = DEFAULT_NAMESPACE
    max_message_bytes: int = MAX_MESSAGE_BYTES
    prefetch: int = 64
    log_level: str = "INFO"
    metrics_port: int = metrics.DEFAULT_PORT  # 0: any free port (logged)
    metrics_host: str = metrics.DEFAULT_HOST

    def __post_init__(self) -> None:
        check_broker_fields(self)
        metrics.check_metrics_fields(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Any:
        """The configuration from a mapping of its fields; unknown keys are refused by name."""
        return config_from_mapping(cls, values)

    @classmethod
    def parser(cls, prog: str, description: str, environ: Mapping[str, str]) -> argparse.ArgumentParser:
        """A parser with the broker and metrics flags (``--prefetch`` defaults to the class's own)."""
        prefetch = cls.__dataclass_fields__["prefetch"].default
        if not isinstance(prefetch, int):
            raise TypeError(f"{cls.__name__}.prefetch: an int default is required")
        p = argparse.ArgumentParser(prog=prog, description=description)
        add_broker_flags(p, environ, prefetch=prefetch)
        metrics.add_metrics_flags(p, environ)
        return p

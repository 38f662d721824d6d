"""The names of one helora deployment on RabbitMQ (DESIGN §4), which every service declares.

Topology (``ns`` = the namespace, ``helora`` by default; tests use a unique one per session):

- ``{ns}.manifest`` (queue): manifest RPC, answered by the encoder(s).
- ``{ns}.requests`` (direct exchange): clients → evaluators, directly (``hecommon.route``).
  Routing key ``{layer}.s{i}of{n}`` (``3.qkv.s0of2``): shard ``i`` of ``n`` of one layer group,
  both directions, ``n`` from the manifest. Each evaluator binds its queue
  ``{ns}.evaluator.b{blocks}.s{i}of{n}`` to the keys of the layers it holds; replicas of one
  evaluator share that queue (competing consumers: every message is a whole unit of work).
  The manifest and the evaluators must agree on ``n`` per layer: a mismatch is unroutable, and
  the ``mandatory`` flag turns it into a clear error instead of a silent drop.
- ``{ns}.partials`` (queue): evaluators of sharded layers → aggregator.
- Replies go to the client's exclusive ``reply_to`` queue through the default exchange, with
  ``correlation_id`` = the request id in hex, forwarded unchanged by every hop.
- ``{ns}.dlx`` (fanout exchange) → ``{ns}.dead`` (queue). Service queues are declared with
  ``x-dead-letter-exchange`` = ``{ns}.dlx`` as a fallback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_NAMESPACE = "helora"
REASON_HEADER = "x-helora-reason"
MESSAGE_HEADER = "x-helora-message"
QUEUE_HEADER = "x-helora-queue"
DROPPED_HEADER = "x-helora-dropped-bytes"
_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: broker-side floor: a message must at least hold one ciphertext row and the headers
MIN_MESSAGE_BYTES = 64 * 1024
#: RabbitMQ's hard maximum for ``max_message_size`` (512 MiB)
MAX_BROKER_MESSAGE_BYTES = 512 * 1024 * 1024


# -- topology ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """Names of every exchange and queue of one helora deployment (see the module docstring)."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not _NAMESPACE_RE.match(self.namespace):
            raise ConfigError(f"namespace: {self.namespace!r} must match {_NAMESPACE_RE.pattern}")

    @property
    def requests(self) -> str:
        return f"{self.namespace}.requests"

    @property
    def dlx(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def manifest(self) -> str:
        return f"{self.namespace}.manifest"

    @property
    def partials(self) -> str:
        return f"{self.namespace}.partials"

    @property
    def federated(self) -> str:
        """The federated aggregator's queue (``helora_aggregator.fedworker``)."""
        return f"{self.namespace}.federated"

    def evaluator_queue(self, blocks: str, shard: int, shards: int) -> str:
        return f"{self.namespace}.evaluator.b{blocks}.s{shard}of{shards}"

    @staticmethod
    def routing_key(layer: str, shard: int, shards: int) -> str:
        return f"{layer}.s{shard}of{shards}"

    def declare_common(self, ch) -> None:
        """Exchanges and the dead-letter queue; idempotent (same arguments every time)."""
        ch.exchange_declare(self.requests, exchange_type="direct", durable=True)
        ch.exchange_declare(self.dlx, exchange_type="fanout", durable=True)
        ch.queue_declare(self.dead, durable=True)
        ch.queue_bind(self.dead, self.dlx)

    def declare_queue(self, ch, name: str) -> None:
        """A durable service queue whose rejected messages go to the dead-letter exchange."""
        ch.queue_declare(name, durable=True, arguments={"x-dead-letter-exchange": self.dlx})

    def delete(self, ch, queues: Iterable[str] = ()) -> None:
        """Remove this namespace's exchanges and the named queues (tests' teardown)."""
        for q in (self.manifest, self.partials, self.dead, *queues):
            ch.queue_delete(q)
        for ex in (self.requests, self.dlx):
            ch.exchange_delete(ex)


def parse_blocks(spec: str) -> tuple[int, ...]:
    """``"0-14"``, ``"3"``, ``"0-3,7"`` → sorted block indices."""
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi or lo)
            if a < 0 or b < a:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise ConfigError(f"blocks: {spec!r} is not a list of ranges such as '0-14' or '0-3,7'") from None
    return tuple(sorted(out))


def blocks_label(blocks: Iterable[int]) -> str:
    """Compact text of a block set for queue names: ``(0,1,2,5)`` → ``0-2_5``."""
    runs: list[str] = []
    items = sorted(blocks)
    start = prev = items[0]
    for b in items[1:] + [None]:  # type: ignore[list-item]
        if b is not None and b == prev + 1:
            prev = b
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return "_".join(runs)

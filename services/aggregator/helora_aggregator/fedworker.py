"""The aggregator's federated rounds over RabbitMQ (SHE-LoRA; DESIGN §5), on the shared ``amqp.Service`` shell.

``python -m helora_aggregator.fedworker --context KEY.pub --owners N`` consumes
``{ns}.federated``. Owners (``helora federate round``) publish ``fedwire`` messages there with
``reply_to`` and ``correlation_id``:

With every coordinate encrypted (``--scheme full``, the owners' default) a round is one message
per owner: a ``SumContribution``, checked on arrival (``FederatedAggregator.check_sum``) and held
unacked; once ``N`` owners have sent theirs (or after the timeout) the worker answers each with
the ``SumAggregate`` and only then acks them. A worker killed mid-round leaves them unacked, so
the broker hands them to its successor, which sums the same round again: nothing is lost.

SHE-LoRA (``--scheme selective``):

1. a ``Proposal`` per owner and round; once ``N`` owners have proposed (or ``--round-timeout-s``
   after the first, with those that did), the worker answers every proposer with the
   ``RoundPlan``;
0. optionally a ``PublicContext`` handshake: the worker answers with its own public context if
   the owner's is the same, and refuses a context that carries a secret key without storing it
   anywhere (no dead letter);
2. a ``Contribution`` per planned owner; each is checked on arrival (``FederatedAggregator.check``:
   round, context, layers, shapes, zeroed columns, ciphertexts): a bad one is dead-lettered and
   its sender gets an error reply; once every planned owner has answered (or after the timeout),
   the worker answers every accepted owner with the ``Aggregate``.

Messages above ``--max-message-bytes`` travel as ``fedwire.Chunk``s (both ways), joined here
up to ``--max-contribution-bytes`` per message (``--max-joined-bytes`` in all); an incomplete
one is dead-lettered after the round timeout. Every chunk of a round's messages stays unacked
until the round's answer is out, so ``--prefetch`` must be at least
``owners × (1 + ceil(max_contribution_bytes / (max_message_bytes − CHUNK_OVERHEAD)))``
(``round_deliveries``; checked at start).
The round id is derived by the owners from the context digest and the round number, so they
agree on it without talking to each other. The worker holds only the PUBLIC context (refused at
start if it carries a secret key). Proposals stay unacked until the plan is out, contributions
until the aggregate is out. A selective round's plan lives in this process: if it dies after
planning, the redelivered contributions find no plan and are refused, and the owners run the
round again (not replayed automatically).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions as pex
from hecommon import wire
from hecommon.broker import amqp, metrics, process, topology
from hecommon.broker import config as broker_config
from hecommon.errors import ConfigError, HeloraError, MalformedMessage, ParameterMismatch
from hecommon.wire import fedchunks, fedfields
from hecommon.wire import federated as fedwire
from hecommon.wire.federated import Contribution, Proposal, SumContribution

from .federated import FederatedAggregator, check_public_context, sum_contributions

log = logging.getLogger("helora.aggregator.federated")


@dataclass(frozen=True)
class FederatedConfig(broker_config.ServiceConfig):
    context: str = ""
    owners: int = 0
    prefetch: int = 64  # every message of a round is held until the round's answer is out
    round_timeout_s: float = 600.0
    #: --scheme full: the fewest owners a sum may hold; a round that times out with fewer is
    #: refused (in a sum of two, each owner learns the other's update)
    min_owners: int = 1
    #: the largest message joined from chunks (a whole contribution or aggregate)
    max_joined_bytes: int = 1 << 30
    #: the largest message an owner may send (a contribution; SmolLM2 q/v: about 20 MiB); it
    #: sizes the prefetch check, and a larger one is refused on its first chunk
    max_contribution_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.owners, int) or not 1 <= self.owners <= fedfields.MAX_OWNERS:
            raise ConfigError(f"owners: {self.owners!r} must be in 1..{fedfields.MAX_OWNERS}")
        if not isinstance(self.max_contribution_bytes, int) or not (
                1 <= self.max_contribution_bytes <= fedfields.MAX_JOINED_BYTES):
            raise ConfigError(f"max_contribution_bytes: {self.max_contribution_bytes} outside "
                              f"1..{fedfields.MAX_JOINED_BYTES}")
        need = round_deliveries(self.owners, self.max_contribution_bytes, self.max_message_bytes)
        if self.prefetch < need:
            raise ConfigError(f"prefetch: {self.prefetch} cannot hold a round of {self.owners} owners: each holds "
                              f"a proposal and up to {need // self.owners - 1} chunks of a contribution of "
                              f"max_contribution_bytes {self.max_contribution_bytes} unacked; {need} needed")
        if not Path(self.context).is_file():
            raise ConfigError(f"context: no such file: {self.context!r} (the public context from keygen)")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"round_timeout_s: {self.round_timeout_s} must be positive")
        if isinstance(self.min_owners, bool) or not isinstance(self.min_owners, int) or not (
                1 <= self.min_owners <= self.owners):
            raise ConfigError(f"min_owners: {self.min_owners!r} must be in 1..owners ({self.owners})")
        if not isinstance(self.max_joined_bytes, int) or not (
                self.max_message_bytes <= self.max_joined_bytes <= fedfields.MAX_JOINED_BYTES):
            raise ConfigError(f"max_joined_bytes: {self.max_joined_bytes} outside "
                              f"{self.max_message_bytes}..{fedfields.MAX_JOINED_BYTES}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> FederatedConfig:
        p = cls.parser("helora-federated", "helora federated aggregator (DESIGN §5)", environ)
        p.add_argument("--context", required=True, metavar="KEY.pub", help="the federation's public CKKS context")
        p.add_argument("--owners", type=int, required=True, help="owners expected per round")
        p.add_argument("--max-joined-bytes", type=int, default=1 << 30,
                       help="largest message reassembled from chunks (a whole contribution or aggregate)")
        p.add_argument("--max-contribution-bytes", type=int, default=64 << 20,
                       help="largest message an owner may send (a contribution); sizes the --prefetch check")
        p.add_argument("--min-owners", type=int, default=1,
                       help="scheme full: refuse a round that times out with fewer owners (3 keeps any owner "
                            "from learning another's update from a sum of two)")
        p.add_argument("--round-timeout-s", type=float, default=600.0,
                       help="after this long, a round goes on with the owners that answered")
        return cls.from_mapping(vars(p.parse_args(argv)))


def round_deliveries(owners: int, max_contribution_bytes: int, max_message_bytes: int) -> int:
    """The most deliveries one round holds unacked: per owner a proposal and every chunk of its
    contribution (``ceil(max_contribution_bytes / chunk piece)``; 1 when it fits in one message)."""
    if max_contribution_bytes <= max_message_bytes:
        return 2 * owners
    piece = max_message_bytes - fedfields.CHUNK_OVERHEAD
    return owners * (1 + -(-max_contribution_bytes // piece))


Deliveries = list[amqp.Delivery]  # one message: a single delivery, or every chunk of it


@dataclass
class _Round:
    started: float = field(default_factory=time.monotonic)
    proposals: dict[str, tuple[Proposal, Deliveries]] = field(default_factory=dict)
    plan: fedwire.RoundPlan | None = None
    planned: tuple[str, ...] = ()
    contributions: dict[str, tuple[Contribution, Deliveries]] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    #: --scheme full: the encrypted updates held (unacked) until the round's sum is out
    sums: dict[str, tuple[SumContribution, Deliveries]] = field(default_factory=dict)


class FederatedWorker(amqp.Service):
    name = "aggregator"  # the metrics' service label: this is the aggregator, in federated mode

    def __init__(self, cfg: FederatedConfig, metrics: metrics.Metrics | None = None) -> None:
        super().__init__(cfg, metrics=metrics)
        self.aggregator = FederatedAggregator(Path(cfg.context).read_bytes())
        self.queue = topology.Topology(cfg.namespace).federated
        self.rounds: dict[bytes, _Round] = {}
        self.closed: dict[bytes, None] = {}
        self.chunks = fedchunks.gather(cfg.max_joined_bytes, cfg.round_timeout_s, cfg.max_contribution_bytes)

    def declare(self, ch) -> list[str]:
        self.topology.declare_queue(ch, self.queue)
        return [self.queue]

    def reset(self) -> None:
        self.rounds.clear()
        self.chunks.clear()

    def handle(self, d: amqp.Delivery) -> None:
        ds: Deliveries = [d]
        try:
            if not d.properties.reply_to:
                raise MalformedMessage("federated message without reply_to: nowhere to answer")
            msg = fedwire.decode(d.body, self.limit)
            if isinstance(msg, fedwire.Chunk):  # a message above the broker's limit, in parts
                got = self.chunks.add(msg, d)
                self.ack(self.chunks.take_copies())  # copies of chunks already held (redeliveries): ack now
                if got is None:
                    return
                body, ds = got
                msg = fedwire.decode(body, self.cfg.max_joined_bytes)
                if isinstance(msg, fedwire.Chunk):
                    raise MalformedMessage("a chunk inside a chunked message")
            if isinstance(msg, fedwire.PublicContext):
                self._handshake(msg, ds)
                return
            if msg.rid in self.closed:
                raise ParameterMismatch(f"round {msg.rid.hex()} is closed")
            if isinstance(msg, Proposal):
                self._proposal(msg, ds)
            elif isinstance(msg, Contribution):
                self._contribution(msg, ds)
            elif isinstance(msg, SumContribution):
                self._sum_contribution(msg, ds)
            else:
                raise MalformedMessage(f"{msg.TYPE}: not accepted on the federated queue")
        except wire.GatherError as exc:  # every chunk of the message received so far goes, not just this one
            self.fail(exc.tokens, exc)
        except HeloraError as exc:
            self.fail(ds, exc)

    def _handshake(self, msg: fedwire.PublicContext, ds: Deliveries) -> None:
        """An owner checks it talks to its federation's aggregator: the same public context comes back.

        A context that carries a secret key is refused WITHOUT dead-lettering: its body must not
        be stored anywhere on the server side, so it is acked and dropped, and the sender told.
        """
        try:
            check_public_context(msg.context)
            if msg.digest != self.aggregator.digest:
                raise ParameterMismatch("context: not this federation's public context")
        except HeloraError as exc:
            self.ack(ds)
            self.metrics.failure(exc)
            self.reply_error(ds[-1].properties, exc)
            log.warning("refused a handshake: %s", exc.reason)
            return
        self._answer(ds, fedwire.encode(fedwire.PublicContext(msg.rid, self.aggregator.public_context),
                                        self.cfg.max_joined_bytes))
        self.ack(ds)

    def _proposal(self, p: Proposal, ds: Deliveries) -> None:
        rnd = self.rounds.setdefault(p.rid, _Round())
        if rnd.sums:
            raise ParameterMismatch(f"owner {p.owner!r}: round {p.rid.hex()} sums encrypted updates (scheme full)")
        if rnd.plan is not None:
            raise ParameterMismatch(f"owner {p.owner!r}: round {p.rid.hex()} is already planned")
        if p.owner in rnd.proposals:
            raise MalformedMessage(f"owner {p.owner!r}: a second proposal for this round (duplicated owner)")
        rnd.proposals[p.owner] = (p, ds)
        if len(rnd.proposals) >= self.cfg.owners:
            self._plan(p.rid, rnd)

    def _plan(self, rid: bytes, rnd: _Round) -> None:
        first = next(iter(rnd.proposals.values()))[0]
        shapes = {x.name: (x.d_out, x.d_in) for x in first.layers}
        plan, rejected = self.aggregator.plan([p for p, _ in rnd.proposals.values()], shapes, rid)
        body = fedwire.encode(plan, self.cfg.max_joined_bytes)
        for owner, (_, ds) in rnd.proposals.items():
            if owner in rejected:
                self.fail(ds, ParameterMismatch(rejected[owner]))
                continue
            self._answer(ds, body)
        rnd.plan, rnd.planned = plan, tuple(o for o in rnd.proposals if o not in rejected)
        self.ack([d for o, (_, ds) in rnd.proposals.items() if o not in rejected for d in ds])
        log.info("round %s: planned for %d owners", rid.hex()[:8], len(rnd.planned))

    def _contribution(self, c: Contribution, ds: Deliveries) -> None:
        rnd = self.rounds.get(c.rid)
        if rnd is None or rnd.plan is None:
            raise ParameterMismatch(f"owner {c.owner!r}: round {c.rid.hex()} has no plan (propose first)")
        if c.owner not in rnd.planned:
            raise ParameterMismatch(f"owner {c.owner!r}: not an owner of this round's plan")
        try:
            self.aggregator.check(rnd.plan, c, {o: x for o, (x, _) in rnd.contributions.items()})
        except HeloraError:
            rnd.rejected.add(c.owner)
            self._maybe_aggregate(c.rid, rnd)
            raise
        rnd.contributions[c.owner] = (c, ds)
        self._maybe_aggregate(c.rid, rnd)

    def _maybe_aggregate(self, rid: bytes, rnd: _Round, timed_out: bool = False) -> None:
        if len(rnd.contributions) + len(rnd.rejected - set(rnd.contributions)) < len(rnd.planned) and not timed_out:
            return
        assert rnd.plan is not None
        self._close(rid)
        if not rnd.contributions:
            return
        try:
            agg, _ = self.aggregator.aggregate(rnd.plan, [c for c, _ in rnd.contributions.values()])
        except HeloraError as exc:  # the round is closed: every owner in it hears why, none waits
            for _, ds in rnd.contributions.values():
                self.fail(ds, exc)
            log.warning("round %s: aggregation failed: %s", rid.hex()[:8], exc)
            return
        body = fedwire.encode(agg, self.cfg.max_joined_bytes)
        for _, ds in rnd.contributions.values():
            self._answer(ds, body)
        self.ack([d for _, ds in rnd.contributions.values() for d in ds])
        log.info("round %s: aggregated %d owners, %d bytes", rid.hex()[:8], len(agg.owners), len(body))

    def _sum_contribution(self, c: SumContribution, ds: Deliveries) -> None:
        """--scheme full: hold the encrypted update (unacked) until every owner's is in, then sum.

        A refused update does not count towards the round: a sender without the federation's
        key must not be able to close a round early, leaving fewer owners in its sum (with two,
        each learns the other's update); the round then waits for the timeout."""
        rnd = self.rounds.setdefault(c.rid, _Round())
        if rnd.proposals:
            raise ParameterMismatch(f"owner {c.owner!r}: round {c.rid.hex()} is a selective one (it has proposals)")
        self.aggregator.check_sum(c, c.rid, self.cfg.owners, {o: x for o, (x, _) in rnd.sums.items()})
        rnd.sums[c.owner] = (c, ds)
        log.info("round %s: holding %d of %d encrypted updates", c.rid.hex()[:8], len(rnd.sums), self.cfg.owners)
        self._maybe_sum(c.rid, rnd)

    def _maybe_sum(self, rid: bytes, rnd: _Round, timed_out: bool = False) -> None:
        if len(rnd.sums) < self.cfg.owners and not timed_out:
            return
        self._close(rid)
        if not rnd.sums:
            return
        if len(rnd.sums) < self.cfg.min_owners:
            exc = ParameterMismatch(f"round {rid.hex()[:8]}: {len(rnd.sums)} of {self.cfg.owners} owners came before "
                                    f"the timeout, fewer than --min-owners {self.cfg.min_owners}: no sum is sent")
            for _, ds in rnd.sums.values():
                self.fail(ds, exc)
            log.warning("round %s: %s", rid.hex()[:8], exc)
            return
        try:
            agg = sum_contributions([c for c, _ in rnd.sums.values()], self.aggregator.digest)
            body = fedwire.encode(agg, self.cfg.max_joined_bytes)
        except HeloraError as exc:  # the round is closed: every owner in it hears why, none waits
            for _, ds in rnd.sums.values():
                self.fail(ds, exc)
            log.warning("round %s: the sum failed: %s", rid.hex()[:8], exc)
            return
        for _, ds in rnd.sums.values():
            self._answer(ds, body)
        self.ack([d for _, ds in rnd.sums.values() for d in ds])  # only now: a restart before this re-sums them
        log.info("round %s: summed %d encrypted updates, %d bytes", rid.hex()[:8], len(agg.owners), len(body))

    def _close(self, rid: bytes) -> None:
        del self.rounds[rid]
        self.closed[rid] = None
        while len(self.closed) > 1024:
            self.closed.pop(next(iter(self.closed)))

    def _answer(self, ds: Deliveries, body: bytes) -> None:
        """Publish ``body`` (in chunks if above the limit) to the sender's ``reply_to``."""
        props = ds[-1].properties
        bodies = fedchunks.split_bytes(body, self.limit, os.urandom(fedwire.RID_BYTES))
        try:
            self.publish_all(props.reply_to, bodies, pika.BasicProperties(correlation_id=props.correlation_id))
        except (pex.UnroutableError, pex.NackError):
            log.warning("an owner's reply queue is gone; answer dropped")

    def tick(self) -> None:
        for _, ds in self.chunks.expired():
            self.fail(ds, MalformedMessage(f"chunked message incomplete after {self.chunks.timeout_s:.0f} s"))
        now = time.monotonic()
        for rid, rnd in list(self.rounds.items()):
            if now - rnd.started <= self.cfg.round_timeout_s:
                continue
            log.warning("round %s: timed out; going on with the owners that answered", rid.hex()[:8])
            if rnd.sums or not rnd.proposals:
                self._maybe_sum(rid, rnd, timed_out=True)
            elif rnd.plan is None:
                self._plan(rid, rnd)
                rnd.started = now
            else:
                self._maybe_aggregate(rid, rnd, timed_out=True)


def main(argv: list[str] | None = None) -> int:
    return process.serve("helora-aggregator", FederatedConfig.from_args, FederatedWorker, argv, reuse_memory=True)


if __name__ == "__main__":
    sys.exit(main())

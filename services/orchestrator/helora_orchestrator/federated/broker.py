"""One owner's federated rounds over RabbitMQ (``helora federate round``; SHE-LoRA, DESIGN §5).

With every coordinate encrypted (``--scheme full``) the owner publishes one ``SumContribution``
and waits for the ``SumAggregate``. SHE-LoRA (``selective``): the owner publishes its ``Proposal``
and then its ``Contribution`` to ``{ns}.federated`` (the
aggregator's ``fedworker``) with its own exclusive ``reply_to`` queue and a fresh
``correlation_id``, and waits for the ``RoundPlan`` and then the ``Aggregate``. An error reply
(``hecommon.wire.ErrorReply``) becomes a ``HeloraError`` naming the aggregator's reason.
Messages above the broker's limit go as ``fedwire.Chunk``s, both ways.
The round id is ``SHA-256("helora-fed-round" ‖ context digest ‖ round number)[:16]``: owners of one
federation agree on it without talking to each other.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import pika
from hecommon import wire
from hecommon.broker import connection, topology
from hecommon.errors import ConfigError, HeloraError, MalformedMessage, TransientError
from hecommon.wire import fedchunks
from hecommon.wire import federated as fedwire

from .client import Owner
from .report import RoundReport


def round_id(digest: bytes, round_no: int) -> bytes:
    return hashlib.sha256(b"helora-fed-round" + digest + round_no.to_bytes(8, "big")).digest()[:fedwire.RID_BYTES]


class AggregatorError(HeloraError):
    """The aggregator refused this owner's message; ``reason`` is its own."""


class FederatedBrokerClient:
    """A blocking request/reply client of the federated aggregator."""

    def __init__(self, url: str, namespace: str = topology.DEFAULT_NAMESPACE, timeout_s: float = 600.0,
                 max_bytes: int = wire.MAX_MESSAGE_BYTES, max_joined: int = 1 << 30):
        # max_bytes: the broker's max_message_size (larger messages go in chunks); max_joined: the
        # largest whole message accepted (an aggregate is a full d_out × d_in product per layer)
        self.timeout_s, self.max_bytes, self.max_joined = timeout_s, max_bytes, max_joined
        # heartbeats off: the owner trains for minutes between two messages on this connection
        self.conn = connection.connect(url, f"helora-federated-owner@{namespace}", heartbeat=0)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        names = topology.Topology(namespace)
        names.declare_common(self.ch)
        self.queue = names.federated
        names.declare_queue(self.ch, self.queue)  # messages wait there until the aggregator runs
        # exclusive, not auto-delete: the queue must outlive each call's consumer (deleted with the connection)
        self.reply_to = self.ch.queue_declare("", exclusive=True).method.queue
        self.bytes_up = self.bytes_down = 0

    def call(self, msg: fedwire.Message, expect: type) -> fedwire.Message:
        """Send ``msg`` (in chunks above the broker's limit) and wait for the answer of type ``expect``."""
        body = fedwire.encode(msg, self.max_joined)
        cid = secrets.token_hex(fedwire.RID_BYTES)
        props = pika.BasicProperties(reply_to=self.reply_to, correlation_id=cid, delivery_mode=2)
        for part in fedchunks.split_bytes(body, self.max_bytes, secrets.token_bytes(fedwire.RID_BYTES)):
            self.ch.basic_publish("", self.queue, part, props, mandatory=True)
            self.bytes_up += len(part)
        chunks = fedchunks.gather(self.max_joined, self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        for method, rprops, reply in self.ch.consume(self.reply_to, inactivity_timeout=1.0):
            if method is None:
                if time.monotonic() > deadline:
                    self.ch.cancel()
                    raise TransientError(f"no answer from the federated aggregator within {self.timeout_s:.0f} s")
                continue
            self.ch.basic_ack(method.delivery_tag)
            if rprops.correlation_id != cid:
                continue  # a stale answer to an earlier, abandoned request
            self.bytes_down += len(reply)
            joined = self._join(chunks, reply)
            if joined is None:
                continue
            self.ch.cancel()
            return self._decode(joined, expect)
        raise TransientError("the reply queue was cancelled")  # pragma: no cover - consume never ends otherwise

    def _join(self, chunks: wire.Gather, reply: bytes) -> bytes | None:
        """The whole answer once every chunk of it is in; an unchunked answer as it is."""
        try:
            part = fedwire.decode(reply, self.max_bytes)
        except MalformedMessage:
            return reply  # an error reply (``hecommon.wire``): ``_decode`` reads it
        if not isinstance(part, fedwire.Chunk):
            return reply
        got = chunks.add(part)
        return None if got is None else got[0]

    def handshake(self, keys) -> None:
        """Check that the aggregator serves this federation (same public context); raises otherwise."""
        got = self.call(fedwire.PublicContext(secrets.token_bytes(fedwire.RID_BYTES), keys.public_bytes()),
                        fedwire.PublicContext)
        assert isinstance(got, fedwire.PublicContext)
        if got.digest != keys.digest:
            raise AggregatorError("the aggregator answered with another public context")

    def _decode(self, reply: bytes, expect: type) -> fedwire.Message:
        try:
            return fedwire.decode(reply, self.max_joined, expect)
        except MalformedMessage:
            try:
                err = wire.decode_error(reply, self.max_bytes)
            except HeloraError:
                raise MalformedMessage(f"the aggregator's answer is neither a {expect.__name__} nor an error") from None
            exc = AggregatorError(f"the aggregator refused it ({err.reason}): {err.message}")
            exc.reason = err.reason
            raise exc from None

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()

    def __enter__(self) -> FederatedBrokerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def owner_round(owner: Owner, client: FederatedBrokerClient, round_no: int, train: bool = True,
                size: int | None = None) -> RoundReport:
    """Train locally, then (``--scheme full``) send the encrypted update of a federation of ``size``
    owners and merge the encrypted sum, or (selective) propose, contribute and merge: one round of
    one owner over the broker."""
    rid = round_id(owner.keys.digest, round_no)
    report = RoundReport(round_no)
    report.train_loss[owner.name] = owner.train_local() if train else float("nan")
    up0, down0 = client.bytes_up, client.bytes_down
    if owner.cfg.scheme == "full":
        if size is None:
            raise ConfigError("owner_round: scheme full needs the federation's size (the number of owners)")
        summed = client.call(owner.contribute_sum(rid, size), fedwire.SumAggregate)
        assert isinstance(summed, fedwire.SumAggregate)
        owner.merge_sum(summed)
        report.aggregate = summed
    else:
        _selective_round(owner, client, rid, report)
    report.eval_loss[owner.name] = owner.eval_loss()
    report.enc_seconds[owner.name] = owner.enc_seconds
    report.bytes_up[owner.name] = client.bytes_up - up0
    report.bytes_down = client.bytes_down - down0
    return report


def _selective_round(owner: Owner, client: FederatedBrokerClient, rid: bytes, report: RoundReport) -> None:
    plan = client.call(owner.proposal(rid), fedwire.RoundPlan)
    assert isinstance(plan, fedwire.RoundPlan)
    agg = client.call(owner.contribute(plan), fedwire.Aggregate)
    assert isinstance(agg, fedwire.Aggregate)
    owner.merge(agg)
    report.plan, report.aggregate = plan, agg

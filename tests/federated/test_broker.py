"""Federated rounds over the real broker: the aggregator's ``fedworker`` as a subprocess, three owners
(ranks 4, 8, 16) in threads, each with its own connection; a malformed message is dead-lettered and
the rounds go on. The message limit is small on purpose: contributions (~1 MB) and aggregates
(~1.2 MB) of the tiny model travel in chunks both ways."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

import numpy as np
import pika
import pytest
from hecommon import wire
from hecommon.broker import topology
from hecommon.wire import fedfields

from .conftest import CKKS_ATOL
from .test_aggregation import torch_flexlora

pytestmark = pytest.mark.integration
URL = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
LIMIT = 256 * 1024



@pytest.fixture
def fedworker(request, tmp_path, fed_keys, local_broker):
    """The worker for 3 owners; ``@pytest.mark.parametrize("fedworker", [timeout_s], indirect=True)``
    sets its round timeout (120 s by default)."""
    timeout_s = getattr(request, "param", 120)

    ns = f"helora-fedtest-{secrets.token_hex(4)}"
    pub = tmp_path / "fed.key.pub"
    pub.write_bytes(fed_keys.public_bytes())
    log = open(tmp_path / "fedworker.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "helora_aggregator.fedworker", "--broker", URL, "--namespace", ns,
                             "--context", str(pub), "--owners", "3", "--max-message-bytes", str(LIMIT),
                             "--max-contribution-bytes", str(4 << 20), "--metrics-port", "0", "--metrics-host",
                             "127.0.0.1", "--round-timeout-s", str(timeout_s)], stdout=log, stderr=subprocess.STDOUT, env=env)
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        end = time.monotonic() + 60
        while True:  # consuming?
            assert proc.poll() is None, (tmp_path / "fedworker.log").read_text()
            try:
                if ch.queue_declare(topology.Topology(ns).federated, passive=True).method.consumer_count:
                    break
            except pika.exceptions.ChannelClosedByBroker:
                ch = conn.channel()
            assert time.monotonic() < end, (tmp_path / "fedworker.log").read_text()
            time.sleep(0.3)
        yield ns, tmp_path / "fedworker.log"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        topology.Topology(ns).delete(conn.channel(), [topology.Topology(ns).federated])
        conn.close()


def _garbage(ns: str) -> bytes:
    """Publish bytes that are no federated message; return the error reply the worker sends."""

    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", topology.Topology(ns).federated, b"\x81\xa1v\x07", pika.BasicProperties(reply_to=q, correlation_id="00" * 16))
        for method, _props, body in ch.consume(q, inactivity_timeout=30):
            assert method is not None, "no error reply within 30 s"
            ch.basic_ack(method.delivery_tag)
            return body
    finally:
        conn.close()
    raise AssertionError("unreachable")


def test_rounds_over_the_broker_match_clear_flexlora(fedworker, make_owners):
    from helora_orchestrator.federated.broker import FederatedBrokerClient, owner_round

    ns, log_path = fedworker
    err = wire.decode_error(_garbage(ns))
    assert err.reason == "version"
    owners = make_owners((4, 8, 16), (0.02, 0.05, 0.2))
    clients = [FederatedBrokerClient(URL, ns, timeout_s=120, max_bytes=LIMIT) for _ in owners]
    try:
        for r in (1, 2):
            for o in owners:
                o.train_local()
            want = torch_flexlora(owners)
            reports: dict[str, object] = {}
            errors: list[BaseException] = []

            def run(o, c, r=r, reports=reports, errors=errors):
                try:
                    reports[o.name] = owner_round(o, c, r, train=False)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(o, c)) for o, c in zip(owners, clients, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            assert not errors, f"{errors}\n{log_path.read_text()[-3000:]}"
            for o in owners:
                assert reports[o.name].bytes_up[o.name] > 2 * LIMIT  # its contribution went in chunks
                assert reports[o.name].bytes_down > 2 * LIMIT  # and so did the aggregate
                for name, dw in o.last_merged.items():
                    np.testing.assert_allclose(dw, want[name], rtol=0, atol=CKKS_ATOL)
    finally:
        for c in clients:
            c.close()


def test_a_bad_contribution_is_refused_over_the_broker_and_the_round_goes_on(fedworker, make_owners):
    import dataclasses

    from hecommon.wire import federated as fedwire
    from helora_orchestrator.federated.broker import (
        AggregatorError,
        FederatedBrokerClient,
        owner_round,
        round_id,
    )
    from helora_orchestrator.federated.selective import CkksKeys

    ns, log_path = fedworker
    owners = make_owners((4, 8, 16), (0.02, 0.05, 0.2))
    for o in owners:
        o.train_local()
    want = {n: sum(o.samples * o.delta()[n] for o in owners[:2]) / sum(o.samples for o in owners[:2])
            for n in owners[0].shapes()}
    stranger = CkksKeys.generate()
    results: dict[str, object] = {}

    def good(o):
        with FederatedBrokerClient(URL, ns, timeout_s=120, max_bytes=LIMIT) as c:
            results[o.name] = owner_round(o, c, 7, train=False)

    def bad(o):
        with FederatedBrokerClient(URL, ns, timeout_s=120, max_bytes=LIMIT) as c:
            plan = c.call(o.proposal(round_id(o.keys.digest, 7)), fedwire.RoundPlan)
            foreign = dataclasses.replace(o.contribute(plan), ctx=stranger.digest)
            try:
                c.call(foreign, fedwire.Aggregate)
            except AggregatorError as exc:
                results[o.name] = exc

    threads = [threading.Thread(target=good, args=(owners[0],)), threading.Thread(target=good, args=(owners[1],)),
               threading.Thread(target=bad, args=(owners[2],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert isinstance(results.get("o2"), AggregatorError), f"{results}\n{log_path.read_text()[-3000:]}"
    assert "another CKKS context" in str(results["o2"]) and results["o2"].reason == "parameter_mismatch"
    for o in owners[:2]:
        assert set(results[o.name].aggregate.owners) == {"o0", "o1"}
        for name, dw in o.last_merged.items():
            np.testing.assert_allclose(dw, want[name], rtol=0, atol=CKKS_ATOL)


def test_handshake_and_a_secret_key_context_is_refused_without_being_stored(fedworker, fed_keys):
    from hecommon.wire import federated as fedwire
    from helora_orchestrator.federated.broker import AggregatorError, FederatedBrokerClient
    from helora_orchestrator.federated.selective import CkksKeys

    ns, _ = fedworker
    with FederatedBrokerClient(URL, ns, timeout_s=60, max_bytes=LIMIT) as c:
        c.handshake(fed_keys)  # the same public context comes back
        with pytest.raises(AggregatorError, match="another public context|not this federation"):
            c.handshake(CkksKeys.generate())
        private = fed_keys._ctx.serialize(save_secret_key=True)
        with pytest.raises(AggregatorError, match="secret key") as info:
            c.call(fedwire.PublicContext(bytes(16), private), fedwire.PublicContext)
        assert info.value.reason == "parameter_mismatch"
        # refused handshakes are acked and dropped, never dead-lettered: the secret key is stored nowhere
        assert c.ch.queue_declare(topology.Topology(ns).dead, passive=True).method.message_count == 0
        assert c.ch.queue_declare(f"{ns}.federated", passive=True).method.message_count == 0


@pytest.mark.parametrize("fedworker", [4], indirect=True)
def test_a_missing_owner_times_out_and_the_round_goes_on(fedworker, make_owners):
    """Three owners expected, two show up: after the round timeout (4 s) the plan goes to those two,
    and their aggregate is their own average."""
    from helora_orchestrator.federated.broker import FederatedBrokerClient, owner_round

    ns, log_path = fedworker
    owners = make_owners((4, 16), (0.05, 0.1))
    for o in owners:
        o.train_local()
    want = {n: sum(o.samples * o.delta()[n] for o in owners) / sum(o.samples for o in owners)
            for n in owners[0].shapes()}
    results: dict[str, object] = {}

    def run(o):
        with FederatedBrokerClient(URL, ns, timeout_s=60, max_bytes=LIMIT) as c:
            results[o.name] = owner_round(o, c, 3, train=False)

    threads = [threading.Thread(target=run, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) == {"o0", "o1"}, log_path.read_text()[-3000:]
    log = log_path.read_text()
    # it waited for the third owner first: the round timed out, then was planned for the two that came
    assert "timed out; going on with the owners that answered" in log, log[-3000:]
    assert log.index("timed out") < log.index("planned for 2 owners"), log[-3000:]
    assert "planned for 3 owners" not in log
    for o in owners:
        assert set(results[o.name].aggregate.owners) == {"o0", "o1"}
        for name, dw in o.last_merged.items():
            np.testing.assert_allclose(dw, want[name], rtol=0, atol=CKKS_ATOL)


def _chunks_to_the_worker(ns: str, log_path, bodies: list[bytes], settle_s: float = 0.0):
    """Publish ``bodies`` to the federated queue; the error reply the sender gets, and the dead
    letters counted once they stop growing (after ``settle_s`` more seconds)."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        props = pika.BasicProperties(reply_to=q, correlation_id="00" * 16)
        for body in bodies:
            ch.basic_publish("", topology.Topology(ns).federated, body, props)
        method, _, reply = next(ch.consume(q, inactivity_timeout=30))
        assert method is not None, f"no error reply within 30 s\n{log_path.read_text()[-3000:]}"
        ch.cancel()
        dead = topology.Topology(ns).dead
        count = lambda: ch.queue_declare(dead, passive=True).method.message_count  # noqa: E731
        end = time.monotonic() + 30
        while count() < 2 and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(settle_s)
        assert ch.queue_declare(topology.Topology(ns).federated, passive=True).method.message_count == 0
        return wire.decode_error(reply), count()
    finally:
        conn.close()


def test_a_chunked_message_that_does_not_join_dead_letters_every_chunk(fedworker):
    """Two chunks whose lengths do not add up to the announced total (the first is plausible, the
    last one 100 bytes too long): both are dead-lettered (the first one used to stay unacked
    forever) and the sender gets one error reply."""
    from hecommon.wire import federated as fedwire

    ns, log_path = fedworker
    mid = secrets.token_bytes(fedwire.RID_BYTES)
    bodies = [fedwire.encode(c) for c in (fedwire.Chunk(mid, 0, 2, 1500, b"x" * 1000),
                                          fedwire.Chunk(mid, 1, 2, 1500, b"y" * 600))]
    err, dead = _chunks_to_the_worker(ns, log_path, bodies)
    assert err.reason == "malformed" and "bytes" in err.message
    assert dead == 2, log_path.read_text()[-3000:]


def test_a_copy_of_a_chunk_is_acked_at_once_and_not_failed_with_its_message(fedworker):
    """A chunk that arrives twice (a redelivery): the copy is acked as soon as it arrives (it must not
    hold a prefetch slot until the message completes), so when the message then fails only its
    two chunks are dead-lettered, not the copy."""
    from hecommon.wire import federated as fedwire

    ns, log_path = fedworker
    mid = secrets.token_bytes(fedwire.RID_BYTES)
    first = fedwire.encode(fedwire.Chunk(mid, 0, 2, 1500, b"x" * 1000))
    bodies = [first, first, fedwire.encode(fedwire.Chunk(mid, 1, 2, 1500, b"y" * 600))]
    err, dead = _chunks_to_the_worker(ns, log_path, bodies, settle_s=3.0)  # a third would be the copy
    assert err.reason == "malformed"
    assert dead == 2, log_path.read_text()[-3000:]


@pytest.mark.parametrize("fedworker", [4], indirect=True)
def test_a_late_copy_of_a_joined_message_is_acked_not_held_until_the_timeout(fedworker):
    """A chunk that comes again after its message was joined (a redelivery): acked at once, not
    held as the start of a new message that can never complete (it used to wait out the round
    timeout in the prefetch window and then be dead-lettered as incomplete)."""
    from hecommon.wire import fedchunks
    from hecommon.wire import federated as fedwire

    ns, log_path = fedworker
    bodies = fedchunks.split_bytes(b"no federated message" * 500, 6000 + fedfields.CHUNK_OVERHEAD,
                                   secrets.token_bytes(fedwire.RID_BYTES))
    assert len(bodies) == 2
    err, dead = _chunks_to_the_worker(ns, log_path, [*bodies, bodies[0]], settle_s=7.0)  # past the 4-s timeout
    assert err.reason == "malformed"  # the joined bytes are no message: both chunks dead-lettered
    assert dead == 2, log_path.read_text()[-3000:]


# -- --scheme full: every coordinate encrypted -----------------------------------------------------

class _Worker:
    """A fedworker subprocess for 3 owners that a test can kill (SIGKILL) and start again."""

    def __init__(self, ns: str, pub, log_path, timeout_s: float = 120, extra: tuple[str, ...] = ()):
        self.ns, self.pub, self.log_path, self.timeout_s, self.extra = ns, pub, log_path, timeout_s, extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "helora_aggregator.fedworker", "--broker", URL, "--namespace", self.ns,
             "--context", str(self.pub), "--owners", "3", "--max-message-bytes", str(LIMIT),
             "--max-contribution-bytes", str(4 << 20), "--metrics-port", "0", "--metrics-host", "127.0.0.1",
             "--round-timeout-s", str(self.timeout_s), *self.extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.wait_for(lambda: self._consumers() == 1, "the worker to consume")

    def _consumers(self) -> int:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        try:
            return conn.channel().queue_declare(topology.Topology(self.ns).federated, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, cond, what: str, timeout_s: float = 60) -> None:
        end = time.monotonic() + timeout_s
        while not cond():
            assert self.proc is None or self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < end, f"waited {timeout_s} s for {what}\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def sumworker(request, tmp_path, fed_keys, local_broker):
    """``@pytest.mark.parametrize("sumworker", [timeout_s or (timeout_s, extra flags)], indirect=True)``
    sets its round timeout (and more flags)."""
    ns = f"helora-fedtest-{secrets.token_hex(4)}"
    pub = tmp_path / "fed.key.pub"
    pub.write_bytes(fed_keys.public_bytes())
    param = getattr(request, "param", 120)
    timeout_s, extra = param if isinstance(param, tuple) else (param, ())
    worker = _Worker(ns, pub, tmp_path / "fedworker.log", timeout_s, extra)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        names = topology.Topology(ns)
        names.delete(conn.channel(), [names.federated])
        conn.close()


def _exact_average(owners, size: int = 3) -> dict[str, np.ndarray]:
    """What every owner must merge: the exact integer sum of the owners' fixed-point updates, divided
    as ``encsum.open_aggregate`` divides (the embedded round gives exactly this: test_full_scheme)."""
    from hecommon.he.fedsum import SumScheme
    from hecommon.wire.federated import SumLayer
    from helora_orchestrator.federated import encsum

    scheme = SumScheme(size)
    f = encsum.frac_bits(scheme, owners[0].cfg.update_range)
    layers = tuple(SumLayer(n, *shape) for n, shape in owners[0].shapes().items())
    m = sum(encsum.encode_update(o.delta(), o.samples, layers, f, scheme) for o in owners)
    weight = m[sum(x.d_out * x.d_in for x in layers)]
    out, pos = {}, 0
    for lay in layers:
        out[lay.name] = m[pos:pos + lay.d_out * lay.d_in].reshape(lay.d_out, lay.d_in) / (weight * 2.0**f)
        pos += lay.d_out * lay.d_in
    return out


def _full_round(owners, ns: str, round_no: int, results: dict, send=None) -> list[threading.Thread]:
    """Start one thread per owner running ``owner_round`` (or ``send(owner, client)``)."""
    from helora_orchestrator.federated.broker import FederatedBrokerClient, owner_round

    def run(o):
        try:
            with FederatedBrokerClient(URL, ns, timeout_s=120, max_bytes=LIMIT) as c:
                results[o.name] = send(o, c) if send else owner_round(o, c, round_no, train=False, size=3)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            results[o.name] = exc

    threads = [threading.Thread(target=run, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    return threads


def test_full_rounds_over_the_broker_equal_the_exact_sum(sumworker, make_owners):
    owners = make_owners((4, 8, 16), (0.0, 0.0, 0.0), scheme="full", lr=1e-2)
    for r in (1, 2):
        for o in owners:
            o.train_local()
        want = _exact_average(owners)
        results: dict[str, object] = {}
        for t in _full_round(owners, sumworker.ns, r, results):
            t.join(180)
        for o in owners:
            report = results[o.name]
            assert not isinstance(report, BaseException), f"{report!r}\n{sumworker.log()[-3000:]}"
            assert report.bytes_up[o.name] > LIMIT and report.bytes_down > LIMIT  # chunked both ways
            assert set(report.aggregate.owners) == {"o0", "o1", "o2"}
            for name, dw in o.last_merged.items():
                np.testing.assert_array_equal(dw, want[name])  # bit for bit


def test_a_worker_killed_mid_round_loses_nothing(sumworker, make_owners):
    """Two of three encrypted updates are in and held (unacked) when the worker is SIGKILLed; the broker
    hands them to the restarted worker, the third arrives, and every owner gets the same exact sum."""
    owners = make_owners((4, 8, 16), (0.0, 0.0, 0.0), scheme="full", lr=1e-2)
    for o in owners:
        o.train_local()
    want = _exact_average(owners)
    results: dict[str, object] = {}
    threads = _full_round(owners[:2], sumworker.ns, 5, results)
    sumworker.wait_for(lambda: "holding 2 of 3 encrypted updates" in sumworker.log(), "two held updates")
    sumworker.kill()
    sumworker.start()
    threads += _full_round(owners[2:], sumworker.ns, 5, results)
    for t in threads:
        t.join(180)
    log = sumworker.log()
    assert log.count("holding 2 of 3 encrypted updates") >= 2, log[-3000:]  # held again by the new worker
    assert "summed 3 encrypted updates" in log, log[-3000:]
    for o in owners:
        assert not isinstance(results[o.name], BaseException), f"{results[o.name]!r}\n{log[-3000:]}"
        for name, dw in o.last_merged.items():
            np.testing.assert_array_equal(dw, want[name])


@pytest.mark.parametrize("sumworker", [6], indirect=True)
def test_wrong_key_and_malformed_updates_are_dead_lettered_and_the_round_goes_on(sumworker, make_owners):
    """A wrong-key update is refused and dead-lettered, and does not count towards the round: the two
    good owners get their sum after the round timeout (6 s), not at once (a refused sender must not
    be able to close a round early, leaving two owners who learn each other's update)."""
    import dataclasses

    from hecommon.broker.amqp import REASON_HEADER
    from hecommon.wire import federated as fedwire
    from helora_orchestrator.federated.broker import AggregatorError, round_id
    from helora_orchestrator.federated.selective import CkksKeys

    owners = make_owners((4, 8, 16), (0.0, 0.0, 0.0), scheme="full", lr=1e-2)
    for o in owners:
        o.train_local()
    want = _exact_average(owners[:2], size=3)
    stranger = CkksKeys.generate()
    ns = sumworker.ns
    assert wire.decode_error(_garbage(ns)).reason == "version"  # malformed bytes: refused, dead-lettered

    def foreign(o, c):
        bad = dataclasses.replace(o.contribute_sum(round_id(o.keys.digest, 9), 3), ctx=stranger.digest)
        try:
            c.call(bad, fedwire.SumAggregate)
        except AggregatorError as exc:
            return exc
        return "accepted"

    results: dict[str, object] = {}
    threads = _full_round(owners[:2], ns, 9, results) + _full_round(owners[2:], ns, 9, results, send=foreign)
    for t in threads:
        t.join(180)
    log = sumworker.log()
    assert log.index("timed out; going on") < log.index("summed 2 encrypted updates"), log[-3000:]
    assert isinstance(results["o2"], AggregatorError), results
    assert results["o2"].reason == "parameter_mismatch" and "another CKKS context" in str(results["o2"])
    for o in owners[:2]:
        assert not isinstance(results[o.name], BaseException), f"{results[o.name]!r}\n{sumworker.log()[-3000:]}"
        assert set(results[o.name].aggregate.owners) == {"o0", "o1"}
        for name, dw in o.last_merged.items():
            np.testing.assert_array_equal(dw, want[name])
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        reasons = []
        while True:
            method, props, _ = ch.basic_get(topology.Topology(ns).dead, auto_ack=True)
            if method is None:
                break
            reasons.append(props.headers[REASON_HEADER])
    finally:
        conn.close()
    assert reasons.count("version") == 1 and reasons.count("parameter_mismatch") >= 1, reasons


@pytest.mark.parametrize("sumworker", [(4, ("--min-owners", "3"))], indirect=True)
def test_a_round_below_min_owners_gets_no_sum(sumworker, make_owners):
    """With ``--min-owners 3``, two of three owners past the timeout get an error, not a sum from
    which each would read the other's update."""
    from helora_orchestrator.federated.broker import AggregatorError

    owners = make_owners((4, 8), (0.0, 0.0), scheme="full")
    results: dict[str, object] = {}
    for t in _full_round(owners, sumworker.ns, 11, results):
        t.join(120)
    for o in owners:
        assert isinstance(results[o.name], AggregatorError), f"{results[o.name]!r}\n{sumworker.log()[-3000:]}"
        assert "--min-owners 3" in str(results[o.name]) and results[o.name].reason == "parameter_mismatch"
        assert not o.last_merged  # nothing merged
    assert "summed" not in sumworker.log()


def test_min_owners_is_checked_at_start(tmp_path, fed_keys):
    from hecommon.errors import ConfigError
    from helora_aggregator.fedworker import FederatedConfig

    pub = tmp_path / "fed.key.pub"
    pub.write_bytes(fed_keys.public_bytes())
    base = ["--context", str(pub), "--owners", "3"]
    assert FederatedConfig.from_args([*base, "--min-owners", "3"]).min_owners == 3
    for bad in ("0", "4"):
        with pytest.raises(ConfigError, match="min_owners"):
            FederatedConfig.from_args([*base, "--min-owners", bad])

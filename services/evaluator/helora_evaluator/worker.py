"""The evaluator's RabbitMQ shell (DESIGN §4): hold shards, compute products, publish partials.

At start it waits for the encoder's ``manifest.bin`` and its own shard files
(``{layer}.{i}of{n}.npy`` for every layer of ``--blocks``) in ``--shard-dir``, then binds its
queue ``{ns}.evaluator.b{blocks}.s{i}of{n}`` to ``{ns}.requests`` with the routing keys
``{layer}.s{i}of{n}``. Manual acks with prefetch 1; the product runs on the worker thread, never
on pika's I/O thread, and acks and publishes go through ``add_callback_threadsafe``
(``hecommon.amqp.Service``), so heartbeats flow during long products. The partial is computed
part by part (``EvaluatorHandler.handle_parts``: the output rows of one message at a time) and
each part is published as soon as it is computed; the sub-request is acked after the last.
An evaluator that holds a whole layer (one shard) switches each part's ``b`` too and publishes
finished reply parts (``EvaluatorHandler.answers``), which the aggregator forwards unchanged.

A sub-request larger than the message limit arrives in parts, held unacked until all have come;
on the float64 product each part is multiplied as it arrives and its product added to the
request's sum (``EvaluatorHandler.add_part``, exact mod p), so that the product overlaps the
client's encryption of the next part and little is left to compute when the last one comes.
The encoder streams one such request at a time (its parts pass on as they arrive) and sends
others whole, so the prefetch is ``max(--prefetch, 3 × the most parts any sub-request for these
shards takes)`` (room for the streaming request, one whole one, and the parts a sender that died
mid-publish left behind; 2 when every sub-request fits one message),
computed at start from the manifest and the message limit (RabbitMQ applies a new ``basic_qos``
only to consumers created after it, so it cannot be raised on the fly). Every service must use
the same ``--max-message-bytes``. Replicas sharing one queue could split the parts of one
multi-part sub-request between them (each would sum only the parts it got): run one consumer per
evaluator queue when sub-requests are multi-part.

torch (through ``.handler``) is imported once ``amqp.serve`` handles
SIGTERM, not with this module: it takes seconds, during which a container's PID 1 would ignore the
signal. A signal during the shard wait or the loading ends the evaluator at once (``amqp.serve``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from hecommon import amqp, wire
from hecommon.bits import packed_size
from hecommon.errors import ConfigError, HeloraError, MalformedMessage
from hecommon.evaluate import default_backend
from hecommon.metrics import Metrics
from hecommon.shards import MANIFEST_FILE, Shard, even_split, shard_file

from .config import EvaluatorConfig

log = logging.getLogger("helora.evaluator")


def _wait_for(paths: list[Path], deadline_s: float) -> None:
    """Poll until every path is a file (a SIGTERM ends the process at once: ``amqp.serve``)."""
    end, logged = time.monotonic() + deadline_s, False
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        if not logged:
            log.info("waiting for %s (and %d more) from the encoder", missing[0], len(missing) - 1)
            logged = True
        if time.monotonic() > end:
            raise ConfigError(f"shard_dir: {missing[0]} (and {len(missing) - 1} more) did not appear within "
                              f"{deadline_s:.0f} s; is the encoder running with a --shards plan that gives "
                              "these layers this many shards?")
        time.sleep(0.2)


def load_shards(cfg: EvaluatorConfig) -> tuple[wire.Manifest, list[Shard], dict[str, tuple[int, int]]]:
    """This evaluator's shards, as the encoder wrote them, checked against the manifest."""
    root = Path(cfg.shard_dir)
    _wait_for([root / MANIFEST_FILE], cfg.wait_shards_s)
    manifest = wire.decode_manifest((root / MANIFEST_FILE).read_bytes(), cfg.max_message_bytes)
    index, count = cfg.shard_pair
    entries = [e for e in manifest.layers if e.block in cfg.block_list]
    missing = sorted(set(cfg.block_list) - {e.block for e in entries})
    if missing:
        raise ConfigError(f"blocks: the model has no block(s) {missing[:5]}")
    _wait_for([shard_file(root, e.name, index, count) for e in entries], cfg.wait_shards_s)
    shards, shard_index = [], {}
    for e in entries:
        if count > e.d_in:
            raise ConfigError(f"shard: layer {e.name} has {e.d_in} inputs, cannot be cut into {count}")
        lo, hi = even_split(e.d_in, count)[index]
        values = np.load(shard_file(root, e.name, index, count), allow_pickle=False)
        if values.shape != (e.d_out, hi - lo) or values.dtype != np.int8:
            raise ConfigError(f"shard_dir: {e.name} shard {index}/{count} is {values.shape} {values.dtype}, "
                              f"expected ({e.d_out}, {hi - lo}) int8")
        shards.append(Shard.of(e, lo, hi, values))
        shard_index[e.name] = (index, count)
    return manifest, shards, shard_index


def max_parts(manifest: wire.Manifest, shards: list[Shard], limit: int) -> int:
    """Most messages one sub-request for these shards takes (``wire.split``'s arithmetic)."""
    params = manifest.params
    row_bytes = sum(packed_size(p.bit_length(), params.n) for p in params.primes)
    per_message = max(1, (limit - wire.HEADER_ALLOWANCE) // row_bytes)
    widths = {e.name: e.d_out for e in manifest.layers}
    rows = max((max(s.hi - s.lo, widths[s.layer]) for s in shards), default=1)  # fwd: its inputs; bwd: d_out
    return math.ceil(rows / per_message)


class EvaluatorWorker(amqp.Service):
    name = "evaluator"

    def __init__(self, cfg: EvaluatorConfig, manifest: wire.Manifest, shards: list[Shard],
                 shard_index: dict[str, tuple[int, int]], metrics: Metrics | None = None) -> None:
        from .handler import EvaluatorHandler  # noqa: PLC0415 - torch: module docstring

        super().__init__(cfg, metrics=metrics)
        backend = default_backend() if cfg.backend == "auto" else cfg.backend
        if cfg.gemm == "int8" and backend != "cupy":
            raise ConfigError("gemm: 'int8' needs a CUDA device (cupy), and none answers here")
        self.handler = EvaluatorHandler(manifest.params, shards, shard_index, backend, cfg.gemm, switch_a=True,
                                        max_owners=cfg.max_owners)
        self.metrics.track_owner_hints(lambda: self.handler.hints.owners, self.handler.hint_bytes)
        self.handler.hints.on_build = self.metrics.hint_built
        self.handler.hints.on_evict = self.metrics.owner_evicted
        self.metrics.set_info(manifest.params.name, backend)
        if backend == "cupy":
            self.metrics.track_device_memory("cuda", device_bytes)
        else:
            self.metrics.track_device_memory("cpu", self.handler.held_bytes)
        self.shard_index = shard_index
        self.parts = amqp.PartCollector(cfg.part_timeout_s)
        self.sums: dict[tuple[bytes, str, str], Any] = {}  # the products of the parts in so far
        self.part_seconds: dict[tuple[bytes, str, str], float] = {}
        # room for the parts of the one request the encoder streams, one whole sub-request next to
        # them, and the incomplete parts a sender that died mid-publish left behind
        most = max_parts(manifest, shards, cfg.max_message_bytes)
        self.prefetch = max(cfg.prefetch, 3 * most if most > 1 else 2)

    def declare(self, ch) -> list[str]:
        t, q = self.topology, self.cfg.queue_name
        t.declare_queue(ch, q)
        t.declare_queue(ch, t.partials)  # partials wait there if the aggregator is not up yet
        for layer, (i, n) in self.shard_index.items():
            ch.queue_bind(q, t.requests, routing_key=t.routing_key(layer, i, n))
        return [q]

    def reset(self) -> None:
        self.parts.clear()
        self.sums.clear()
        self.part_seconds.clear()

    def in_flight(self) -> int:
        """Deliveries queued or being handled, plus multi-part sub-requests still arriving."""
        return super().in_flight() + len(self.parts)

    def tick(self) -> None:
        for key, ds in self.parts.expired():
            self.sums.pop(key, None)
            self.part_seconds.pop(key, None)
            self.fail(ds, MalformedMessage(f"sub-request incomplete after {self.parts.timeout_s:.0f} s"), rid=key[0])

    def handle(self, d: amqp.Delivery) -> None:
        seconds = 0.0
        try:
            with self.metrics.stage("decode"):
                chunk = wire.decode_request(d.body, self.limit)
            key = (chunk.rid, chunk.layer, chunk.direction)
            if self.handler.sums_parts(chunk):  # multiplied now, while the next part is on its way
                if not self.parts.holds(key, chunk.part):
                    t0 = time.perf_counter()
                    self.sums[key] = self.handler.add_part(self.sums.get(key), chunk)
                    seconds += time.perf_counter() - t0
                got = self.parts.add(key, wire.RequestHead.of(chunk), d)  # the residues are not kept
            else:
                got = self.parts.add(key, chunk, d)
        except HeloraError as exc:
            self.fail([d], exc)
            return
        self.ack(self.parts.take_copies())  # redundant copies (their originals are held): ack now
        if seconds:  # a part multiplied on arrival: its product's time counts with the request's
            self.part_seconds[key] = self.part_seconds.get(key, 0.0) + seconds
        if got is None:
            return
        chunks, ds = got
        props = amqp.forward_properties(d.properties)
        seconds, sent = self.part_seconds.pop(key, 0.0), 0
        try:
            if key in self.sums:  # the parts' products, summed as they came: their heads joined
                req: wire.EncryptedRequest | wire.RequestHead = wire.join_heads(chunks)
                b = self.handler.finish(req, self.sums.pop(key))
            else:
                req, b = wire.join(chunks), None
            answers = self.handler.answers(req)  # the whole layer: finished reply parts, b switched here
            parts = self.handler.handle_parts(req, self.limit, b)  # the product, on this worker thread,
            while True:                                             # part by part: each goes out at once
                t0 = time.perf_counter()
                part = next(parts, None)
                seconds += time.perf_counter() - t0
                if part is None:
                    break
                if answers:
                    with self.metrics.stage("switch"):
                        reply = wire.reply_part(part)
                    body = wire.encode_reply(reply, self.limit)
                else:
                    body = wire.encode_partial(part, self.limit)
                self.publish_all(self.topology.partials, [body], props)
                sent += len(body)
        except HeloraError as exc:  # parts already sent are dropped by the aggregator once it times out
            self.sums.pop(key, None)
            self.fail(ds, exc, rid=chunk.rid, pset=chunk.params.name)
            return
        n_tokens = req.n_tokens if isinstance(req, wire.RequestHead) else req.batch.n_tokens
        self.metrics.he_product(req.layer, req.direction, seconds)
        self.ack(ds)
        self.metrics.request(req.layer, req.direction)
        self.metrics.add_tokens(n_tokens)
        log.debug("rid %s layer %s %s shard %s: %.3f s, %d bytes out", req.rid.hex(), req.layer,
                  req.direction, self.shard_index.get(req.layer), seconds, sent)


def device_bytes() -> int:
    """Bytes held on the device: cupy's default memory pool, plus torch's allocator, which holds the
    int8 weights of the tensor-core product (both imported lazily: GPU only)."""
    import cupy  # noqa: PLC0415 - optional GPU extra

    held = int(cupy.get_default_memory_pool().used_bytes())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        held += int(torch.cuda.memory_allocated())
    return held


def _build(cfg: EvaluatorConfig, metrics: Metrics | None = None) -> EvaluatorWorker:
    manifest, shards, shard_index = load_shards(cfg)
    log.info("holding %d layer shard(s) of blocks %s, shard %s", len(shards), cfg.blocks, cfg.shard)
    return EvaluatorWorker(cfg, manifest, shards, shard_index, metrics)


def main(argv: list[str] | None = None) -> int:
    return amqp.serve("helora-evaluator", EvaluatorConfig.from_args, _build, argv)

if __name__ == "__main__":
    sys.exit(main())

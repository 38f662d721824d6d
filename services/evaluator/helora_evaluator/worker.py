"""The evaluator's RabbitMQ shell (DESIGN §4): hold shards, compute products, publish partials.

At start it waits for the encoder's ``manifest.bin`` and its own shard files
(``{layer}.{i}of{n}.npy`` for every layer of ``--blocks``) in ``--shard-dir``, then binds its
queue ``{ns}.evaluator.b{blocks}.s{i}of{n}`` to ``{ns}.requests`` with the routing keys
``{layer}.s{i}of{n}``, on which clients publish their requests directly (``hecommon.route``).
Manual acks with prefetch ``max(--prefetch, 2)``; the product runs on the worker thread, never on pika's
I/O thread, and acks and publishes go through ``add_callback_threadsafe``
(``hecommon.broker.amqp.Service``), so heartbeats flow during long products.

Every message is a whole unit of work: a request part is decoded and checked in full (this is
the entry point: nothing validated it before), multiplied alone, and its output rows published
block by block as they are computed (``EvaluatorHandler.handle_parts``), then acked. An
evaluator that holds a whole layer switches each block and sends it to the client's
``reply_to``; a shard sends partials to ``{ns}.partials`` for the aggregator. No state is kept
between messages, so replicas sharing one queue (KEDA) may take the parts of one request
between them. A bad message is dead-lettered with its reason and the client gets an
``ErrorReply``.

torch (through ``.handler``) is imported once ``process.serve`` handles
SIGTERM, not with this module: it takes seconds, during which a container's PID 1 would ignore the
signal. A signal during the shard wait or the loading ends the evaluator at once (``process.serve``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pika
import pika.exceptions as pex
from hecommon import wire
from hecommon.broker import amqp, connection, process
from hecommon.broker.metrics import Metrics
from hecommon.errors import ConfigError, HeloraError, MalformedMessage
from hecommon.he.evaluate import default_backend
from hecommon.shards import MANIFEST_FILE, Shard, even_split, shard_file

from .config import EvaluatorConfig

log = logging.getLogger("helora.evaluator")


def _wait_for(paths: list[Path], deadline_s: float) -> None:
    """Poll until every path is a file (a SIGTERM ends the process at once: ``process.serve``)."""
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


class EvaluatorWorker(amqp.Service):
    name = "evaluator"

    def __init__(self, cfg: EvaluatorConfig, manifest: wire.Manifest, shards: list[Shard],
                 shard_index: dict[str, tuple[int, int]], metrics: Metrics | None = None) -> None:
        from .handler import EvaluatorHandler  # noqa: PLC0415 - torch: module docstring

        super().__init__(cfg, metrics=metrics)
        backend = default_backend() if cfg.backend == "auto" else cfg.backend
        if cfg.gemm == "int8" and backend != "cupy":
            raise ConfigError("gemm: 'int8' needs a CUDA device (cupy), and none answers here")
        self.handler = EvaluatorHandler(manifest.params, shards, shard_index, backend, cfg.gemm, send_switched=True,
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
        # the next message arrives while this one is multiplied (prefetch 1 would leave a gap
        # of one message's transfer between products)
        self.prefetch = max(cfg.prefetch, 2)

    def declare(self, ch) -> list[str]:
        t, q = self.topology, self.cfg.queue_name
        t.declare_queue(ch, q)
        t.declare_queue(ch, t.partials)  # partials wait there if the aggregator is not up yet
        for layer, (i, n) in self.shard_index.items():
            ch.queue_bind(q, t.requests, routing_key=t.routing_key(layer, i, n))
        return [q]

    def handle(self, d: amqp.Delivery) -> None:
        """One request part, straight from a client: decoded and checked in full (residues below
        their primes, the layer, the rows against this shard), multiplied, and its output rows
        published block by block as they are computed: reply parts to the client's ``reply_to``
        where this evaluator holds the whole layer, partials to the aggregator otherwise."""
        props, seconds, sent = d.properties, 0.0, 0
        req = None
        try:
            with self.metrics.stage("decode"):
                req = wire.decode_request(d.body, self.limit)
            if not props.reply_to:
                raise MalformedMessage("request without reply_to: nowhere to send the result")
            answers = self.handler.answers_client(req)
            parts = self.handler.handle_parts(req, self.limit)  # the product, on this worker thread,
            while True:                                          # block by block: each goes out at once
                t0 = time.perf_counter()
                part = next(parts, None)
                seconds += time.perf_counter() - t0
                if part is None:
                    break
                if answers:
                    with self.metrics.stage("switch"):
                        body = wire.encode_reply(self.handler.reply_part(part), self.limit)
                    if not self._to_client(props, body, req):
                        break
                else:
                    body = wire.encode_partial(part, self.limit)
                    self.publish_all(self.topology.partials, [body], connection.forward_properties(props))
                sent += len(body)
        except HeloraError as exc:  # parts already sent: the client drops them once the error comes
            self.fail([d], exc, rid=req.rid if req else None, pset=req.params.name if req else "")
            return
        self.metrics.he_product(req.layer, req.direction, seconds)
        self.ack([d])
        self.metrics.request(req.layer, req.direction)
        if req.part == 0:  # a layer call's tokens once, whatever its parts
            self.metrics.add_tokens(req.batch.n_tokens)
        log.debug("rid %s layer %s %s part %d/%d shard %s: %.3f s, %d bytes out", req.rid.hex(), req.layer,
                  req.direction, req.part, req.parts, self.shard_index.get(req.layer), seconds, sent)

    def _to_client(self, props, body: bytes, req: wire.EncryptedRequest) -> bool:
        """Publish a reply part to the client; False if its reply queue is gone (it gave up or
        reconnected under a fresh id: the rest of this part's reply is not computed)."""
        try:
            self.publish(props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id))
            return True
        except (pex.UnroutableError, pex.NackError):
            log.warning("rid %s layer %s: the client's reply queue is gone; reply dropped", req.rid.hex(), req.layer)
            return False


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
    return process.serve("helora-evaluator", EvaluatorConfig.from_args, _build, argv, reuse_memory=True)

if __name__ == "__main__":
    sys.exit(main())

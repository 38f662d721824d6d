"""The encoder's RabbitMQ shell (DESIGN §4): quantize once, write shards, validate and route.

At start: load the model, quantize every block linear, write each evaluator's shard to
``shard_dir`` as ``{layer}.{i}of{n}.npy`` (int8, ``np.save`` without pickle) and the manifest as
``manifest.bin`` (written last, atomically: its presence means the shards are complete). A
manifest already in ``shard_dir`` for the same model and quantization is reused, so a restarted
encoder keeps the public seeds the evaluators and clients already hold.

Serves ``{ns}.manifest`` (RPC: the encoded manifest to ``reply_to``) and ``{ns}.ingress``
(requests: validated, routed to ``{ns}.requests`` with key ``{layer}.s{i}of{n}``,
``reply_to``/``correlation_id`` forwarded). A forward request to a layer cut across evaluators
is gathered by request id, unpacked and cut. Any other multi-part request streams: each part is
checked on its own (its head, its rows against the layer) and passed on as it arrives, so that
the evaluator receives the first part while the client still encrypts the last; one request
streams at a time, and parts of others wait until they are whole (``gate.StreamGate``).
A bad request is dead-lettered with its reason and the client gets an ``ErrorReply``. Logs name
layers, request ids and sizes, never payload.

torch (``.handler``, ``.model``) is imported once ``amqp.serve`` handles SIGTERM, not with this
module: it takes seconds, during which a container's PID 1 would ignore the signal.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pika
import pika.exceptions as pex
from hecommon import amqp, wire
from hecommon import params as P
from hecommon.errors import ConfigError, HeloraError, MalformedMessage
from hecommon.metrics import Metrics
from hecommon.shards import MANIFEST_FILE, make_shards, shard_file

from .config import TINY, EncoderConfig
from .gate import StreamGate

if TYPE_CHECKING:
    from .handler import Shard

log = logging.getLogger("helora.encoder")
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_model(cfg: EncoderConfig):
    """(model, model id) as the client names it (``helora --model tiny`` uses the same id)."""
    from hecommon.model import BUNDLED_MODEL_ID, load_model, tiny_llama

    if cfg.model == TINY:
        return tiny_llama(cfg.seed)[0], cfg.model_id or f"tiny-llama(seed={cfg.seed})"
    return load_model(cfg.model), cfg.model_id or (cfg.model or BUNDLED_MODEL_ID)


def _reusable(old: wire.Manifest, new: wire.Manifest) -> bool:
    """Same model, parameters and quantization: keep the old public seeds."""
    if (old.model, old.params, old.x_bits, old.w_bits, old.metadata) != (
            new.model, new.params, new.x_bits, new.w_bits, new.metadata):
        return False
    if [(e.name, e.d_in, e.d_out, e.members, e.exact_terms) for e in old.layers] != [
            (e.name, e.d_in, e.d_out, e.members, e.exact_terms) for e in new.layers]:
        return False
    return all(np.array_equal(a.row_sums, b.row_sums) and np.array_equal(a.col_sums, b.col_sums)
               and np.array_equal(a.weight_scale, b.weight_scale) for a, b in zip(old.layers, new.layers, strict=True))


def layer_plan(cfg: EncoderConfig, manifest: wire.Manifest) -> dict[str, int]:
    """Shard count of every layer from ``--shards`` (later entries win; default 1)."""
    plan: dict[str, int] = {}
    for e in manifest.layers:
        count = 1
        for blocks, n in cfg.plan:
            if e.block in blocks:
                count = n
        if count > e.d_in:
            raise ConfigError(f"shards: layer {e.name} has {e.d_in} inputs, cannot make {count} shards")
        plan[e.name] = count
    return plan


def prepare(cfg: EncoderConfig) -> tuple[wire.Manifest, dict[str, list[Shard]]]:
    """Quantize, write the shards and the manifest; return what the handler needs."""
    from hecommon.model import discover_groups  # noqa: PLC0415

    from .handler import build_manifest, quantize_groups  # noqa: PLC0415 - torch: module docstring

    log.info("loading and quantizing the model (%s)", cfg.model or "bundled")
    model, model_id = _load_model(cfg)
    groups = discover_groups(model)
    qweights = quantize_groups(model, groups, cfg.bits)
    manifest = build_manifest(model, groups, qweights, P.get(cfg.param_set), x_bits=cfg.bits, model_id=model_id)
    out = Path(cfg.shard_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_path = out / MANIFEST_FILE
    if old_path.is_file():
        try:
            old = wire.decode_manifest(old_path.read_bytes(), cfg.max_message_bytes)
            if _reusable(old, manifest):
                manifest = old
                log.info("reusing the manifest in %s (same model and quantization)", out)
        except HeloraError as exc:
            log.warning("ignoring an unreadable %s: %s", old_path, exc.reason)
    shards = make_shards(manifest, qweights, layer_plan(cfg, manifest))
    for layer, parts in shards.items():
        for i, s in enumerate(parts):
            buf = io.BytesIO()
            np.save(buf, s.values, allow_pickle=False)
            _write_atomic(shard_file(out, layer, i, len(parts)), buf.getvalue())
    _write_atomic(old_path, wire.encode_manifest(manifest, cfg.max_message_bytes))
    log.info("model %s: %d layers quantized, shards and manifest in %s", model_id, len(manifest.layers), out)
    return manifest, shards


class EncoderWorker(amqp.Service):
    name = "encoder"

    def __init__(self, cfg: EncoderConfig, manifest: wire.Manifest, shards: dict[str, list[Shard]],
                 metrics: Metrics | None = None) -> None:
        from .handler import EncoderHandler  # noqa: PLC0415 - torch: module docstring

        super().__init__(cfg, metrics=metrics)
        self.metrics.set_info(manifest.params.name, "numpy")
        self.manifest = manifest
        self.manifest_bytes = wire.encode_manifest(manifest, cfg.max_message_bytes)
        self.handler = EncoderHandler(manifest, {k: [(s.lo, s.hi) for s in v] for k, v in shards.items()})
        self.parts = amqp.PartCollector(cfg.part_timeout_s)
        self.gate = StreamGate(cfg.part_timeout_s)  # multi-part requests that are not cut
        self._route_s: dict[bytes, float] = {}  # a streaming request's first part: its check's seconds

    def declare(self, ch) -> list[str]:
        t = self.topology
        t.declare_queue(ch, t.ingress)
        t.declare_queue(ch, t.manifest)
        return [t.manifest, t.ingress]

    def reset(self) -> None:
        self.parts.clear()
        self.gate.clear()
        self._route_s.clear()

    def in_flight(self) -> int:
        """Deliveries queued or being handled, plus multi-part requests still arriving."""
        return super().in_flight() + len(self.parts) + len(self.gate)

    def tick(self) -> None:
        late, following = self.gate.expired()
        for key, _ in late:
            self._route_s.pop(key, None)
        for key, ds in self.parts.expired() + late:
            self.fail(ds, MalformedMessage(f"request incomplete after {self.parts.timeout_s:.0f} s "
                                           f"({len(ds)} parts arrived)"), rid=key)
        self._pass_on(following)

    def handle(self, d: amqp.Delivery) -> None:
        if d.queue == self.topology.manifest:
            self._serve_manifest(d)
        else:
            self._route(d)

    def _serve_manifest(self, d: amqp.Delivery) -> None:
        if not d.properties.reply_to:
            self.dead_letter([d], MalformedMessage("manifest request without reply_to"))
            return
        props = pika.BasicProperties(correlation_id=d.properties.correlation_id)
        try:
            self.publish(d.properties.reply_to, self.manifest_bytes, props)
        except (pex.UnroutableError, pex.NackError):
            log.warning("manifest requester went away before the reply")
        self.ack([d])

    def _route(self, d: amqp.Delivery) -> None:
        try:
            with self.metrics.stage("decode"):
                chunk = wire.decode_request_head(d.body, self.limit)  # residues: sizes only, not unpacked
            if chunk.parts > 1 and not self.handler.cuts(chunk):
                self._stream(chunk, d)
                return
            got = self.parts.add(chunk.rid, chunk, d)
        except HeloraError as exc:
            self.fail([d], exc)
            return
        self.ack(self.parts.take_copies())  # redundant copies (their originals are held): ack now
        if got is not None:
            self._route_whole(*got)

    def _stream(self, head: wire.RequestHead, d: amqp.Delivery) -> None:
        """A part of a multi-part request that every shard gets as it came (``StreamGate``)."""
        try:
            t0 = time.perf_counter()
            self.handler.validate_part(head)
            action, what = self.gate.offer(head, d)
            if head.part == 0 and action in ("forward", "hold"):  # the route stage counts requests:
                self._route_s[head.rid] = time.perf_counter() - t0   # a streaming one when part 0 goes on
        except HeloraError as exc:
            self.fail([d], exc, rid=head.rid, pset=head.params.name)
            return
        self.ack(self.gate.waiting.take_copies())
        if action == "copy":
            self.ack(what)
        elif action == "forward":
            self._pass_on(what)
        elif action == "whole":
            self._route_whole(*what)

    def _pass_on(self, parts: list[tuple[wire.RequestHead, amqp.Delivery]]) -> None:
        """Forward a streaming request's parts to every shard of its layer, acking each once it is
        out; then those of the request that streams next, if this one is complete."""
        while parts:
            for head, d in parts:
                count = self.handler.shard_count(head)
                props = amqp.forward_properties(d.properties)
                try:
                    for index in range(count):
                        key = self.topology.routing_key(head.layer, index, count)
                        self.publish(key, d.body, props, exchange=self.topology.requests)
                except pex.UnroutableError:
                    exc = amqp.Unroutable(f"no evaluator holds layer {head.layer} for {count} shard(s)")
                    self.fail([d], exc, rid=head.rid, pset=head.params.name)
                    continue
                self.ack([d])
                if head.part == 0:
                    self.metrics.observe_stage("route", self._route_s.pop(head.rid, 0.0))
                    self.metrics.request(head.layer, head.direction)
            parts = self.gate.forwarded([h for h, _ in parts])
            self.ack(self.gate.waiting.take_copies())

    def _route_whole(self, heads: list[wire.RequestHead], ds: list[amqp.Delivery]) -> None:
        """A whole request (all its parts in): validated, cut if its layer is sharded by rows, and
        published to every shard, its parts one after the other."""
        d = ds[-1]
        self._route_s.pop(heads[0].rid, None)
        try:
            req = wire.join_heads(heads)
            with self.metrics.stage("route"):
                self.handler.validate(req)
                if self.handler.cuts(req):  # forward rows split across shards: unpack and cut
                    whole = wire.join([wire.decode_request(x.body, self.limit) for x in ds[: len(heads)]])
                    routed = [(i, [wire.encode_request(c, self.limit) for c in wire.split(sub, self.limit)])
                              for i, sub in self.handler.route(whole)]
                else:  # every shard gets the request as it came: the validated bodies, in part order
                    bodies = [x.body for x in ds[: len(heads)]]
                    routed = [(i, bodies) for i in range(self.handler.shard_count(req))]
        except HeloraError as exc:
            self.fail(ds, exc, rid=heads[0].rid, pset=heads[0].params.name)
            return
        props = amqp.forward_properties(d.properties)
        for index, bodies in routed:
            key = self.topology.routing_key(req.layer, index, len(routed))
            try:
                self.publish_all(key, bodies, props, exchange=self.topology.requests)
            except pex.UnroutableError:
                exc = amqp.Unroutable(f"no evaluator holds shard {index} of {len(routed)} of layer {req.layer} "
                                      f"(routing key {key!r})")
                self.fail(ds, exc, rid=req.rid, pset=req.params.name)
                return
        self.ack(ds)
        self.metrics.request(req.layer, req.direction)
        log.debug("rid %s layer %s %s: %d bytes routed to %d shard(s)", req.rid.hex(), req.layer, req.direction,
                  sum(len(x.body) for x in ds), len(routed))


def main(argv: list[str] | None = None) -> int:
    return amqp.serve("helora-encoder", EncoderConfig.from_args,
                      lambda cfg, metrics: EncoderWorker(cfg, *prepare(cfg), metrics=metrics), argv)

if __name__ == "__main__":
    sys.exit(main())

"""The encoder's RabbitMQ shell (DESIGN §4): quantize once, write shards, serve the manifest.

At start: load the model, quantize every block linear, write each evaluator's shard to
``shard_dir`` as ``{layer}.{i}of{n}.npy`` (int8, ``np.save`` without pickle) and the manifest as
``manifest.bin`` (written last, atomically: its presence means the shards are complete). A
manifest already in ``shard_dir`` for the same model and quantization is reused, so a restarted
encoder keeps the public seeds the evaluators and clients already hold.

Serves ``{ns}.manifest`` (RPC: the encoded manifest to ``reply_to``). The manifest carries each
layer's shard count, with which clients send their requests straight to the evaluators
(``hecommon.route``): the encoder is not on the per-request path. Logs name the model and its
layers, never payload.

torch (``.handler``, ``.model``) is imported once ``process.serve`` handles SIGTERM, not with this
module: it takes seconds, during which a container's PID 1 would ignore the signal.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pika
import pika.exceptions as pex
from hecommon import wire
from hecommon.broker import amqp, process
from hecommon.broker.metrics import Metrics
from hecommon.errors import ConfigError, HeloraError, MalformedMessage
from hecommon.he import params as P
from hecommon.shards import MANIFEST_FILE, make_shards, shard_file

from .config import TINY, EncoderConfig

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


def prepare(cfg: EncoderConfig) -> wire.Manifest:
    """Quantize, write the shards and the manifest (with every layer's shard count: the clients
    address the evaluators with it); return the manifest."""
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
    plan = layer_plan(cfg, manifest)
    manifest = dataclasses.replace(manifest, layers=tuple(dataclasses.replace(e, shards=plan[e.name])
                                                          for e in manifest.layers))
    shards = make_shards(manifest, qweights, plan)
    for layer, parts in shards.items():
        for i, s in enumerate(parts):
            buf = io.BytesIO()
            np.save(buf, s.values, allow_pickle=False)
            _write_atomic(shard_file(out, layer, i, len(parts)), buf.getvalue())
    _write_atomic(old_path, wire.encode_manifest(manifest, cfg.max_message_bytes))
    log.info("model %s: %d layers quantized, shards and manifest in %s", model_id, len(manifest.layers), out)
    return manifest


class EncoderWorker(amqp.Service):
    name = "encoder"

    def __init__(self, cfg: EncoderConfig, manifest: wire.Manifest, metrics: Metrics | None = None) -> None:
        super().__init__(cfg, metrics=metrics)
        self.metrics.set_info(manifest.params.name, "numpy")
        self.manifest = manifest
        self.manifest_bytes = wire.encode_manifest(manifest, cfg.max_message_bytes)

    def declare(self, ch) -> list[str]:
        t = self.topology
        t.declare_queue(ch, t.manifest)
        return [t.manifest]

    def handle(self, d: amqp.Delivery) -> None:
        if not d.properties.reply_to:
            self.dead_letter([d], MalformedMessage("manifest request without reply_to"))
            return
        props = pika.BasicProperties(correlation_id=d.properties.correlation_id)
        try:
            self.publish(d.properties.reply_to, self.manifest_bytes, props)
        except (pex.UnroutableError, pex.NackError):
            log.warning("manifest requester went away before the reply")
        self.ack([d])


def main(argv: list[str] | None = None) -> int:
    return process.serve("helora-encoder", EncoderConfig.from_args,
                      lambda cfg, metrics: EncoderWorker(cfg, prepare(cfg), metrics=metrics), argv)

if __name__ == "__main__":
    sys.exit(main())

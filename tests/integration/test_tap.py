"""What crosses the broker (DESIGN §7.1, issue 4): record every message of a training run and look
for the client's secrets in it.

The fleet runs in a vhost of its own with RabbitMQ's firehose tracer on (``rabbitmqctl trace_on
-p VHOST``): every message published in that vhost, to any exchange including the default one
(client requests to ``ingress``, partials, replies), is copied to ``amq.rabbitmq.trace`` with its
routing key, properties and headers. A tap queue bound there with ``publish.#`` records them all
(other helpers' traffic in other vhosts is neither traced nor slowed down).

The needles, gathered on the client during the same run: the 32-byte master key (raw, hex,
base64), windows of the per-request ternary secrets (int8/int32/int64 and their residues mod the
first prime), the token ids (int32/int64 arrays, the text, decimal lists), rows of the real
activations and output-gradients (float32/float16/bfloat16/float64 bytes, and their quantized
integers as uint8/int8/int16/int32/int64), and the LoRA weights before and after the step
(float32/float64). The test first shows that the search finds every needle once it is spliced
into a copy of the recording, so that it can fail.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse

import numpy as np
import pika
import pytest
import torch
from hecommon import amqp
from hecommon.keys import SecretKey
from hecommon.quantize import fold_output_scale, quantize_rows
from helora_encoder.model import discover_groups, tiny_llama
from helora_orchestrator.broker import make_broker_backend
from helora_orchestrator.client_model import ClientModel, causal_lm_loss
from helora_orchestrator.data import ByteTokenizer
from helora_orchestrator.lora import LoraSettings
from helora_orchestrator.up import LocalFleet

pytestmark = pytest.mark.integration
BROKER = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F").rsplit("/", 1)[0]
LIMIT = 1024 * 1024
WINDOW = 16  # values per float / integer needle
MIN_DISTINCT = 8  # a needle window must not be (nearly) constant: zeros occur everywhere


def _rabbitmqctl(*args: str) -> None:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise AssertionError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip()}")


@pytest.fixture(scope="module")
def traced_url():
    """A fresh vhost with the firehose tracer on; deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to create a traced vhost")
    vhost = f"helora-tap-{secrets.token_hex(4)}"
    try:
        _rabbitmqctl("add_vhost", vhost)
    except (AssertionError, OSError) as exc:
        pytest.skip(f"cannot administer the broker here: {exc}")
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        _rabbitmqctl("trace_on", "-p", vhost)
        yield f"{BROKER}/{urllib.parse.quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


class Tap(threading.Thread):
    """Consumes ``amq.rabbitmq.trace`` with ``publish.#``: (routing key, metadata, body) per message."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.records: list[tuple[str, str, bytes, bytes]] = []  # (trace key, routing key, metadata, body)
        self.bound = threading.Event()
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.url))
            ch = conn.channel()
            q = ch.queue_declare("", exclusive=True).method.queue
            ch.queue_bind(q, "amq.rabbitmq.trace", "publish.#")
            ch.basic_consume(q, self._on_message, auto_ack=True)
            self.bound.set()
            idle_since = None
            while True:
                before = len(self.records)
                conn.process_data_events(time_limit=0.2)
                if not self._halt.is_set():
                    continue
                if len(self.records) != before or ch.queue_declare(q, passive=True).method.message_count:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > 1.0:
                    break
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.bound.set()

    def _on_message(self, ch, method, props, body: bytes) -> None:
        headers = props.headers or {}
        keys = headers.get("routing_keys") or [""]
        self.records.append((method.routing_key, str(keys[0]), repr(headers.get("properties")).encode(), body))

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
        assert not self.is_alive() and self.error is None, self.error


class Recorder:
    """Instrumentation on the client's backend: the per-request secrets and the plaintext rows
    (inputs of every forward, output-gradients of every backward) it handles."""

    def __init__(self, backend) -> None:
        self.secrets: list[np.ndarray] = []
        self.forward: list[tuple[str, np.ndarray]] = []
        self.backward: list[tuple[str, np.ndarray]] = []
        key, fwd, bwd = backend.key, backend.forward, backend.backward
        recorder = self

        class KeyView:
            def request_secret(self, params, nonce):
                s = key.request_secret(params, nonce)
                recorder.secrets.append(s.s.copy())
                return s

        backend.key = KeyView()
        backend.forward = lambda g, x: (self.forward.append((g, np.array(x, np.float32))), fwd(g, x))[1]
        backend.backward = lambda g, dy: (self.backward.append((g, np.array(dy, np.float32))), bwd(g, dy))[1]


# -- needles ------------------------------------------------------------------------------------------
def _windows(rows: np.ndarray, count: int) -> list[np.ndarray]:
    """Up to ``count`` windows of WINDOW values, from different rows, each with enough distinct values."""
    out = []
    for row in np.asarray(rows).reshape(-1, rows.shape[-1]):
        w = row[:WINDOW]
        if len(w) == WINDOW and len(np.unique(w)) >= MIN_DISTINCT:
            out.append(w)
        if len(out) == count:
            break
    return out


def _float_encodings(name: str, w: np.ndarray) -> dict[str, bytes]:
    f32 = np.asarray(w, np.float32)
    return {f"{name} float32": f32.tobytes(), f"{name} float16": f32.astype(np.float16).tobytes(),
            f"{name} bfloat16": (f32.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
            f"{name} float64": f32.astype(np.float64).tobytes()}


def _int_encodings(name: str, w: np.ndarray, dtypes=("uint8", "int8", "int16", "int32", "int64")) -> dict[str, bytes]:
    out = {}
    for dt in dtypes:
        shifted = w - 128 if dt == "int8" and w.min() >= 0 else w  # unsigned bytes seen as signed
        out[f"{name} {dt}"] = np.asarray(shifted).astype(dt).tobytes()
    return out


def _needles(key: SecretKey, rec: Recorder, backend, ids: torch.Tensor, text: str,
             loras: list[dict[str, torch.Tensor]]) -> dict[str, bytes]:
    master = key._master  # the test's own key: reading it is how we know what must not leak
    n: dict[str, bytes] = {"master key raw": master, "master key hex": master.hex().encode(),
                           "master key base64": base64.b64encode(master)}
    p0 = backend.params.primes[0]
    for i, s in enumerate(rec.secrets[:8]):
        w = s[100:100 + 8 * WINDOW]  # 128 ternary values
        n.update(_int_encodings(f"request secret {i}", w, ("int8", "int32", "int64")))
        n[f"request secret {i} residues mod p0 uint32"] = (w.astype(np.int64) % p0).astype(np.uint32).tobytes()
    flat = ids.reshape(-1).numpy()
    n.update(_int_encodings("token ids", flat[:WINDOW], ("int32", "int64")))
    n["token text"] = text[:24].encode()
    n["token ids decimal"] = " ".join(map(str, flat[:10])).encode()
    n["token ids list"] = ", ".join(map(str, flat[:10])).encode()
    for direction, calls in (("activation", rec.forward[:6]), ("gradient", rec.backward[:6])):
        for layer, rows in calls:
            e = backend.layers[layer]
            q = quantize_rows(rows if direction == "activation" else fold_output_scale(rows, e.weight_scale), 8)
            for j, w in enumerate(_windows(rows, 2)):
                n.update(_float_encodings(f"{direction} {layer} row {j}", w))
            for j, w in enumerate(_windows(q.values, 2)):
                n.update(_int_encodings(f"quantized {direction} {layer} row {j}", w))
    for k, state in enumerate(loras):
        for name, t in state.items():
            flat = t.detach().numpy().reshape(-1)  # lora_B is (d_out, r): rows shorter than a window
            for j, w in enumerate(_windows(flat[: len(flat) // WINDOW * WINDOW].reshape(-1, WINDOW), 1)):
                f32 = np.asarray(w, np.float32)
                n[f"lora {k} {name} {j} float32"] = f32.tobytes()
                n[f"lora {k} {name} {j} float64"] = f32.astype(np.float64).tobytes()
    return n


def _found(blob: bytes, needles: dict[str, bytes]) -> set[str]:
    return {name for name, needle in needles.items() if needle in blob}


# -- the test ---------------------------------------------------------------------------------------------
def test_no_secret_plaintext_or_lora_weight_crosses_the_broker(traced_url, tmp_path):
    from pydoc_data.topics import topics

    ns = f"helora-tap-{secrets.token_hex(4)}"
    tap = Tap(traced_url)
    tap.start()
    assert tap.bound.wait(30) and tap.error is None, tap.error
    fleet = LocalFleet(traced_url, ns, "tiny", seed=0, evaluators=2, shard_dir=tmp_path / "shards",
                       max_message_bytes=LIMIT, backend="numpy", threads=1)
    try:
        fleet.start(timeout_s=120)
        key = SecretKey.generate()
        model = tiny_llama(0)[0]
        backend = make_broker_backend(traced_url, key, namespace=ns, model=model, timeout_s=90,
                                      max_message_bytes=LIMIT)
        rec = Recorder(backend)
        client = ClientModel(model, backend, discover_groups(model), LoraSettings(r=4, alpha=8), seed=0)
        before = {k: v.clone() for k, v in client.lora_state_dict().items()}
        text = next(t for t in topics.values() if len(t) > 200)[:48]
        ids = torch.tensor([ByteTokenizer().encode(text)], dtype=torch.long).reshape(2, 24)
        opt = torch.optim.AdamW(client.lora_parameters(), lr=1e-2)
        for _ in range(2):  # after one Adam step lora_B is all ±lr: too uniform to make a needle
            opt.zero_grad(set_to_none=True)
            loss, n = causal_lm_loss(client(ids), ids)
            (loss / n).backward()
            opt.step()
        with torch.no_grad():
            client(ids)  # one more forward with the trained adapter
        after = client.lora_state_dict()
        transport = backend.transport
        transport.close()
    finally:
        codes = fleet.stop()
        tap.stop()
        fleet.delete_topology()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{fleet.logs()}"

    # the tap saw everything: every request byte the client sent, and its replies
    topo = amqp.Topology(ns)
    sent = sum(len(b) for trace, key, _, b in tap.records if trace == "publish." and key == topo.ingress)
    replies = sum(len(b) for trace, key, _, b in tap.records if trace == "publish." and key.startswith("amq.gen-"))
    assert sent == transport.bytes_sent > 0
    assert replies >= transport.bytes_received > 0
    assert {f"publish.{topo.requests}", "publish."} <= {t for t, *_ in tap.records}
    assert {topo.partials, topo.manifest} <= {k for _, k, _, _ in tap.records}
    blob = b"\x00".join(t.encode() + k.encode() + meta + body for t, k, meta, body in tap.records)

    needles = _needles(key, rec, backend, ids, text, [before, after])
    kinds = {name.split(" ")[0] for name in needles}
    assert {"master", "request", "token", "activation", "gradient", "quantized", "lora"} <= kinds, kinds
    assert len(rec.secrets) >= 8 and any("lora_B" in k for k in needles if k.startswith("lora 1"))
    # the search can fail: every needle spliced into a copy of a real message is found
    largest = max((body for *_, body in tap.records), key=len)
    probe = largest[: len(largest) // 2] + b"".join(needles.values()) + largest[len(largest) // 2:]
    assert _found(probe, needles) == set(needles)
    # and nothing of it is in what crossed the broker
    leaked = _found(blob, needles)
    assert not leaked, f"found in broker traffic: {sorted(leaked)[:10]}"

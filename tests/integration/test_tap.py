"""What crosses the broker (DESIGN §7.1, issue 4): record every message of a training run and look
for the client's secrets in it.

The fleet runs in a vhost of its own with RabbitMQ's firehose tracer on (``rabbitmqctl trace_on
-p VHOST``): every message published in that vhost, to any exchange including the default one
(client requests to the evaluators through ``requests``, partials, replies), is copied to ``amq.rabbitmq.trace`` with its
routing key, properties and headers. A tap queue bound there with ``publish.#`` records them all
(other helpers' traffic in other vhosts is neither traced nor slowed down).

The needles, gathered on the client during the same run: the 32-byte master key (raw, hex,
base64), windows of the per-request ternary secrets (int8/int32/int64 and their residues mod the
first prime), the token ids (int32/int64 arrays, the text, decimal lists), rows of the real
activations and output-gradients (float32/float16/bfloat16/float64 bytes, and their quantized
integers as uint8/int8/int16/int32/int64), and the LoRA weights before and after the step
(float32/float64).

The same needles are looked for in what the run leaves in text (issue 15): every line the services
logged (the fleet's log files; the services run at DEBUG, so every log statement on the request
path fires), the client's own log records and output, and each ``/metrics`` page (the four services'
and the orchestrator's, scraped before the fleet stops). There every byte needle is also searched as
hex and as base64 (at each of its three alignments), the key and the token text in their escaped
forms, and the integers and floats of each window as decimal numbers in whatever format and with
whatever separators they are printed (``Decimals``).

Each search first shows that it finds every needle once it is spliced into a copy of what it
searches (a real message; the logs; the metrics pages, in several renderings), so that it can fail.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pika
import pytest
import torch
from hecommon.broker import topology
from hecommon.he.keys import SecretKey
from hecommon.he.quantize import fold_output_scale, quantize_rows
from hecommon.model import discover_groups, tiny_llama
from helora_orchestrator.broker import make_broker_backend
from helora_orchestrator.client_model import ClientModel, causal_lm_loss
from helora_orchestrator.data import ByteTokenizer
from helora_orchestrator.lora import LoraSettings
from helora_orchestrator.metrics import start_metrics
from helora_orchestrator.operator.up import LocalFleet
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration
BROKER = os.environ.get("HELORA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F").rsplit("/", 1)[0]
LIMIT = 1024 * 1024
WINDOW = 16  # values per float / integer needle
MIN_DISTINCT = 8  # a needle window must not be (nearly) constant: zeros occur everywhere
#: a float window as decimal text: its first values (numpy prints a large array's rows as their first
#: three), each printed with at least this many significant digits (fewer match by chance)
FLOAT_RUN, FLOAT_DIGITS = 3, 3
#: the line each service logs once its metrics endpoints listen (``hecommon.broker.metrics.serve``)
METRICS_LINE = re.compile(rb"metrics on http://[^:/\s]+:(\d+)/metrics")


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


NUMBER = re.compile(rb"(?<![\w.-])-?(\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?(?![\w.])")


def _digits(number: bytes) -> int:
    """Significant digits of a printed number (``0.00120`` → 3)."""
    m = NUMBER.fullmatch(number)
    return len((m[1] + (m[2] or b"")).lstrip(b"0")) if m else 0


DecimalNeedle = tuple[np.ndarray, bool]  # (values, whether they are floats): a needle as printed numbers


def _float_run(w: np.ndarray) -> DecimalNeedle | None:
    """The first FLOAT_RUN values of a float window, if each prints with FLOAT_DIGITS digits or more."""
    v = np.asarray(w[:FLOAT_RUN], np.float32)
    return (v, True) if all(_digits(str(x).encode()) >= FLOAT_DIGITS for x in v) else None


def _needles(key: SecretKey, rec: Recorder, backend, ids: torch.Tensor, text: str,
             loras: list[dict[str, torch.Tensor]]) -> tuple[dict[str, bytes], dict[str, DecimalNeedle]]:
    """Byte needles (searched as bytes everywhere) and decimal needles (searched in text)."""
    master = key._master  # the test's own key: reading it is how we know what must not leak
    n: dict[str, bytes] = {"master key raw": master, "master key hex": master.hex().encode(),
                           "master key base64": base64.b64encode(master),
                           "master key HEX": master.hex().upper().encode(),
                           "master key base64url": base64.urlsafe_b64encode(master),
                           "master key repr": repr(master)[2:-1].encode()}
    d: dict[str, DecimalNeedle | None] = {"master key decimal": (np.frombuffer(master, np.uint8), False)}
    p0 = backend.params.primes[0]
    for i, s in enumerate(rec.secrets[:8]):
        w = s[100:100 + 8 * WINDOW]  # 128 ternary values
        n.update(_int_encodings(f"request secret {i}", w, ("int8", "int32", "int64")))
        n[f"request secret {i} residues mod p0 uint32"] = (w.astype(np.int64) % p0).astype(np.uint32).tobytes()
        d[f"request secret {i} decimal"] = (w[:2 * WINDOW], False)  # 3^32 runs of -1, 0, 1
        d[f"request secret {i} residues decimal"] = (w[:2 * WINDOW].astype(np.int64) % p0, False)
    flat = ids.reshape(-1).numpy()
    n.update(_int_encodings("token ids", flat[:WINDOW], ("int32", "int64")))
    n["token text"] = text[:24].encode()
    n["token text repr"] = repr(text[:24])[1:-1].encode()  # the text has a newline and quotes
    n["token text json"] = json.dumps(text[:24])[1:-1].encode()
    n["token ids decimal"] = " ".join(map(str, flat[:10])).encode()
    n["token ids list"] = ", ".join(map(str, flat[:10])).encode()
    d["token ids decimal run"] = (flat[:WINDOW], False)
    for direction, calls in (("activation", rec.forward[:6]), ("gradient", rec.backward[:6])):
        for layer, rows in calls:
            e = backend.layers[layer]
            q = quantize_rows(rows if direction == "activation" else fold_output_scale(rows, e.weight_scale), 8)
            for j, w in enumerate(_windows(rows, 2)):
                n.update(_float_encodings(f"{direction} {layer} row {j}", w))
                d[f"{direction} {layer} row {j} decimal"] = _float_run(w)
            for j, w in enumerate(_windows(q.values, 2)):
                n.update(_int_encodings(f"quantized {direction} {layer} row {j}", w))
                d[f"quantized {direction} {layer} row {j} decimal"] = (w, False)
    for k, state in enumerate(loras):
        for name, t in state.items():
            flat = t.detach().numpy().reshape(-1)  # lora_B is (d_out, r): rows shorter than a window
            for j, w in enumerate(_windows(flat[: len(flat) // WINDOW * WINDOW].reshape(-1, WINDOW), 1)):
                f32 = np.asarray(w, np.float32)
                n[f"lora {k} {name} {j} float32"] = f32.tobytes()
                n[f"lora {k} {name} {j} float64"] = f32.astype(np.float64).tobytes()
                d[f"lora {k} {name} {j} decimal"] = _float_run(f32)
    return n, {name: v for name, v in d.items() if v is not None}


def _found(blob: bytes, needles: dict[str, bytes]) -> set[str]:
    return {name for name, needle in needles.items() if needle in blob}


# -- the same needles in text -----------------------------------------------------------------------------
def _text_forms(needles: dict[str, bytes]) -> dict[str, bytes]:
    """Each needle as lower-case hex, and as base64 at each of the three byte offsets it may start at
    (the characters that depend on the needle's bytes alone)."""
    out = {}
    for name, b in needles.items():
        out[f"{name} as hex"] = b.hex().encode()
        for k in range(3):
            out[f"{name} as base64+{k}"] = base64.b64encode(bytes(k) + b)[-(-8 * k // 6): 8 * (k + len(b)) // 6]
    return out


class Decimals:
    """The numbers of a text in order, each with half a unit of its last printed digit: finds a
    needle's values printed one after the other in any format (``%d``, ``%.4e``, numpy's, repr)
    with any separators between them."""

    def __init__(self, text: bytes) -> None:
        found = [(float(m[0]), 0.5 * 10.0 ** (min(max(int(m[3] or 0), -300), 300) - len(m[2] or b"")),
                  _digits(m[0])) for m in NUMBER.finditer(text)]
        self.value, self.half_unit, self.digits = np.array(found, np.float64).reshape(-1, 3).T

    def contains(self, values: np.ndarray, floats: bool) -> bool:
        """Integers: printed exactly; floats: each to its last printed digit (a float32 printed by
        its shortest repr may be off by half an ulp), with FLOAT_DIGITS significant digits or more."""
        w = np.asarray(values, np.float64)
        starts = len(self.value) - len(w) + 1
        hit = np.ones(max(starts, 0), bool)
        for j, x in enumerate(w):
            value, half, digits = (a[j:j + starts] for a in (self.value, self.half_unit, self.digits))
            if floats:
                hit &= (np.abs(value - x) <= half + 2.0 ** -23 * abs(x)) & (digits >= FLOAT_DIGITS)
            else:
                hit &= (value == x) & (half <= 0.5)
            if not hit.any():
                return False
        return bool(hit.any())


def _renderings(values: np.ndarray, floats: bool) -> list[bytes]:
    """Three ways a log line or a page would print ``values``."""
    if floats:
        v = np.asarray(values, np.float32)
        out = [", ".join(map(str, v)), np.array2string(v), " ".join(f"{x:.4e}" for x in v)]
    else:
        v = np.asarray(values, np.int64)
        out = [", ".join(map(str, v)), np.array2string(v), "\t".join(f"{x:d}" for x in v)]
    return [r.encode() for r in out]


def _found_in_text(text: bytes, strings: dict[str, bytes], decimals: dict[str, DecimalNeedle]) -> set[str]:
    numbers = Decimals(text)
    return _found(text, strings) | {name for name, (v, floats) in decimals.items() if numbers.contains(v, floats)}


def _spliced(text: bytes, strings: dict[str, bytes], decimals: dict[str, DecimalNeedle], rendering: int) -> bytes:
    """A copy of ``text`` with every needle (decimals in their ``rendering``) between two of its lines."""
    lines = [*strings.values(), *(_renderings(v, floats)[rendering] for v, floats in decimals.values())]
    mid = text.find(b"\n", len(text) // 2) + 1 or len(text)
    return text[:mid] + b"\n".join(lines) + b"\n" + text[mid:]


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200, (url, r.status)
        return r.read()


def _service_metrics(fleet: LocalFleet, name: str) -> bytes:
    """A service's ``/metrics``, on the port its log names (the fleet asks for any free port)."""
    ports = METRICS_LINE.findall((fleet.log_dir / f"{name}.log").read_bytes())
    assert ports, f"{name} logged no metrics port\n{fleet.logs()}"
    return _scrape(f"http://127.0.0.1:{int(ports[-1])}/metrics")


def _totals(page: bytes) -> dict[str, float]:
    """Each sample name of a metrics page → the sum of its values."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(page.decode()):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


# -- the test ---------------------------------------------------------------------------------------------
def test_no_secret_plaintext_or_lora_weight_crosses_the_broker(traced_url, tmp_path, monkeypatch, caplog, capfd):
    from pydoc_data.topics import topics

    monkeypatch.setenv("HELORA_LOG_LEVEL", "DEBUG")  # the services inherit it: every log statement fires
    caplog.set_level(logging.DEBUG, logger="helora")  # the client's own records
    ns = f"helora-tap-{secrets.token_hex(4)}"
    tap = Tap(traced_url)
    tap.start()
    assert tap.bound.wait(30) and tap.error is None, tap.error
    fleet = LocalFleet(traced_url, ns, "tiny", seed=0, evaluators=2, shard_dir=tmp_path / "shards",
                       max_message_bytes=LIMIT, backend="numpy", threads=1)
    owner_server = None
    try:
        fleet.start(timeout_s=120)
        key = SecretKey.generate()
        model = tiny_llama(0)[0]
        backend = make_broker_backend(traced_url, key, namespace=ns, model=model, timeout_s=90,
                                      max_message_bytes=LIMIT)
        rec = Recorder(backend)
        client = ClientModel(model, backend, discover_groups(model), LoraSettings(r=4, alpha=8), seed=0)
        owner_metrics, owner_server = start_metrics(0, "127.0.0.1", client)  # as `helora train --metrics-port 0`
        before = {k: v.clone() for k, v in client.lora_state_dict().items()}
        text = next(t for t in topics.values() if len(t) > 200)[:48]
        ids = torch.tensor([ByteTokenizer().encode(text)], dtype=torch.long).reshape(2, 24)
        opt = torch.optim.AdamW(client.lora_parameters(), lr=1e-2)
        t0 = time.perf_counter()
        for step in range(2):  # after one Adam step lora_B is all ±lr: too uniform to make a needle
            opt.zero_grad(set_to_none=True)
            loss, n = causal_lm_loss(client(ids), ids)
            (loss / n).backward()
            opt.step()
            owner_metrics.record_step(step + 1, loss.item() / n, n, n * (step + 1) / (time.perf_counter() - t0))
        with torch.no_grad():
            client(ids)  # one more forward with the trained adapter
        after = client.lora_state_dict()
        transport = backend.transport
        transport.close()
        pages = {name: _service_metrics(fleet, name) for name in fleet.procs}  # before the fleet stops
        pages["orchestrator"] = _scrape(f"http://127.0.0.1:{owner_server.port}/metrics")
    finally:
        if owner_server is not None:
            owner_server.close()
        codes = fleet.stop()
        tap.stop()
        fleet.delete_topology()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{fleet.logs()}"

    # the tap saw everything: every request byte the client sent, and its replies
    topo = topology.Topology(ns)
    sent = sum(len(b) for trace, key, _, b in tap.records if trace == f"publish.{topo.requests}")  # client → evaluators
    replies = sum(len(b) for trace, key, _, b in tap.records if trace == "publish." and key.startswith("amq.gen-"))
    assert sent == transport.bytes_sent > 0
    assert replies >= transport.bytes_received > 0
    assert {f"publish.{topo.requests}", "publish."} <= {t for t, *_ in tap.records}
    assert {topo.partials, topo.manifest} <= {k for _, k, _, _ in tap.records}
    blob = b"\x00".join(t.encode() + k.encode() + meta + body for t, k, meta, body in tap.records)

    needles, decimals = _needles(key, rec, backend, ids, text, [before, after])
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

    # the text the run left: every service's log, the client's log and output, every /metrics page
    logs = {f"{p.stem} log": p.read_bytes() for p in sorted(fleet.log_dir.glob("*.log"))}
    logs["client log"] = caplog.text.encode() + "".join(capfd.readouterr()).encode()
    assert len(logs) == len(codes) + 1 and all(logs.values()), {k: len(v) for k, v in logs.items()}
    assert b" DEBUG helora." in b"".join(logs.values()), "the services did not log at DEBUG"
    assert b"metrics on http://127.0.0.1:" in logs["client log"]
    totals = {name: _totals(page) for name, page in pages.items()}
    assert all(t["helora_bytes_total"] > 0 and (name == "encoder" or t["helora_requests_total"] > 0)
               for name, t in totals.items() if name != "orchestrator"), totals  # the encoder: manifests only
    assert totals["orchestrator"]["helora_orchestrator_request_seconds_count"] > 0, totals["orchestrator"]
    assert all(page.count(b"\nhelora_") >= 10 for page in pages.values())
    kinds = {name.split(" ")[0] for name in decimals}
    assert {"master", "request", "token", "activation", "gradient", "quantized", "lora"} <= kinds, kinds
    strings = needles | _text_forms(needles)
    # the search can fail: every needle, in every rendering, spliced into a copy is found
    for what, copy in (("logs", b"\n".join(logs.values())), ("metrics", b"\n".join(pages.values()))):
        for r in range(3):
            found = _found_in_text(_spliced(copy, strings, decimals, r), strings, decimals)
            missed = (set(strings) | set(decimals)) - found
            assert not missed, f"{what}, rendering {r}: not found once spliced in: {sorted(missed)[:10]}"
    # and nothing of it is in any of them
    for where, written in {**logs, **{f"{name} /metrics": page for name, page in pages.items()}}.items():
        leaked = _found_in_text(written, strings, decimals)
        assert not leaked, f"found in the {where}: {sorted(leaked)[:10]}"

"""Throughput of the whole system on this machine (issue 17): the client's cost per value, the
encrypted step against plain PEFT, and the bytes a broker run moves.

    python benchmarks/throughput.py [--quick] [--json PATH] [--skip-broker]

In one run, every key at the top level of the JSON:

- ``client_ns_per_value_1_thread``, ``client_ns_per_value_all_threads``: the client's whole cost
  of one value crossing the wire: quantize, encrypt, cut and encode (up); decode, join, decrypt,
  fold and dequantize (down), through the real client (``EncryptedBackend`` over the wire codec,
  as a broker client: the layer's switched ``a`` held, replies ``b`` alone), at full packing
  (N = 2048 tokens a request), over the block linears of SmolLM2-135M and Llama-3.2-1B (one block
  of random weights each: only the shapes matter), forward and backward. A value is one
  coefficient of one ciphertext, up or down. The server's seconds are not in it: two real passes
  compute each layer's replies (the first gives the client its ``a``), later passes replay the
  second pass's reply under the request's id (the same bytes the server would send; the result
  decrypts to noise, which costs the same).
- ``fft_ns_per_value``: one batched complex128 FFT of size N over as many rows as those requests
  carry (up and down), one thread, through the client's own FFT (``hecommon.he.fft``: FFTW where
  installed) in its blocks of rows: the floor; ``client_over_fft`` = 1-thread client / FFT.
- ``client_parallel_speedup_2_threads``: 1-thread over 2-thread client time.
- The client passes at each thread count and the floor are timed in rounds (one of each a round,
  medians over the rounds), so that the figures of a ratio are taken minutes apart at most: this
  machine's speed drifts within a run.
- ``slowdown_vs_plain_peft``: SmolLM2-135M encrypted (embedded, ``helora train``'s default) vs
  plain PEFT (transformers + PEFT, fp32) on this CPU, same batches (8 × 256 tokens), each after
  one warm-up step: the median encrypted step over the median of plain PEFT's steps, which run
  before and again after the encrypted ones (this machine's speed drifts within a run; both
  lists are in ``step_seconds``; the second run shares the client's heap setting,
  ``helora_orchestrator.heap``, which the encrypted session set for the process).
- ``broker_hops_per_byte``: the bytes through the broker (every body published into it and
  delivered out of it: each party's own counters, the services' ``helora_bytes_total`` and the
  client's transport) over the client's own wire bytes, in a SmolLM2 step over RabbitMQ with one
  evaluator; 2.0 is one hop each way. ``equals_embedded``: that run's LoRA weights equal the
  embedded run's bit for bit after every step.
- ``transport_ratio``: MB/s that the fleet moves with its GEMM replaced by an identity product
  (``benchmarks/identity_evaluator.py``, a benchmark-only patch: an encoder and one such evaluator
  holding SmolLM2's blocks, the real broker client streaming one request per layer and direction
  at N = 2048 tokens, ``b``-only replies) over the MB/s of plain pika through the same broker, same
  run: the same request bodies published with confirms to an echo process that answers each with
  bodies of the sizes the fleet's replies had, consumed by the same kind of client.

``--quick``: two timed client passes, SmolLM2 shapes only for the client keys, one timed step,
one timed transport pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import multiprocessing
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pika
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, write_json  # noqa: E402
from finetune import Run, helora_run, lora_snapshot, peft_run  # noqa: E402
from hecommon import route, wire  # noqa: E402
from hecommon.broker import topology  # noqa: E402
from hecommon.he import fft as hefft  # noqa: E402
from hecommon.he import kernels  # noqa: E402
from hecommon.he.keys import SecretKey  # noqa: E402
from hecommon.model import discover_groups, load_model, load_tokenizer  # noqa: E402
from helora_orchestrator.broker import BrokerTransport, make_broker_backend  # noqa: E402
from helora_orchestrator.client_model import ClientModel  # noqa: E402
from helora_orchestrator.data import DataOrder, load_splits  # noqa: E402
from helora_orchestrator.embedded import EmbeddedServer, make_encrypted_backend  # noqa: E402
from helora_orchestrator.lora import LoraSettings  # noqa: E402
from helora_orchestrator.operator.up import SMOLLM2, LocalFleet  # noqa: E402
from helora_orchestrator.train import TrainConfig  # noqa: E402

URL = os.environ.get("HELORA_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: one block of each model, random weights (only the linear shapes matter for the client's cost)
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8),
}


class _Replay:
    """The embedded server's ``call``, timed; after ``record()`` each (layer, direction) gets the
    reply recorded from its last real call again, under the new request's id."""

    def __init__(self, server: EmbeddedServer) -> None:
        self.call, self.seconds, self.replaying = server.call, 0.0, False
        self.recorded: dict[tuple[str, str], list[wire.EncryptedReply]] = {}

    def __call__(self, chunks: list[wire.Pieces]) -> list[bytes]:
        t0 = time.perf_counter()
        head = wire.decode_request_head(bytes(chunks[0]))  # joined on the server's side, as a broker's receiver does
        key = (head.layer, head.direction)
        if self.replaying:
            out = [wire.encode_reply(dataclasses.replace(r, rid=head.rid)) for r in self.recorded[key]]
        else:
            out = self.call(chunks)
            self.recorded[key] = [wire.decode_reply(c) for c in out]
        self.seconds += time.perf_counter() - t0
        return out


def client_costs(name: str, passes: int) -> dict:
    """The client's ns per value at 1 thread and at all threads, and the FFT floor, for one block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, vocab_size=256, **SHAPES[name]))
    groups = discover_groups(model)
    server = EmbeddedServer(model, groups, hints_on_client=False)
    replay = _Replay(server)
    server.call = replay  # type: ignore[method-assign] - the backend's ByteTransport sends here
    backend = make_encrypted_backend(model, groups, over_bytes=True, hints_on_client=False,
                                     hold_a_bytes=1 << 40, server=server)
    n = backend.params.n
    gen = np.random.default_rng(0)
    inputs = [(g.name, "fwd", gen.standard_normal((n, g.in_features)).astype(np.float32)) for g in groups]
    inputs += [(g.name, "bwd", gen.standard_normal((n, g.total_out)).astype(np.float32)) for g in groups]

    def one_pass() -> float:
        """Client seconds of one request per (layer, direction)."""
        server_before, t0 = replay.seconds, time.perf_counter()
        for layer, direction, x in inputs:
            (backend.forward if direction == "fwd" else backend.backward)(layer, x)
        return time.perf_counter() - t0 - (replay.seconds - server_before)

    one_pass()  # real: the replies carry a, which the client holds from now on
    one_pass()  # real: the replies carry b alone: recorded
    replay.replaying = True
    rows = [(backend.layers[layer].d_in if d == "fwd" else backend.layers[layer].d_out)
            + backend.layers[layer].out_rows(d) for layer, d, _ in inputs]  # values crossing, per request
    values = sum(rows) * n
    # the floor: as many transforms through the client's FFT (hecommon.he.fft), by its blocks, of
    # each request's rows in turn, from one buffer of random values (rescaled after each request,
    # untimed, so that repeated unnormalized transforms keep their magnitude)
    x = hefft.empty((max(rows), n))
    x[:] = gen.standard_normal(x.shape) + 1j * gen.standard_normal(x.shape)

    def floor() -> float:
        seconds = 0.0
        for count in rows:
            t0 = time.perf_counter()
            for r in range(0, count, kernels.BLOCK_ROWS):
                hefft.forward(x[r:r + kernels.BLOCK_ROWS])
            seconds += time.perf_counter() - t0
            x[:count] *= n ** -0.5
        return seconds

    counts = sorted({1, 2, os.cpu_count() or 1})
    timed: dict[int, list[float]] = {t: [] for t in counts}
    ffts = []
    for threads in counts:
        os.environ["HELORA_THREADS"] = str(threads)
        one_pass()  # warm at this thread count
    floor()  # warm
    for _ in range(passes):  # rounds: a round's passes and floor within seconds of each other (this machine drifts)
        for threads in counts:
            os.environ["HELORA_THREADS"] = str(threads)
            timed[threads].append(one_pass())
        ffts.append(floor())
    os.environ.pop("HELORA_THREADS", None)
    return {"values": values, "seconds": {t: statistics.median(v) for t, v in timed.items()},
            "fft_seconds": statistics.median(ffts)}


def _batches(steps: int, batch_size: int, seq_len: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train, _ = load_splits(None, load_tokenizer(None), seq_len)
    order = DataOrder(len(train), batch_size, seed)
    return [train.batch(order.next_batch()) for _ in range(steps)]


def _timed(run: Run, batches, warmup: int) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Step through ``batches``; seconds of the steps after ``warmup``, and LoRA after every step."""
    seconds, states = [], []
    for i, (ids, labels) in enumerate(batches):
        before = run.seconds
        run.step(ids, labels)
        if i >= warmup:
            seconds.append(run.seconds - before)
        states.append(lora_snapshot(run))
        print(f"  {run.name}: step {i + 1}/{len(batches)} {run.seconds - before:.1f} s", flush=True)
    return seconds, states


def _service_bytes(fleet: LocalFleet) -> float:
    """Message bytes in and out of every service of ``fleet`` (their ``helora_bytes_total``)."""
    total = 0.0
    for log in fleet.log_dir.glob("*.log"):
        ports = re.findall(rb"metrics on http://[^:/\s]+:(\d+)/metrics", log.read_bytes())
        if not ports:
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{int(ports[-1])}/metrics", timeout=10) as r:
            text = r.read().decode()
        total += sum(float(v) for v in re.findall(r"^helora_bytes_total\{[^}]*\} (\S+)$", text, re.M))
    return total


@contextlib.contextmanager
def _smollm2_fleet(kind: type[LocalFleet], prefix: str, part_timeout_s: float) -> Iterator[LocalFleet]:
    """Encoder, one evaluator holding all of SmolLM2, aggregator, under a fresh namespace; gone after."""
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmp:
        fleet = kind(URL, f"{prefix}-{secrets.token_hex(4)}", SMOLLM2, evaluators=1, shard_dir=Path(tmp) / "shards",
                     backend="numpy", part_timeout_s=part_timeout_s)
        try:
            yield fleet.start(timeout_s=1800)
        finally:
            fleet.stop()
            fleet.delete_topology()


def broker_run(cfg: TrainConfig, lora: LoraSettings, batches, warmup: int) -> dict:
    """SmolLM2 over RabbitMQ with one evaluator: step seconds, LoRA states, bytes per hop."""
    with _smollm2_fleet(LocalFleet, "helora-throughput", 3600) as fleet:
        model = load_model(None)
        backend = make_broker_backend(URL, SecretKey.generate(), namespace=fleet.namespace, model=model, timeout_s=3600)
        torch.manual_seed(cfg.seed)
        client = ClientModel(model, backend, discover_groups(model), lora, seed=cfg.seed)
        run = Run("broker_1", client, client.lora_parameters(), cfg, client)
        _, states = _timed(run, batches[:warmup], warmup)
        transport = backend.transport
        client0 = transport.bytes_sent + transport.bytes_received
        services0 = _service_bytes(fleet)
        seconds, more = _timed(run, batches[warmup:], 0)
        client_bytes = transport.bytes_sent + transport.bytes_received - client0
        services = _service_bytes(fleet) - services0
        transport.close()
    return {"seconds": seconds, "states": states + more, "client_bytes": client_bytes,
            "hops": (services + client_bytes) / client_bytes}


class _IdentityFleet(LocalFleet):
    """A ``LocalFleet`` whose evaluators run ``benchmarks/identity_evaluator.py`` (benchmark only)."""

    def _env(self, port: int) -> dict[str, str]:
        env = super()._env(port)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                          env.get("PYTHONPATH")]))
        return env

    def start_evaluator(self, index: int, name: str | None = None):
        return self.start_service(name or f"evaluator{index}", "identity_evaluator",
                                  "--blocks", topology.blocks_label(self.blocks), "--shard", f"{index}/{self.evaluators}",
                                  "--shard-dir", str(self.shard_dir), "--backend", "numpy", port_offset=1 + index)


def _echo(url: str, queue: str) -> None:
    """The plain-pika stand-in for the evaluator: each message consumed is answered, to its
    ``reply_to``, with bodies of the sizes its ``x-reply-sizes`` header lists (confirms on, as the
    services publish)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue, auto_delete=True)
    ch.basic_qos(prefetch_count=2)
    blobs: dict[int, bytes] = {}

    def answer(channel, method, props, body) -> None:
        for size in props.headers["x-reply-sizes"]:
            blob = blobs.setdefault(size, os.urandom(size))
            channel.basic_publish("", props.reply_to, blob, pika.BasicProperties(correlation_id=props.correlation_id))
        channel.basic_ack(method.delivery_tag)

    ch.basic_consume(queue, answer)
    ch.start_consuming()  # until the benchmark terminates this process


def transport_run(passes: int, blocks: int = 4) -> dict:
    """``transport_ratio``: the identity-product fleet's MB/s over plain pika's, same bodies, same broker."""
    from hecommon.he.encrypt import EncryptedBatch
    from hecommon.he.params import DEFAULT

    with _smollm2_fleet(_IdentityFleet, "helora-transport", 600) as fleet:
        transport = BrokerTransport(URL, fleet.namespace, timeout_s=600)
        manifest = transport.fetch_manifest()
        gen = np.random.default_rng(0)
        p = np.asarray(DEFAULT.primes, dtype=np.uint64)[None, :, None]
        owner = os.urandom(wire.OWNER_BYTES)
        requests = []  # the parts of one request per layer and direction of the first ``blocks`` blocks
        for e in manifest.layers:
            if e.block >= blocks:
                continue
            for d in ("fwd", "bwd"):
                b = (gen.integers(0, 1 << 32, size=(route.width(e, d), DEFAULT.limbs, DEFAULT.n), dtype=np.uint64)
                     % p).astype(np.uint32)
                requests.append([wire.EncryptedRequest(os.urandom(16), e.name, d, EncryptedBatch(DEFAULT, b[x.lo:x.hi],
                                                                                                  DEFAULT.n),
                                                       part=x.part, parts=x.parts, row_start=x.lo, send_a=False,
                                                       owner=owner)
                                 for x in route.pieces(e, d, DEFAULT, transport.limit)])
        sizes: dict[tuple[str, str, int], list[int]] = {}  # each request part's reply bodies

        def record(reply: wire.EncryptedReply) -> None:
            sizes.setdefault((reply.layer, reply.direction, reply.piece), []).append(
                len(wire.encode_reply(reply, transport.limit)))

        def fleet_pass(on_part: Callable[[wire.EncryptedReply], None]) -> tuple[float, int]:
            moved0, t0 = transport.bytes_sent + transport.bytes_received, time.perf_counter()
            for parts in requests:
                transport.stream([dataclasses.replace(x, rid=os.urandom(16)) for x in parts], on_part)
            return time.perf_counter() - t0, transport.bytes_sent + transport.bytes_received - moved0

        fleet_pass(record)  # warm: the evaluator builds its (zero) hints
        fleet_runs = [fleet_pass(lambda reply: None) for _ in range(passes)]
        transport.close()

    # plain pika: the same request bodies to an echo consumer, replies of the same sizes back
    bodies = [[(wire.encode_request(x, wire.MAX_MESSAGE_BYTES), sizes[(x.layer, x.direction, x.part)]) for x in parts]
              for parts in requests]
    queue = f"helora-transport-echo-{secrets.token_hex(4)}"
    echo = multiprocessing.get_context("spawn").Process(target=_echo, args=(URL, queue))
    echo.start()
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue, auto_delete=True)  # as the echo process declares it: requests wait for it there
        reply_q = ch.queue_declare("", exclusive=True).method.queue
        inbox: list[int] = []
        ch.basic_consume(reply_q, lambda c, m, pr, body: inbox.append(len(body)), auto_ack=True)

        def pika_pass() -> tuple[float, int]:
            moved, t0 = 0, time.perf_counter()
            for parts in bodies:
                inbox.clear()
                want = sum(len(s) for _, s in parts)
                for body, reply_sizes in parts:
                    ch.basic_publish("", queue, body, pika.BasicProperties(
                        reply_to=reply_q, correlation_id="echo", headers={"x-reply-sizes": reply_sizes}),
                        mandatory=True)
                    moved += len(body)
                while len(inbox) < want:
                    conn.process_data_events(time_limit=0.5)
                moved += sum(inbox)
            return time.perf_counter() - t0, moved

        pika_pass()
        pika_runs = [pika_pass() for _ in range(passes)]
    finally:
        conn.close()
        echo.terminate()
        echo.join(10)
    fleet_mb_s = statistics.median(m / s for s, m in fleet_runs) / 1e6
    pika_mb_s = statistics.median(m / s for s, m in pika_runs) / 1e6
    return {"fleet_mb_s": fleet_mb_s, "pika_mb_s": pika_mb_s, "ratio": fleet_mb_s / pika_mb_s,
            "mb_per_pass": statistics.median(m for _, m in fleet_runs) / 1e6, "requests": len(requests)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, SmolLM2 shapes only, one timed step")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--skip-broker", action="store_true", help="no RabbitMQ runs (their keys are null)")
    ap.add_argument("--idle", action="store_true", help="record that nothing else ran on the machine")
    args = ap.parse_args(argv)
    passes = 2 if args.quick else 5
    timed_steps = 1 if args.quick else 2
    load0 = os.getloadavg()
    print(f"client kernels: {'numba' if kernels.enabled() else 'numpy'}; {os.cpu_count()} CPUs", flush=True)

    # 1. the client's cost per value
    rows, values, seconds, fft = [], 0, {}, 0.0
    for name in (("smollm2",) if args.quick else tuple(SHAPES)):
        c = client_costs(name, passes)
        values += c["values"]
        fft += c["fft_seconds"]
        for t, s in c["seconds"].items():
            seconds[t] = seconds.get(t, 0.0) + s
        rows.append({"shapes": name, "values_M": c["values"] / 1e6, **{f"ns_{t}": s / c["values"] * 1e9
                                                                        for t, s in c["seconds"].items()},
                     "fft_ns": c["fft_seconds"] / c["values"] * 1e9})
        gc.collect()
    all_threads = max(seconds)
    print_table(rows, [("shapes", "shapes", "s"), ("values_M", "Mvalues", ".1f"),
                       *[(f"ns_{t}", f"ns/v {t} thr", ".1f") for t in sorted(seconds)], ("fft_ns", "FFT ns/v", ".2f")])
    one_ns = seconds[1] / values * 1e9
    fft_ns = fft / values * 1e9

    # 2. SmolLM2 encrypted (embedded) vs plain PEFT, same batches, after one warm-up step each
    lora = LoraSettings()
    cfg = TrainConfig(steps=1 + timed_steps, lr=2e-4, warmup_steps=1, batch_size=8, seq_len=256, eval_batches=1,
                      progress=False)
    batches = _batches(1 + timed_steps, cfg.batch_size, cfg.seq_len, cfg.seed)
    tokens = batches[0][0].numel()
    torch.manual_seed(cfg.seed)
    peft_before, _ = _timed(peft_run(cfg, lora), batches, 1)
    gc.collect()
    torch.manual_seed(cfg.seed)
    enc_seconds, enc_states = _timed(helora_run("encrypted", cfg, lora), batches, 1)
    gc.collect()
    torch.manual_seed(cfg.seed)  # the baseline again, around the encrypted run: this machine drifts
    peft_after, _ = _timed(peft_run(cfg, lora), batches, 1)
    gc.collect()
    peft_seconds = peft_before + peft_after
    peft_s, enc_s = statistics.median(peft_seconds), statistics.median(enc_seconds)

    # 3. the same steps over RabbitMQ, one evaluator
    broker = None if args.skip_broker else broker_run(cfg, lora, batches, 1)
    # 4. the data path alone: the identity-product fleet vs plain pika, same bodies
    transport = None if args.skip_broker else transport_run(2 if args.quick else 3)
    if transport is not None:
        print(f"transport: fleet {transport['fleet_mb_s']:.1f} MB/s, plain pika {transport['pika_mb_s']:.1f} MB/s "
              f"({transport['mb_per_pass']:.0f} MB a pass, {transport['requests']} requests)", flush=True)
    equal = None
    if broker is not None:
        equal = len(broker["states"]) == len(enc_states) and all(
            all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) for a, b in zip(broker["states"], enc_states,
                                                                                      strict=True))

    payload = {
        "benchmark": "throughput", "quick": args.quick, "machine": machine(), "kernels": kernels.enabled(),
        "cpu_shared_with_other_jobs": not args.idle, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "client_ns_per_value_1_thread": one_ns,
        "client_ns_per_value_all_threads": seconds[all_threads] / values * 1e9,
        "client_threads_all": all_threads,
        "fft_ns_per_value": fft_ns,
        "client_over_fft": one_ns / fft_ns,
        "client_parallel_speedup_2_threads": seconds[1] / seconds[2] if 2 in seconds else None,
        "client_shapes": rows,
        "slowdown_vs_plain_peft": enc_s / peft_s,
        "tokens_per_step": tokens,
        "tokens_per_s_plain_peft": tokens / peft_s,
        "tokens_per_s_encrypted_embedded": tokens / enc_s,
        "step_seconds": {"plain_peft": peft_seconds, "plain_peft_before": peft_before, "plain_peft_after": peft_after,
                         "encrypted_embedded": enc_seconds,
                         "broker_1": broker["seconds"] if broker else None},
        "broker_hops_per_byte": broker["hops"] if broker else None,
        "broker_client_bytes_per_token": broker["client_bytes"] / (tokens * timed_steps) if broker else None,
        "tokens_per_s_broker_1": tokens / statistics.median(broker["seconds"]) if broker else None,
        "equals_embedded": equal,
        "transport_ratio": transport["ratio"] if transport else None,
        "transport_fleet_mb_s": transport["fleet_mb_s"] if transport else None,
        "transport_plain_pika_mb_s": transport["pika_mb_s"] if transport else None,
    }
    for key in ("client_ns_per_value_1_thread", "client_ns_per_value_all_threads", "fft_ns_per_value",
                "client_over_fft", "client_parallel_speedup_2_threads", "slowdown_vs_plain_peft",
                "broker_hops_per_byte", "transport_ratio", "equals_embedded"):
        value = payload[key]
        print(f"{key:36s} {value:.3f}" if isinstance(value, float) else f"{key:36s} {value}")
    write_json(args.json, payload)
    return 0 if equal in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())

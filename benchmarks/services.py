"""The services over RabbitMQ vs the embedded server: same fine-tuning steps, same results?

    python benchmarks/services.py [--quick] [--json PATH] [--model tiny|smollm2] [--steps K]

One run, three configurations on the same batches, seed, LoRA and optimizer:
- ``embedded``: ``helora train``'s default, the three server handlers in-process (the baseline);
- ``broker_1``: encoder, one evaluator, aggregator as processes on the local RabbitMQ
  (``helora_orchestrator.operator.up.LocalFleet``), the client over ``BrokerTransport``;
- ``broker_2``: the same with two evaluators, each holding half of every layer.

Each configuration runs ``--warmup`` steps (the first computes the server's hints), then
``--steps`` timed steps. ``embedded`` and ``broker_1`` take turns, step by step (the fleet waits
idle while an embedded step runs; the client's connection is closed after each of its turns and
opened again in the next, inside the timed step), so that this machine's drift over minutes weighs on both
alike; ``broker_2`` runs before them, on a fleet of its own (its client released before the
turns start, so that the run fits this machine's 24 GiB). Reported: ``equals_embedded`` (the
LoRA weights after every step equal the embedded run's bit for bit, for both fleets),
``overhead_vs_embedded`` (median step time over the broker with one evaluator / embedded;
``overhead_vs_embedded_per_step``: the ratio of each pair of turns), the same ratio with two
evaluators, tokens/s of each, and ``broker_bytes_per_token``: the message bodies the client really sent and received (its
transport's byte counters, every attempt) per trained token. ``--quick``: the tiny random Llama,
seconds. Default: the bundled SmolLM2-135M with one warm-up and one timed step of 8 × 256 tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, write_json  # noqa: E402
from hecommon.he.keys import SecretKey  # noqa: E402
from hecommon.model import discover_groups, load_model, load_tokenizer, tiny_llama  # noqa: E402
from helora_orchestrator.broker import make_broker_backend  # noqa: E402
from helora_orchestrator.client_model import ClientModel, build_client, causal_lm_loss  # noqa: E402
from helora_orchestrator.data import ByteTokenizer, load_splits  # noqa: E402
from helora_orchestrator.lora import LoraSettings  # noqa: E402
from helora_orchestrator.operator.up import SMOLLM2, TINY, LocalFleet  # noqa: E402

URL = os.environ.get("HELORA_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
LORA = LoraSettings(r=8, alpha=16)


def _model(name: str):
    return tiny_llama(0)[0] if name == TINY else load_model(None)


def _batches(name: str, steps: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    tokenizer = ByteTokenizer() if name == TINY else load_tokenizer(None)
    train, _ = load_splits(None, tokenizer, seq_len)
    return [train.batch(range(i * batch_size, (i + 1) * batch_size))[0] for i in range(steps)]


class _Steps:
    """One configuration's run over ``batches``: its client, its optimizer, and per step the
    seconds, the loss and the LoRA weights after it. ``step()`` runs the next batch, so that two
    configurations can take turns (``_interleaved``)."""

    def __init__(self, name: str, client: ClientModel, batches: list[torch.Tensor], warmup: int,
                 transport=None) -> None:
        self.name, self.client, self.batches, self.warmup, self.transport = name, client, batches, warmup, transport
        self.opt = torch.optim.AdamW(client.lora_parameters(), lr=1e-3)
        self.seconds: list[float] = []
        self.states: list[dict] = []
        self.tokens = 0
        self._bytes0 = 0
        self.client_bytes = 0

    def _moved(self) -> int:
        return self.transport.bytes_sent + self.transport.bytes_received if self.transport is not None else 0

    def step(self) -> None:
        i = len(self.states)
        ids = self.batches[i]
        if i == self.warmup:
            self._bytes0 = self._moved()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(self.client(ids), ids)
        (loss / n).backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        if i >= self.warmup:
            self.seconds.append(dt)
            self.tokens += ids.numel()
            self.client_bytes = self._moved() - self._bytes0
        self.states.append({k: v.clone() for k, v in self.client.lora_state_dict().items()})
        kind = "timed" if i >= self.warmup else "warm-up"
        print(f"  {self.name} step {i + 1}/{len(self.batches)} ({kind}): {dt:.1f} s, loss {loss.item() / n:.4f}",
              flush=True)

    def run(self) -> None:
        while len(self.states) < len(self.batches):
            self.step()

    def release(self) -> None:
        """Drop the client and what it holds (an embedded server, the held ``a`` parts: GBs for
        SmolLM2), keeping the timings and weights: the next configuration needs the memory."""
        self.client = self.opt = self.transport = None
        gc.collect()
        try:  # glibc keeps freed heap pages mapped: give them back before the next fleet starts
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


class _Fleet:
    """A ``LocalFleet`` of ``evaluators`` on the local broker and a client over it; stopped and its
    topology removed on exit."""

    def __init__(self, args, evaluators: int, root: Path) -> None:
        self.ns = f"helora-bench-{secrets.token_hex(4)}"
        self.fleet = LocalFleet(URL, self.ns, args.model, evaluators=evaluators,
                                shard_dir=root / f"shards{evaluators}", backend="numpy", part_timeout_s=3600)
        self.backend = None
        self.start_s = 0.0

    def __enter__(self) -> _Fleet:
        t0 = time.perf_counter()
        try:
            self.fleet.start(timeout_s=1800)
            self.start_s = time.perf_counter() - t0
            self.model = _model(self.fleet.model)
            self.backend = make_broker_backend(URL, SecretKey.generate(), namespace=self.ns, model=self.model,
                                               timeout_s=3600)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def steps(self, name: str, batches: list[torch.Tensor], warmup: int) -> _Steps:
        client = ClientModel(self.model, self.backend, discover_groups(self.model), LORA, seed=0)
        return _Steps(name, client, batches, warmup, self.backend.transport)

    def __exit__(self, *exc) -> None:
        if self.backend is not None:
            self.backend.transport.close()
        self.backend = self.model = None
        codes = self.fleet.stop()
        self.fleet.delete_topology()
        if any(codes.values()):
            print(f"  warning: unclean service exits {codes}\n{self.fleet.logs()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, a few seconds per configuration")
    p.add_argument("--model", choices=(TINY, SMOLLM2), default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--idle", action="store_true",
                   help="record that nothing else ran on the machine (default: assume it was shared)")
    args = p.parse_args(argv)
    args.model = args.model or (TINY if args.quick else SMOLLM2)
    args.steps = args.steps or (3 if args.quick else 1)
    torch.manual_seed(0)
    batches = _batches(args.model, args.warmup + args.steps, args.batch_size, args.seq_len)
    tokens_per_step = batches[0].numel()
    load0 = os.getloadavg()
    print(f"model {args.model}: {args.warmup} warm-up + {args.steps} timed steps of {tokens_per_step} tokens")
    results: dict[str, _Steps] = {}
    start_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="helora-bench-") as tmp:
        # two evaluators first: the turns below hold an embedded server and a broker client at
        # once, and what they free stays in this process's heap, where a third client no longer fits
        with _Fleet(args, 2, Path(tmp)) as two:
            start_s["broker_2"] = two.start_s
            print("over RabbitMQ, 2 evaluators", flush=True)
            results["broker_2"] = two.steps("broker_2", batches, args.warmup)
            results["broker_2"].run()
            results["broker_2"].release()
        # embedded and one evaluator take turns, step by step, so that the machine's drift over
        # minutes weighs on both alike; that fleet waits idle while the embedded steps run
        with _Fleet(args, 1, Path(tmp)) as one:
            start_s["broker_1"] = one.start_s
            print("embedded (in-process server) and over RabbitMQ with 1 evaluator, taking turns", flush=True)
            results["embedded"] = _Steps("embedded", build_client(_model(args.model), "encrypted", LORA, seed=0),
                                         batches, args.warmup)
            results["broker_1"] = one.steps("broker_1", batches, args.warmup)
            for _ in batches:
                # an idle blocking connection misses its heartbeats during an embedded turn and
                # the broker drops it: close it (the manifest's, then each turn's), and let the
                # broker turn open a fresh one
                one.backend.transport.close()
                results["embedded"].step()
                results["broker_1"].step()
    results = {name: results[name] for name in ("embedded", "broker_1", "broker_2")}
    emb = statistics.median(results["embedded"].seconds)
    rows, summary = [], {}
    for name, r in results.items():
        step = statistics.median(r.seconds)
        rows.append({"config": name, "step_s": step, "tokens_per_s": tokens_per_step / step,
                     "ratio": step / emb, "bytes_per_token": r.client_bytes / max(r.tokens, 1) or None,
                     "start_s": start_s.get(name)})
        summary[name] = {k: v for k, v in rows[-1].items() if k != "config"}
    print_table(rows, [("config", "config", "s"), ("step_s", "s/step", ".2f"), ("tokens_per_s", "tokens/s", ".1f"),
                       ("ratio", "vs embedded", ".3f"), ("bytes_per_token", "bytes/token", ".0f"),
                       ("start_s", "fleet start s", ".1f")])
    equal = all(_same(results["embedded"].states, results[f"broker_{n}"].states) for n in (1, 2))
    paired = [b / e for b, e in zip(results["broker_1"].seconds, results["embedded"].seconds, strict=True)]
    payload = {
        "benchmark": "services", "model": args.model, "quick": args.quick, "machine": machine(),
        "cpu_shared_with_other_jobs": not args.idle, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "warmup_steps": args.warmup, "timed_steps": args.steps, "tokens_per_step": tokens_per_step,
        "equals_embedded": equal,
        "overhead_vs_embedded": summary["broker_1"]["ratio"],
        "overhead_vs_embedded_per_step": paired,
        "step_seconds": {name: r.seconds for name, r in results.items()},
        "overhead_vs_embedded_2_evaluators": summary["broker_2"]["ratio"],
        "tokens_per_s_embedded": summary["embedded"]["tokens_per_s"],
        "tokens_per_s_1_evaluator": summary["broker_1"]["tokens_per_s"],
        "tokens_per_s_2_evaluators": summary["broker_2"]["tokens_per_s"],
        "broker_bytes_per_token": summary["broker_1"]["bytes_per_token"],
        "configs": summary,
        "note": "broker_bytes_per_token: request and reply bodies the client sent and received (broker replies "
                "carry the a part, switched once per layer by the evaluator); "
                + ("nothing else ran on the machine" if args.idle else "the machine may have been shared with "
                   "other jobs, so timings are noisy"),
    }
    print(f"equals_embedded {equal}  overhead_vs_embedded {payload['overhead_vs_embedded']:.3f} "
          f"(2 evaluators: {payload['overhead_vs_embedded_2_evaluators']:.3f})")
    write_json(args.json, payload)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

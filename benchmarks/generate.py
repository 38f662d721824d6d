"""Private generation, measured: how long a user waits for each token (issue 18).

    python benchmarks/generate.py [--quick] [--json PATH] [--prompt-tokens P] [--new-tokens K]

One run, the same model, adapter (a random rank-8 LoRA on every block linear) and prompt, greedy:

- ``clear``: the client's model in the clear (transformers with the adapter's LoRA layers);
- ``quantized``: the exact integers of the encrypted mode, in the clear (the reference);
- ``embedded``: every block linear encrypted, the server in-process (``helora generate``'s default);
- ``broker``: the same over the local RabbitMQ, with one evaluator (``LocalFleet``, one BLAS
  thread: it shares the machine's cores with the client and the broker).

Each prints and records the time to the first token (the prompt's forward pass included) and the
tokens/s after it (``K - 1`` tokens over the time from the first to the last). Also recorded: the
bytes on the wire per generated token (the encrypted backends' counters over the tokens after the
first), the server's multiply-adds per generated token (counted by the client from the requests it
sent: each block linear's ``d_in × d_out`` times the request's tokens and ``L`` limbs; beside it,
``server_madds_per_token_full_requests``, what a token cost when every request carried N columns),
whether both private modes generated the quantized mode's tokens, and the client's peak RSS.
Last, ``training_step_wire_bytes``: one encrypted training step's bytes on a micro-batch of 2048
tokens and on one of 256, and their ratio (requests carry the columns of their tokens only).

The private modes generate in a session (``EncryptedBackend.session``): each step's token takes the
next coefficient of one secret per layer, so a step costs one column on the wire and in the
server's product, and the client's ``a·s`` products are computed once, before the first token.

Default: SmolLM2-135M, a 32-token prompt and 64 new tokens (a few minutes on 2 cores);
``--quick``: the tiny random Llama, 8 and 8 (seconds).
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, write_json  # noqa: E402
from hecommon.he import params as P  # noqa: E402
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


def _prompt(name: str, length: int) -> list[int]:
    """The first ``length`` tokens of the bundled corpus's first held-out example."""
    tokenizer = ByteTokenizer() if name == TINY else load_tokenizer(None)
    _, held = load_splits(None, tokenizer, length)
    return held.batch([0])[0][0].tolist()


def _adapter(client: ClientModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) * (0.05 if ".lora_B." in k else 1 / v.shape[1] ** 0.5)
            for k, v in client.lora_state_dict().items()}


def _run(label: str, client: ClientModel, prompt: list[int], new_tokens: int, start: float) -> dict:
    """Greedy generation on ``client``: its tokens, time to first token since ``start`` (the
    session's set-up began), tokens/s after it, bytes on the wire per token after it."""
    times, wire, madds = [], [], []

    def on_token(step: int, ids) -> None:
        times.append(time.perf_counter())
        wire.append(client.wire_bytes)
        madds.append(getattr(client.backend, "server_madds", 0))

    tokens = client.generate([prompt], new_tokens, on_token=on_token)[0]
    after = len(times) - 1
    row = {"mode": label, "tokens": tokens, "time_to_first_token_s": times[0] - start,
           "tokens_per_s": after / (times[-1] - times[0]) if after and times[-1] > times[0] else None,
           "bytes_per_generated_token": (wire[-1] - wire[0]) / after if after else None,
           "server_madds_per_generated_token": (madds[-1] - madds[0]) / after if after else None}
    print(f"  {label}: first token after {row['time_to_first_token_s']:.2f} s, "
          f"{row['tokens_per_s'] or 0:.3f} tokens/s after it", flush=True)
    return row


def _training_wire_bytes(name: str) -> dict:
    """Wire bytes of one encrypted training step (forward and backward, embedded) on a micro-batch of
    2048 tokens (one full request per layer call) and on one of 256 (a window of 256 columns),
    same run; before token windows every request carried N = 2048 columns, so 256 tokens cost
    what 2048 do (the 2048-token step is today's cost of both)."""
    out: dict = {}
    client = build_client(_model(name), "encrypted", LORA, bits=8, seed=0)
    vocab = client.hf.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    for tokens in (2048, 256):
        ids = torch.randint(0, vocab, (1, tokens), generator=gen)
        before = client.wire_bytes
        loss, n = causal_lm_loss(client(ids), ids)
        (loss / n).backward()
        out[str(tokens)] = client.wire_bytes - before
    out["ratio_256_over_2048"] = out["256"] / out["2048"]
    print(f"  training step wire bytes: 2048 tokens {out['2048'] / 1e6:.1f} MB, 256 tokens "
          f"{out['256'] / 1e6:.1f} MB (ratio {out['ratio_256_over_2048']:.3f})", flush=True)
    return out


def _full_request_madds(model, params: P.ParamSet) -> int:
    """What a token cost the server before token windows: a full N-column request at every block
    linear, d_out × d_in × N × L (the baseline of ``server_madds_per_generated_token``)."""
    return sum(g.total_out * g.in_features for g in discover_groups(model)) * params.n * params.limbs


def _broker_run(args, prompt: list[int], weights: dict[str, torch.Tensor]) -> dict:
    with tempfile.TemporaryDirectory(prefix="helora-bench-gen-") as root:
        ns = f"helora-bench-{secrets.token_hex(4)}"
        # the evaluator with one BLAS thread: it shares this machine's 2 cores with the client and
        # the broker, and its one-token products gain nothing from a second thread that spins
        fleet = LocalFleet(URL, ns, args.model, evaluators=1, shard_dir=Path(root) / "shards", backend="numpy",
                           part_timeout_s=3600, threads=1)
        backend = None
        try:
            fleet.start(timeout_s=1800)
            model = _model(args.model)
            start = time.perf_counter()  # the session: connection, manifest, then the first token
            backend = make_broker_backend(URL, SecretKey.generate(), namespace=ns, model=model, timeout_s=3600)
            client = ClientModel(model, backend, discover_groups(model), LORA, seed=0)
            client.load_lora_state_dict(weights)
            return _run("broker", client, prompt, args.new_tokens, start)
        finally:
            if backend is not None:
                backend.transport.close()
            fleet.stop()
            fleet.delete_topology()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny random Llama, 8-token prompt, 8 new tokens")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--no-broker", action="store_true", help="skip the RabbitMQ run")
    args = p.parse_args(argv)
    args.model = TINY if args.quick else SMOLLM2
    args.prompt_tokens = args.prompt_tokens or (8 if args.quick else 32)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    if args.prompt_tokens < 1 or args.new_tokens < 2:
        p.error("--prompt-tokens must be >= 1 and --new-tokens >= 2")
    torch.manual_seed(0)
    prompt = _prompt(args.model, args.prompt_tokens)
    print(f"generate: {args.model}, {len(prompt)}-token prompt, {args.new_tokens} new tokens, greedy", flush=True)
    rows, weights, params = [], None, P.DEFAULT
    for mode in ("clear", "quantized", "encrypted"):
        model = _model(args.model)
        start = time.perf_counter()  # embedded: the in-process server's set-up counts as the session's
        client = build_client(model, mode, LORA, bits=8, seed=0)
        weights = weights or _adapter(client)
        client.load_lora_state_dict(weights)
        if mode != "encrypted":
            start = time.perf_counter()
        else:
            params = client.backend.params
        rows.append(_run("embedded" if mode == "encrypted" else mode, client, prompt, args.new_tokens, start))
        del client, model
    if not args.no_broker:
        rows.append(_broker_run(args, prompt, weights))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # generation's: before training
    training = _training_wire_bytes(args.model)
    by = {r["mode"]: r for r in rows}
    print_table(rows, [("mode", "mode", "s"), ("time_to_first_token_s", "first tok s", ".2f"),
                       ("tokens_per_s", "tok/s after", ".3f"), ("bytes_per_generated_token", "B/token", ".3e")])
    private = [m for m in ("embedded", "broker") if m in by]
    payload = {
        "model": args.model, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "clear_tokens_per_s": by["clear"]["tokens_per_s"],
        "private_tokens_per_s_embedded": by["embedded"]["tokens_per_s"],
        "private_tokens_per_s_broker": by["broker"]["tokens_per_s"] if "broker" in by else None,
        "time_to_first_token_s": {m: by[m]["time_to_first_token_s"] for m in private},
        "bytes_per_generated_token": {m: by[m]["bytes_per_generated_token"] for m in private},
        # counted by the client from the requests it sent: inputs × outputs × tokens × limbs of each
        "server_madds_per_generated_token": {m: by[m]["server_madds_per_generated_token"] for m in private},
        "server_madds_per_token_full_requests": _full_request_madds(_model(args.model), params),
        "training_step_wire_bytes": training,
        "private_equals_quantized": all(by[m]["tokens"] == by["quantized"]["tokens"] for m in private),
        "client_peak_rss_mb": peak_rss_mb,
        "tokens": {m: r["tokens"] for m, r in by.items()},
        "machine": machine(),
    }
    madds = payload["server_madds_per_generated_token"]["embedded"]
    print(f"private == quantized: {payload['private_equals_quantized']}; server multiply-adds per generated token: "
          f"{madds:.3e} (a full N-token request a token: {payload['server_madds_per_token_full_requests']:.3e}); "
          f"client peak RSS {payload['client_peak_rss_mb']:.0f} MB")
    write_json(args.json, payload)
    return 0 if payload["private_equals_quantized"] else 1


if __name__ == "__main__":
    sys.exit(main())

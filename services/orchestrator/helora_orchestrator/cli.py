"""``helora``: the data owner's command line (DESIGN §4, orchestrator).

``helora train | eval | generate | status``. Without ``--broker`` the server side runs in-process (the
embedded default). Bad input exits with status 2 and one line on stderr, never a traceback.
``--model tiny`` is a tiny random Llama with a byte tokenizer, for smoke tests.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from hecommon.errors import ConfigError, HeloraError, ParameterMismatch

from .backend import MODES
from .encrypted import HOLD_A_MIB
from .lora import BLOCK_LINEARS, LoraSettings
from .operator.status import add_parser as add_status_parser
from .operator.status import cmd_status

TINY = "tiny"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="base model: .gguf file or HF directory (default: bundled SmolLM2-135M-Instruct; 'tiny': test model)")
    if data:
        p.add_argument("--data", default=None, metavar="PATH", help=".txt or .jsonl (default: bundled pydoc corpus)")
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mode", choices=MODES, default="encrypted", help="how the block linears are computed")
    p.add_argument("--bits", type=int, default=8, help="quantization bits (quantized/encrypted modes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param-set", default=None, metavar="NAME", help="HE parameter set (encrypted mode)")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="RabbitMQ URL of a running helora server (encrypted mode); default: in-process server")
    p.add_argument("--namespace", default="helora", help="the server's exchange and queue prefix (with --broker)")
    p.add_argument("--hold-a-mib", type=int, default=HOLD_A_MIB, metavar="MIB",
                   help="with --broker: keep each layer's public a part from its first reply, up to MIB in all, "
                        f"and receive b alone after that (about half of every reply; SmolLM2-135M needs about 2.8 GiB; "
                        f"0: never; default {HOLD_A_MIB})")
    p.add_argument("--broker-timeout-s", type=float, default=120.0, metavar="S",
                   help="with --broker: how long to wait for a reply before sending the request once more "
                        "under a fresh id (a paused or restarting service), and as long again before failing "
                        "(default 120)")
    p.add_argument("--key-file", default=None, metavar="PATH",
                   help="keep the secret key in this 0600 file (created if missing); default: memory only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="helora", description="Private LoRA fine-tuning over encrypted linear layers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,generate,federate,status,up}")
    t = sub.add_parser("train", help="fine-tune a LoRA adapter")
    _common(t)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--targets", default=",".join(BLOCK_LINEARS), help="comma-separated block linears with LoRA")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--in-flight", type=int, default=None, metavar="K",
                   help="with --broker: run up to K micro-batches of a step at once (their requests overlap "
                        "on the server; same result bit for bit; needs --dropout 0); default 2, 1 with dropout")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--eval-batches", type=int, default=8)
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--out", default="helora-out", metavar="DIR")
    t.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--generate", default=None, metavar="PROMPT",
                   help="after training, generate from PROMPT with the new adapter (same process, same server)")
    t.add_argument("--max-new-tokens", type=int, default=16)
    t.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve /metrics, /healthz, /readyz on PORT while training (0: any free port, logged; "
                        "default: off)")
    t.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                   help="address of the metrics endpoints (default 127.0.0.1: the loss stays on this machine)")
    t.add_argument("--metrics-linger-s", type=float, default=30.0, metavar="S",
                   help="after the last step, keep serving /metrics until one scrape has seen the final values, "
                        "at most S seconds (default 30; 0: stop at once)")
    e = sub.add_parser("eval", help="held-out loss and perplexity")
    _common(e)
    e.add_argument("--adapter", default=None, metavar="DIR", help="PEFT adapter or checkpoint directory")
    e.add_argument("--eval-batches", type=int, default=8)
    g = sub.add_parser("generate", help="continue prompts (greedy or sampled), streamed as tokens come")
    _common(g, data=False)
    g.add_argument("--adapter", default=None, metavar="DIR")
    g.add_argument("--prompt", required=True, action="append",
                   help="a prompt; repeat for several, generated together in one batch")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this mass")
    g.add_argument("--sample-seed", type=int, default=0, help="the sampler's seed (same seed, same tokens)")
    x = sub.add_parser("export", help="the adapter for other tools: PEFT, llama.cpp GGUF, merged model")
    x.add_argument("adapter", metavar="ADAPTER", help="a PEFT adapter (OUT/adapter) or checkpoint directory")
    x.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/adapter (PEFT), DIR/adapter.gguf (llama.cpp LoRA), with --merged DIR/merged")
    x.add_argument("--model", default=None, metavar="PATH",
                   help="the base model the adapter was trained on (default: bundled SmolLM2-135M-Instruct)")
    x.add_argument("--seed", type=int, default=0, help="the tiny test model's seed (--model tiny)")
    x.add_argument("--merged", action="store_true", help="also a Hugging Face model with the adapter merged in")
    x.add_argument("--no-gguf", action="store_true", help="skip the llama.cpp GGUF adapter")
    r = sub.add_parser("report", help="summary and PNG of a training run (its metrics.jsonl)")
    r.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of a helora train run")
    r.add_argument("--out", default=None, metavar="PNG", help="where the PNG goes (default: RUN_DIR/report.png)")
    from .federated.cli import add_parser as add_federate_parser

    add_federate_parser(sub)
    add_status_parser(sub)
    from .operator.up import add_arguments as add_up_arguments

    add_up_arguments(sub.add_parser("up", help="start the server side locally (encoder, evaluators, aggregator)"))
    return parser


def _load_base(model_arg: str | None, seed: int):
    """(model, tokenizer, model id) without touching the network."""
    if model_arg == TINY:
        from hecommon.model import tiny_llama

        from .data import ByteTokenizer

        return tiny_llama(seed)[0], ByteTokenizer(), f"tiny-llama(seed={seed})"
    from hecommon.model import BUNDLED_MODEL_ID, load_model, load_tokenizer

    return load_model(model_arg), load_tokenizer(model_arg), (model_arg or BUNDLED_MODEL_ID)


def _client(args, model, model_id: str, lora: LoraSettings):
    from .client_model import build_client

    if args.broker is not None:
        return _broker_client(args, model, lora)
    kwargs = {}
    if args.mode == "encrypted":  # the embedded server needs the parameter set and the model id
        kwargs = {"model_id": model_id, "key": _secret_key(args.key_file),
                  **({"params": args.param_set} if args.param_set else {})}
    elif args.key_file:
        raise ConfigError(f"--key-file: only meaningful with --mode encrypted, not {args.mode}")
    return build_client(model, args.mode, lora, bits=args.bits, seed=args.seed, **kwargs)


def _broker_client(args, model, lora: LoraSettings):
    """The client over a RabbitMQ server: the model stays local for embeddings, norms and lm_head;
    its block weights are dropped by ``ClientModel`` (the server holds them)."""
    from hecommon.model import discover_groups

    from .broker import make_broker_backend
    from .client_model import ClientModel

    if args.hold_a_mib < 0:
        raise ConfigError(f"--hold-a-mib: {args.hold_a_mib} must be 0 or more")
    if not 0 < args.broker_timeout_s <= 86400:
        raise ConfigError(f"--broker-timeout-s: {args.broker_timeout_s} outside (0, 86400]")
    backend = make_broker_backend(args.broker, key=_secret_key(args.key_file), namespace=args.namespace,
                                  model=model, params=args.param_set, in_flight=_in_flight(args),
                                  hold_a_bytes=args.hold_a_mib << 20, timeout_s=args.broker_timeout_s)
    if backend.bits != args.bits:
        raise ParameterMismatch(f"--bits {args.bits}: the server quantizes with {backend.bits} bits")
    return ClientModel(model, backend, discover_groups(model), lora, args.seed)


def _in_flight(args) -> int:
    """Concurrent micro-batches: only over a broker (in-process there is nothing to overlap), only
    with several micro-batches, and only without dropout (its random draws would change order)."""
    k = getattr(args, "in_flight", 1)
    if k is None:
        k = 1 if getattr(args, "dropout", 0.0) > 0 else 2
    if k < 1:
        raise ConfigError(f"--in-flight: {k} must be at least 1")
    if args.broker is None or getattr(args, "grad_accum", 1) < 2:
        return 1
    if k > 1 and getattr(args, "dropout", 0.0) > 0:
        raise ConfigError("--in-flight above 1 needs --dropout 0 (dropout's random draws would change order)")
    return min(k, args.grad_accum)


def _secret_key(path: str | None):
    """The owner's key: from ``path`` (created 0600 if missing), or fresh in memory only."""
    from hecommon.he.keys import SecretKey

    if path is None:
        return SecretKey.generate()
    if Path(path).exists():
        return SecretKey.load(path)
    key = SecretKey.generate()
    key.save(path)
    print(f"new secret key written to {path} (mode 0600); keep it private", file=sys.stderr)
    return key


def _meta(args, model, model_id: str, lora: LoraSettings, client=None):
    """Checkpoint metadata; the parameter-set name comes from the backend actually in use."""
    from hecommon.model import config_fingerprint

    from .checkpoint import CheckpointMeta

    params = getattr(getattr(client, "backend", None), "params", None)
    param_set = getattr(params, "name", None) or args.param_set
    return CheckpointMeta(base_model_id=model_id, base_model_fingerprint=config_fingerprint(model),
                          mode=args.mode, bits=args.bits, lora=lora.to_dict(), param_set=param_set)


def _read_adapter(path: str):
    """(LoRA settings, weights, meta or None) from a PEFT export or a checkpoint directory."""
    from safetensors.torch import load_file

    from .checkpoint import LINK, read_meta
    from .export import CONFIG, load_peft_adapter

    d = Path(path)
    if (d / CONFIG).is_file():
        return load_peft_adapter(d)
    if (d / LINK).exists():
        d = (d / LINK).resolve()
    if (d / "lora.safetensors").is_file():
        meta = read_meta(d)
        return LoraSettings.from_dict(meta.lora), load_file(str(d / "lora.safetensors")), meta
    raise ConfigError(f"adapter: {path} is neither a PEFT adapter nor a helora checkpoint")


def _client_with_adapter(args, model, model_id: str):
    settings, weights, meta = _read_adapter(args.adapter) if args.adapter else (LoraSettings(), None, None)
    if meta is not None and meta.base_model_fingerprint != _meta(args, model, model_id, settings).base_model_fingerprint:
        raise ParameterMismatch(f"adapter: trained on {meta.base_model_id!r}, not on this base model")
    client = _client(args, model, model_id, settings)
    if weights is not None:
        client.load_lora_state_dict(weights)
    return client


def cmd_train(args) -> int:
    from .checkpoint import checkpoint_dir
    from .data import load_splits, read_examples
    from .export import export_peft
    from .metrics import check_metrics_fields, start_metrics
    from .train import TrainConfig, Trainer

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoraSettings(r=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, seq_len=args.seq_len, seed=args.seed, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every, mode=args.mode,
                      bits=args.bits, output_dir=args.out, progress=not args.no_progress, in_flight=_in_flight(args))
    read_examples(args.data)  # fail on bad data before the (slow) model load
    metrics_on = args.metrics_port is not None
    if metrics_on:
        check_metrics_fields(args)
        if not 0 <= args.metrics_linger_s <= 3600:
            raise ConfigError(f"--metrics-linger-s: {args.metrics_linger_s} outside 0..3600")
    if not args.resume and checkpoint_dir(args.out) is not None:
        raise ConfigError(f"output: {args.out} already holds a checkpoint; pass --resume or choose another --out")
    model, tokenizer, model_id = _load_base(args.model, args.seed)
    train_data, eval_data = load_splits(args.data, tokenizer, cfg.seq_len)
    client = _client(args, model, model_id, lora)
    meta = _meta(args, model, model_id, lora, client)
    metrics, server = start_metrics(args.metrics_port, args.metrics_host, client) if metrics_on else (None, None)
    trainer = Trainer(cfg, client, train_data, eval_data, meta, metrics)
    trainer.start(resume=args.resume)
    try:
        summary = trainer.run()
    except BaseException:
        if server is not None:
            server.close()
        raise
    if server is not None:
        if args.metrics_linger_s > 0:
            print(f"waiting up to {args.metrics_linger_s:g} s for a scrape of the final metrics (--metrics-linger-s)",
                  file=sys.stderr)
        server.close_after_scrape(args.metrics_linger_s)
    adapter = export_peft(client, Path(args.out) / "adapter", meta)
    print(summary)
    print(f"adapter (PEFT format): {adapter}")
    if args.generate is not None:
        _generate(client, tokenizer, [args.generate], args.max_new_tokens)
    return 0


def _generate(client, tokenizer, prompts: list[str], max_new_tokens: int, sampling=None) -> None:
    """Continue each prompt; in encrypted mode every block linear stays encrypted. One prompt is
    streamed to the terminal token by token; several are printed when done. Time to the first
    token and tokens/s after it go to stderr."""
    import time

    from .generation import StreamText

    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if not prompts or any(not ids for ids in encoded):
        raise ConfigError("every prompt needs at least one token")
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    stream, times = (StreamText(tokenizer, eos) if len(prompts) == 1 else None), []
    if stream is not None:
        print(prompts[0], end="", flush=True)

    def on_token(step: int, ids) -> None:
        times.append(time.perf_counter())
        if stream is not None:
            print(stream.add(int(ids[0])), end="", flush=True)

    start = time.perf_counter()
    new = client.generate(encoded, max_new_tokens, eos, sampling, pad, on_token)
    if stream is not None:
        print()
    else:
        for prompt, tokens in zip(prompts, new, strict=True):
            print(f"{prompt}{tokenizer.decode(tokens, skip_special_tokens=True)}")
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    print(f"time to first token {times[0] - start:.2f} s; {rate:.2f} tokens/s per prompt after it "
          f"({len(prompts)} prompt(s), {len(times)} step(s))", file=sys.stderr)


def cmd_eval(args) -> int:
    from .data import load_splits, read_examples
    from .train import evaluate

    if args.eval_batches < 1 or args.batch_size < 1:
        raise ConfigError("--eval-batches and --batch-size must be at least 1")
    read_examples(args.data)
    model, tokenizer, model_id = _load_base(args.model, args.seed)
    _, eval_data = load_splits(args.data, tokenizer, args.seq_len)
    client = _client_with_adapter(args, model, model_id)
    loss = evaluate(client, eval_data, args.eval_batches, args.batch_size)
    print(f"held-out loss {loss:.4f}  perplexity {math.exp(min(loss, 50)):.2f}")
    return 0


def cmd_generate(args) -> int:
    from .generation import Sampling

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    sampling = Sampling(args.temperature, args.top_p, args.sample_seed)  # checked before the model loads
    if sampling.greedy and (args.top_p != 1.0 or args.sample_seed != 0):
        raise ConfigError("--top-p and --sample-seed need --temperature above 0 (0 is greedy)")
    model, tokenizer, model_id = _load_base(args.model, args.seed)
    _generate(_client_with_adapter(args, model, model_id), tokenizer, args.prompt, args.max_new_tokens, sampling)
    return 0


def cmd_export(args) -> int:
    """PEFT adapter, llama.cpp GGUF adapter, merged model: each from the same LoRA weights."""
    from hecommon.model import config_fingerprint

    from .export import write_peft
    from .ggufexport import check_fits, gguf_tensors, write_gguf_adapter, write_merged

    settings, weights, meta = _read_adapter(args.adapter)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: {out} is not empty; choose a new --out")
    model, tokenizer, _ = _load_base(args.model, args.seed)
    if meta is not None and meta.base_model_fingerprint != config_fingerprint(model):
        raise ParameterMismatch(f"export: the adapter was trained on {meta.base_model_id!r}, not on this base model")
    check_fits(weights, settings, model)  # everything is checked before anything is written
    if not args.no_gguf:
        gguf_tensors(weights, model.config)
    print(f"PEFT adapter: {write_peft(settings, weights, out / 'adapter', meta)}")
    if not args.no_gguf:
        print(f"llama.cpp LoRA adapter: {write_gguf_adapter(weights, settings, model.config, out / 'adapter.gguf')}")
    if args.merged:
        print(f"merged model: {write_merged(model, weights, settings, out / 'merged', tokenizer)}")
    return 0


def cmd_report(args) -> int:
    from .runreport import report

    text, png = report(args.run_dir, args.out)
    print(text)
    print(f"plot: {png}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "federate":  # its own subcommands and error handling (federated/cli.py)
        from .federated.cli import cmd_federate

        return cmd_federate(args)
    if args.command == "export":  # files only; no server
        return run_reported("helora export", lambda: cmd_export(args))
    if args.command == "report":  # reads a run directory; no model, no server
        return run_reported("helora report", lambda: cmd_report(args))
    if args.command == "up":  # its own flags and signal handling (helora_orchestrator.operator.up)
        from .operator.up import cmd_up

        return cmd_up(args)
    return run_reported(f"helora {args.command}", lambda: _run(args))


def _run(args) -> int:
    if args.broker is not None and args.mode != "encrypted":
        raise ConfigError(f"--broker: only meaningful with --mode encrypted, not {args.mode}")
    if args.broker is not None and not args.broker.startswith(("amqp://", "amqps://")):
        raise ConfigError("--broker: an amqp:// or amqps:// URL is required")
    if args.param_set and args.mode != "encrypted":
        raise ConfigError(f"--param-set: only meaningful with --mode encrypted, not {args.mode}")
    return COMMANDS[args.command](args)


def run_reported(label: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status; an error of helora's or of the OS is printed as ``label: error: …``
    (exit 2), Ctrl-C as ``label: interrupted`` (exit 130)."""
    try:
        return run()
    except (HeloraError, OSError) as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

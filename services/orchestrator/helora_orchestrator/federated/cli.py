"""``helora federate keygen | demo | round``: the federated mode's command line (SHE-LoRA; DESIGN §5).

- ``keygen --out KEY``: one owner makes the federation's shared key: ``KEY`` (0600, the CKKS
  secret key included, from which the RLWE key of ``--scheme full`` is derived; hand it to the
  other owners out of band) and ``KEY.pub`` (the public context,
  no secret key: the only file the aggregator gets).
- ``--scheme full`` (the default) encrypts every coordinate of every update; ``--scheme
  selective`` is SHE-LoRA (the paper's method, our baseline).
- ``demo``: several owners and the aggregator in one process (embedded), several rounds,
  printing the held-out loss and the bytes per round.
- ``round``: one owner's rounds against a federated aggregator on RabbitMQ
  (``python -m helora_aggregator.fedworker --context KEY.pub --owners N``).

Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hecommon.errors import ConfigError

from ..lora import BLOCK_LINEARS
from .schemes import DEFAULT_UPDATE_RANGE, SCHEMES


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: a comma-separated list of numbers is required") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: a comma-separated list of integers is required") from None


def _owner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (test model), 'smollm2' (bundled) or a model path")
    p.add_argument("--data", default=None, metavar="PATH", help=".txt or .jsonl (default: bundled pydoc corpus)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2, help="private optimizer steps per round")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--mode", choices=("clear", "quantized", "encrypted"), default="clear",
                   help="how the owners' local steps compute the block linears")
    p.add_argument("--targets", default=",".join(BLOCK_LINEARS), help="comma-separated block linears with LoRA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="export each owner's merged adapter (PEFT) here")
    p.add_argument("--scheme", choices=SCHEMES, default="full",
                   help="full (default): every coordinate of every update encrypted (helora's RLWE); "
                        "selective: SHE-LoRA, the budget's columns of A encrypted, the rest in the clear")
    p.add_argument("--update-range", type=float, default=DEFAULT_UPDATE_RANGE, metavar="R",
                   help="full: the bound on |samples x ΔW| per coordinate, the same for every owner (an update "
                        "past it is refused, never wrapped)")


def add_parser(sub) -> None:
    f = sub.add_parser("federate", help="federated LoRA (every coordinate encrypted, or SHE-LoRA): keygen, local "
                                        "demo, or one owner's rounds")
    f.set_defaults(broker=None, mode="clear", param_set=None)  # the top-level checks of helora's main
    fsub = f.add_subparsers(dest="fed_command", required=True, metavar="{keygen,demo,round}")
    k = fsub.add_parser("keygen", help="make the federation's shared CKKS key")
    k.add_argument("--out", required=True, metavar="KEY", help="secret key file (0600); KEY.pub: public context")
    d = fsub.add_parser("demo", help="N owners and the aggregator in one process")
    _owner_flags(d)
    d.add_argument("--ranks", default="4,8,16", help="one LoRA rank per owner")
    d.add_argument("--budgets", default="0.00125,0.01,0.1",
                   help="selective: one budget per owner, the fraction of A's columns encrypted")
    r = fsub.add_parser("round", help="one owner's rounds against a federated aggregator on RabbitMQ")
    _owner_flags(r)
    r.add_argument("--key", required=True, metavar="KEY", help="the shared CKKS key file (from keygen)")
    r.add_argument("--owner", required=True, help="this owner's name (unique in the federation)")
    r.add_argument("--owners", type=int, required=True, help="how many owners take part (the shard of --data)")
    r.add_argument("--index", type=int, required=True, help="this owner's index, 0..owners-1 (its data shard)")
    r.add_argument("--rank", type=int, default=8)
    r.add_argument("--budget", type=float, default=0.01, help="selective: the fraction of A's columns encrypted")
    r.add_argument("--first-round", type=int, default=1)
    r.add_argument("--broker", dest="fed_broker", default="amqp://guest:guest@127.0.0.1:5672/%2F", metavar="URL")
    r.add_argument("--namespace", default="helora")
    r.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024,
                   help="the broker's max_message_size: larger messages go in chunks")
    r.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait for the other owners")


def _configs(args, names, ranks, budgets):
    from .client import OwnerConfig

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return [OwnerConfig(name, rank=r, budget=b, local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
                        seq_len=args.seq_len, mode=args.mode, seed=args.seed + 1 + i, targets=targets,
                        scheme=args.scheme, update_range=args.update_range)
            for i, (name, r, b) in enumerate(zip(names, ranks, budgets, strict=True))]


def _export(owners, out: str | None) -> None:
    if out is None:
        return
    from ..export import export_peft

    for o in owners:
        print(f"{o.name}: adapter (PEFT format, rank {o.cfg.rank}): {export_peft(o.client, Path(out) / o.name)}")


def cmd_keygen(args) -> int:
    from .selective import CkksKeys

    out = Path(args.out)
    pub = out.with_name(out.name + ".pub")
    if out.exists() or pub.exists():
        raise ConfigError(f"--out: {out} or {pub} already exists; refusing to overwrite a key")
    keys = CkksKeys.generate()
    keys.save(out)
    pub.write_bytes(keys.public_bytes())
    print(f"shared CKKS key written to {out} (mode 0600): give it to the other owners out of band, never to the server")
    print(f"public context (no secret key) written to {pub}: the aggregator's --context; digest {keys.digest.hex()[:16]}")
    return 0


def cmd_demo(args) -> int:
    from ..train import human_bytes
    from .round import build_owners, run_round

    ranks, budgets = _ints(args.ranks), _floats(args.budgets)
    if len(ranks) != len(budgets) or not ranks:
        raise ConfigError(f"--ranks and --budgets: {len(ranks)} ranks for {len(budgets)} budgets")
    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    names = [f"owner{i}" for i in range(len(ranks))]
    owners, keys = build_owners(_configs(args, names, ranks, budgets), args.model, args.data, args.seed)
    from ..embedded import federated_aggregator

    aggregator = federated_aggregator(keys.public_bytes())
    protection = (lambda o: "every coordinate encrypted") if args.scheme == "full" else (
        lambda o: f"budget {o.cfg.budget:g}")
    print("owners: " + ", ".join(f"{o.name} (rank {o.cfg.rank}, {protection(o)}, {o.samples} samples)"
                                 for o in owners))
    print(f"held-out loss before: {sum(o.eval_loss() for o in owners) / len(owners):.4f}")
    for r in range(1, args.rounds + 1):
        report = run_round(owners, aggregator, r)
        enc = max(report.enc_seconds.values())
        print(f"{report}  encryption {enc * 1e3:.0f} ms")
    print(f"last round: the aggregator received {human_bytes(sum(len(b) for b in report.received))} "
          f"of contributions from {len(report.received)} owners")
    _export(owners, args.out)
    return 0


def cmd_round(args) -> int:
    from hecommon.broker.topology import MAX_BROKER_MESSAGE_BYTES, MIN_MESSAGE_BYTES

    from .broker import FederatedBrokerClient, owner_round
    from .round import build_owner_shard
    from .selective import CkksKeys

    if not MIN_MESSAGE_BYTES <= args.max_message_bytes <= MAX_BROKER_MESSAGE_BYTES:
        raise ConfigError(f"--max-message-bytes {args.max_message_bytes}: must be in "
                          f"{MIN_MESSAGE_BYTES}..{MAX_BROKER_MESSAGE_BYTES}")
    if not args.timeout_s > 0 or args.timeout_s == float("inf"):
        raise ConfigError(f"--timeout-s {args.timeout_s}: must be a positive number of seconds")
    if args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: must be at least 1")
    if args.owners < 1:
        raise ConfigError(f"--owners {args.owners}: must be at least 1")
    if not 0 <= args.index < args.owners:
        raise ConfigError(f"--index {args.index}: must be in 0..{args.owners - 1}")
    keys = CkksKeys.load(args.key)
    cfg = _configs(args, [args.owner], [args.rank], [args.budget])[0]
    owner = build_owner_shard(cfg, args.index, args.owners, args.model, args.data, args.seed, keys)
    with FederatedBrokerClient(args.fed_broker, args.namespace, timeout_s=args.timeout_s,
                               max_bytes=args.max_message_bytes) as client:
        client.handshake(keys)
        for r in range(args.first_round, args.first_round + args.rounds):
            print(owner_round(owner, client, r, size=args.owners))
    _export([owner], args.out)
    return 0


COMMANDS = {"keygen": cmd_keygen, "demo": cmd_demo, "round": cmd_round}


def cmd_federate(args) -> int:
    from ..cli import run_reported

    return run_reported(f"helora federate {args.fed_command}", lambda: COMMANDS[args.fed_command](args))

"""Federated benchmark: SHE-LoRA against the full-HE baseline, and the DAGER attack on what the server sees.

    python benchmarks/federated.py [--quick] [--json PATH]

Measured in one run (DESIGN §5; issue 6):

- **rounds**: 3 owners (ranks 4, 8, 16) on the tiny model, the same seeds and data, once per
  budget: 0 (clear FlexLoRA), 0.125 %, 1 %, 10 % of each ``A``'s columns encrypted (SHE-LoRA),
  and 100 % (every column: the full-HE baseline). Upload bytes (proposal + contribution, as
  encoded), the owners' encryption seconds, the final held-out loss. Ratios against full HE and
  the loss gap against clear, from the same run.
- **layer cost at SmolLM2-135M dimensions** (full run): the first block's 7 LoRA layers (rank 8)
  encrypted at each budget and at 100 % (``select_and_encrypt`` + the fedwire message, median of
  3 runs, one for full HE); every block has the same shapes, so the ratios hold for the whole adapter.
- **attack**: DAGER-style token recovery by the server from one owner's message after ONE SGD
  step on a private batch (``helora_orchestrator.federated.dager``): DAGER as published on the
  first ``A`` (q), on q|k|v stacked, and position-aware; SmolLM2-135M in the full run, the tiny
  model with ``--quick``.

The paper's anchors (SHE-LoRA, arXiv 2505.21051) are printed next to ours: −99.71 %
communication and −99.87 % encryption time against HE, DAGER ROUGE-1 ≈ 0 at 0.125 % vs ≈ 95 without
protection. Ours compare with a different HE baseline (CKKS over the column-packed ΔW, N = 4096).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, write_json  # noqa: E402
from hecommon.wire.federated import Contribution, LayerContribution, encode_contribution  # noqa: E402
from helora_aggregator.federated import FederatedAggregator  # noqa: E402
from helora_orchestrator.client_model import build_client  # noqa: E402
from helora_orchestrator.data import Example, pack, read_examples  # noqa: E402
from helora_orchestrator.federated.client import OwnerConfig  # noqa: E402
from helora_orchestrator.federated.dager import (  # noqa: E402
    FIRST_BLOCK_QKV,
    attack_message,
    first_layer_inputs,
    one_step_contribution,
    warm_start,
)
from helora_orchestrator.federated.negotiate import budget_columns  # noqa: E402
from helora_orchestrator.federated.round import build_owners, run_round  # noqa: E402
from helora_orchestrator.federated.selective import CkksKeys, select_and_encrypt  # noqa: E402
from helora_orchestrator.lora import LoraSettings  # noqa: E402

SHE_BUDGETS = (0.00125, 0.01, 0.1)
FULL_HE = 1.0
PAPER = {"comm_reduction_vs_full_he": 0.9971, "enc_time_reduction_vs_full_he": 0.9987,
         "dager_rouge1_clear": 0.95, "dager_rouge1_she_0.125%": 0.0}
VARIANTS = {  # name → (layers read, position-aware)
    "dager_q": (FIRST_BLOCK_QKV[:1], False),
    "dager_qkv": (FIRST_BLOCK_QKV, False),
    "position_aware": (FIRST_BLOCK_QKV, True),
}
SECRET_TEXT = "Alice wired the money to her brother in Zurich on Monday"  # the attacked owner's batch


def pct(b: float) -> str:
    return f"{100 * b:g}%"


# -- rounds: SHE-LoRA vs full HE vs clear, same seeds ------------------------------------------

def federation(budget: float, rounds: int, keys: CkksKeys) -> dict:
    configs = [OwnerConfig(f"o{i}", rank=r, budget=budget, seed=10 + i, local_steps=2, lr=1e-2)
               for i, r in enumerate((4, 8, 16))]
    owners, _ = build_owners(configs, "tiny", None, seed=0, keys=keys)
    server = FederatedAggregator(keys.public_bytes())
    up = enc = down = 0.0
    report = None
    for r in range(1, rounds + 1):
        report = run_round(owners, server, r)
        if report.rejected:
            raise RuntimeError(f"round {r} at budget {budget}: rejected {report.rejected}")
        up += sum(report.bytes_up.values())
        enc += sum(report.enc_seconds.values())
        down += report.bytes_down * len(owners)
    assert report is not None
    return {"budget": budget, "bytes_up": up, "bytes_down": down, "enc_seconds": enc,
            "eval_loss": report.mean_eval_loss}


def rounds_section(rounds: int, keys: CkksKeys) -> tuple[list[dict], dict]:
    rows = [federation(b, rounds, keys) for b in (0.0, *SHE_BUDGETS, FULL_HE)]
    clear, full = rows[0], rows[-1]
    for row in rows:
        row["comm_reduction_vs_full_he"] = 1 - row["bytes_up"] / full["bytes_up"]
        row["enc_time_reduction_vs_full_he"] = 1 - row["enc_seconds"] / full["enc_seconds"]
        row["quality_gap_vs_clear"] = row["eval_loss"] - clear["eval_loss"]
    summary = {key: {pct(r["budget"]): r[key] for r in rows[1:-1]}
               for key in ("comm_reduction_vs_full_he", "enc_time_reduction_vs_full_he", "quality_gap_vs_clear")}
    summary["quality_gap_full_he_vs_clear"] = full["eval_loss"] - clear["eval_loss"]
    return rows, summary


# -- per-layer cost at SmolLM2-135M dimensions ---------------------------------------------------

SMOLLM2_BLOCK = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                 "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def layer_cost(keys: CkksKeys, budget: float, rank: int = 8, reps: int = 3) -> dict:
    """One owner's first block at ``budget``: seconds to select, encrypt and encode (median of
    ``reps``) and the message's bytes."""
    rng = np.random.default_rng(0)  # benchmark data only
    mats = {n: (rng.standard_normal((rank, d_in)) / np.sqrt(d_in), 1e-2 * rng.standard_normal((d_out, rank)))
            for n, (d_out, d_in) in SMOLLM2_BLOCK.items()}
    orders = {n: tuple(int(j) for j in rng.permutation(d_in)) for n, (_, d_in) in SMOLLM2_BLOCK.items()}

    def build() -> bytes:
        parts = []
        for n, (a, b) in mats.items():
            d_out, d_in = SMOLLM2_BLOCK[n]
            k = budget_columns(budget, d_in)
            swapped, enc = select_and_encrypt(keys, a, b.astype(np.float32), orders[n], k, 1)
            parts.append(LayerContribution(n, d_out, d_in, rank, k, b.astype(np.float32), swapped, enc))
        return encode_contribution(Contribution(os.urandom(16), "o0", 1, keys.digest, tuple(parts)), 1 << 30)

    times, size = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        size = len(build())
        times.append(time.perf_counter() - t0)
    return {"budget": budget, "bytes": size, "enc_seconds": statistics.median(times)}


def layer_section(keys: CkksKeys) -> tuple[list[dict], dict]:
    # full HE encrypts 1,728 ciphertexts per block: one timed run on this 2-core machine
    rows = [layer_cost(keys, b, reps=1 if b == FULL_HE else 3) for b in (0.0, *SHE_BUDGETS, FULL_HE)]
    full = rows[-1]
    for row in rows:
        row["comm_reduction_vs_full_he"] = 1 - row["bytes"] / full["bytes"]
        row["enc_time_reduction_vs_full_he"] = 1 - row["enc_seconds"] / full["enc_seconds"]
    summary = {key: {pct(r["budget"]): r[key] for r in rows[1:-1]}
               for key in ("comm_reduction_vs_full_he", "enc_time_reduction_vs_full_he")}
    return rows, summary


# -- the attack ------------------------------------------------------------------------------------

def attack_section(model_name: str, keys: CkksKeys) -> tuple[list[dict], dict]:
    """One owner after a merged round (B ≠ 0), one SGD step on SECRET_TEXT, every budget."""
    if model_name == "tiny":
        from hecommon.model import tiny_llama
        from helora_orchestrator.data import ByteTokenizer

        model, tok, rank = tiny_llama(seed=0)[0], ByteTokenizer(), 16
        rows = [Example(key=str(i), completion=f"The number {i} is followed by {i + 1}, and then by {i + 2}.")
                for i in range(40)]  # the same owner data and batch as tests/federated/test_dager.py
        secret = "hello world, hello"
    else:
        from hecommon.model import load_model, load_tokenizer

        model, tok, rank = load_model(), load_tokenizer(), 16
        rows, secret = read_examples(None)[:40], SECRET_TEXT
    candidates = first_layer_inputs(model.model.embed_tokens.weight.detach().numpy(),
                                    model.model.layers[0].input_layernorm.weight.detach().numpy(),
                                    model.config.rms_norm_eps)
    data = pack(rows, tok, seq_len=32)
    batch = torch.tensor([tok.encode(secret)])
    client = build_client(model, "clear", LoraSettings(r=rank), seed=1)
    warm_start(client, data)  # round 1 merged: the owner starts round 2 from B ≠ 0
    start = client.lora_state_dict()
    out = []
    for budget in (0.0, *SHE_BUDGETS):
        client.load_lora_state_dict(start)
        view = one_step_contribution(client, batch, data, budget, keys)
        for name, (layers, aware) in VARIANTS.items():
            s = attack_message(view, candidates, layers, aware)
            out.append({"budget": budget, "variant": name, "optimizer": "sgd", **s})
    # outside the attack's setting: one Adam step from fresh moments (as after Owner.merge), clear
    client.load_lora_state_dict(start)
    view = one_step_contribution(client, batch, data, 0.0, keys, lr=1e-3, optimizer="adam")
    adam = {name: attack_message(view, candidates, layers, aware) for name, (layers, aware) in VARIANTS.items()}
    summary = {
        "model": model_name, "rank": rank, "batch_tokens": int(batch.numel()),
        "batch_unique_tokens": int(len(set(batch[0].tolist()))),
        "attack_token_recovery_clear": {r["variant"]: r["recall"] for r in out if r["budget"] == 0.0},
        "attack_token_recovery_clear_one_adam_step": {name: s["recall"] for name, s in adam.items()},
        "attack_token_recovery_she": {pct(b): {r["variant"]: r["recall"] for r in out if r["budget"] == b}
                                      for b in SHE_BUDGETS},
        "attack_rouge1_clear": {r["variant"]: r["rouge1_unique"] for r in out if r["budget"] == 0.0},
        "attack_rouge1_she": {pct(b): {r["variant"]: r["rouge1_unique"] for r in out if r["budget"] == b}
                              for b in SHE_BUDGETS},
        "attack_false_positives": {f"{pct(r['budget'])}/{r['variant']}": r["false_positives"] for r in out},
    }
    return out, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only (rounds and attack); no SmolLM2")
    ap.add_argument("--rounds", type=int, default=None, help="federated rounds per budget (2 quick, 3 full)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.manual_seed(0)
    keys = CkksKeys.generate()
    t0 = time.perf_counter()

    round_rows, round_summary = rounds_section(rounds, keys)
    print(f"\nrounds: 3 owners (ranks 4, 8, 16), tiny model, {rounds} rounds per budget")
    print_table(round_rows, [("budget", "budget", ".5f"), ("bytes_up", "bytes up", ".0f"),
                             ("enc_seconds", "enc s", ".3f"), ("eval_loss", "held-out", ".4f"),
                             ("comm_reduction_vs_full_he", "comm -%", ".4f"),
                             ("enc_time_reduction_vs_full_he", "enc -%", ".4f"),
                             ("quality_gap_vs_clear", "loss gap", ".2e")])
    layer_rows, layer_summary = [], {}
    if not args.quick:
        layer_rows, layer_summary = layer_section(keys)
        print("\nfirst block of SmolLM2-135M (7 LoRA layers, rank 8), one owner")
        print_table(layer_rows, [("budget", "budget", ".5f"), ("bytes", "bytes", ".0f"),
                                 ("enc_seconds", "enc s", ".3f"),
                                 ("comm_reduction_vs_full_he", "comm -%", ".4f"),
                                 ("enc_time_reduction_vs_full_he", "enc -%", ".4f")])
    attack_rows, attack_summary = attack_section("tiny" if args.quick else "smollm2", keys)
    print(f"\nDAGER-style attack, {attack_summary['model']}, rank {attack_summary['rank']}, "
          f"{attack_summary['batch_unique_tokens']} distinct tokens in the batch, one SGD step")
    print(f"one Adam step instead (clear): recall {attack_summary['attack_token_recovery_clear_one_adam_step']}")
    print_table(attack_rows, [("budget", "budget", ".5f"), ("variant", "variant", "s"),
                              ("recall", "recall", ".3f"), ("precision", "precision", ".3f"),
                              ("false_positives", "false pos", ".0f"), ("rouge1_unique", "ROUGE-1", ".3f"),
                              ("rank", "rank", ".0f"), ("dims", "dims", ".0f"), ("hidden", "hidden", ".0f")])
    print("\npaper anchors (SHE-LoRA): " + ", ".join(f"{k} {v}" for k, v in PAPER.items()))
    summary = {"rounds": round_summary, "smollm2_block": layer_summary, "attack": attack_summary,
               "seconds": time.perf_counter() - t0}
    for k, v in summary.items():
        print(f"  {k}: {v}")
    write_json(args.json, {"summary": summary, "paper": PAPER, "rounds_rows": round_rows,
                           "smollm2_block_rows": layer_rows, "attack_rows": attack_rows,
                           "machine": machine(), "quick": args.quick, "n_rounds": rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

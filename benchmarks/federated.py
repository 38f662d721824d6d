"""Federated benchmark: every coordinate encrypted (``--scheme full``) against SHE-LoRA's selective
encryption and TenSEAL full HE, and the DAGER attack on what the server sees.

    python benchmarks/federated.py [--quick] [--json PATH]

Measured in one run (DESIGN §5; issues 6 and 20), written at the top level of the JSON:

- ``schemes``: ``full`` (helora's RLWE over every coordinate of ``w_i·ΔW_i``), ``selective_0.125%``,
  ``selective_1%``, ``selective_10%`` (SHE-LoRA) and ``tenseal_full`` (CKKS over every coordinate),
  each with
  - ``bytes_per_owner_round`` (what one owner uploads: proposal and contribution, as encoded) and
    ``bytes_over_clear`` (over the same update, ``ΔW`` of every layer, sent in the clear as fp32);
  - ``encrypt_s_per_owner_round`` (one owner's encryption and encoding, median of the runs) and
    ``aggregate_s_per_round`` (the aggregator's plan, checks, sum and answer for 3 owners);
    both on SmolLM2-135M's first block (7 LoRA layers, rank 8; every block has the same shapes),
    the tiny model's with ``--quick``;
  - ``attack_token_recovery``: DAGER as published on q (``dager_q``), on q|k|v stacked
    (``dager_qkv``), and position-aware, from one owner's message after ONE SGD step on a private
    batch (SmolLM2, the tiny model with ``--quick``);
  - ``quality_gap_vs_clear``: held-out loss after the same rounds (3 owners, ranks 4/8/16, the
    tiny model) minus clear FlexLoRA's.
- ``attack_token_recovery_clear``: the three attacks on the clear update (SHE-LoRA's budget 0).

The paper's anchors (SHE-LoRA, arXiv 2505.21051) are printed next to ours: −99.71 %
communication and −99.87 % encryption time against HE, DAGER ROUGE-1 ≈ 0 at 0.125 % vs ≈ 95
without protection. Its HE baseline is not ours (CKKS over the column-packed ΔW, N = 4096, here).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, write_json  # noqa: E402
from hecommon.wire import federated as fedwire  # noqa: E402
from hecommon.wire.federated import (  # noqa: E402
    Contribution,
    LayerContribution,
    PlanLayer,
    Proposal,
    ProposalLayer,
    RoundPlan,
)
from helora_aggregator.federated import FederatedAggregator  # noqa: E402
from helora_orchestrator.client_model import build_client  # noqa: E402
from helora_orchestrator.data import Example, pack, read_examples  # noqa: E402
from helora_orchestrator.federated import encsum, fullhe  # noqa: E402
from helora_orchestrator.federated.client import OwnerConfig  # noqa: E402
from helora_orchestrator.federated.dager import (  # noqa: E402
    FIRST_BLOCK_QKV,
    ObservedA,
    attack_message,
    attack_sum_message,
    dager_attack,
    first_layer_inputs,
    local_step,
    one_step_contribution,
    one_step_sum,
    recovery_scores,
    warm_start,
)
from helora_orchestrator.federated.negotiate import budget_columns  # noqa: E402
from helora_orchestrator.federated.round import build_owners, run_round  # noqa: E402
from helora_orchestrator.federated.selective import CkksKeys, select_and_encrypt  # noqa: E402
from helora_orchestrator.federated.sensitivity import lora_layers  # noqa: E402
from helora_orchestrator.lora import LoraSettings  # noqa: E402

SHE_BUDGETS = (0.00125, 0.01, 0.1)
FULL_HE = 1.0
OWNERS = 3
SCHEMES = ("full", *(f"selective_{100 * b:g}%" for b in SHE_BUDGETS), "tenseal_full")
PAPER = {"comm_reduction_vs_full_he": 0.9971, "enc_time_reduction_vs_full_he": 0.9987,
         "dager_rouge1_clear": 0.95, "dager_rouge1_she_0.125%": 0.0}
VARIANTS = {  # name → (layers read, position-aware)
    "dager_q": (FIRST_BLOCK_QKV[:1], False),
    "dager_qkv": (FIRST_BLOCK_QKV, False),
    "position_aware": (FIRST_BLOCK_QKV, True),
}
SECRET_TEXT = "Alice wired the money to her brother in Zurich on Monday"  # the attacked owner's batch
SMOLLM2_BLOCK = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                 "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
TINY_BLOCK = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def pct(b: float) -> str:
    return f"{100 * b:g}%"


# -- quality: the same rounds under every scheme, tiny model ----------------------------------------

def federation(scheme: str, budget: float, rounds: int, keys: CkksKeys) -> dict:
    configs = [OwnerConfig(f"o{i}", rank=r, budget=budget, seed=10 + i, local_steps=2, lr=1e-2, scheme=scheme)
               for i, r in enumerate((4, 8, 16))]
    owners, _ = build_owners(configs, "tiny", None, seed=0, keys=keys)
    server = FederatedAggregator(keys.public_bytes())
    report = None
    for r in range(1, rounds + 1):
        report = run_round(owners, server, r)
        if report.rejected:
            raise RuntimeError(f"round {r} ({scheme}, budget {budget}): rejected {report.rejected}")
    assert report is not None
    return {"scheme": scheme, "budget": budget, "eval_loss": report.mean_eval_loss}


def quality_section(rounds: int, keys: CkksKeys) -> tuple[list[dict], dict[str, float]]:
    """Held-out loss after ``rounds`` rounds per scheme, and its gap to clear FlexLoRA (budget 0)."""
    runs = {"clear": ("selective", 0.0), "full": ("full", 0.0),
            **{f"selective_{pct(b)}": ("selective", b) for b in SHE_BUDGETS},
            "tenseal_full": ("selective", FULL_HE)}  # every column under CKKS: the full-HE baseline (tests)
    rows = [{"name": name, **federation(scheme, budget, rounds, keys)} for name, (scheme, budget) in runs.items()]
    clear = rows[0]["eval_loss"]
    for row in rows:
        row["quality_gap_vs_clear"] = row["eval_loss"] - clear
    return rows, {row["name"]: row["quality_gap_vs_clear"] for row in rows[1:]}


# -- cost per owner and per round, one block -----------------------------------------------------------

def owner_factors(shapes: dict[str, tuple[int, int]], rank: int = 8) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per owner, per layer ``(A (r, d_in), s·B (d_out, r))`` of LoRA's scale (benchmark data)."""
    rng = np.random.default_rng(0)
    return [{n: (rng.standard_normal((rank, d_in)) / np.sqrt(d_in), 1e-2 * rng.standard_normal((d_out, rank)))
             for n, (d_out, d_in) in shapes.items()} for _ in range(OWNERS)]


def _timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of ``reps`` calls after one untimed call, and the last result."""
    times, out = [], fn()
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@dataclasses.dataclass
class Scheme:
    """One scheme's owner side (``build(i)``: owner i's messages of a round, encoded) and server side
    (``aggregate()``), prepared so that the schemes can also be timed in turns (``time_schemes``)."""

    build: Callable[[int], bytes]
    aggregate: Callable[[], bytes]
    extra_bytes: int = 0  # per owner, sent before the contribution (SHE-LoRA's proposal)


def prepare_full(keys: CkksKeys, shapes, mats) -> Scheme:
    rid = os.urandom(16)
    server = FederatedAggregator(keys.public_bytes())
    msgs: list[bytes] = []

    def build(i: int) -> bytes:  # from the factors, as Owner.contribute_sum (ΔW formed block by block)
        return fedwire.encode(encsum.contribute(keys, rid, f"o{i}", mats[i], shapes, 100 + i, OWNERS), 1 << 30)

    def aggregate() -> bytes:
        if not msgs:
            msgs.extend(build(i) for i in range(OWNERS))
        agg, rejected = server.aggregate_sum(rid, msgs, OWNERS, 1 << 30)
        assert not rejected, rejected
        return fedwire.encode(agg, 1 << 30)

    return Scheme(build, aggregate)


def prepare_selective(keys: CkksKeys, shapes, mats, budget: float) -> Scheme:
    rid = os.urandom(16)
    rng = np.random.default_rng(1)
    orders = {n: tuple(int(j) for j in rng.permutation(d_in)[:budget_columns(budget, d_in)])
              for n, (_, d_in) in shapes.items()}
    plan = RoundPlan(rid, keys.digest, tuple(PlanLayer(n, *shapes[n], orders[n]) for n in shapes))
    proposals = [fedwire.encode(Proposal(rid, f"o{i}", keys.digest, tuple(ProposalLayer(n, *shapes[n], orders[n])
                                                                        for n in shapes)), 1 << 30)
                 for i in range(OWNERS)]
    server = FederatedAggregator(keys.public_bytes())
    msgs: list[bytes] = []

    def build(i: int) -> bytes:
        parts = []
        for n, (a, b) in mats[i].items():
            d_out, d_in = shapes[n]
            k = len(orders[n])
            swapped, enc = select_and_encrypt(keys, a, b.astype(np.float32), orders[n], k, 100 + i)
            parts.append(LayerContribution(n, d_out, d_in, a.shape[0], k, b.astype(np.float32), swapped, enc))
        return fedwire.encode(Contribution(rid, f"o{i}", 100 + i, keys.digest, tuple(parts)), 1 << 30)

    def aggregate() -> bytes:
        if not msgs:
            msgs.extend(build(i) for i in range(OWNERS))
        server.plan([fedwire.decode(p, 1 << 30, Proposal) for p in proposals], shapes, rid)
        agg, rejected = server.aggregate(plan, msgs, 1 << 30)
        assert not rejected, rejected
        return fedwire.encode(agg, 1 << 30)

    return Scheme(build, aggregate, len(proposals[0]))


def time_schemes(schemes: dict[str, Scheme], reps: int) -> dict[str, dict]:
    """Each scheme's owner and server seconds: the median of ``reps`` calls in a loop of its own after
    one untimed call (``encrypt_s_per_owner_round``, ``aggregate_s_per_round``: steady state), and
    the median of ``reps`` turns in which every scheme's owner side runs once, one after the other
    (``encrypt_s_in_turns``). On this 2-vCPU VM the second differs from the first for multi-threaded
    code: while TenSEAL encrypts on one thread the other vCPU idles, and the hypervisor takes some
    milliseconds to give it back (a 0.2 s sleep before a call adds about a third to ``full``'s)."""
    out = {}
    for k, s in schemes.items():
        enc_s, msg = _timed(lambda s=s: s.build(0), reps)
        agg_s, _ = _timed(s.aggregate, reps)
        out[k] = {"bytes_per_owner_round": len(msg) + s.extra_bytes, "encrypt_s_per_owner_round": enc_s,
                  "aggregate_s_per_round": agg_s}
    turns: dict[str, list[float]] = {k: [] for k in schemes}
    for _ in range(reps):
        for k, s in schemes.items():
            t0 = time.perf_counter()
            s.build(0)
            turns[k].append(time.perf_counter() - t0)
    for k in schemes:
        out[k]["encrypt_s_in_turns"] = statistics.median(turns[k])
    return out


def cost_tenseal(keys: CkksKeys, shapes, mats) -> dict:
    """Every coordinate under CKKS (``fullhe``): one timed run (thousands of ciphertexts a block)."""
    def delta(i: int) -> dict[str, np.ndarray]:
        return {n: b @ a for n, (a, b) in mats[i].items()}

    enc_s, first = _timed(lambda: fullhe.encrypt_full(keys, delta(0), 100)[0], 1)
    cts = [first] + [fullhe.encrypt_full(keys, delta(i), 100 + i)[0] for i in range(1, OWNERS)]
    agg_s, _ = _timed(lambda: fullhe.sum_full(keys.public_bytes(), cts), 1)
    size = sum(len(b) for blobs in first.values() for b in blobs)  # type: ignore[union-attr]
    return {"bytes_per_owner_round": size, "encrypt_s_per_owner_round": enc_s, "aggregate_s_per_round": agg_s}


def cost_section(keys: CkksKeys, shapes, reps: int) -> dict[str, dict]:
    mats = owner_factors(shapes)
    clear_bytes = 4 * sum(d_out * d_in for d_out, d_in in shapes.values())  # ΔW of every layer, fp32
    schemes = {"full": prepare_full(keys, shapes, mats)}
    for b in SHE_BUDGETS:
        schemes[f"selective_{pct(b)}"] = prepare_selective(keys, shapes, mats, b)
    out = time_schemes(schemes, reps)
    out["tenseal_full"] = cost_tenseal(keys, shapes, mats)
    for row in out.values():
        row["bytes_over_clear"] = row["bytes_per_owner_round"] / clear_bytes
    return out


# -- the attack ------------------------------------------------------------------------------------

def tenseal_view(client, layers, keys: CkksKeys) -> list[ObservedA]:
    """What a server holding TenSEAL ciphertexts of each layer's ``w·ΔW`` can read without the key:
    the serialized bytes taken as numbers, one per coefficient of ``ΔW`` (it has nothing better)."""
    lora = lora_layers(client)
    out = []
    for n in layers:
        m = lora[n]
        dw = m.scaling * (m.lora_B.weight.detach().double() @ m.lora_A.weight.detach().double()).numpy()
        blobs = fullhe.encrypt_full(keys, {n: dw}, 1)[0][n]
        raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.float64)
        out.append(ObservedA(n, raw[: dw.size].reshape(dw.shape), np.zeros(0, dtype=np.int64)))
    return out


def attack_section(model_name: str, keys: CkksKeys) -> tuple[list[dict], dict]:
    """One owner after a merged round (B ≠ 0), one SGD step on the secret batch, every scheme."""
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
        name = "clear" if budget == 0.0 else f"selective_{pct(budget)}"
        for variant, (layers, aware) in VARIANTS.items():
            out.append({"scheme": name, "variant": variant, **attack_message(view, candidates, layers, aware)})
    client.load_lora_state_dict(start)
    sum_view = one_step_sum(client, batch, keys, size=OWNERS)
    for variant, (layers, _) in VARIANTS.items():  # no position is hidden, none is known: one reading
        out.append({"scheme": "full", "variant": variant, **attack_sum_message(sum_view, candidates, layers)})
        out.append({"scheme": "full_in_the_clear", "variant": variant,
                    **attack_sum_message(sum_view, candidates, layers, clear=True)})
    client.load_lora_state_dict(start)
    local_step(client, batch, 0.1)  # the same SGD step (one_step_sum's), then the ciphertexts TenSEAL sends
    for variant, (layers, _) in VARIANTS.items():
        result = dager_attack(tenseal_view(client, layers, keys), candidates)
        out.append({"scheme": "tenseal_full", "variant": variant,
                    **recovery_scores(result.tokens, batch.numpy()), "rank": float(result.rank),
                    "dims": float(result.dims), "hidden": 0.0})
    # outside the attack's setting: one Adam step from fresh moments (as after Owner.merge), clear
    client.load_lora_state_dict(start)
    view = one_step_contribution(client, batch, data, 0.0, keys, lr=1e-3, optimizer="adam")
    adam = {name: attack_message(view, candidates, layers, aware)["recall"] for name, (layers, aware) in VARIANTS.items()}
    recall = {}
    for r in out:
        recall.setdefault(r["scheme"], {})[r["variant"]] = r["recall"]
    summary = {"model": model_name, "rank": rank, "batch_tokens": int(batch.numel()),
               "batch_unique_tokens": int(len(set(batch[0].tolist()))), "recall": recall,
               "recall_clear_one_adam_step": adam,
               "false_positives": {f"{r['scheme']}/{r['variant']}": r["false_positives"] for r in out}}
    return out, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only (cost, rounds and attack); no SmolLM2")
    ap.add_argument("--rounds", type=int, default=None, help="federated rounds per scheme (2 quick, 3 full)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.manual_seed(0)
    keys = CkksKeys.generate()
    t0 = time.perf_counter()

    # cost first, in a fresh process (the rounds leave torch's thread pool behind), with numpy's
    # BLAS on one thread: OpenBLAS's threads spin after each product and take the cores the
    # encryption's own threads need (the rank-8 products are small)
    block = TINY_BLOCK if args.quick else SMOLLM2_BLOCK
    with threadpool_limits(1, user_api="blas"):
        costs = cost_section(keys, block, reps=1 if args.quick else 9)
    block_name = "tiny model" if args.quick else "SmolLM2-135M"
    print(f"\ncost: the first block of {block_name} (7 LoRA layers, rank 8), {OWNERS} owners")
    print_table([{"scheme": k, **v} for k, v in costs.items()],
                [("scheme", "scheme", "s"), ("bytes_per_owner_round", "bytes/owner", ".0f"),
                 ("bytes_over_clear", "/clear fp32", ".4f"), ("encrypt_s_per_owner_round", "enc s", ".3f"),
                 ("encrypt_s_in_turns", "enc s, turns", ".3f"), ("aggregate_s_per_round", "aggregate s", ".3f")])
    quality_rows, gaps = quality_section(rounds, keys)
    print(f"\nquality: 3 owners (ranks 4, 8, 16), tiny model, {rounds} rounds per scheme")
    print_table(quality_rows, [("name", "scheme", "s"), ("eval_loss", "held-out", ".5f"),
                               ("quality_gap_vs_clear", "gap", ".2e")])
    attack_rows, attack = attack_section("tiny" if args.quick else "smollm2", keys)
    print(f"\nDAGER-style attack, {attack['model']}, rank {attack['rank']}, {attack['batch_unique_tokens']} "
          f"distinct tokens in the batch, one SGD step (one Adam step, clear: {attack['recall_clear_one_adam_step']})")
    print_table(attack_rows, [("scheme", "scheme", "s"), ("variant", "variant", "s"), ("recall", "recall", ".3f"),
                              ("precision", "precision", ".3f"), ("false_positives", "false pos", ".0f"),
                              ("rank", "rank", ".0f"), ("dims", "dims", ".0f"), ("hidden", "hidden", ".0f")])
    schemes = {name: {**costs[name], "attack_token_recovery": attack["recall"][name],
                      "quality_gap_vs_clear": gaps[name]} for name in SCHEMES}
    full, she1 = schemes["full"], schemes["selective_1%"]
    targets = {
        "full_attacks_recover_0": all(v == 0.0 for v in full["attack_token_recovery"].values()),
        "clear_recovery_above_0.5": all(v > 0.5 for v in attack["recall"]["clear"].values()),
        "full_bytes_over_clear_le_1.3": full["bytes_over_clear"] <= 1.3,
        "full_encrypt_le_selective_1%": full["encrypt_s_per_owner_round"] <= she1["encrypt_s_per_owner_round"],
        "full_quality_gap_le_1e-4": abs(full["quality_gap_vs_clear"]) <= 1e-4,
    }
    print("\ntargets (issue 20): " + ", ".join(f"{k} {v}" for k, v in targets.items()))
    print("paper anchors (SHE-LoRA): " + ", ".join(f"{k} {v}" for k, v in PAPER.items()))
    write_json(args.json, {
        "attack_token_recovery_clear": attack["recall"]["clear"],
        "schemes": schemes,
        "targets": targets,
        "cost_block": block_name, "owners": OWNERS, "n_rounds": rounds,
        "attack": attack, "attack_rows": attack_rows, "quality_rows": quality_rows,
        "paper": PAPER, "machine": machine(), "quick": args.quick, "seconds": time.perf_counter() - t0,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

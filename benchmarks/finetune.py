"""Fine-tuning benchmark on SmolLM2-135M: plaintext PEFT vs helora's clear, quantized, encrypted.

    python benchmarks/finetune.py [--quick] [--json PATH] [--png PATH]

Same data (the bundled CPython docs corpus), same batches, same seed, same LoRA (r=8, α=16 on
all block linears), same AdamW + warm-up/cosine schedule, in one run:
- quality: ``plain_peft`` (transformers + PEFT, fp32, the reference), helora's ``clear`` and
  ``quantized`` modes, ``--steps`` steps of small batches, final held-out loss;
- throughput, at full packing (one ciphertext batch of N = 2048 tokens per request):
  ``plain_peft`` and ``encrypted`` tokens/s on the same batches; ``encrypted`` is compared bit for
  bit with ``quantized`` over the same steps (loss and LoRA weights after each step);
- the client's cost and wire bytes per token at Llama-3.2-1B dimensions (one block of random
  weights, scaled to 16 blocks).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, time_transport, write_json  # noqa: E402
from hecommon.model import discover_groups, load_model, load_tokenizer  # noqa: E402
from helora_orchestrator.client_model import build_client, causal_lm_loss  # noqa: E402
from helora_orchestrator.data import DataOrder, load_splits  # noqa: E402
from helora_orchestrator.lora import LoraSettings  # noqa: E402
from helora_orchestrator.train import TrainConfig, evaluate, lr_factor  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Run:
    """Steps of one mode over the shared batch order; records losses and timing."""

    def __init__(self, name: str, module, params, cfg: TrainConfig, forward) -> None:
        self.name, self.module, self.cfg, self.forward = name, module, cfg, forward
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))
        self.losses: list[float] = []
        self.seconds = 0.0
        self.tokens = 0

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss, n = causal_lm_loss(self.forward(ids), labels)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0
        self.tokens += ids.numel()
        self.losses.append(float(loss) / n)


def peft_run(cfg: TrainConfig, lora: LoraSettings) -> Run:
    from peft import LoraConfig, get_peft_model

    model = load_model(None)
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(TARGETS))
    pm = get_peft_model(model, peft_cfg)
    return Run("plain_peft", pm, [p for p in pm.parameters() if p.requires_grad], cfg,
               lambda ids: pm(input_ids=ids).logits)


def helora_run(mode: str, cfg: TrainConfig, lora: LoraSettings, **kw) -> Run:
    client = build_client(load_model(None), mode, lora, seed=cfg.seed, **kw)
    return Run(mode, client, client.lora_parameters(), cfg, client)


def eval_loss(run: Run, data, cfg: TrainConfig) -> float:
    if run.name == "plain_peft":
        class _Wrap(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids).logits
        return evaluate(_Wrap(run.module), data, cfg.eval_batches, cfg.batch_size)
    return evaluate(run.module, data, cfg.eval_batches, cfg.batch_size)


def lora_snapshot(run: Run) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.params]


def hint_bytes_once(backend, blocks_scale: float = 1.0) -> float:
    """Bytes of every layer's public hint (forward and backward) at the residues' packed size.

    The client fetches each once (the embedded mode reads the evaluator's array instead); it is
    not in the per-token figures and amortizes over the whole run.
    """
    ps = backend.params
    per_value = sum(p.bit_length() for p in ps.primes) / 8
    return blocks_scale * sum((e.d_out + e.d_in) * ps.n * per_value for e in backend.manifest.layers)


def llama1b_costs() -> dict:
    """Client seconds and wire bytes per token for one Llama-3.2-1B block, scaled to 16 blocks."""
    from helora_orchestrator.embedded import make_encrypted_backend
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=1, vocab_size=256)
    model = LlamaForCausalLM(cfg)
    groups = discover_groups(model)
    backend = make_encrypted_backend(model, groups)
    server_seconds = time_transport(backend)
    gen = np.random.default_rng(0)
    n = backend.params.n
    for g in groups:  # warm the hints (server start-up, not per-token cost)
        backend.forward(g.name, gen.standard_normal((1, g.in_features)).astype(np.float32))
        backend.backward(g.name, gen.standard_normal((1, g.total_out)).astype(np.float32))
    backend.wire_bytes, server_seconds[0] = 0, 0.0
    t0 = time.perf_counter()
    for g in groups:
        backend.forward(g.name, gen.standard_normal((n, g.in_features)).astype(np.float32))
        backend.backward(g.name, gen.standard_normal((n, g.total_out)).astype(np.float32))
    total = time.perf_counter() - t0
    blocks = 16
    return {
        "blocks": blocks,
        "client_s_per_token": (total - server_seconds[0]) * blocks / n,
        "server_cpu_s_per_token": server_seconds[0] * blocks / n,
        "wire_bytes_per_token": backend.wire_bytes * blocks / n,
        "hint_bytes_once": hint_bytes_once(backend, blocks),
        "zama_estimate_bytes_per_token": 8.4e6,
    }


def plot(runs: dict[str, list[float]], path: str, window: int = 10) -> None:
    """Train-loss curves: raw (faint) and a ``window``-step moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in runs.items():
        steps = np.arange(1, len(losses) + 1)
        if len(losses) < 2 * window:
            ax.plot(steps, losses, label=name, marker="o", linestyle="none")
            continue
        line, = ax.plot(steps, losses, alpha=0.15)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=line.get_color(), label=f"{name} ({window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("SmolLM2-135M LoRA fine-tuning (bundled corpus)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def replot(json_path: str, png_path: str) -> None:
    """Redraw the PNG from a JSON written by this script."""
    import json

    plot(json.loads(open(json_path).read())["curves"], png_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 steps instead of 200, one encrypted step")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--encrypted-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1, help="quality runs")
    ap.add_argument("--seq-len", type=int, default=128, help="quality runs")
    ap.add_argument("--throughput-batch", type=int, default=8, help="throughput runs (8 x 256 = N tokens)")
    ap.add_argument("--throughput-seq-len", type=int, default=256)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--png", metavar="PATH", default="out/finetune_loss.png")
    ap.add_argument("--skip-llama1b", action="store_true")
    ap.add_argument("--replot", metavar="JSON", help="only redraw --png from an earlier --json output")
    args = ap.parse_args(argv)
    if args.replot:
        replot(args.replot, args.png)
        return 0
    steps = args.steps or (20 if args.quick else 200)
    enc_steps = args.encrypted_steps or (1 if args.quick else 2)
    cfg = TrainConfig(steps=steps, lr=2e-4, warmup_steps=max(1, steps // 20), batch_size=args.batch_size,
                      seq_len=args.seq_len, eval_batches=4, progress=False)
    lora = LoraSettings()
    torch.manual_seed(0)
    train, held_out = load_splits(None, load_tokenizer(None), cfg.seq_len)
    order = DataOrder(len(train), cfg.batch_size, cfg.seed)
    batches = [train.batch(order.next_batch()) for _ in range(steps)]

    results: dict = {}
    curves: dict[str, list[float]] = {}
    for name in ("plain_peft", "clear", "quantized"):
        torch.manual_seed(cfg.seed)
        run = peft_run(cfg, lora) if name == "plain_peft" else helora_run(name, cfg, lora)
        before = eval_loss(run, held_out, cfg)
        for i, (ids, labels) in enumerate(batches):
            run.step(ids, labels)
            if (i + 1) % 10 == 0 or i + 1 == steps:
                print(f"  {name}: step {i + 1}/{steps} loss {run.losses[-1]:.4f}", flush=True)
        after = eval_loss(run, held_out, cfg)
        results[name] = {"eval_loss_before": before, "eval_loss_after": after,
                         "tokens_per_s": run.tokens / run.seconds, "final_train_loss": run.losses[-1]}
        curves[name] = run.losses
        del run

    # throughput at full packing, and encrypted vs quantized step by step from the same start
    tcfg = TrainConfig(steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, batch_size=args.throughput_batch,
                       seq_len=args.throughput_seq_len, eval_batches=1, progress=False)
    train_t, _ = load_splits(None, load_tokenizer(None), tcfg.seq_len)
    order_t = DataOrder(len(train_t), tcfg.batch_size, tcfg.seed)
    big = [train_t.batch(order_t.next_batch()) for _ in range(enc_steps)]
    torch.manual_seed(cfg.seed)
    peft_t = peft_run(tcfg, lora)
    for ids, labels in big:
        peft_t.step(ids, labels)
    tps_peft = peft_t.tokens / peft_t.seconds
    del peft_t
    torch.manual_seed(cfg.seed)
    quant = helora_run("quantized", tcfg, lora)
    torch.manual_seed(cfg.seed)
    enc = helora_run("encrypted", tcfg, lora)
    server_seconds = time_transport(enc.module.backend)
    equal = True
    step_seconds = []
    for ids, labels in big:
        quant.step(ids, labels)
        t0 = time.perf_counter()
        enc.step(ids, labels)
        step_seconds.append(time.perf_counter() - t0)
        equal &= all(torch.equal(a, b) for a, b in zip(lora_snapshot(quant), lora_snapshot(enc), strict=True))
        equal &= quant.losses[-1] == enc.losses[-1]
        print(f"  encrypted: step {len(enc.losses)}/{enc_steps} loss {enc.losses[-1]:.4f} "
              f"({step_seconds[-1]:.0f} s, equal to quantized: {equal})", flush=True)
    curves["encrypted (full packing)"] = enc.losses
    curves["quantized (full packing)"] = quant.losses
    tokens = enc.tokens
    # the first step also computes the server's hints (start-up); report the steady state when we have it
    steady = step_seconds[1:] or step_seconds
    tps_enc = big[0][0].numel() / (sum(steady) / len(steady))

    summary = {
        "steps": steps,
        "encrypted_steps": enc_steps,
        "tokens_per_step_quality": batches[0][0].numel(),
        "tokens_per_step_throughput": big[0][0].numel(),
        "loss_fp32": results["plain_peft"]["eval_loss_after"],
        "loss_clear": results["clear"]["eval_loss_after"],
        "loss_quantized": results["quantized"]["eval_loss_after"],
        "loss_ratio_quantized_vs_fp32": results["quantized"]["eval_loss_after"] / results["plain_peft"]["eval_loss_after"],
        "encrypted_equals_quantized": bool(equal),
        "tokens_per_s_plain_peft": tps_peft,
        "tokens_per_s_encrypted": tps_enc,
        "slowdown_vs_plain_peft": tps_peft / tps_enc,
        "client_share": 1.0 - server_seconds[0] / sum(step_seconds),
        "bytes_per_token": enc.module.wire_bytes / tokens,
        "hint_bytes_once": hint_bytes_once(enc.module.backend),
        "encrypted_step_seconds": step_seconds,
    }
    if not args.skip_llama1b:
        summary["llama_3_2_1b"] = llama1b_costs()
    plot(curves, args.png)
    print("\nfine-tuning SmolLM2-135M, bundled corpus")
    print(f"{'mode':12s} {'eval before':>12s} {'eval after':>12s} {'tok/s':>10s}")
    for name, r in results.items():
        print(f"{name:12s} {r['eval_loss_before']:12.4f} {r['eval_loss_after']:12.4f} {r['tokens_per_s']:10.1f}")
    print(f"full packing ({big[0][0].numel()} tokens/step): plain PEFT {tps_peft:.1f} tok/s, "
          f"encrypted {tps_enc:.2f} tok/s")
    for k, v in summary.items():
        if not isinstance(v, (dict, list)):
            print(f"  {k:32s} {v}")
    if "llama_3_2_1b" in summary:
        for k, v in summary["llama_3_2_1b"].items():
            print(f"  llama-3.2-1b {k:24s} {v:.4g}")
    write_json(args.json, {"summary": summary, **summary, "modes": results, "curves": curves,
                           "machine": machine(), "quick": args.quick, "ppl_fp32": math.exp(summary["loss_fp32"])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

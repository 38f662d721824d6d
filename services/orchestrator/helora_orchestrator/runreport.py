"""``helora report RUN_DIR``: a finished (or running) training run at a glance.

Reads ``RUN_DIR/metrics.jsonl`` (``runlog``), prints a short summary and draws a PNG (matplotlib,
no display needed): the training loss and the held-out loss per step, tokens/s per step, and each
step's seconds by phase (the client's encryption and decryption, the server with the wire, the
clear layers).
"""

from __future__ import annotations

from pathlib import Path

from hecommon.errors import ConfigError

from . import runlog
from .train import human_bytes

PNG = "report.png"
PHASE_LABELS = {"encrypt": "client: encrypt", "decrypt": "client: decrypt", "server": "server + wire",
                "clear": "client: clear layers, LoRA, optimizer"}


def summary(run_dir: str | Path, steps: list[dict], evals: list[dict]) -> str:
    """A few lines: steps, losses, throughput, wire bytes and where the time went."""
    seconds = {p: sum(s["seconds"][p] for s in steps) for p in ("step", *runlog.PHASES)}
    tokens = sum(s["tokens"] for s in steps)
    wire = sum(s["wire_bytes"] for s in steps)
    lines = [f"run {run_dir}: {len(steps)} steps, {tokens} tokens in {seconds['step']:.1f} s "
             f"({tokens / seconds['step'] if seconds['step'] else 0.0:.1f} tokens/s)"]
    last = steps[-1]["loss"]
    lines.append(f"train loss: first {_num(steps[0]['loss'])}, last {_num(last)} (step {steps[-1]['step']})")
    scored = [e for e in evals if e["eval_loss"] is not None]
    if scored:
        best = min(scored, key=lambda e: e["eval_loss"])
        lines.append(f"held-out loss: last {_num(scored[-1]['eval_loss'])} (step {scored[-1]['step']}), "
                     f"best {_num(best['eval_loss'])} (step {best['step']})")
    if wire:
        lines.append(f"wire: {human_bytes(wire)} ({human_bytes(wire / max(tokens, 1))} per token)")
    split = ", ".join(f"{PHASE_LABELS[p]} {100 * seconds[p] / seconds['step']:.0f}%"
                      for p in runlog.PHASES if seconds["step"] and seconds[p])
    if split:
        lines.append(f"time: {split}")
    overlap = max(s["seconds"].get("overlap", 0.0) for s in steps)
    if overlap > 1.0:
        lines.append(f"linear calls of micro-batches in flight overlapped up to {overlap:.2f}x "
                     "(their phases are scaled to the wall time)")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def draw(steps: list[dict], evals: list[dict], path: str | Path) -> Path:
    """The PNG: loss and held-out loss, tokens/s, seconds by phase, against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the environment says
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [s["step"] for s in steps]
    fig, (ax_loss, ax_tps, ax_time) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    try:
        ax_loss.plot(x, [s["loss"] for s in steps], label="training loss")
        scored = [e for e in evals if e["eval_loss"] is not None]
        ax_loss.plot([e["step"] for e in scored], [e["eval_loss"] for e in scored], "o-", label="held-out loss")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_tps.plot(x, [s["tokens_per_s"] for s in steps], color="tab:green")
        ax_tps.set_ylabel("tokens/s")
        bottom = [0.0] * len(steps)
        for phase in runlog.PHASES:
            height = [s["seconds"][phase] for s in steps]
            ax_time.bar(x, height, bottom=bottom, label=PHASE_LABELS[phase])
            bottom = [b + h for b, h in zip(bottom, height, strict=True)]
        ax_time.set_ylabel("seconds per step")
        ax_time.set_xlabel("step")
        ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_time.legend(fontsize="small")
        fig.suptitle("helora training run")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def report(run_dir: str | Path, out: str | Path | None = None) -> tuple[str, Path]:
    """(summary text, PNG path) of a run; the PNG goes to ``out`` or ``RUN_DIR/report.png``."""
    steps, evals = runlog.read(run_dir)
    if not steps:
        raise ConfigError(f"report: {Path(run_dir) / runlog.FILE} holds no training step yet")
    png = Path(out) if out is not None else Path(run_dir) / PNG
    if png.suffix.lower() != ".png":
        raise ConfigError(f"report: --out {png} must end in .png")
    return summary(run_dir, steps, evals), draw(steps, evals, png)

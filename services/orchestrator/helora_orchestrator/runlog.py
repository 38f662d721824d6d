"""A training run's per-step record: ``<out>/metrics.jsonl``, one JSON object per line, beside the
checkpoints (``helora report`` reads it).

Each optimizer step appends ``{"kind": "step", "step", "loss", "tokens", "tokens_per_s",
"wire_bytes", "seconds": {...}, "time"}``; each held-out evaluation appends ``{"kind": "eval",
"step", "eval_loss", "time"}``. ``seconds`` splits the step's wall time into phases: ``encrypt``
and ``decrypt`` (the client's cryptography), ``server`` (the rest of the block linears' time:
the server's product and the wire) and ``clear`` (everything else: attention, norms, LoRA, loss,
optimizer); they add up to the step's wall time. With micro-batches in flight at once
(``--in-flight``) the backend's counters are summed over threads; ``phase_seconds`` scales them to
the wall time and records the overlap. Modes without
encryption have ``encrypt``, ``decrypt`` and ``server`` at 0. Only aggregates of the owner's own
run are written: no token, activation or weight.

A resumed run appends to the same file; records of steps after the checkpoint it resumed from
(written before a crash) are dropped when the file is read (the later record of a step wins).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hecommon.errors import ConfigError

FILE = "metrics.jsonl"
PHASES = ("encrypt", "decrypt", "server", "clear")
#: what the linear backend counts (``EncryptedBackend.seconds``): client crypto and whole calls
BACKEND_PHASES = ("encrypt", "decrypt", "linear")


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    tokens: int
    tokens_per_s: float
    wire_bytes: int
    seconds: dict[str, float]


def phase_seconds(wall_s: float, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A step's ``seconds`` from its wall time and the backend's counters before and after it.

    The counters are summed over threads: with micro-batches in flight at once they can exceed the
    wall time. Then the linear phases are scaled down in proportion to fill the wall time exactly
    (``clear`` 0), and ``overlap`` (thread-seconds of linear calls per wall second) says by how
    much; otherwise ``overlap`` is the share of the wall time in linear calls (<= 1)."""
    d = {k: max(after.get(k, 0.0) - before.get(k, 0.0), 0.0) for k in BACKEND_PHASES}
    server = max(d["linear"] - d["encrypt"] - d["decrypt"], 0.0)
    overlap = d["linear"] / wall_s if wall_s > 0 else 0.0
    k = 1.0 / overlap if overlap > 1.0 else 1.0
    return {"step": wall_s, "encrypt": k * d["encrypt"], "decrypt": k * d["decrypt"], "server": k * server,
            "clear": max(wall_s - d["linear"], 0.0), "overlap": overlap}


class RunLog:
    """Appends records to ``<out_dir>/metrics.jsonl`` (created with the directory)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, record: dict) -> None:
        line = json.dumps({**record, "time": round(time.time(), 3)}, allow_nan=False) + "\n"
        with self.path.open("a+b") as f:
            f.seek(0, 2)
            if f.tell():  # a run killed mid-line left no newline: this record starts its own line
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))

    def step(self, r: StepRecord) -> None:
        self._append({"kind": "step", "step": r.step, "loss": _finite(r.loss), "tokens": r.tokens,
                      "tokens_per_s": r.tokens_per_s, "wire_bytes": r.wire_bytes,
                      "seconds": {k: round(v, 6) for k, v in r.seconds.items()}})

    def eval(self, step: int, eval_loss: float) -> None:
        self._append({"kind": "eval", "step": step, "eval_loss": _finite(eval_loss)})


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no NaN: a diverged loss is null


def read(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run, in step order, each step once (the last written).

    Refuses a missing file and names the line of a malformed record; a line cut short by a kill
    (it does not end its JSON object) is skipped, with a word on stderr."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise ConfigError(f"report: {path} does not exist (is {run_dir} the --out of a helora train run?)")
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    skipped: list[int] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if not line.rstrip().endswith("}"):  # a write cut short by a kill: the run went on after it
            skipped.append(n)
            continue
        try:
            rec = json.loads(line)
            kind, step = rec["kind"], rec["step"]
            _check(rec)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"report: {path}:{n}: not a helora metrics record ({exc})") from None
        if kind == "step":
            for done in (steps, evals):  # a resume rewrites what came after its checkpoint
                for later in [s for s in done if s >= step]:
                    del done[later]
            steps[step] = rec
        else:
            evals[step] = rec
    if skipped:
        print(f"report: {path}: skipped {len(skipped)} record(s) cut short by a kill (line {skipped[0]}, …)",
              file=sys.stderr)
    return [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)]


def _check(rec: dict) -> None:
    if rec["kind"] not in ("step", "eval") or not isinstance(rec["step"], int) or rec["step"] < 0:
        raise ValueError("kind must be step or eval, step an integer >= 0")
    nullable = ("loss",) if rec["kind"] == "step" else ("eval_loss",)  # a diverged loss is null
    numbers = ("tokens", "tokens_per_s", "wire_bytes") if rec["kind"] == "step" else ()
    for key in (*nullable, *numbers):
        ok = isinstance(rec[key], (int, float)) and not isinstance(rec[key], bool)
        if not (ok or (rec[key] is None and key in nullable)):
            raise ValueError(f"{key} must be a number")
    if rec["kind"] == "step":
        seconds = rec["seconds"]
        if not isinstance(seconds, dict) or any(not isinstance(seconds.get(k), (int, float)) for k in ("step", *PHASES)):
            raise ValueError(f"seconds must hold step, {', '.join(PHASES)}")

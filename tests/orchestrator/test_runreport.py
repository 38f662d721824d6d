"""The run's per-step record (``metrics.jsonl``) and ``helora report`` (issue 18: see the run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hecommon.errors import ConfigError
from helora_orchestrator import runlog
from helora_orchestrator.runreport import report
from training import make_trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / runlog.FILE).read_text().splitlines()]


def test_every_step_and_evaluation_is_recorded_and_report_draws_them(tiny_splits, tmp_path):
    trainer = make_trainer(tiny_splits, tmp_path, "quantized", steps=3, eval_every=2)
    trainer.start(resume=False)
    trainer.run()
    lines = _lines(tmp_path)
    assert [(r["kind"], r["step"]) for r in lines] == [("step", 1), ("step", 2), ("eval", 2), ("step", 3), ("eval", 3)]
    for r in (r for r in lines if r["kind"] == "step"):
        assert r["tokens"] == 2 * 2 * 32 and r["loss"] > 0 and r["tokens_per_s"] > 0
        assert r["wire_bytes"] == 0 and r["seconds"]["encrypt"] == r["seconds"]["server"] == 0  # no server here
        assert r["seconds"]["clear"] == pytest.approx(r["seconds"]["step"])
    text, png = report(tmp_path)
    assert png == tmp_path / "report.png" and png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert "3 steps, 384 tokens" in text and "held-out loss" in text and f"{lines[-1]['eval_loss']:.4f}" in text


def test_an_encrypted_step_splits_its_time_between_client_crypto_server_and_clear_layers(tiny_splits, tmp_path):
    trainer = make_trainer(tiny_splits, tmp_path, "encrypted", steps=1, grad_accum=1)
    trainer.start(resume=False)
    trainer.run()
    step = _lines(tmp_path)[0]
    s = step["seconds"]
    assert s["encrypt"] > 0 and s["decrypt"] > 0 and s["server"] > 0 and s["clear"] > 0
    assert s["encrypt"] + s["decrypt"] + s["server"] + s["clear"] == pytest.approx(s["step"], rel=1e-3)
    assert 0 < step["wire_bytes"] < trainer.client.wire_bytes  # the final evaluation came after it
    text, _ = report(tmp_path)
    assert "client: encrypt" in text and "server + wire" in text and "per token" in text


def test_a_resumed_run_replaces_what_came_after_its_checkpoint(tmp_path):
    log = runlog.RunLog(tmp_path)
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.4)):  # then killed; the checkpoint was at step 1
        log.step(runlog.StepRecord(step, loss, 10, 1.0, 0, runlog.phase_seconds(1.0, {}, {})))
    log.eval(3, 2.6)
    for step, loss in ((2, 2.2), (3, 2.1)):  # the resumed run
        log.step(runlog.StepRecord(step, loss, 10, 1.0, 0, runlog.phase_seconds(1.0, {}, {})))
    steps, evals = runlog.read(tmp_path)
    assert [(s["step"], s["loss"]) for s in steps] == [(1, 3.0), (2, 2.2), (3, 2.1)] and evals == []


def test_a_diverged_loss_is_recorded_as_null_and_reported(tmp_path):
    log = runlog.RunLog(tmp_path)
    log.step(runlog.StepRecord(1, float("nan"), 10, 1.0, 0, runlog.phase_seconds(1.0, {}, {})))
    assert _lines(tmp_path)[0]["loss"] is None
    text, png = report(tmp_path, tmp_path / "elsewhere.png")
    assert "last n/a" in text and png.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(("content", "match"), [
    ("{not json}\n", r"metrics.jsonl:1: not a helora metrics record"),
    ('{"kind": "step", "step": 1}\n', r"metrics.jsonl:1: .*'loss'"),
    ('{"kind": "eval", "step": -1, "eval_loss": 1.0}\n', r"metrics.jsonl:1: .*step an integer >= 0"),
    ('{"kind": "eval", "step": 1, "eval_loss": 1.0}\n{"kind": "oops", "step": 2}\n', r"metrics.jsonl:2: "),
])
def test_a_malformed_record_is_refused_with_its_line(tmp_path, content, match):
    (tmp_path / runlog.FILE).write_text(content)
    with pytest.raises(ConfigError, match=match):
        report(tmp_path)


def test_helora_report_explains_a_directory_without_a_run(tmp_path):
    helora = str(Path(sys.executable).with_name("helora"))
    done = subprocess.run([helora, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "metrics.jsonl does not exist" in done.stderr
    (tmp_path / runlog.FILE).write_text("")
    done = subprocess.run([helora, "report", str(tmp_path), "--out", str(tmp_path / "x.jpg")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "holds no training step yet" in done.stderr


def test_micro_batches_in_flight_are_scaled_to_the_wall_time():
    s = runlog.phase_seconds(2.0, {}, {"encrypt": 1.0, "decrypt": 0.6, "linear": 3.2})  # two threads
    assert s["overlap"] == pytest.approx(1.6) and s["clear"] == 0.0
    assert s["encrypt"] + s["decrypt"] + s["server"] == pytest.approx(2.0)
    assert s["encrypt"] / s["server"] == pytest.approx(1.0 / 1.6)  # in proportion
    alone = runlog.phase_seconds(2.0, {}, {"encrypt": 0.5, "decrypt": 0.3, "linear": 1.0})
    assert (alone["server"], alone["clear"], alone["overlap"]) == pytest.approx((0.2, 1.0, 0.5))


def test_a_record_cut_short_by_a_kill_is_skipped_and_the_next_starts_its_own_line(tmp_path):
    log = runlog.RunLog(tmp_path)
    log.step(runlog.StepRecord(1, 3.0, 10, 1.0, 0, runlog.phase_seconds(1.0, {}, {})))
    with (tmp_path / runlog.FILE).open("a") as f:
        f.write('{"kind": "step", "step": 2, "lo')  # killed mid-write
    log.step(runlog.StepRecord(2, 2.5, 10, 1.0, 0, runlog.phase_seconds(1.0, {}, {})))  # the resumed run
    steps, _ = runlog.read(tmp_path)
    assert [(s["step"], s["loss"]) for s in steps] == [(1, 3.0), (2, 2.5)]


def test_only_a_loss_may_be_null(tmp_path):
    (tmp_path / runlog.FILE).write_text('{"kind": "step", "step": 1, "loss": 1.0, "tokens": null, "tokens_per_s": 1.0, '
                                        '"wire_bytes": 0, "seconds": {"step": 1, "encrypt": 0, "decrypt": 0, '
                                        '"server": 0, "clear": 1}}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:1: .*tokens must be a number"):
        report(tmp_path)

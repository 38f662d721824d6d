"""Training loop, checkpoints and resume (bit-for-bit trajectory)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hecommon.errors import ConfigError, ParameterMismatch
from helora_orchestrator.checkpoint import CheckpointMeta, checkpoint_dir
from helora_orchestrator.train import TrainConfig, lr_factor
from training import make_trainer


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["clear", "quantized"])
def test_resume_follows_the_same_trajectory(tiny_splits, tmp_path, mode):
    straight = make_trainer(tiny_splits, tmp_path / "a", mode)
    straight.start(resume=False)
    summary = straight.run()
    killed = make_trainer(tiny_splits, tmp_path / "b", mode, checkpoint_every=2)
    killed.start(resume=False)
    killed.run(until=2)  # as if killed right after the step-2 checkpoint
    resumed = make_trainer(tiny_splits, tmp_path / "b", mode, checkpoint_every=2)
    resumed.start(resume=True)
    assert resumed.step == 2
    resumed.run()
    a, b = straight.client.lora_state_dict(), resumed.client.lora_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k)  # it did train
    assert summary.steps == 4 and summary.eval_loss > 0


def test_training_lowers_the_loss(tiny_splits, tmp_path):
    trainer = make_trainer(tiny_splits, tmp_path, steps=30, lr=1e-2)
    trainer.start(resume=False)
    before = trainer.evaluate()
    summary = trainer.run()
    assert summary.eval_loss < before - 0.3
    assert summary.tokens_per_s > 0 and summary.wire_bytes == 0


def test_checkpoint_of_another_model_is_refused_untouched(tiny_splits, tmp_path):
    first = make_trainer(tiny_splits, tmp_path, steps=1)
    first.start(resume=False)
    first.run()
    before = _tree_digest(tmp_path)
    other = make_trainer(tiny_splits, tmp_path, steps=2, model={"num_hidden_layers": 3})
    with pytest.raises(ParameterMismatch, match="base_model_fingerprint differs"):
        other.start(resume=True)
    other_params = make_trainer(tiny_splits, tmp_path, steps=2, param_set="n4096")
    with pytest.raises(ParameterMismatch, match="param_set differs"):
        other_params.start(resume=True)
    fresh = make_trainer(tiny_splits, tmp_path, steps=2)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        fresh.start(resume=False)
    assert _tree_digest(tmp_path) == before


def test_checkpoint_layout_is_atomic_and_self_describing(tiny_splits, tmp_path):
    trainer = make_trainer(tiny_splits, tmp_path, steps=2, checkpoint_every=1)
    trainer.start(resume=False)
    trainer.run()
    link = tmp_path / "checkpoint"
    assert link.is_symlink() and checkpoint_dir(tmp_path).name.startswith("checkpoint-00000002-")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint-", ".tmp"))) == [link.resolve().name]
    meta = CheckpointMeta.from_json((link / "meta.json").read_text())
    assert meta.schema_version == 1 and meta.mode == "clear" and meta.lora["r"] == 4 and meta.helora_version
    assert {p.name for p in link.iterdir()} == {"meta.json", "lora.safetensors", "state.pt", "trainer_state.json"}


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="mode"):
        TrainConfig(mode="plain")
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=2.5)
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(lr_factor(cfg, s), 3) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(cfg, 10) == pytest.approx(0.1) and lr_factor(cfg, 6) < lr_factor(cfg, 3)
    assert replace(cfg, steps=5).steps == 5

"""Training checkpoints of the data owner (DESIGN §1, §4; STYLE: "checkpoints describe themselves").

``<out>/checkpoint`` is a symlink to the latest complete ``checkpoint-<step>-<id>`` directory.
A checkpoint is written in a temporary directory, renamed, then the link is swapped with
``os.replace``: a kill at any point leaves the previous checkpoint or the new one, never half
of one. Contents: LoRA weights (safetensors), optimizer + scheduler + torch RNG (``state.pt``,
tensors and numbers only, loaded with ``weights_only=True``), step, data position and numpy /
Python RNG (JSON), and ``meta.json`` naming the base model, mode, bits, LoRA settings and
parameter set. There is no key material on the client side of this file, by construction.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from hecommon.errors import ConfigError, ParameterMismatch
from safetensors.torch import load_file, save_file

from . import __version__

SCHEMA_VERSION = 1
LINK = "checkpoint"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint was trained against; resuming requires every field but the version to match."""

    base_model_id: str
    base_model_fingerprint: str
    mode: str
    bits: int
    lora: dict
    param_set: str | None = None
    schema_version: int = SCHEMA_VERSION
    helora_version: str = __version__

    _MUST_MATCH = ("base_model_fingerprint", "param_set", "mode", "bits", "lora")

    def check_compatible(self, saved: CheckpointMeta) -> None:
        """Refuse to resume from a checkpoint of another model, parameter set or setting."""
        if saved.schema_version != SCHEMA_VERSION:
            raise ParameterMismatch(f"checkpoint: schema version {saved.schema_version}, this helora reads {SCHEMA_VERSION}")
        for field in self._MUST_MATCH:
            mine, theirs = getattr(self, field), getattr(saved, field)
            if mine != theirs:
                what = f"{saved.base_model_id!r}" if field == "base_model_fingerprint" else repr(theirs)
                raise ParameterMismatch(f"checkpoint: {field} differs: checkpoint has {what}, this run has {mine!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        try:
            return cls(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"checkpoint: unreadable meta.json ({e})") from None


@dataclass
class TrainingState:
    """Everything needed to continue a run on the same trajectory."""

    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    data: dict
    rng: dict


def capture_rng() -> dict:
    """Torch, numpy (legacy global) and Python RNG states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = rng["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def _write(directory: Path, meta: CheckpointMeta, state: TrainingState) -> None:
    (directory / "meta.json").write_text(meta.to_json())
    save_file({k: v.detach().contiguous() for k, v in state.lora.items()}, str(directory / "lora.safetensors"))
    torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "torch_rng": state.rng["torch"]},
               directory / "state.pt")
    trainer = {"step": state.step, "data": state.data, "numpy_rng": state.rng["numpy"], "python_rng": state.rng["python"]}
    (directory / "trainer_state.json").write_text(json.dumps(trainer))


def save_checkpoint(out_dir: str | Path, meta: CheckpointMeta, state: TrainingState) -> Path:
    """Write a checkpoint atomically and point ``<out>/checkpoint`` at it; returns its directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    link = out / LINK
    if link.exists() and not link.is_symlink():
        raise ConfigError(f"checkpoint: {link} exists and is not a helora checkpoint link; not overwriting")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=out))
    try:
        _write(tmp, meta, state)
        final = out / f"checkpoint-{state.step:08d}-{uuid.uuid4().hex[:8]}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    new_link = out / f".tmp-link-{uuid.uuid4().hex[:8]}"
    os.symlink(final.name, new_link)
    os.replace(new_link, link)  # the atomic step: readers see the old or the new checkpoint
    for old in out.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(out_dir: str | Path) -> Path | None:
    """The latest complete checkpoint under ``out_dir``, or None."""
    link = Path(out_dir) / LINK
    return link.resolve() if link.exists() else None


def read_meta(directory: str | Path) -> CheckpointMeta:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint: {path} not found")
    return CheckpointMeta.from_json(path.read_text())


def load_checkpoint(out_dir: str | Path, expected: CheckpointMeta) -> TrainingState:
    """Read the latest checkpoint after checking it matches ``expected``; changes nothing on disk."""
    directory = checkpoint_dir(out_dir)
    if directory is None:
        raise ConfigError(f"checkpoint: nothing to resume in {out_dir} (no {LINK} link)")
    expected.check_compatible(read_meta(directory))
    blobs = torch.load(directory / "state.pt", weights_only=True)
    trainer = json.loads((directory / "trainer_state.json").read_text())
    return TrainingState(
        step=int(trainer["step"]), lora=load_file(str(directory / "lora.safetensors")),
        optimizer=blobs["optimizer"], scheduler=blobs["scheduler"], data=trainer["data"],
        rng={"torch": blobs["torch_rng"], "numpy": trainer["numpy_rng"], "python": trainer["python_rng"]},
    )

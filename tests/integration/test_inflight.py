"""Several requests in flight (``helora train --in-flight K``): the micro-batches of a step run on
threads over the broker, and the steps equal the sequential embedded ones bit for bit."""

from __future__ import annotations

import pytest
import torch
from hecommon.he.keys import SecretKey
from hecommon.model import config_fingerprint, discover_groups, tiny_llama
from helora_orchestrator.broker import TransportPool, make_broker_backend
from helora_orchestrator.checkpoint import CheckpointMeta
from helora_orchestrator.client_model import ClientModel, build_client
from helora_orchestrator.data import ByteTokenizer, load_splits
from helora_orchestrator.lora import LoraSettings
from helora_orchestrator.train import TrainConfig, Trainer

pytestmark = pytest.mark.integration
LORA = LoraSettings(r=4, alpha=8)


def _steps(client: ClientModel, in_flight: int, out, steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=1, batch_size=2, grad_accum=3, seq_len=32,
                      in_flight=in_flight, output_dir=str(out), progress=False)
    train, held = load_splits(None, ByteTokenizer(), cfg.seq_len)
    meta = CheckpointMeta("tiny", config_fingerprint(client.hf), "encrypted", 8, LORA.to_dict())
    trainer = Trainer(cfg, client, train, held, meta)
    trainer.start(resume=False)
    losses = [trainer.train_step()[0] for _ in range(steps)]
    return losses, client.lora_state_dict()


def test_micro_batches_in_flight_equal_the_sequential_embedded_steps(fleet, tmp_path):
    ref_losses, ref = _steps(build_client(tiny_llama(0)[0], "encrypted", LORA, seed=0), 1, tmp_path / "a")
    model = tiny_llama(0)[0]
    backend = make_broker_backend(fleet.url, SecretKey.generate(), namespace=fleet.namespace, model=model,
                                  timeout_s=90, max_message_bytes=fleet.limit, in_flight=3)
    assert isinstance(backend.transport, TransportPool)
    try:
        losses, got = _steps(ClientModel(model, backend, discover_groups(model), LORA, seed=0), 3, tmp_path / "b")
    finally:
        backend.transport.close()
    assert len(backend.transport._all) >= 2  # the micro-batches really talked over several connections
    assert losses == ref_losses
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert any(torch.count_nonzero(v) for k, v in got.items() if "lora_B" in k)

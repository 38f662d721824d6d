"""The real SmolLM2-135M-Instruct (slow: loads a 100 MB GGUF and trains a few steps)."""

from __future__ import annotations

import pytest
import torch
from helora_encoder.model import config_fingerprint, discover_groups, load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None), load_tokenizer(None)


def test_bundled_model_loads_with_the_expected_groups(smollm2):
    model, tokenizer = smollm2
    groups = discover_groups(model)
    assert len(groups) == 30 * 4
    by_name = {g.name: g for g in groups}
    qkv, gate_up, down, o = by_name["29.qkv"], by_name["0.gate_up"], by_name["7.down"], by_name["3.o"]
    assert qkv.out_features == (576, 192, 192) and qkv.in_features == 576
    assert gate_up.out_features == (1536, 1536) and gate_up.in_features == 576
    assert down.in_features == 1536 and down.out_features == (576,)
    assert o.out_features == (576,) and o.in_features == 576
    assert model.config.tie_word_embeddings and tokenizer.eos_token_id is not None
    assert len(config_fingerprint(model)) == 64


def test_short_quantized_run_lowers_the_held_out_loss(smollm2, tmp_path):
    import copy

    from helora_orchestrator.checkpoint import CheckpointMeta
    from helora_orchestrator.client_model import build_client
    from helora_orchestrator.data import load_splits
    from helora_orchestrator.lora import LoraSettings
    from helora_orchestrator.train import TrainConfig, Trainer

    model, tokenizer = smollm2
    model = copy.deepcopy(model)  # the client takes the block weights out of the model it wraps
    train, held = load_splits(None, tokenizer, seq_len=64)
    cfg = TrainConfig(steps=8, lr=2e-3, warmup_steps=1, batch_size=2, seq_len=64, eval_batches=2,
                      mode="quantized", output_dir=str(tmp_path), progress=False)
    lora = LoraSettings()
    meta = CheckpointMeta(base_model_id="smollm2", base_model_fingerprint=config_fingerprint(model),
                          mode="quantized", bits=8, lora=lora.to_dict())
    trainer = Trainer(cfg, build_client(model, "quantized", lora), train, held, meta)
    trainer.start(resume=False)
    before = trainer.evaluate()
    summary = trainer.run()
    print(f"held-out loss {before:.4f} -> {summary.eval_loss:.4f}; {summary}")
    assert torch.isfinite(torch.tensor(summary.eval_loss))
    assert summary.eval_loss < before

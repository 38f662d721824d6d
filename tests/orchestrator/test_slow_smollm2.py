"""The real SmolLM2-135M-Instruct (slow: loads a 100 MB GGUF and trains a few steps)."""

from __future__ import annotations

import pytest
import torch
from hecommon.model import config_fingerprint, discover_groups, load_model, load_tokenizer

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


def _first_blocks(model, n: int):
    """A copy of the real model keeping its first ``n`` decoder blocks (bounds the test's time)."""
    import copy

    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n]
    m.config.num_hidden_layers = n
    return m


def test_encrypted_equals_quantized_on_the_real_model(smollm2):
    """One training step on the real SmolLM2 weights (first 3 blocks): logits, loss, every LoRA
    gradient equal bit for bit between the encrypted and the quantized modes."""
    from helora_orchestrator.client_model import build_client, causal_lm_loss
    from helora_orchestrator.data import load_splits
    from helora_orchestrator.lora import LoraSettings

    model, tokenizer = smollm2
    train, _ = load_splits(None, tokenizer, seq_len=64)
    ids, labels = train.batch([0, 1])
    results = []
    for mode in ("quantized", "encrypted"):
        client = build_client(_first_blocks(model, 3), mode, LoraSettings(), seed=0)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():  # non-zero B so that every A has a gradient too
            for name, p in client.lora_named_parameters():
                if name.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        logits = client(ids)
        loss, n = causal_lm_loss(logits, labels)
        (loss / n).backward()
        grads = {k: p.grad.clone() for k, p in client.lora_named_parameters()}
        results.append((logits.detach(), loss.detach(), grads, client.wire_bytes))
    (lq, sq, gq, _), (le, se, ge, wire) = results
    assert torch.equal(lq, le) and torch.equal(sq, se)
    assert gq.keys() == ge.keys() and len(gq) == 3 * 7 * 2
    for k in gq:
        assert torch.equal(gq[k], ge[k]), k
        assert gq[k].abs().sum() > 0, k
    assert wire > 0


def test_private_generation_equals_quantized_on_the_real_model(smollm2):
    """Generation in a session on the real SmolLM2 weights (first 3 blocks, a random adapter):
    two prompts, greedy and sampled, the encrypted tokens are the quantized mode's, one column per
    prompt and step on the wire after the prompts' forward pass."""
    from helora_orchestrator.client_model import build_client
    from helora_orchestrator.generation import Sampling
    from helora_orchestrator.lora import LoraSettings

    model, tokenizer = smollm2
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("def add(a, b):")]
    outputs = []
    for mode in ("quantized", "encrypted"):
        client = build_client(_first_blocks(model, 3), mode, LoraSettings(), seed=0)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, p in client.lora_named_parameters():
                if name.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        seen: list[tuple[int, int]] = []
        if mode == "encrypted":
            inner = client.backend.transport

            def transport(request, inner=inner, seen=seen):
                seen.append((request.batch.col0, request.batch.n_tokens))
                return inner(request)

            client.backend.transport = transport
        outputs.append((client.generate(prompts, 6), client.generate(prompts, 6, sampling=Sampling(0.9, 0.95, 3)),
                        seen))
    (greedy_q, sampled_q, _), (greedy_e, sampled_e, seen) = outputs
    assert greedy_e == greedy_q and sampled_e == sampled_q
    per_forward = 3 * 4  # 3 blocks, 4 block linears each
    first_layer = seen[: 6 * per_forward : per_forward]  # block 0's qkv in the greedy session's 6 forwards
    width = 2 * max(map(len, prompts))  # the prompts, left-padded to one length
    assert first_layer == [(0, width)] + [(width + 2 * i, 2) for i in range(5)]


def test_peft_loads_the_adapter_exported_from_the_real_model(smollm2, tmp_path):
    import copy

    from helora_orchestrator.client_model import build_client
    from helora_orchestrator.export import export_peft
    from helora_orchestrator.lora import LoraSettings
    from peft import PeftModel

    model, _ = smollm2
    reference = copy.deepcopy(model)
    client = build_client(copy.deepcopy(model), "clear", LoraSettings(), seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in client.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    out = export_peft(client, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(reference, str(out))
    ids = torch.tensor([[1, 504, 3299, 282, 10043, 30, 11, 198]])
    with torch.no_grad():
        torch.testing.assert_close(client(ids), peft_model(input_ids=ids).logits, rtol=1e-3, atol=1e-3)

"""The client model: backend-computed block linears + LoRA (DESIGN §1)."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from hecommon.he.quantize import quantize_weight, quantized_matmul
from hecommon.model import discover_groups, group_weight, tiny_llama
from helora_orchestrator.backend import build_backend
from helora_orchestrator.client_model import ClientModel, build_client, causal_lm_loss
from helora_orchestrator.lora import LoraSettings


class CountingBackend:
    """Wraps a backend and counts calls per (direction, group)."""

    def __init__(self, inner):
        self.inner, self.calls, self.wire_bytes = inner, Counter(), 0

    def forward(self, group, x):
        self.calls["forward", group] += 1
        return self.inner.forward(group, x)

    def backward(self, group, dy):
        self.calls["backward", group] += 1
        return self.inner.backward(group, dy)


def _randomize_lora(client: ClientModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in client.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # B = 0 would hide LoRA bugs


def _peft_reference(base, client: ClientModel):
    from peft import LoraConfig, get_peft_model

    s = client.lora_settings
    ref = get_peft_model(base, LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=list(s.target_modules)))
    ours = client.lora_state_dict()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(ours[name.removeprefix("base_model.model.").replace(".default", "")])
    return ref


def _grads(model, ids) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=ids) if not isinstance(model, ClientModel) else model(ids)
    logits = getattr(logits, "logits", logits)
    loss, n = causal_lm_loss(logits, ids)
    (loss / n).backward()
    grads = {k.removeprefix("base_model.model.").replace(".default", ""): p.grad
             for k, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), {k.removeprefix("hf."): v for k, v in grads.items()}


@pytest.mark.parametrize("factory", ["llama", "qwen2"])
def test_clear_mode_matches_torch_autograd(factory):
    if factory == "llama":
        base, vocab = tiny_llama(seed=3)
    else:  # q/k/v biases, added in the clear on the client
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(3)
        vocab = 128
        base = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab))
    reference = copy.deepcopy(base)
    client = build_client(base, "clear", LoraSettings(r=4, alpha=8))
    _randomize_lora(client)
    peft_model = _peft_reference(reference, client)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    logits, grads = _grads(client, ids)
    ref_logits, ref_grads = _grads(peft_model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_only_lora_is_trainable_and_block_weights_are_gone():
    base, _ = tiny_llama()
    client = build_client(base, "clear")
    trainable = [n for n, p in client.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    names = {n for n, _ in client.named_parameters()}
    assert not any(n.endswith("q_proj.weight") or "base_layer.weight" in n for n in names)
    assert "hf.model.embed_tokens.weight" in names  # lm_head is tied to it and stays on the client
    assert all(torch.count_nonzero(p) == 0 for n, p in client.lora_named_parameters() if "lora_B" in n)


def test_quantized_forward_equals_direct_hecommon_computation():
    base, _ = tiny_llama(seed=5)
    groups = discover_groups(base)
    w = group_weight(base, groups[0]).numpy()  # fused q|k|v rows, (128, 64)
    client = build_client(base, "quantized", bits=8)
    attn = client.hf.model.layers[0].self_attn
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    q, k, v = (attn.q_proj.base_layer(x), attn.k_proj.base_layer(x), attn.v_proj.base_layer(x))
    direct = quantized_matmul(x.reshape(10, 64).numpy(), quantize_weight(w, 8), 8).astype(np.float32)
    got = torch.cat([q, k, v], dim=-1).reshape(10, 128).numpy()
    np.testing.assert_array_equal(got, direct)


def test_quantized_logits_stay_close_to_clear():
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    clear = build_client(tiny_llama(seed=1)[0], "clear")(ids)
    quant = build_client(tiny_llama(seed=1)[0], "quantized", bits=8)(ids)
    diff = (clear - quant).abs().max().item()
    assert 0 < diff < 0.05 * clear.abs().max().item()


def test_one_backend_call_per_group_each_way_and_block0_backward_skipped():
    base, _ = tiny_llama()
    groups = discover_groups(base)
    backend = CountingBackend(build_backend("clear", base, groups))
    client = ClientModel(base, backend, groups)
    _randomize_lora(client)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    loss, n = causal_lm_loss(client(ids), ids)
    assert {k for k, c in backend.calls.items() if c != 1} == set()
    assert {g for d, g in backend.calls if d == "forward"} == {g.name for g in groups}
    loss.backward()
    backward = {g: c for (d, g), c in backend.calls.items() if d == "backward"}
    assert backward == {g.name: 1 for g in groups if g.name != "0.qkv"}  # embeddings frozen: no dX needed
    assert all(p.grad is not None for p in client.lora_parameters())


def test_fused_members_must_share_their_input():
    client = build_client(tiny_llama()[0], "clear")
    attn = client.hf.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    attn.q_proj(x)
    with pytest.raises(RuntimeError, match="different input"):
        attn.k_proj(x.clone())
    client.fused["0.qkv"].reset()
    attn.q_proj(x)
    attn.k_proj(x)
    attn.v_proj(x)  # all three consumed: the next call starts a new request
    assert client.fused["0.qkv"]._pending is None


def test_greedy_generate_matches_the_reference_model():
    base, _ = tiny_llama(seed=7)
    reference = copy.deepcopy(base)
    client = build_client(base, "clear")
    prompt = torch.tensor([[5, 17, 42, 99]])
    out = client.generate(prompt.tolist(), max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):  # no KV cache in the reference: checks the cached path too
            ids = torch.cat([ids, reference(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert out == [ids[0, 4:].tolist()]

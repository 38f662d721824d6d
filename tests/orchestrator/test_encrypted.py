"""Encrypted mode equals quantized mode bit for bit: logits, loss, every LoRA gradient (DESIGN §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helora_encoder.model import tiny_llama
from helora_orchestrator.client_model import build_client, causal_lm_loss
from helora_orchestrator.lora import LoraSettings


def _model():
    m = tiny_llama(0)
    return m[0] if isinstance(m, tuple) else m


def _step(client, ids: torch.Tensor):
    client.zero_grad(set_to_none=True)
    logits = client(ids)
    loss, n = causal_lm_loss(logits, ids)
    (loss / n).backward()
    grads = {name: p.grad.detach().clone() for name, p in client.lora_named_parameters()}
    return logits.detach(), loss.detach(), grads


def _randomize_lora(clients, seed: int = 3) -> None:
    """Non-zero B (PEFT starts it at zero) so that every A gets a non-zero gradient too."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in clients[0].lora_named_parameters()]
    values = {n: torch.randn(p.shape, generator=gen) * 0.05 for n, p in clients[0].lora_named_parameters()}
    for c in clients:
        with torch.no_grad():
            for n, p in c.lora_named_parameters():
                assert n in names
                p.copy_(values[n])


@pytest.mark.parametrize("shape", [(2, 40), (2, 1100)], ids=["fewer-than-N", "more-than-N"])
def test_encrypted_equals_quantized_exactly(shape):
    lora = LoraSettings()
    quantized = build_client(_model(), "quantized", lora, seed=0)
    encrypted = build_client(_model(), "encrypted", lora, seed=0)
    _randomize_lora([quantized, encrypted])
    vocab = quantized.hf.config.vocab_size
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    lq, loss_q, gq = _step(quantized, ids)
    le, loss_e, ge = _step(encrypted, ids)
    assert torch.equal(lq, le)
    assert torch.equal(loss_q, loss_e)
    assert gq.keys() == ge.keys() and len(gq) > 0
    for name in gq:
        assert torch.equal(gq[name], ge[name]), name
        assert gq[name].abs().sum() > 0, f"{name} has a zero gradient: the check would be vacuous"
    assert encrypted.wire_bytes > 0 and quantized.wire_bytes == 0
    # and the quantized computation is close to the clear one (not a degenerate equality)
    clear = build_client(_model(), "clear", lora, seed=0)
    _randomize_lora([clear])
    lc, _, _ = _step(clear, ids)
    assert (lc - lq).abs().max() < 0.1 * lc.abs().max()
    assert not torch.equal(lc, lq)


def test_encrypted_mode_never_holds_block_weights():
    client = build_client(_model(), "encrypted", LoraSettings(), seed=0)
    names = [n for n, _ in client.hf.named_parameters()]
    assert not any(n.endswith(("q_proj.weight", "down_proj.weight", "gate_proj.weight")) for n in names)
    assert np.isfinite(client(torch.zeros((1, 4), dtype=torch.long)).detach().numpy()).all()


def test_over_bytes_equals_in_process_and_counts_real_bytes():
    """The wire codec path (what a broker carries) gives the same logits as the object path."""
    lora = LoraSettings()
    direct = build_client(_model(), "encrypted", lora, seed=0)
    framed = build_client(_model(), "encrypted", lora, seed=0, over_bytes=True)
    ids = torch.randint(0, direct.hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(direct(ids), framed(ids))
    # payload bytes (in-process count) are the encoded bytes less a small msgpack framing
    assert 0 < framed.wire_bytes - direct.wire_bytes < 2000 * direct.backend.requests


@pytest.mark.gpu
def test_encrypted_on_the_gpu_equals_quantized_exactly():  # pragma: no cover - needs a device
    """The embedded server on cupy (int8 tensor cores where the shape allows, else float64)."""
    lora = LoraSettings()
    quantized = build_client(_model(), "quantized", lora, seed=0)
    encrypted = build_client(_model(), "encrypted", lora, seed=0, backend="cupy", shards=2)
    _randomize_lora([quantized, encrypted])
    ids = torch.randint(0, quantized.hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    lq, loss_q, gq = _step(quantized, ids)
    le, loss_e, ge = _step(encrypted, ids)
    assert torch.equal(lq, le) and torch.equal(loss_q, loss_e)
    for name in gq:
        assert torch.equal(gq[name], ge[name]), name

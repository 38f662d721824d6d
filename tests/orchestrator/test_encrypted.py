"""Encrypted mode equals quantized mode bit for bit: logits, loss, every LoRA gradient (DESIGN §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hecommon import wire
from hecommon.he.bits import packed_size
from hecommon.model import tiny_llama
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


def _spy(client) -> list[tuple[bool, bool]]:
    """Records (request said send_a, reply carried a) for every call through the client's bytes."""
    transport = client.backend.transport
    inner, seen = transport.send, []

    def send(chunks):
        replies = inner(chunks)
        seen.append((wire.decode_request_head(bytes(chunks[0])).send_a, wire.decode_reply_head(replies[0]).with_a))
        return replies

    transport.send = send
    return seen


@pytest.mark.parametrize("shards", [1, 2])
def test_a_part_held_from_the_first_reply_changes_nothing_and_halves_replies(shards):
    """Without hints, the client keeps each layer's switched a from its first reply and asks for b
    alone after that: the same results, bit for bit, as the quantized computation, step after step."""
    lora = LoraSettings()
    quantized = build_client(_model(), "quantized", lora, seed=0)
    held = build_client(_model(), "encrypted", lora, seed=0, shards=shards, over_bytes=True, hints_on_client=False,
                        hold_a_bytes=1 << 30)
    _randomize_lora([quantized, held])
    seen = _spy(held)
    ids = torch.randint(0, quantized.hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    per_step = []
    for _ in range(2):
        before = (len(seen), held.wire_bytes)
        lq, loss_q, gq = _step(quantized, ids)
        lh, loss_h, gh = _step(held, ids)
        assert torch.equal(lq, lh) and torch.equal(loss_q, loss_h)
        assert gq.keys() == gh.keys() and all(torch.equal(gq[k], gh[k]) for k in gq)
        per_step.append((seen[before[0]:], held.wire_bytes - before[1]))
    (first, bytes_1), (second, bytes_2) = per_step
    assert first and all(flags == (True, True) for flags in first)  # each layer's first call: a comes back
    assert len(second) == len(first) and all(flags == (False, False) for flags in second)  # then b alone
    backend = held.backend
    row = packed_size(backend.params.out_bits, backend.params.n)
    layers = {(e.name, d): e.d_out if d == "fwd" else e.d_in for e in backend.manifest.layers for d in ("fwd", "bwd")}
    assert backend.held_bytes == sum(layers[k] * row for k in backend._held) > 0
    assert bytes_2 < 0.8 * bytes_1  # the a part is about half of every reply


def test_a_part_is_not_held_beyond_the_budget():
    lora = LoraSettings()
    client = build_client(_model(), "encrypted", lora, seed=0, over_bytes=True, hints_on_client=False,
                          hold_a_bytes=0)
    seen = _spy(client)
    ids = torch.randint(0, client.hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        _step(client, ids)
    assert seen and all(flags == (True, True) for flags in seen) and client.backend.held_bytes == 0
    with pytest.raises(ValueError, match="hold_a_bytes"):
        build_client(_model(), "encrypted", lora, hints_on_client=False, hold_a_bytes=-1)


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

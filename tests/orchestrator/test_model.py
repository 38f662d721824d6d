"""Base-model loading and linear-group discovery (DESIGN §1)."""

from __future__ import annotations

import pytest
import torch
from hecommon.errors import ConfigError
from hecommon.model import (
    config_fingerprint,
    discover_groups,
    group_bias,
    group_weight,
    load_model,
    tiny_llama,
)


def test_tiny_groups_fuse_members_that_share_an_input():
    model, vocab = tiny_llama()
    groups = discover_groups(model)
    assert vocab == 256
    assert [g.name for g in groups[:4]] == ["0.qkv", "0.o", "0.gate_up", "0.down"]
    assert len(groups) == 2 * 4
    qkv, o, gate_up, down = groups[:4]
    assert qkv.members == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert qkv.out_features == (64, 32, 32) and qkv.in_features == 64  # GQA: 2 kv heads of 16
    assert gate_up.out_features == (128, 128) and down.in_features == 128 and down.out_features == (64,)
    assert o.total_out == 64


def test_group_weight_concatenates_member_rows_in_order():
    model, _ = tiny_llama()
    qkv = discover_groups(model)[0]
    attn = model.model.layers[0].self_attn
    w = group_weight(model, qkv)
    assert w.shape == (128, 64)
    assert torch.equal(w, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert group_bias(model, qkv) is None


def test_group_bias_of_a_qwen2_style_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = Qwen2ForCausalLM(cfg)
    qkv, o = discover_groups(model)[:2]
    attn = model.model.layers[0].self_attn
    bias = group_bias(model, qkv)
    assert torch.equal(bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert group_bias(model, o) is None  # o_proj has no bias in Qwen2


def test_missing_member_is_skipped_and_missing_group_is_an_error():
    model, _ = tiny_llama()
    for block in model.model.layers:
        del block.mlp.up_proj
    gate = discover_groups(model)[2]
    assert gate.members == ("mlp.gate_proj",) and gate.out_features == (128,)
    for block in model.model.layers:
        del block.mlp.gate_proj
    with pytest.raises(ConfigError, match="block 0 has no nn.Linear for group 'gate_up'"):
        discover_groups(model)


def test_load_model_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match="nope.gguf"):
        load_model(missing)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .gguf"):
        load_model(tmp_path / "w.bin")
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def test_fingerprint_depends_on_architecture_only():
    a, _ = tiny_llama(seed=0)
    b, _ = tiny_llama(seed=1)
    c, _ = tiny_llama(seed=0, num_hidden_layers=3)
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(a) != config_fingerprint(c)

"""``helora export``: the PEFT adapter, the llama.cpp LoRA adapter GGUF and the merged model carry
the same LoRA weights (issue 18: the adapter where people run models)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hecommon.model import tiny_llama
from helora_orchestrator.client_model import build_client
from helora_orchestrator.export import export_peft
from helora_orchestrator.ggufexport import gguf_tensors, permute_rows, write_gguf_adapter, write_merged
from helora_orchestrator.lora import LoraSettings

LORA = LoraSettings(r=4, alpha=8)


def _trained_client(seed: int = 0):
    """A tiny clear client whose LoRA B is not zero (as after training)."""
    model, _ = tiny_llama(seed=0)
    client = build_client(model, "clear", LORA, bits=8, seed=0)
    gen = torch.Generator().manual_seed(seed)
    client.load_lora_state_dict({k: torch.randn(v.shape, generator=gen) * 0.05
                                 for k, v in client.lora_state_dict().items()})
    return client


def _inverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_the_gguf_adapter_holds_every_lora_weight_under_llama_cpp_names(tmp_path):
    import gguf

    client = _trained_client()
    weights, config = client.lora_state_dict(), client.hf.config
    path = write_gguf_adapter(weights, LORA, config, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.fields[name] for name in ("general.architecture", "general.type", "adapter.type",
                                                     "adapter.lora.alpha")}
    text = {k: bytes(f.parts[f.data[0]]).decode() for k, f in fields.items() if k != "adapter.lora.alpha"}
    assert text == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == LORA.alpha
    got = {t.name: np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    assert len(got) == len(weights) == 2 * 7 * config.num_hidden_layers
    for key, tensor in weights.items():
        layer, module = key.split(".")[2], key.split(".")[4]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module]
        stored = got[f"blk.{layer}.{name}.weight.lora_{'a' if '.lora_A.' in key else 'b'}"]
        want = tensor.numpy()
        if ".lora_B." in key and module in ("q_proj", "k_proj"):  # rows in llama.cpp's rotary order
            heads = config.num_attention_heads if module == "q_proj" else config.num_key_value_heads
            assert not np.array_equal(stored, want)
            stored = _inverse_permute(stored, heads)
        np.testing.assert_array_equal(stored, want)


def test_permuting_b_permutes_the_product_like_the_base_weight():
    gen = np.random.default_rng(0)
    b, a = gen.standard_normal((64, 4)), gen.standard_normal((4, 32))
    np.testing.assert_allclose(permute_rows(b, 4) @ a, permute_rows(b @ a, 4))
    np.testing.assert_array_equal(_inverse_permute(permute_rows(b, 4), 4), b)


def test_the_gguf_adapter_refuses_a_base_it_cannot_address():
    client = _trained_client()
    config = client.hf.config
    config.model_type = "qwen2"
    with pytest.raises(Exception, match="only Llama-family bases"):
        gguf_tensors(client.lora_state_dict(), config)
    with pytest.raises(Exception, match="unexpected LoRA weight"):
        gguf_tensors({"lm_head.lora_A.weight": torch.zeros(1)}, tiny_llama(0)[0].config)


def test_the_merged_model_computes_what_the_base_with_the_adapter_computes(tmp_path):
    from transformers import AutoModelForCausalLM

    client = _trained_client()
    ids = torch.randint(0, client.hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = client(ids)
    out = write_merged(tiny_llama(seed=0)[0], client.lora_state_dict(), LORA, tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_helora_export_writes_all_three_and_refuses_a_wrong_base_or_a_used_directory(tmp_path):
    from hecommon.model import config_fingerprint
    from helora_orchestrator.checkpoint import CheckpointMeta

    client = _trained_client()
    meta = CheckpointMeta(base_model_id="tiny", base_model_fingerprint=config_fingerprint(client.hf), mode="clear",
                          bits=8, lora=LORA.to_dict(), param_set=None)
    adapter = export_peft(client, tmp_path / "run" / "adapter", meta)
    helora = str(Path(sys.executable).with_name("helora"))

    def export(*args):
        return subprocess.run([helora, "export", str(adapter), "--model", "tiny", *args], capture_output=True,
                              text=True, timeout=300)

    done = export("--out", str(tmp_path / "x"), "--merged")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"adapter", "adapter.gguf", "merged"}
    assert (tmp_path / "x" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    again = export("--out", str(tmp_path / "x"))
    assert again.returncode == 2 and "is not empty" in again.stderr
    deeper = tiny_llama(seed=0, num_hidden_layers=3)[0]  # the adapter says it was trained on another base
    export_peft(client, tmp_path / "other", replace(meta, base_model_fingerprint=config_fingerprint(deeper)))
    other = subprocess.run([helora, "export", str(tmp_path / "other"), "--model", "tiny", "--out", str(tmp_path / "y")],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "not on this base model" in other.stderr
    assert not (tmp_path / "y").exists()  # refused before anything was written


@pytest.mark.slow
def test_q_and_k_rows_are_permuted_as_in_the_bundled_gguf():
    """The bundled SmolLM2 GGUF stores q_proj and k_proj in exactly the row order ``permute_rows``
    gives the weights transformers loads from it: the adapter's B rows land on the same rows."""
    import gguf
    from gguf.quants import dequantize
    from hecommon.model import bundled_model_path, load_model

    reader = gguf.GGUFReader(str(bundled_model_path()))
    stored = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors
              if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    model = load_model(None)
    attn, config = model.model.layers[0].self_attn, model.config
    for name, weight, heads in (("attn_q", attn.q_proj.weight, config.num_attention_heads),
                                ("attn_k", attn.k_proj.weight, config.num_key_value_heads)):
        w = weight.detach().numpy()
        np.testing.assert_array_equal(permute_rows(w, heads), stored[f"blk.0.{name}.weight"])
        assert not np.array_equal(w, stored[f"blk.0.{name}.weight"])  # the permutation is not the identity here


def test_an_adapter_that_does_not_fit_the_base_is_refused_before_anything_is_written(tmp_path):
    import json

    wide = build_client(tiny_llama(seed=0, hidden_size=96, intermediate_size=128)[0], "clear", LORA, bits=8, seed=0)
    adapter = export_peft(wide, tmp_path / "wide")  # no helora metadata: only the shapes can tell
    helora = str(Path(sys.executable).with_name("helora"))
    done = subprocess.run([helora, "export", str(adapter), "--model", "tiny", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "this base model needs" in done.stderr and not (tmp_path / "x").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 8}}))
    patterned = subprocess.run([helora, "export", str(adapter), "--model", "tiny", "--out", str(tmp_path / "x")],
                               capture_output=True, text=True, timeout=300)
    assert patterned.returncode == 2 and "rank_pattern" in patterned.stderr

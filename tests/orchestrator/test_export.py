"""PEFT export round trip: PeftModel.from_pretrained gives the client's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hecommon.errors import ConfigError
from hecommon.model import config_fingerprint, tiny_llama
from helora_orchestrator.checkpoint import CheckpointMeta
from helora_orchestrator.client_model import build_client
from helora_orchestrator.export import export_peft, load_peft_adapter
from helora_orchestrator.lora import LoraSettings


def _trained_client(settings: LoraSettings):
    base, _ = tiny_llama(seed=4)
    reference = copy.deepcopy(base)
    client = build_client(base, "clear", settings, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in client.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return client, reference


def test_peft_loads_the_export_and_gives_the_same_logits(tmp_path):
    from peft import PeftModel

    settings = LoraSettings(r=4, alpha=12, target_modules=("q_proj", "v_proj", "down_proj"))
    client, reference = _trained_client(settings)
    meta = CheckpointMeta(base_model_id="tiny", base_model_fingerprint=config_fingerprint(reference),
                          mode="clear", bits=8, lora=settings.to_dict())
    out = export_peft(client, tmp_path / "adapter", meta)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    peft_model = PeftModel.from_pretrained(reference, str(out))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = client(ids), peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=ids).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter really is applied

    settings_back, weights, meta_back = load_peft_adapter(out)
    assert settings_back == settings and meta_back == meta
    assert all(torch.equal(weights[k], v) for k, v in client.lora_state_dict().items())


def test_adapter_changes_the_output_and_bad_adapters_are_refused(tmp_path):
    settings = LoraSettings(r=2, alpha=4)
    client, reference = _trained_client(settings)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(client(ids), reference(input_ids=ids).logits, atol=1e-4)
    with pytest.raises(ConfigError, match="needs adapter_config.json"):
        load_peft_adapter(tmp_path)
    out = export_peft(client, tmp_path / "a")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="not a plain LoRA adapter"):
        load_peft_adapter(out)
    with pytest.raises(ConfigError, match="do not match"):
        client.load_lora_state_dict({})

"""The exported GGUF adapter on the bundled base GGUF in llama.cpp (llama-cpp-python) gives the
next token that transformers + PEFT give on the same prompts (issue 18).

Run by ``make test-llama-cpp``, which installs llama-cpp-python (built from its PyPI sdist) first;
it is marked ``slow`` and ``llamacpp``. The tolerance comes from the base GGUF itself: llama.cpp
multiplies its Q4_1 weights with activations it quantizes to 8 bits, transformers uses the same
weights dequantized to float32, so the base model alone already differs by ``base_gap``; the adapted
model may differ by a little more, never by the adapter's own effect (which the test shows is far
larger)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
PROMPTS = ("The with statement", "def fibonacci(n):", "A list comprehension is", "import os\nimport sys\n",
           "The quick brown fox", "Exceptions in Python are raised with")
RANK, ALPHA = 8, 16.0


def _adapter(model) -> dict[str, torch.Tensor]:
    """A LoRA on every block linear, large enough to change the next token on some prompts."""
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            d_out, d_in = module.weight.shape
            weights[f"{name}.lora_A.weight"] = torch.randn(RANK, d_in, generator=gen) / d_in ** 0.5
            weights[f"{name}.lora_B.weight"] = torch.randn(d_out, RANK, generator=gen) * 0.1
    return weights


def test_the_gguf_adapter_in_llama_cpp_gives_the_next_token_of_transformers_with_peft(tmp_path):
    if os.environ.get("HELORA_REQUIRE_LLAMA_CPP"):  # make test-llama-cpp: installed, so never skipped
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="make test-llama-cpp installs llama-cpp-python")
    from hecommon.model import bundled_model_path, load_model, load_tokenizer
    from helora_orchestrator.export import write_peft
    from helora_orchestrator.ggufexport import write_gguf_adapter
    from helora_orchestrator.lora import LoraSettings
    from peft import PeftModel

    settings = LoraSettings(r=RANK, alpha=ALPHA)
    base, tokenizer = load_model(None), load_tokenizer(None)
    weights = _adapter(base)
    peft_dir = write_peft(settings, weights, tmp_path / "adapter")
    gguf_adapter = write_gguf_adapter(weights, settings, base.config, tmp_path / "adapter.gguf")
    base_gguf = str(bundled_model_path())
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]

    def hf_logits(model) -> np.ndarray:
        with torch.no_grad():
            return np.stack([model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
                             for ids in prompts])

    def cpp_logits(**kwargs) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=base_gguf, n_ctx=128, n_threads=2, logits_all=True, verbose=False, **kwargs)
        rows = []
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        return np.stack(rows)

    hf_base = hf_logits(base)
    hf_peft = hf_logits(PeftModel.from_pretrained(base, str(peft_dir)).eval())
    cpp_base, cpp_lora = cpp_logits(), cpp_logits(lora_path=str(gguf_adapter))
    base_gap = float(np.abs(cpp_base - hf_base).max())
    lora_gap = float(np.abs(cpp_lora - hf_peft).max())
    effect = float(np.abs(hf_peft - hf_base).max())
    print(f"max |Δlogit| llama.cpp vs transformers: base {base_gap:.4f}, with the adapter {lora_gap:.4f}; "
          f"the adapter's own effect {effect:.4f}; next tokens {hf_peft.argmax(1).tolist()}")
    assert effect > 5 * base_gap, "the adapter changes too little for this test to see it applied"
    assert (hf_peft.argmax(1) != hf_base.argmax(1)).any(), "the adapter changes no next token"
    assert (cpp_lora.argmax(1) == hf_peft.argmax(1)).all()
    assert lora_gap <= 3 * base_gap + 0.05

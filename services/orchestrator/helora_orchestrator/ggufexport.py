"""The adapter where people run models (issue 18): a llama.cpp LoRA adapter GGUF and a merged
Hugging Face model.

**GGUF adapter** (what llama.cpp's ``--lora`` and an Ollama ``ADAPTER`` line load): metadata
``general.architecture`` (the base's), ``general.type = "adapter"``, ``adapter.type = "lora"`` and
``adapter.lora.alpha``; one pair of tensors per adapted weight, named after the base GGUF's
tensor with ``.lora_a`` (r × d_in) and ``.lora_b`` (d_out × r) appended, float32. llama.cpp scales
the product by alpha / r, as PEFT does. Llama-family GGUF files store ``q_proj`` and ``k_proj``
with their rows permuted for llama.cpp's rotary layout (convert_hf_to_gguf's ``permute``); the
adapter's ``B`` of those layers gets the same permutation, so ``B·A`` lands on the same rows.

**Merged model**: the base with ``W + (alpha/r)·B·A`` in every adapted linear, saved by
transformers as safetensors (and the tokenizer), loadable with ``AutoModelForCausalLM`` alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from hecommon.errors import ConfigError

from .lora import LoraSettings

#: Hugging Face module path inside a block → llama.cpp's tensor name in block ``blk.N``
GGUF_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight")
#: transformers model types whose GGUF is llama.cpp's "llama" architecture, q/k rows permuted
LLAMA_TYPES = {"llama", "mistral"}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections: within each head, the two rotary halves interleaved."""
    if w.shape[0] % (2 * n_head):
        raise ConfigError(f"gguf: {w.shape[0]} rows do not split into {n_head} heads of two rotary halves")
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(weights: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensor name → float32 array of every LoRA weight, ``B`` of q/k permuted like the base."""
    if getattr(config, "model_type", None) not in LLAMA_TYPES:
        raise ConfigError(f"gguf: only Llama-family bases ({', '.join(sorted(LLAMA_TYPES))}) are supported, "
                          f"not {getattr(config, 'model_type', None)!r}")
    heads = {"self_attn.q_proj": config.num_attention_heads,
             "self_attn.k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    out: dict[str, np.ndarray] = {}
    for key, tensor in weights.items():
        found = KEY.fullmatch(key)
        if found is None:
            raise ConfigError(f"gguf: unexpected LoRA weight {key!r}")
        block, module, part = found.groups()
        w = tensor.detach().to(torch.float32).numpy()
        if part == "B" and module in heads:
            w = permute_rows(w, heads[module])
        out[f"blk.{block}.{GGUF_TENSORS[module]}.weight.lora_{part.lower()}"] = np.ascontiguousarray(w)
    return out


def write_gguf_adapter(weights: dict[str, torch.Tensor], settings: LoraSettings, config, path: str | Path) -> Path:
    """A llama.cpp LoRA adapter GGUF for a base GGUF of ``config``'s model; returns its path."""
    import gguf

    tensors = gguf_tensors(weights, config)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings.alpha))
        for name in sorted(tensors, key=_tensor_order):
            writer.add_tensor(name, tensors[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


def _tensor_order(name: str) -> tuple[int, str]:
    return int(name.split(".")[1]), name


def check_fits(weights: dict[str, torch.Tensor], settings: LoraSettings, model: torch.nn.Module) -> None:
    """Every LoRA pair names a linear of ``model`` and fits it: A (r, d_in), B (d_out, r)."""
    modules = dict(model.named_modules())
    for key, tensor in weights.items():
        found = KEY.fullmatch(key)
        linear = modules.get(key.rsplit(".lora_", 1)[0]) if found else None
        if linear is None:
            raise ConfigError(f"adapter: {key!r} names no block linear of this base model")
        d_out, d_in = linear.weight.shape
        want = (settings.r, d_in) if found.group(3) == "A" else (d_out, settings.r)
        if tuple(tensor.shape) != want:
            raise ConfigError(f"adapter: {key} is {tuple(tensor.shape)}, this base model needs {want}")


def merge_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], settings: LoraSettings) -> torch.nn.Module:
    """``W += (alpha/r)·B·A`` in place for every adapted linear of ``model`` (a Hugging Face causal LM)."""
    check_fits(weights, settings, model)
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        path, _, part = key.removesuffix(".weight").rpartition(".lora_")
        pairs.setdefault(path, {})[part] = tensor
    scale = settings.alpha / settings.r
    with torch.no_grad():
        for path, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise ConfigError(f"merge: {path} has only its lora_{next(iter(ab))}")
            linear = modules[path]
            linear.weight += (scale * (ab["B"].to(torch.float64) @ ab["A"].to(torch.float64))).to(linear.weight.dtype)
    return model


def write_merged(model: torch.nn.Module, weights: dict[str, torch.Tensor], settings: LoraSettings,
                 out_dir: str | Path, tokenizer=None) -> Path:
    """The merged model (safetensors) and, when it can save itself, the tokenizer, in ``out_dir``."""
    out = Path(out_dir)
    merge_into(model, weights, settings).save_pretrained(str(out), safe_serialization=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    return out

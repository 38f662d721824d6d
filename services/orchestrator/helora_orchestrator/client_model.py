"""The data owner's model: a ``transformers`` causal LM whose block linears go to a backend.

DESIGN §1: the client keeps embeddings, norms, attention, activations, residuals, LoRA and
``lm_head``; every frozen block ``nn.Linear`` is replaced by a thin module that asks a
:class:`~helora_orchestrator.backend.LinearBackend` for ``X·Wᵀ`` (forward) and ``dY·W``
(backward). Members of a group (``q|k|v``, ``gate|up``) share one request each way:

- forward: the first member called computes every member's output from ONE backend call
  and stashes the others for the same input tensor;
- backward: one autograd node receives all member gradients at once and makes ONE
  backend call with them concatenated (the server returns ``dQ·Wq + dK·Wk + dV·Wv``);
- if the group input needs no gradient (block 0's ``qkv``: embeddings are frozen), autograd
  never calls the backward at all, so that request is skipped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from hecommon.model import LinearGroup, decoder_blocks, discover_groups, group_bias
from torch import nn

from .backend import LinearBackend
from .generation import Sampling, generate
from .lora import LoraLinear, LoraSettings


class _GroupProduct(torch.autograd.Function):
    """Autograd node of one fused group: outputs one tensor per member."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fused: FusedGroup):
        g = fused.group
        lead = x.shape[:-1]
        x2d = np.ascontiguousarray(x.detach().reshape(-1, g.in_features).to(torch.float32).cpu().numpy())
        y = fused.backend.forward(g.name, x2d)  # (T, sum(out))
        y = torch.from_numpy(np.asarray(y, dtype=np.float32)).to(device=x.device, dtype=x.dtype)
        ctx.fused, ctx.lead, ctx.dtype, ctx.device = fused, lead, x.dtype, x.device
        parts = torch.split(y, list(g.out_features), dim=1)
        return tuple(p.reshape(*lead, p.shape[1]).contiguous() for p in parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        g = ctx.fused.group
        # (T, sum(out)): member gradients side by side, in member (= fused row) order
        dy = torch.cat([d.reshape(-1, d.shape[-1]).to(torch.float32) for d in grads], dim=1)
        dx = ctx.fused.backend.backward(g.name, np.ascontiguousarray(dy.cpu().numpy()))
        dx = torch.from_numpy(np.asarray(dx, dtype=np.float32)).to(device=ctx.device, dtype=ctx.dtype)
        return dx.reshape(*ctx.lead, g.in_features), None


class FusedGroup:
    """Runtime state of one group: its backend and the outputs pending for later members.

    The pending outputs are per thread: micro-batches may run their forwards concurrently
    (``helora train --in-flight``), each on its own thread and autograd graph.
    """

    def __init__(self, group: LinearGroup, backend: LinearBackend):
        self.group, self.backend = group, backend
        self._local = threading.local()

    @property
    def _pending(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None:
        return getattr(self._local, "pending", None)

    @_pending.setter
    def _pending(self, value: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None) -> None:
        self._local.pending = value

    def reset(self) -> None:
        self._pending = None

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """Output of member ``member`` for input ``x``; one backend call per group input."""
        n = len(self.group.members)
        if self._pending is None:
            outs = _GroupProduct.apply(x, self)
            if n > 1:
                self._pending = (x, outs, set(range(n)) - {member})
            return outs[member]
        x0, outs, remaining = self._pending
        if x is not x0:
            raise RuntimeError(
                f"group {self.group.name}: {self.group.members[member]} got a different input than the "
                "member that computed the group; fusion needs every member to read the same tensor"
            )
        if member not in remaining:
            raise RuntimeError(f"group {self.group.name}: {self.group.members[member]} called twice for one input")
        remaining.discard(member)
        if not remaining:
            self._pending = None
        return outs[member]


class BackendLinear(nn.Module):
    """Stands in for one frozen ``nn.Linear``: no weight here; the bias is added in the clear."""

    def __init__(self, fused: FusedGroup, member: int, bias: torch.Tensor | None):
        super().__init__()
        self.fused, self.member = fused, member
        self.in_features = fused.group.in_features
        self.out_features = fused.group.out_features[member]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.output(self.member, x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        name = self.fused.group.members[self.member]
        return f"group={self.fused.group.name}, member={name}, in={self.in_features}, out={self.out_features}"


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, module)


class ClientModel(nn.Module):
    """HF causal LM + backend-computed block linears + LoRA (DESIGN §1).

    The block weights leave the model here in every mode: the backend was built from them
    beforehand (clear/quantized) or holds them on the server (encrypted), and the client never
    needs them again. Only LoRA parameters require a gradient.
    """

    def __init__(self, model, backend: LinearBackend, groups: list[LinearGroup] | None = None,
                 lora: LoraSettings | None = None, seed: int = 0):
        super().__init__()
        self.hf = model
        self.backend = backend
        self.groups = list(groups) if groups is not None else discover_groups(model)
        self.lora_settings = lora or LoraSettings()
        self.fused: dict[str, FusedGroup] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        blocks = decoder_blocks(model)
        for g in self.groups:
            self._install(blocks[g.block], g, generator)

    def _install(self, block: nn.Module, g: LinearGroup, generator: torch.Generator) -> None:
        fused = self.fused[g.name] = FusedGroup(g, self.backend)
        bias = group_bias(self.hf, g)
        start = 0
        for j, (member, out) in enumerate(zip(g.members, g.out_features, strict=True)):
            b = None if bias is None else bias[start:start + out]
            start += out
            module: nn.Module = BackendLinear(fused, j, b)
            if member.rpartition(".")[2] in self.lora_settings.target_modules:
                module = LoraLinear(module, g.in_features, out, self.lora_settings, generator)
            _replace(block, member, module)

    @property
    def wire_bytes(self) -> int:
        return int(getattr(self.backend, "wire_bytes", 0))

    @property
    def linear_seconds(self) -> dict[str, float]:
        """The backend's time counters (``EncryptedBackend.seconds``); empty for clear backends."""
        return dict(getattr(self.backend, "seconds", {}))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, S, vocab)``; ``lm_head`` runs here, on the client."""
        for fused in self.fused.values():
            fused.reset()  # a failed previous step must not leave a stale stash behind
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.lora_named_parameters()]

    def lora_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, param)`` with names relative to the HF model, in a fixed order."""
        return [(n, p) for n, p in self.hf.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.lora_named_parameters()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load LoRA weights; names and shapes must match exactly."""
        from hecommon.errors import ConfigError

        own = dict(self.lora_named_parameters())
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state))[:3], sorted(set(state) - set(own))[:3]
            raise ConfigError(f"adapter: LoRA weights do not match this model (missing {missing}, unexpected {extra})")
        for name, p in own.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ConfigError(f"adapter: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(state[name])

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None = None,
                 sampling: Sampling | None = None, pad_id: int = 0,
                 on_token: Callable[[int, torch.Tensor], None] | None = None) -> list[list[int]]:
        """Each prompt's new tokens, with a KV cache (``generation.generate``: greedy by default,
        several prompts in one batch); every new token's block linears go to the backend, inside
        one of its sessions where it has them (the encrypted backend: each step's tokens take the
        next coefficients of one secret per layer, ``EncryptedBackend.session``)."""
        for fused in self.fused.values():
            fused.reset()
        session = getattr(self.backend, "session", None)
        if session is not None:  # one window of a·s products for the whole generation, where it fits
            from .encrypted import MAX_SESSION_WINDOW, SESSION_WINDOW

            columns = len(prompts) * (max(map(len, prompts), default=0) + max_new_tokens)
            window = min(self.backend.params.n, MAX_SESSION_WINDOW, max(SESSION_WINDOW, columns))
        with session(window) if session is not None else contextlib.nullcontext():
            return generate(self.hf, prompts, max_new_tokens, sampling or Sampling(), eos_token_id, pad_id, on_token)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of scored tokens (labels -100 ignored)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    n = int((shift_labels != -100).sum())
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss, n


def build_client(model, mode: str, lora: LoraSettings | None = None, bits: int = 8, seed: int = 0,
                 **backend_kwargs) -> ClientModel:
    """Discover groups, build the backend from the still-present weights, wrap the model."""
    from .backend import build_backend

    groups = discover_groups(model)
    backend = build_backend(mode, model, groups, bits=bits, **backend_kwargs)
    return ClientModel(model, backend, groups, lora, seed)

"""Generation on the client's model: greedy or sampled (temperature, top-p, seed), several prompts
at once, each new token handed to a callback as it comes (``helora generate`` streams them).

Several prompts share one batch: they are padded on the left, masked, and given their own
positions, so each continues from its own last token; every step sends one token per prompt to
the block linears (in encrypted mode: one request per linear for all prompts). Sampling draws
from a ``torch.Generator`` seeded by the user, on logits that the encrypted mode computes bit for
bit like the quantized one, so both modes sample the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hecommon.errors import ConfigError

#: below this, softmax(logits / T) underflows to NaN in float64; 0 means greedy
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0: greedy (argmax); otherwise softmax(logits / temperature) restricted to the
    smallest set of tokens whose probability reaches ``top_p``, drawn with ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature
                                                      <= 100.0)):
            raise ConfigError(f"temperature: {self.temperature} must be 0 (greedy) or in {MIN_TEMPERATURE}..100")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p: {self.top_p} outside (0, 1]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: {self.seed!r} must be an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token per row of ``logits`` (B, V) → (B, 1)."""
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)  # the top token always stays
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator)


class StreamText:
    """The text of a growing token list, handed out piece by piece: a piece that would end inside a
    character (a token holding part of its UTF-8 bytes decodes to U+FFFD) waits for the rest."""

    def __init__(self, tokenizer, eos_token_id: int | None = None):
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self.tokens: list[int] = []
        self.shown = 0  # characters of the decoded text already handed out

    def add(self, token: int) -> str:
        """The new text that ``token`` completes ("" while a character is incomplete, or after EOS)."""
        if self.tokens and self.tokens[-1] == self.eos:
            return ""
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, longest prompt), prompts aligned on the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def generate(hf, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_token_id: int | None = None, pad_id: int = 0,
             on_token: Callable[[int, torch.Tensor], None] | None = None) -> list[list[int]]:
    """Each prompt's new tokens (cut after its EOS), with a KV cache; ``on_token(step, (B,) ids)``
    after every step. ``hf`` is the client's causal LM (its block linears go to the backend)."""
    if max_new_tokens < 1:
        raise ConfigError("generate: max_new_tokens must be at least 1")
    ids, mask = left_padded(prompts, pad_id)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
    new: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    step_ids, past = ids, None
    with torch.no_grad():
        for step in range(max_new_tokens):
            out = hf(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                     use_cache=True)
            past = out.past_key_values
            step_ids = sampling.pick(out.logits[:, -1].float(), generator)
            for row, token in enumerate(step_ids[:, 0].tolist()):
                if not done[row]:
                    new[row].append(token)
            if on_token is not None:
                on_token(step, step_ids[:, 0])
            if eos_token_id is not None:
                done |= step_ids[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
    return new

"""Training data of the data owner: read, split, tokenize, pack, order (DESIGN §1, §4).

Sources: ``.txt`` (paragraphs separated by blank lines), ``.jsonl`` (``{"text"}`` or
``{"prompt", "completion"}`` with the loss on the completion only), or the bundled corpus,
the CPython topic docs in ``pydoc_data.topics``. Examples split 95/5 into train/held-out by a
hash of their key, so the split never depends on file order or on a seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hecommon.errors import ConfigError

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class Example:
    """One document; the loss covers ``completion`` only (``prompt`` may be empty)."""

    key: str
    completion: str
    prompt: str = ""


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256) for the tiny test model; byte 0 ends a document."""

    eos_token_id = 0
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


def _read_txt(path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return [Example(key=f"{path.name}:{i}:{p}", completion=p) for i, p in enumerate(paragraphs) if p]


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> Example:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data: {where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"data: {where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("text"), str):
        return Example(key=f"{lineno}:{obj['text']}", completion=obj["text"])
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return Example(key=f"{lineno}:{obj['prompt']}", completion=obj["completion"], prompt=obj["prompt"])
    raise ConfigError(f"data: {where}: need a string 'text', or string 'prompt' and 'completion'")


def _read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as f:
        return [_parse_jsonl_line(path, n, line) for n, line in enumerate(f, start=1) if line.strip()]


def bundled_examples() -> list[Example]:
    """The CPython docs shipped with every Python (``pydoc_data.topics``), one per topic."""
    from pydoc_data.topics import topics

    return [Example(key=k, completion=topics[k]) for k in sorted(topics)]


def read_examples(path: str | Path | None) -> list[Example]:
    """Examples of a ``.txt``/``.jsonl`` file, or the bundled corpus when ``path`` is None."""
    if path is None:
        return bundled_examples()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data: no such file: {p}")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl}
    if p.suffix not in readers:
        raise ConfigError(f"data: {p}: unknown format {p.suffix!r}; use .txt or .jsonl")
    examples = readers[p.suffix](p)
    if not examples:
        raise ConfigError(f"data: {p}: empty dataset (no examples)")
    return examples


def split_examples(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Deterministic ~95/5 train/held-out split by SHA-256 of each key; both sides non-empty."""
    if len(examples) < 2:
        raise ConfigError(f"data: {len(examples)} example(s); need at least 2 to hold one out for evaluation")
    bucket = [int(hashlib.sha256(e.key.encode()).hexdigest()[:8], 16) % 100 for e in examples]
    held = [e for e, b in zip(examples, bucket, strict=True) if b < HELD_OUT_PERCENT]
    train = [e for e, b in zip(examples, bucket, strict=True) if b >= HELD_OUT_PERCENT]
    if not held:  # small files: hold out the last example rather than evaluate on nothing
        held, train = train[-1:], train[:-1]
    if not train:
        held, train = held[:1], held[1:]
    return train, held


@dataclass(frozen=True)
class PackedData:
    """Fixed-length sequences: ``input_ids`` and ``labels`` (n, seq_len) int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.input_ids[idx], self.labels[idx]


def _token_stream(examples: list[Example], tokenizer) -> tuple[list[int], list[int]]:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        p = tokenizer.encode(e.prompt, add_special_tokens=False) if e.prompt else []
        c = tokenizer.encode(e.completion, add_special_tokens=False)
        c = c + [eos] if eos is not None else c  # the model learns where a document ends
        ids += p + c
        labels += [IGNORE] * len(p) + c
    return ids, labels


def pack(examples: list[Example], tokenizer, seq_len: int = 256) -> PackedData:
    """Concatenate the token streams and cut them into ``seq_len`` sequences.

    The tail is padded (labels -100) rather than dropped, so small held-out sets still count.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len: {seq_len} must be at least 2")
    ids, labels = _token_stream(examples, tokenizer)
    if sum(1 for t in labels if t != IGNORE) < 2:
        raise ConfigError("data: empty dataset (no tokens carry a loss)")
    n = -(-len(ids) // seq_len)
    pad = n * seq_len - len(ids)
    fill = getattr(tokenizer, "eos_token_id", None) or 0
    ids_t = torch.tensor(ids + [fill] * pad, dtype=torch.long).reshape(n, seq_len)
    lab_t = torch.tensor(labels + [IGNORE] * pad, dtype=torch.long).reshape(n, seq_len)
    keep = (lab_t[:, 1:] != IGNORE).any(dim=1)  # a sequence with nothing to predict is dead weight
    return PackedData(ids_t[keep], lab_t[keep])


def load_splits(path: str | Path | None, tokenizer, seq_len: int = 256) -> tuple[PackedData, PackedData]:
    """Train and held-out packed data from a file or the bundled corpus."""
    train, held = split_examples(read_examples(path))
    return pack(train, tokenizer, seq_len), pack(held, tokenizer, seq_len)


class DataOrder:
    """Seeded order of micro-batches over epochs, resumable from ``state()``.

    Epoch ``e`` visits a permutation drawn from ``default_rng([seed, e])``: independent of how
    many batches came before, so a resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1 or batch_size < 1:
            raise ConfigError(f"data order: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            out.append(int(self._perm[self.cursor]))
            self.cursor += 1
        return out

    def state(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        mine = {"n": self.n, "batch_size": self.batch_size, "seed": self.seed}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ConfigError(f"checkpoint: data order {theirs} does not match this run's {mine} (other data or settings?)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)

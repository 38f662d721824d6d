"""Fixtures for the orchestrator tests: the tiny random Llama and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helora_orchestrator.data import ByteTokenizer, load_splits


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def counting_rows(n: int = 60) -> list[dict]:
    return [{"text": f"The number {i} is followed by {i + 1}, and then by {i + 2}."} for i in range(n)]


@pytest.fixture
def text_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", counting_rows())


@pytest.fixture
def tiny_splits(text_jsonl: Path):
    """(train, held-out) packed with the byte tokenizer, 32-token sequences."""
    return load_splits(text_jsonl, ByteTokenizer(), seq_len=32)

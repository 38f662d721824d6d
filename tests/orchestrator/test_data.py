"""Data reading, splitting, packing and ordering."""

from __future__ import annotations

import json

import pytest
import torch
from hecommon.errors import ConfigError
from helora_orchestrator.data import (
    IGNORE,
    ByteTokenizer,
    DataOrder,
    Example,
    bundled_examples,
    load_splits,
    pack,
    read_examples,
    split_examples,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ConfigError, match="no such file: .*absent.jsonl"):
        read_examples(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unknown format '.csv'"):
        read_examples(tmp_path / "data.csv")


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:3: bad JSON"):
        read_examples(path)
    path.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2: need a string 'text'"):
        read_examples(path)


def test_empty_datasets(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="empty dataset"):
        read_examples(tmp_path / "e.jsonl")
    (tmp_path / "e.txt").write_text("   \n\n  ")
    with pytest.raises(ConfigError, match="empty dataset"):
        read_examples(tmp_path / "e.txt")
    with pytest.raises(ConfigError, match="empty dataset"):
        pack([Example("k", "")], ByteTokenizer(), 8)


def test_txt_paragraphs_and_prompt_completion_labels(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond\n")
    assert [e.completion for e in read_examples(tmp_path / "a.txt")] == ["first para\nstill first", "second"]
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q?", "completion": "A!"}])
    packed = pack(read_examples(path), ByteTokenizer(), seq_len=8)
    assert packed.input_ids[0].tolist() == [ord(c) for c in "Q?A!"] + [0, 0, 0, 0]  # eos, then padding
    assert packed.labels[0].tolist() == [IGNORE, IGNORE, ord("A"), ord("!"), 0, IGNORE, IGNORE, IGNORE]


def test_split_is_deterministic_disjoint_and_non_empty():
    examples = bundled_examples()
    train, held = split_examples(examples)
    assert len(train) + len(held) == len(examples)
    assert held and train and not {e.key for e in held} & {e.key for e in train}
    assert split_examples(list(reversed(examples)))[1] == list(reversed(held))  # by key, not by position
    small_train, small_held = split_examples([Example("a", "x"), Example("b", "y")])
    assert len(small_train) == len(small_held) == 1
    with pytest.raises(ConfigError, match="at least 2"):
        split_examples([Example("a", "x")])


def test_packing_shapes(text_jsonl):
    train, held = load_splits(text_jsonl, ByteTokenizer(), seq_len=32)
    assert train.input_ids.shape[1] == held.seq_len == 32
    assert len(train) > len(held) >= 1
    ids, labels = train.batch([0, 1])
    assert ids.shape == labels.shape == (2, 32)
    assert torch.equal(ids[labels != IGNORE], labels[labels != IGNORE])


def test_data_order_is_seeded_and_resumable():
    a = DataOrder(10, 3, seed=1)
    straight = [a.next_batch() for _ in range(8)]  # crosses epochs
    assert sorted(sum(straight[:3], []) + [straight[3][0]]) == list(range(10))
    b = DataOrder(10, 3, seed=1)
    first = [b.next_batch() for _ in range(4)]
    c = DataOrder(10, 3, seed=1)
    c.load_state(b.state())
    assert first + [c.next_batch() for _ in range(4)] == straight
    assert [DataOrder(10, 3, seed=2).next_batch() for _ in range(3)] != straight[:3]
    with pytest.raises(ConfigError, match="data order"):
        DataOrder(11, 3, seed=1).load_state(b.state())

"""Generation (issue 18): greedy or sampled (temperature, top-p, seed), several prompts in one batch,
tokens handed over as they come; the encrypted mode samples what the quantized mode samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hecommon.errors import ConfigError
from hecommon.model import tiny_llama
from helora_orchestrator.client_model import build_client
from helora_orchestrator.data import ByteTokenizer
from helora_orchestrator.generation import Sampling, StreamText, left_padded

PROMPTS = [[5, 17, 42, 99, 3], [7, 8], [100, 101, 102]]


def _client(mode: str = "clear"):
    return build_client(tiny_llama(seed=7)[0], mode)


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": 1e-310},
                                    {"top_p": 0.0},
                                    {"top_p": 1.5}, {"seed": -1}])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        Sampling(**kwargs)


def test_prompts_are_padded_on_the_left_and_masked():
    ids, mask = left_padded([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ConfigError, match="at least one token"):
        left_padded([[1], []], 0)


@pytest.mark.parametrize("mode", ["clear", "quantized"])
def test_each_prompt_of_a_batch_continues_as_it_would_alone(mode):
    client = _client(mode)
    together = client.generate(PROMPTS, 6)
    alone = [client.generate([p], 6)[0] for p in PROMPTS]
    assert together == alone and all(len(t) == 6 for t in together)


def test_sampling_is_reproducible_by_seed_and_top_p_near_zero_is_greedy():
    client = _client()
    hot = Sampling(temperature=1.5, seed=3)
    first, again = client.generate(PROMPTS, 8, sampling=hot), client.generate(PROMPTS, 8, sampling=hot)
    other = client.generate(PROMPTS, 8, sampling=Sampling(temperature=1.5, seed=4))
    greedy = client.generate(PROMPTS, 8)
    assert first == again and first != other and first != greedy
    assert client.generate(PROMPTS, 8, sampling=Sampling(temperature=1.5, top_p=1e-9, seed=3)) == greedy


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(Sampling(temperature=1.0, top_p=0.75).pick(logits, gen)) for _ in range(400)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reach 0.75: tokens 2 and 3 are never drawn
    drawn = {int(Sampling(temperature=1.0, top_p=0.85).pick(logits, gen)) for _ in range(400)}
    assert drawn == {0, 1, 2}


def test_generation_stops_at_the_eos_of_every_prompt_and_streams_each_step():
    client = _client()
    eos = client.generate([PROMPTS[0]], 1)[0][0]  # the first prompt's first token, called EOS here
    steps = []
    out = client.generate(PROMPTS, 5, eos_token_id=eos, on_token=lambda step, ids: steps.append((step, ids.tolist())))
    assert out[0] == [eos]  # cut after its EOS
    assert [s for s, _ in steps] == list(range(len(steps))) and all(len(ids) == len(PROMPTS) for _, ids in steps)
    for row in out:  # each row runs until its own EOS, or to the end if it has none
        assert (row[-1] == eos and row.count(eos) == 1) or (eos not in row and len(row) == len(steps))
    assert len(steps) == 5 or all(row[-1] == eos for row in out)  # it stops early only when every row ended


def test_streamed_text_waits_for_the_rest_of_a_character():
    tok = ByteTokenizer()
    text = "Olá 日本語 🙂"
    stream = StreamText(tok, tok.eos_token_id)
    pieces = [stream.add(b) for b in tok.encode(text)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 0  # the bytes inside a character gave nothing yet
    assert stream.add(tok.eos_token_id) == "" and stream.add(ord("x")) == ""  # nothing after EOS


def test_encrypted_generation_samples_the_tokens_of_the_quantized_mode():
    hot = Sampling(temperature=1.0, top_p=0.9, seed=11)
    quantized = _client("quantized").generate(PROMPTS, 4, sampling=hot)
    encrypted = _client("encrypted").generate(PROMPTS, 4, sampling=hot)
    assert encrypted == quantized


def test_helora_generate_streams_one_prompt_and_prints_several(tmp_path):
    helora = str(Path(sys.executable).with_name("helora"))
    base = [helora, "generate", "--model", "tiny", "--mode", "quantized", "--max-new-tokens", "4"]
    one = subprocess.run([*base, "--prompt", "abc"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("abc") and "time to first token" in one.stderr and "1 prompt(s), 4 step(s)" in one.stderr
    two = subprocess.run([*base, "--prompt", "abc", "--prompt", "xy", "--temperature", "0.7", "--top-p", "0.9",
                          "--sample-seed", "5"], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    lines = two.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("abc") and lines[1].startswith("xy")
    bad = subprocess.run([*base, "--prompt", "abc", "--top-p", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "top_p" in bad.stderr
    greedy = subprocess.run([*base, "--prompt", "abc", "--top-p", "0.9"], capture_output=True, text=True, timeout=300)
    assert greedy.returncode == 2 and "need --temperature above 0" in greedy.stderr

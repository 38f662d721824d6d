"""The ``helora`` command line: bad input exits 2 with one line; a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from helora_orchestrator.cli import main


def _fail(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--mode", "plain"], "invalid choice: 'plain'"),
    (["train", "--steps", "ten"], "invalid int value: 'ten'"),
    (["generate"], "the following arguments are required: --prompt"),
    ([], "the following arguments are required"),
])
def test_argparse_errors_exit_2_on_one_line(capsys, argv, message):
    err = _fail(capsys, argv)
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "steps: 0 must be at least 1"),
    (["train", "--rank", "0"], "lora.r: 0"),
    (["train", "--targets", "q_proj,lm_head"], "lora.target_modules"),
    (["train", "--data", "/nonexistent/d.jsonl"], "no such file: /nonexistent/d.jsonl"),
    (["train", "--mode", "clear", "--broker", "amqp://localhost"], "--broker: only meaningful with --mode encrypted"),
    (["train", "--broker", "localhost:5672"], "--broker: an amqp:// or amqps:// URL is required"),
    (["train", "--mode", "clear", "--param-set", "n4096"], "only meaningful with --mode encrypted"),
    (["train", "--model", "tiny", "--broker", "amqp://127.0.0.1:1/", "--broker-timeout-s", "0"],
     "--broker-timeout-s: 0.0 outside (0, 86400]"),
    (["eval", "--model", "/nonexistent/m.gguf", "--data", "/nonexistent/d.jsonl"], "no such file"),
    (["generate", "--model", "/nonexistent/m.gguf", "--prompt", "hi"], "no such file or directory"),
])
def test_bad_values_exit_2_with_a_clear_message(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_tiny_train_eval_generate_end_to_end(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}? ", "completion": f"A{i}."}) + "\n" for i in range(30)))
    out = tmp_path / "run"
    common = ["--model", "tiny", "--mode", "quantized", "--data", str(data), "--seq-len", "32", "--batch-size", "2"]
    assert main(["train", *common, "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint" / "meta.json").is_file()
    assert main(["train", *common, "--steps", "3", "--out", str(out)]) == 2  # would overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["train", *common, "--steps", "5", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "steps 5" in capsys.readouterr().out
    assert main(["eval", *common, "--adapter", str(out / "adapter")]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny", "--mode", "clear", "--adapter", str(out), "--prompt", "Q1?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Q1?")
    assert main(["eval", *common, "--adapter", str(tmp_path)]) == 2
    assert "neither a PEFT adapter nor a helora checkpoint" in capsys.readouterr().err


def test_train_then_generate_in_one_process_encrypted(tmp_path, capsys):
    """The demo's shape: encrypted training, held-out eval and a generation, one process."""
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--mode", "encrypted", "--seq-len", "32", "--batch-size", "2",
                 "--steps", "2", "--eval-batches", "1", "--out", str(out), "--no-progress",
                 "--generate", "The for", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "wire" in printed
    assert printed.rstrip().splitlines()[-1].startswith("The for")


def test_key_file_is_created_private_and_reused(tmp_path, capsys):
    import stat

    key = tmp_path / "owner.key"
    argv = ["generate", "--model", "tiny", "--mode", "encrypted", "--prompt", "ab", "--max-new-tokens", "1",
            "--key-file", str(key)]
    assert main(argv) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    assert main(argv) == 0 and key.read_bytes() == first  # loaded, not overwritten
    key.chmod(0o644)
    assert main(argv) == 2
    assert "readable by others" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--mode", "clear", "--prompt", "ab", "--key-file", str(key)]) == 2

"""``helora federate keygen | demo``: files, permissions, output, and one-line errors."""

from __future__ import annotations

import os
import stat

import tenseal as ts
from helora_orchestrator.cli import main
from helora_orchestrator.federated.selective import CkksKeys


def test_keygen_writes_a_0600_key_and_a_public_context(tmp_path, capsys):
    key = tmp_path / "fed.key"
    assert main(["federate", "keygen", "--out", str(key)]) == 0
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    pub = (tmp_path / "fed.key.pub").read_bytes()
    assert not ts.context_from(pub).is_private()
    assert CkksKeys.load(key).public_bytes() == pub
    assert main(["federate", "keygen", "--out", str(key)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_demo_prints_rounds_and_exports_adapters(tmp_path, fed_data, capsys):
    rc = main(["federate", "demo", "--rounds", "2", "--data", str(fed_data), "--ranks", "4,8,16",
               "--budgets", "0,0.01,1", "--scheme", "selective", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("held-out loss") == 3 and "round 2:" in out and "up " in out
    for i, r in enumerate((4, 8, 16)):
        assert (tmp_path / "out" / f"owner{i}" / "adapter_model.safetensors").is_file()
        assert f'"r": {r}' in (tmp_path / "out" / f"owner{i}" / "adapter_config.json").read_text()


def test_demo_encrypts_every_coordinate_by_default(fed_data, capsys):
    rc = main(["federate", "demo", "--rounds", "1", "--data", str(fed_data), "--ranks", "4,8", "--budgets", "0,0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("every coordinate encrypted") == 2 and "round 1:" in out
    assert main(["federate", "demo", "--rounds", "1", "--data", str(fed_data), "--update-range", "-1"]) == 2
    assert "update_range" in capsys.readouterr().err


def test_demo_bad_input_is_one_line(capsys):
    assert main(["federate", "demo", "--ranks", "4,8", "--budgets", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("helora federate demo: error:") and err.count("\n") == 1
    assert main(["federate", "demo", "--budgets", "0.1,2,0.1"]) == 2
    assert "budget" in capsys.readouterr().err


def test_round_bad_flags_are_one_line(tmp_path, capsys):
    """Checked before the key is read or the broker dialled: a too-small message limit (it used to
    die in ``split_bytes`` with ZeroDivisionError), a non-positive timeout, no rounds, no owners."""
    from hecommon.broker.topology import MIN_MESSAGE_BYTES

    base = ["federate", "round", "--key", str(tmp_path / "absent.key"), "--owner", "a", "--owners", "2", "--index", "0"]
    for flags, word in ((["--max-message-bytes", "1024"], "--max-message-bytes"),
                        (["--max-message-bytes", "0"], "--max-message-bytes"),
                        (["--timeout-s", "0"], "--timeout-s"), (["--timeout-s", "nan"], "--timeout-s"),
                        (["--rounds", "0"], "--rounds")):
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("helora federate round: error:") and err.count("\n") == 1, err
        assert word in err, err
    assert main(base[:7] + ["0", "--index", "0"]) == 2
    err = capsys.readouterr().err
    assert "--owners" in err and err.count("\n") == 1, err
    assert main(base + ["--max-message-bytes", "1024"]) == 2
    assert str(MIN_MESSAGE_BYTES) in capsys.readouterr().err  # the error says the least accepted


def test_split_bytes_refuses_a_limit_below_the_chunk_overhead():
    import pytest
    from hecommon.errors import OversizedMessage
    from hecommon.wire import fedchunks, fedfields
    from hecommon.wire import federated as fedwire

    for limit in (1, fedfields.CHUNK_OVERHEAD - 1, fedfields.CHUNK_OVERHEAD):
        with pytest.raises(OversizedMessage, match="chunk"):
            fedchunks.split_bytes(bytes(4096), limit, bytes(fedwire.RID_BYTES))

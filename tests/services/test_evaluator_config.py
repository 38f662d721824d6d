"""The evaluator's configuration refuses a bad GEMM choice at start, not at the first request."""

from __future__ import annotations

import dataclasses

import pytest
from hecommon.errors import ConfigError
from helora_aggregator.config import AggregatorConfig
from helora_encoder.config import EncoderConfig
from helora_evaluator.config import EvaluatorConfig


def test_gemm_from_flag_and_environment():
    assert EvaluatorConfig.from_args([], environ={}).gemm == "auto"
    assert EvaluatorConfig.from_args(["--gemm", "float64"], environ={}).gemm == "float64"
    assert EvaluatorConfig.from_args([], environ={"HELORA_GPU_GEMM": "int8"}).gemm == "int8"


@pytest.mark.parametrize(("argv", "environ", "match"), [
    ([], {"HELORA_GPU_GEMM": "fp16"}, "gemm: 'fp16' is not one of"),
    (["--gemm", "int4"], {}, "gemm: 'int4' is not one of"),
    (["--gemm", "int8", "--backend", "numpy"], {}, "runs on a GPU only"),
])
def test_bad_gemm_is_refused_at_start(argv, environ, match):
    with pytest.raises(ConfigError, match=match):
        EvaluatorConfig.from_args(argv, environ=environ)


@pytest.mark.parametrize("config", [EvaluatorConfig, EncoderConfig])
def test_no_flag_that_the_service_ignores(config, capsys):
    """Only the aggregator puts parts of a message together (it gives up after --part-timeout-s);
    the evaluator answers each part alone and the encoder is not on the request path: they refuse
    the flag instead of accepting and ignoring it."""
    with pytest.raises(SystemExit) as exit_:
        config.from_args(["--part-timeout-s", "5"], environ={})
    assert exit_.value.code == 2 and "unrecognized arguments: --part-timeout-s" in capsys.readouterr().err
    assert "part_timeout_s" not in {f.name for f in dataclasses.fields(config)}
    assert AggregatorConfig.from_args(["--part-timeout-s", "5"], environ={}).part_timeout_s == 5.0

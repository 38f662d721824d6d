"""The evaluator's configuration refuses a bad GEMM choice at start, not at the first request."""

from __future__ import annotations

import pytest
from hecommon.errors import ConfigError
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

"""``hecommon.heap.reuse_freed_memory``: the large temporaries of the client and the CPU services
(residues as float64, GEMM sums, decrypted rows: tens of MB each, hundreds per step) come back from freed memory instead of fresh
pages from the kernel, which faults and zeroes them on first touch (measured: ~10 % of an
embedded SmolLM2 step). Checked in a fresh interpreter, since the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import numpy as np
from hecommon import heap
applied = heap.reuse_freed_memory() if sys.argv[1] == "on" else False
def faults_of_a_fresh_array():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(64 << 20, dtype=np.uint8)
    a.fill(1)
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_array()
print(json.dumps({"applied": applied, "faults": min(faults_of_a_fresh_array() for _ in range(3))}))
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_large_array_is_reused_without_page_faults():
    huge_pages = (64 << 20) // (2 << 20)  # numpy asks for transparent huge pages: a fault per 2 MiB at least
    assert _probe("off")["faults"] >= huge_pages  # the default: every large array maps fresh pages
    on = _probe("on")
    assert on["applied"] is True
    assert on["faults"] < huge_pages // 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_helora_heap_default_leaves_the_allocator_alone():
    env = {**os.environ, "HELORA_HEAP": "default"}
    got = _probe("on", env)
    assert got["applied"] is False
    assert got["faults"] >= (64 << 20) // (2 << 20)


def test_a_bad_helora_heap_is_a_clear_error(monkeypatch):
    from hecommon import heap
    from hecommon.errors import ConfigError

    monkeypatch.setenv("HELORA_HEAP", "fast")
    with pytest.raises(ConfigError, match="HELORA_HEAP"):
        heap.reuse_freed_memory()


SERVE = r"""
import sys
from types import SimpleNamespace
from hecommon import heap
from hecommon.broker import process

class Worker:
    def install_signal_handlers(self):
        pass
    def run(self):
        print("applied", heap._applied)
        return 0

cfg = SimpleNamespace(log_level="warning", metrics_host="127.0.0.1", metrics_port=0)
code = process.serve("helora-aggregator", lambda argv: cfg, lambda c, m: Worker(), [],
                     reuse_memory=sys.argv[1] == "on")
sys.exit(code)
"""


@pytest.mark.parametrize("flag, env, code, says", [("on", "keep", 0, "applied True"), ("off", "keep", 0, "applied None"),
                                                  ("on", "fast", 2, "HELORA_HEAP")])
def test_a_service_started_with_reuse_memory_keeps_its_freed_memory(flag, env, code, says):
    """``process.serve(reuse_memory=True)`` (the CPU evaluator, the aggregator) sets the heap before
    the service is built; a bad ``HELORA_HEAP`` is a start-up error (status 2, one line)."""
    out = subprocess.run([sys.executable, "-c", SERVE, flag], capture_output=True, text=True,
                         env={**os.environ, "HELORA_HEAP": env})
    assert out.returncode == code
    assert says in out.stdout + out.stderr

"""BENCHMARK ONLY: the evaluator service with its encrypted product replaced by an identity.

``benchmarks/throughput.py`` (``transport_ratio``) runs this module instead of
``helora_evaluator.worker`` to measure what the fleet's data path moves when the GEMM costs
nothing: output row ``o`` of a product is input row ``o mod d_in`` (a copy, no multiply-adds) and
every hint is zero. Everything else is the real evaluator: the broker shell, decoding and
validation, the modulus switch and packing of each reply part, the publishes with confirms.

The switch lives here, patched in at start, so that no production path has it: nothing under
``libs/`` or ``services/`` imports this file. Its replies decrypt to noise.

    python benchmarks/identity_evaluator.py <helora-evaluator arguments>
"""

from __future__ import annotations

import sys

import numpy as np
from hecommon.he import evaluate


def _copy_rows(product: evaluate.MatrixProduct, residues: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Output rows ``lo…hi`` of the identity product: input rows ``o mod d_in``."""
    return np.ascontiguousarray(residues[np.arange(lo, hi) % residues.shape[0]], dtype=np.uint32)


def _row_blocks(self, batch, blocks):
    self._check(batch)
    for lo, hi in blocks:
        yield _copy_rows(self, batch.b, lo, hi)


def _piece(self, residues, offset):
    return _copy_rows(self, residues, 0, self.d_out)


def _build_hint(self, a_seed, rows=None):
    return np.zeros((self.d_out, self.params.limbs, self.params.n), dtype=np.uint32)


def install() -> None:
    """Replace the product, the pieces and the hints of every ``MatrixProduct`` in this process."""
    evaluate.MatrixProduct.row_blocks = _row_blocks  # type: ignore[method-assign]
    evaluate.MatrixProduct.piece = _piece  # type: ignore[method-assign]
    evaluate.MatrixProduct.build_hint = _build_hint  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from helora_evaluator.worker import main

    sys.exit(main(sys.argv[1:]))

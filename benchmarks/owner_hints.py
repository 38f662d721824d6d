"""What one data owner's hints cost the server (issue 15): seconds and memory per owner.

    python benchmarks/owner_hints.py [--config smollm2|llama1b|all] [--blocks K] [--json PATH]

Each owner has its own public ``a`` (``sampling.owner_a_seed``), so an evaluator builds ``W·A`` for
every (layer, direction) an owner uses, on that owner's first request of it, and keeps it for the
owner's session (``helora_evaluator.handler.OwnerHints``). This script builds one block's
products with random 8-bit weights at the configuration's shapes (the weights do not change the
cost), times ``build_hint`` for each group and direction (the median of ``--reps`` builds, each for
a new owner, after one untimed), and, as the baseline measured in the same run, one request's
product of the same shapes (a full batch of N tokens, median likewise): the hint costs
what one request does (the same GEMM, with ``a`` in place of ``b``). Whole-model figures are one
block's times the number of blocks. Memory: the hint mod q (4 bytes per residue, where row shards'
hints are summed) and switched and packed at ``out_bits`` (what an evaluator holding the whole
layer keeps).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_time, print_table, write_json  # noqa: E402
from exactness import CONFIGS, groups  # noqa: E402
from hecommon.he import params as P  # noqa: E402
from hecommon.he.bits import packed_size  # noqa: E402
from hecommon.he.encrypt import EncryptedBatch  # noqa: E402
from hecommon.he.evaluate import MatrixProduct  # noqa: E402

NAMES = {"smollm2": "SmolLM2-135M", "llama1b": "Llama-3.2-1B"}


def one_block(name: str, backend: str, reps: int) -> list[dict]:
    ps = P.DEFAULT
    hidden, inter, heads, kv, hd, _ = CONFIGS[name]
    rng = np.random.default_rng(0)
    warm = MatrixProduct(rng.integers(-127, 128, size=(64, 64), dtype=np.int8), ps, None, backend=backend)
    warm.build_hint(os.urandom(16))  # the BLAS threads and the allocator, once
    rows = []
    for group, (d_in, d_out) in groups(hidden, inter, heads, kv, hd).items():
        w = rng.integers(-127, 128, size=(d_out, d_in), dtype=np.int8)
        for direction, matrix in (("fwd", w), ("bwd", np.ascontiguousarray(w.T))):
            product = MatrixProduct(matrix, ps, None, backend=backend)
            hint = product.build_hint(os.urandom(16))
            hint_s = median_time(lambda product=product: product.build_hint(os.urandom(16)), reps, warmup=0)
            batch = EncryptedBatch(ps, rng.integers(0, min(ps.primes), size=(product.d_in, ps.limbs, ps.n),
                                                    dtype=np.uint32), ps.n)
            request_s = median_time(lambda product=product, batch=batch, hint=hint: product(batch, a=hint), reps)
            rows.append({"group": group, "direction": direction, "d_in": product.d_in, "d_out": product.d_out,
                         "hint_s": hint_s, "request_s": request_s, "hint_bytes": hint.nbytes,
                         "switched_bytes": product.d_out * packed_size(ps.out_bits, ps.n)})
            del product, hint
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[*NAMES, "all"], default="all")
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per product (median), after one untimed")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    out = {}
    for key in NAMES if args.config == "all" else [args.config]:
        name = NAMES[key]
        blocks = CONFIGS[name][5]
        rows = one_block(name, args.backend, args.reps)
        print(f"\n{name}: one block ({args.backend}); whole model = x{blocks} blocks")
        print_table(rows, [("group", "group", "s"), ("direction", "dir", "s"), ("d_in", "d_in", "d"),
                           ("d_out", "d_out", "d"), ("hint_s", "hint s", ".3f"), ("request_s", "request s", ".3f"),
                           ("hint_bytes", "hint B", ",d"), ("switched_bytes", "switched B", ",d")])
        block_hint = sum(r["hint_s"] for r in rows)
        block_request = sum(r["request_s"] for r in rows)
        out[name] = {
            "blocks": blocks,
            "hint_seconds_per_owner": block_hint * blocks,
            "request_seconds_per_token_batch": block_request * blocks,
            "hint_vs_request": block_hint / block_request,
            "hint_bytes_per_owner_mod_q": sum(r["hint_bytes"] for r in rows) * blocks,
            "hint_bytes_per_owner_switched": sum(r["switched_bytes"] for r in rows) * blocks,
            "per_block": rows,
        }
        o = out[name]
        print(f"per owner: {o['hint_seconds_per_owner']:.1f} s of hints (one training step's server work: "
              f"{o['request_seconds_per_token_batch']:.1f} s; ratio {o['hint_vs_request']:.2f}), "
              f"{o['hint_bytes_per_owner_mod_q'] / 2**30:.2f} GiB mod q, "
              f"{o['hint_bytes_per_owner_switched'] / 2**30:.2f} GiB switched")
    write_json(args.json, {"backend": args.backend, "param_set": P.DEFAULT.name, "reps": args.reps, "configs": out,
                           "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

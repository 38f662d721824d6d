"""Exact or refused at every width (issue 15): the widest sums of real model configurations, the
bound, an extreme-value probe through the encrypted product, and what the exactness costs.

    python benchmarks/exactness.py [--quick] [--json PATH]

For each configuration (shapes from the models' published configs; weights are not needed) and
each fused group of a Llama block (``qkv``, ``o``, ``gate_up``, ``down``) and direction, the summed
width (``d_in`` forward, the fused ``d_out`` backward) against the bound of ``hecommon.he.exact``
(8-bit activations and weights on the default parameter set), and how many sub-sums it takes.
The probe encrypts activations at 255 for that width, multiplies by weight rows at +127 and −127
(the largest sums the quantization can produce) with the server's product as the layer would
(split into its sub-sums), switches, decrypts, adds the sub-sums, and compares with the integer
product. A width the method cannot cover is refused; the same width as one sum is refused too (it
would decode wrongly: ``tests/hecommon/test_exact.py``). ``silently_wrong`` counts probes that
decoded to a wrong integer without an error: it must be 0.

Bytes per token: one training token's requests through every block linear, forward and backward,
as the broker client sends them (27-bit packed residues up; ``b`` alone at ``out_bits`` down, the
client holding each layer's switched ``a``), with the sub-sums and, for comparison, as if every sum
were one ciphertext (which it cannot be past the bound). The server's float64 GEMMs cut their inputs
at the sub-sums' boundaries (no more multiply-adds); the GPU's int8 product multiplies the spread
matrix (k times the split layer's int8 weights and work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402
from hecommon.errors import InexactLayer  # noqa: E402
from hecommon.he import params as P  # noqa: E402
from hecommon.he.bits import packed_size  # noqa: E402
from hecommon.he.encrypt import decrypt, encrypt  # noqa: E402
from hecommon.he.evaluate import MatrixProduct  # noqa: E402
from hecommon.he.exact import exact_terms, fold, sub_sums  # noqa: E402
from hecommon.he.keys import SecretKey  # noqa: E402

#: hidden, intermediate, attention heads, KV heads, head dim, blocks (the models' config.json)
CONFIGS = {
    "SmolLM2-135M": (576, 1536, 9, 3, 64, 30),
    "Llama-3.2-1B": (2048, 8192, 32, 8, 64, 16),
    "Llama-3.1-8B": (4096, 14336, 32, 8, 128, 32),
    "Mistral-7B-v0.3": (4096, 14336, 32, 8, 128, 32),
    "Qwen2-7B": (3584, 18944, 28, 4, 128, 28),
}


def groups(hidden: int, inter: int, heads: int, kv: int, hd: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each fused group of one block."""
    return {"qkv": (hidden, heads * hd + 2 * kv * hd), "o": (heads * hd, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def probe(width: int, terms: int) -> tuple[bool, int]:
    """(exact, sub-sums) of the extreme-value product summed over ``width`` terms; ``InexactLayer`` if
    the width cannot be covered."""
    ps = P.DEFAULT
    k = sub_sums("probe", "fwd", width, terms)
    w = np.full((2, width), 127, dtype=np.int8)
    w[1] = -127
    x = np.full((2, width), 255, dtype=np.int64)
    secret = SecretKey.generate().request_secret(ps, os.urandom(16))
    seed = os.urandom(16)
    product = MatrixProduct(w, ps, seed, terms=terms, sub_sums=k)
    got = fold(decrypt(secret, product(encrypt(secret, x, seed)).switch()), k)
    return bool(np.array_equal(got, x @ w.T.astype(np.int64))), k


def bytes_per_token(shapes: dict[str, tuple[int, int]], blocks: int, terms: int, split: bool) -> float:
    ps = P.DEFAULT
    up = sum(packed_size(p.bit_length(), ps.n) for p in ps.primes)  # one input ciphertext
    down = packed_size(ps.out_bits, ps.n)  # one output ciphertext, b alone
    total = 0
    for d_in, d_out in shapes.values():
        for summed, inputs, outputs in ((d_in, d_in, d_out), (d_out, d_out, d_in)):
            k = -(-summed // terms) if split else 1
            total += inputs * up + outputs * k * down
    return blocks * total / ps.n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 and Llama-3.2-1B only")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    terms = exact_terms(P.DEFAULT, 8, 8)
    names = list(CONFIGS)[:2] if args.quick else list(CONFIGS)
    rows, configs, probed = [], {}, {}
    t0 = time.perf_counter()
    for name in names:
        hidden, inter, heads, kv, hd, blocks = CONFIGS[name]
        shapes = groups(hidden, inter, heads, kv, hd)
        for group, (d_in, d_out) in shapes.items():
            for direction, width in (("fwd", d_in), ("bwd", d_out)):
                if width not in probed:
                    try:
                        probed[width] = probe(width, terms)
                    except InexactLayer:
                        probed[width] = (None, 0)
                exact, k = probed[width]
                rows.append({"config": name, "group": group, "direction": direction, "width": width,
                             "bound": terms, "sub_sums": k, "refused": exact is None,
                             "exact": bool(exact), "silently_wrong": exact is False})
        split, unsplit = bytes_per_token(shapes, blocks, terms, True), bytes_per_token(shapes, blocks, terms, False)
        configs[name] = {"blocks": blocks, "bytes_per_token": split, "bytes_per_token_one_sum": unsplit,
                         "exactness_overhead": split / unsplit,
                         "widest_sum": max(max(s) for s in shapes.values())}
    print(f"bound: {terms} terms per exact sum (8-bit x 8-bit, {P.DEFAULT.name}); "
          f"{len(probed)} widths probed in {time.perf_counter() - t0:.0f} s")
    print_table(rows, [("config", "config", "s"), ("group", "group", "s"), ("direction", "dir", "s"),
                       ("width", "width", "d"), ("sub_sums", "sub-sums", "d"), ("exact", "exact", "")])
    print()
    print_table([{"config": n, "mb_per_token": c["bytes_per_token"] / 1e6, **c} for n, c in configs.items()],
                [("config", "config", "s"), ("widest_sum", "widest sum", "d"),
                 ("mb_per_token", "MB/token", ".3f"), ("exactness_overhead", "vs one sum", ".4f")])
    silently_wrong = sum(r["silently_wrong"] for r in rows)
    all_ok = all(r["exact"] or r["refused"] for r in rows) and silently_wrong == 0
    print(f"all_exact_or_refused: {all_ok}, silently_wrong: {silently_wrong}")
    write_json(args.json, {"all_exact_or_refused": all_ok, "silently_wrong": silently_wrong, "bound": terms,
                           "param_set": P.DEFAULT.name, "x_bits": 8, "w_bits": 8, "layers": rows,
                           "configs": configs, "machine": machine()})
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

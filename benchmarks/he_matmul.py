"""Benchmark of the server's HE product against plaintext GEMM and TenSEAL (issue 2).

    python benchmarks/he_matmul.py [--quick] [--json PATH] [--backend numpy|cupy]

For each layer shape (SmolLM2-135M and Llama-3.2-1B), N tokens: the numpy float32 plaintext
GEMM, our encrypted product (per request; the hint ``W·A`` is precomputed once per layer and
reported apart), the aggregator's modulus switch, the client's encryption and decryption, and
the encoded message sizes: replies with ``a`` and ``b``, and with ``b`` alone (the client holds
the layer's hint, the default).
In the same run: TenSEAL's CKKSTensor product (tokens batched in slots) on a reduced shape.
On a GPU (``--backend cupy``) also torch's bf16 GEMM of the same shape.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, median_time, print_table, write_json  # noqa: E402
from hecommon import wire  # noqa: E402
from hecommon.he import params as P  # noqa: E402
from hecommon.he.encrypt import ClientA, decrypt, encrypt  # noqa: E402
from hecommon.he.evaluate import MatrixProduct  # noqa: E402
from hecommon.he.keys import SecretKey  # noqa: E402

SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LLAMA_1B = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
REFERENCE = (2048, 2048)  # the shape of ratio_vs_plain_f32


def bench_shape(d_in: int, d_out: int, ps: P.ParamSet, reps: int, backend: str) -> dict:
    gen = np.random.default_rng(d_in + d_out)  # benchmark data, not key material
    n = ps.n
    w = gen.integers(-127, 128, size=(d_out, d_in)).astype(np.int8)
    x = gen.integers(0, 256, size=(n, d_in))
    xf = gen.standard_normal((n, d_in), dtype=np.float32)
    wf = gen.standard_normal((d_out, d_in), dtype=np.float32)
    seed = os.urandom(16)
    s = SecretKey.generate().request_secret(ps, os.urandom(16))

    t_plain = median_time(lambda: xf @ wf.T, reps)
    layer = MatrixProduct(w, ps, seed, backend=backend)
    ct = encrypt(s, x, seed)
    t_he = median_time(lambda: layer(ct), reps)
    partial = layer(ct)
    t_switch = median_time(partial.switch, reps)
    result = partial.switch()
    t_enc = median_time(lambda: encrypt(s, x, seed), max(1, reps // 2))
    t_dec = median_time(lambda: decrypt(s, result), max(1, reps // 2))
    assert np.array_equal(decrypt(s, result), np.rint(x.astype(np.float64) @ w.T.astype(np.float64)))
    up = sum(len(wire.encode_request(c)) for c in wire.split(
        wire.EncryptedRequest(rid=b"r" * 16, layer="bench", direction="fwd", batch=ct, owner=b"o" * 16)))
    down = sum(len(wire.encode_reply(c)) for c in wire.split(
        wire.EncryptedReply(rid=b"r" * 16, layer="bench", direction="fwd", result=result)))
    b_only = partial.switch(ClientA.HINT)  # the client holds the layer's hint: b alone comes back
    assert np.array_equal(decrypt(s, b_only, hint=partial.a), decrypt(s, result))
    down_b = sum(len(wire.encode_reply(c)) for c in wire.split(
        wire.EncryptedReply(rid=b"r" * 16, layer="bench", direction="fwd", result=b_only)))
    t_dec_b = median_time(lambda: decrypt(s, b_only, hint=partial.a), max(1, reps // 2))
    row = {
        "shape": f"{d_in}->{d_out}",
        "d_in": d_in,
        "d_out": d_out,
        "tokens": n,
        "plain_f32_s": t_plain,
        "he_product_s": t_he,
        "hint_s": layer.hint_seconds,
        "switch_s": t_switch,
        "ratio_vs_plain_f32": t_he / t_plain,
        "he_mac_per_s": n * d_in * d_out / t_he,
        "encrypt_s": t_enc,
        "decrypt_s": t_dec,
        "client_us_per_value": 1e6 * (t_enc + t_dec) / (n * d_in + n * d_out),
        "bytes_per_value_up": up / (n * d_in),
        "bytes_per_value_down": down / (n * d_out),
        "bytes_per_value_down_hint_on_client": down_b / (n * d_out),
        "decrypt_hint_on_client_s": t_dec_b,
    }
    if backend == "cupy":
        row.update(gpu_row(layer, ct, n, d_in, d_out, reps, w, seed, ps))
    return row


def gpu_row(layer: MatrixProduct, ct, n: int, d_in: int, d_out: int, reps: int, w, seed: bytes, ps) -> dict:  # pragma: no cover
    """On the device: torch's bf16 GEMM against our product, on-device compute alone (the input
    already in device memory, as the bf16 operands are) for the int8 and the float64 GEMMs, and
    end to end (host input to host output, what a request costs the evaluator)."""
    import cupy
    import torch

    a = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)

    def bf16() -> None:
        a @ b.T
        torch.cuda.synchronize()

    def timed(fn) -> float:
        def run() -> None:
            fn()
            cupy.cuda.Device().synchronize()
        return median_time(run, max(reps, 10), warmup=2)

    row = {"gpu_bf16_s": median_time(bf16, max(reps, 10), warmup=2), "gpu_gemm": layer.gemm}
    b_dev = cupy.asarray(ct.b)
    row["gpu_he_s"] = timed(lambda: layer.product_on_device(b_dev))
    row["gpu_he_end_to_end_s"] = timed(lambda: layer(ct))
    if layer.gemm == "int8":
        f64 = MatrixProduct(w, ps, seed, backend="cupy", gemm="float64")
        row["gpu_he_float64_s"] = timed(lambda: f64.product_on_device(b_dev))
        row["gpu_ratio_float64_vs_bf16"] = row["gpu_he_float64_s"] / row["gpu_bf16_s"]
    row["gpu_ratio_vs_bf16"] = row["gpu_he_s"] / row["gpu_bf16_s"]
    row["gpu_ratio_end_to_end_vs_bf16"] = row["gpu_he_end_to_end_s"] / row["gpu_bf16_s"]
    return row


def bench_tenseal(reps: int) -> dict:
    """TenSEAL CKKSTensor: tokens batched in the 4096 slots, a plain weight matrix."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    tokens, d_in, d_out = 4096, 64, 16
    gen = np.random.default_rng(7)
    x = gen.standard_normal((tokens, d_in))
    w = gen.standard_normal((d_in, d_out))
    enc = ts.ckks_tensor(ctx, x.tolist(), batch=True).reshape([1, d_in])
    t = median_time(lambda: enc.mm(w.tolist()), reps, warmup=0)
    err = np.abs(np.array(enc.mm(w.tolist()).decrypt().tolist()).reshape(tokens, d_out) - x @ w).max()
    return {"shape": f"{d_in}->{d_out}", "tokens": tokens, "seconds": t, "mac_per_s": tokens * d_in * d_out / t, "max_abs_error": err}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--pset", default=P.DEFAULT.name, choices=sorted(P.REGISTRY))
    args = ap.parse_args(argv)
    ps = P.get(args.pset)
    reps = 2 if args.quick else 5
    shapes = [SMOLLM2[0], SMOLLM2[2], REFERENCE] if args.quick else SMOLLM2 + LLAMA_1B

    rows = []
    for d_in, d_out in shapes:
        print(f"  {d_in}->{d_out} ...", flush=True)
        rows.append(bench_shape(d_in, d_out, ps, reps, args.backend))
    print(f"\nHE product, {ps.name}, N = {ps.n} tokens per request, backend {args.backend}")
    print_table(rows, [
        ("shape", "shape", "s"), ("plain_f32_s", "f32 GEMM s", ".4f"), ("he_product_s", "HE s", ".4f"),
        ("ratio_vs_plain_f32", "ratio", ".2f"), ("hint_s", "hint s", ".3f"), ("switch_s", "switch s", ".3f"),
        ("client_us_per_value", "client us/v", ".3f"), ("bytes_per_value_up", "B/v up", ".3f"),
        ("bytes_per_value_down", "B/v down", ".3f"), ("bytes_per_value_down_hint_on_client", "B/v dn b", ".3f"),
        ("gpu_bf16_s", "bf16 s", ".5f"), ("gpu_he_s", "GPU HE s", ".5f"), ("gpu_ratio_vs_bf16", "GPU/bf16", ".2f"),
        ("gpu_ratio_float64_vs_bf16", "f64/bf16", ".2f"), ("gpu_ratio_end_to_end_vs_bf16", "e2e/bf16", ".2f"),
    ])
    tenseal = bench_tenseal(1 if args.quick else 3)
    ref = next(r for r in rows if (r["d_in"], r["d_out"]) == REFERENCE)
    summary = {
        "ratio_vs_plain_f32": ref["ratio_vs_plain_f32"],
        "speedup_vs_tenseal_per_mac": ref["he_mac_per_s"] / tenseal["mac_per_s"],
        "client_us_per_value": ref["client_us_per_value"],
        "bytes_per_value_up": ref["bytes_per_value_up"],
        "bytes_per_value_down": ref["bytes_per_value_down"],
        "bytes_per_value_down_hint_on_client": ref["bytes_per_value_down_hint_on_client"],
    }
    for key in ("gpu_ratio_vs_bf16", "gpu_ratio_float64_vs_bf16", "gpu_ratio_end_to_end_vs_bf16"):
        if key in ref:
            summary[key] = ref[key]
    print(f"\nTenSEAL CKKSTensor {tenseal['shape']} x {tenseal['tokens']} tokens: "
          f"{tenseal['mac_per_s'] / 1e6:.2f} MMAC/s; ours at 2048x2048: {ref['he_mac_per_s'] / 1e6:.0f} MMAC/s")
    for key, value in summary.items():
        print(f"  {key:28s} {value:10.3f}")
    write_json(args.json, {"summary": summary, **summary, "shapes": rows, "tenseal": tenseal,
                           "params": ps.describe(), "backend": args.backend, "machine": machine(),
                           "quick": args.quick})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

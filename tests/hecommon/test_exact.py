"""Exact or refused at every width (issue 15, DESIGN §3): the widest exact sum, its boundary in both
directions for a plain and a fused layer, sub-sums beyond it, and refusals that name the layer."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hecommon.errors import InexactLayer
from hecommon.he import params as P
from hecommon.he.encrypt import decrypt, encrypt
from hecommon.he.evaluate import MatrixProduct
from hecommon.he.exact import MAX_SUB_SUMS, exact_terms, fold, sub_sums
from hecommon.he.keys import SecretKey

PS = P.DEFAULT
X_MAX, W_MAX = 255, 127


def _secret():
    return SecretKey.generate().request_secret(PS, os.urandom(16))


def _extreme_sum(matrix: np.ndarray, tokens: int = 3, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(decrypted, expected) for activations at 255 times ``matrix`` (d_out, width): the largest
    sums the quantization can produce, through encrypt → the server's product → switch → decrypt."""
    width = matrix.shape[1]
    x = np.full((tokens, width), X_MAX, dtype=np.int64)
    s, seed = _secret(), os.urandom(16)
    terms = exact_terms(PS)
    k = sub_sums("probe", "fwd", width, terms) if k is None else k
    product = MatrixProduct(matrix, PS, seed, terms=terms, sub_sums=k)
    got = fold(decrypt(s, product(encrypt(s, x, seed)).switch()), k)
    return got, x @ matrix.T.astype(np.int64)


def test_the_widest_exact_sum_comes_from_the_bits_and_the_parameter_set():
    # 8 x 8 bits: the message bound allows 16,577 terms, the noise budget of out_bits 2^14
    assert PS.max_message // (X_MAX * W_MAX) == 16_577
    assert exact_terms(PS, 8, 8) == P.MAX_GEMM_TERMS == 16_384
    assert exact_terms(PS, 12, 8) == PS.max_message // (4095 * 127) == 1_032
    assert exact_terms(P.N4096, 8, 8) == 16_384  # out_bits of every set are chosen for 2^14 terms
    assert sub_sums("l", "fwd", 16_384, 16_384) == 1 and sub_sums("l", "bwd", 16_385, 16_384) == 2
    assert sub_sums("l", "bwd", 28_672, 16_384) == 2 and sub_sums("l", "fwd", 18_944, 16_384) == 2


def test_a_sum_past_the_bound_is_refused_naming_the_layer_its_width_and_the_bound():
    with pytest.raises(InexactLayer, match=r"layer 3\.gate_up bwd: a sum of 200000 terms .*bound is 16384"):
        sub_sums("3.gate_up", "bwd", 200_000, exact_terms(PS))
    with pytest.raises(InexactLayer, match="16640 terms"):  # the d_in = 16,640, unsplit
        MatrixProduct(np.full((1, 16_640), W_MAX, dtype=np.int8), PS, os.urandom(16))
    with pytest.raises(InexactLayer):  # more sub-sums than allowed
        sub_sums("l", "fwd", exact_terms(PS) * MAX_SUB_SUMS + 1, exact_terms(PS))


@pytest.mark.parametrize("width", [16_384, 16_385, 16_640])
def test_plain_layer_forward_at_and_past_the_bound_is_exact(width):
    """Forward of a plain layer: W (d_out, width); one row at +127, one at -127. 16,640 is the issue's
    case (decrypted −534,855,444 for 538,886,400 before), exact through two sub-sums."""
    w = np.full((2, width), W_MAX, dtype=np.int8)
    w[1] = -W_MAX
    got, expected = _extreme_sum(w)
    np.testing.assert_array_equal(got, expected)
    assert int(expected[0, 0]) == X_MAX * W_MAX * width


@pytest.mark.parametrize("members", [(8_192, 8_192), (8_192, 8_193)])
def test_fused_layer_backward_at_and_past_the_bound_is_exact(members):
    """Backward of a fused layer sums over every member's outputs: W = [Wg; Wu], dX = dY·W sums
    over 8,192 + 8,192 = 16,384 (at the bound) or 8,192 + 8,193 (one past). This is the server's
    product in the backward orientation (Wᵀ); the whole fused path, evaluator and client, is
    ``test_a_split_layer_trains_through_the_client_bit_for_bit``."""
    width = sum(members)
    fused = np.full((width, 2), W_MAX, dtype=np.int8)  # (d_out = both members, d_in = 2)
    fused[:, 1] = -W_MAX
    got, expected = _extreme_sum(np.ascontiguousarray(fused.T))  # the backward product: Wᵀ
    np.testing.assert_array_equal(got, expected)


def test_without_sub_sums_the_sum_would_wrap_silently():
    """Why the refusal exists: the same product at 16,640 terms computed as one sum decodes to the
    wrong integer with no error (the bound check is bypassed here on purpose)."""
    width = 16_640
    w = np.full((1, width), W_MAX, dtype=np.int8)
    x = np.full((2, width), X_MAX, dtype=np.int64)
    s, seed = _secret(), os.urandom(16)
    product = MatrixProduct(w, PS, seed, terms=width)  # a bound that is not the real one
    got = decrypt(s, product(encrypt(s, x, seed)).switch())
    assert int(got[0, 0]) != X_MAX * W_MAX * width == 538_886_400


def test_row_shards_of_a_split_layer_sum_to_the_sub_sums():
    """A forward layer cut across evaluators: each shard spreads its inputs over the layer's
    sub-sums by their global index, so the shards' partials add up to the whole split product."""
    width, cut = 16_500, 9_000
    rng = np.random.default_rng(5)
    w = rng.integers(-W_MAX, W_MAX + 1, size=(3, width)).astype(np.int8)
    x = rng.integers(0, X_MAX + 1, size=(4, width))
    s, seed = _secret(), os.urandom(16)
    terms = exact_terms(PS)
    ct = encrypt(s, x, seed)
    from hecommon.he.encrypt import EncryptedBatch

    left = MatrixProduct(w[:, :cut], PS, seed, 0, terms=terms, sub_sums=2)(EncryptedBatch(PS, ct.b[:cut], 4))
    right = MatrixProduct(w[:, cut:], PS, seed, cut, terms=terms, sub_sums=2)(EncryptedBatch(PS, ct.b[cut:], 4))
    got = decrypt(s, (left + right).switch())
    np.testing.assert_array_equal(got[:, 0::2], x[:, :terms] @ w[:, :terms].T.astype(np.int64))
    np.testing.assert_array_equal(fold(got, 2), x @ w.T.astype(np.int64))


#: hidden, intermediate, attention heads, KV heads, head dim (the models' published config.json)
SEVEN_EIGHT_B = {
    "Llama-3.1-8B": (4096, 14336, 32, 8, 128),
    "Mistral-7B-v0.3": (4096, 14336, 32, 8, 128),
    "Qwen2-7B": (3584, 18944, 28, 4, 128),
}


def _entry(name: str, d_in: int, d_out: int, terms: int):
    from hecommon.wire import LayerEntry

    return LayerEntry(name, 0, d_in, d_out, ((name, d_out),), bytes(16), bytes(16), np.ones(d_out),
                      np.zeros(d_out, np.int64), np.zeros(d_in, np.int64), terms)


@pytest.mark.parametrize("config", list(SEVEN_EIGHT_B))
def test_every_layer_of_the_7_8b_configurations_is_exact_through_its_sub_sums(config):
    """Every fused group of a block at the real shapes: one exact sum, or exact sub-sums, both
    directions. The widest sums are split: Llama/Mistral gate_up backward (28,672 terms) in 2,
    Qwen2's down forward (18,944) in 2 and gate_up backward (37,888) in 3."""
    hidden, inter, heads, kv, hd = SEVEN_EIGHT_B[config]
    terms = exact_terms(PS)
    layers = {"qkv": (hidden, heads * hd + 2 * kv * hd), "o": (heads * hd, hidden),
              "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}
    sums = {(g, d): _entry(g, d_in, d_out, terms).sums(d) for g, (d_in, d_out) in layers.items()
            for d in ("fwd", "bwd")}
    expected_split = {("gate_up", "bwd"): -(-2 * inter // terms), ("down", "fwd"): -(-inter // terms)}
    for key, k in sums.items():
        assert k == expected_split.get(key, 1), key
        assert k * terms >= (layers[key[0]][0] if key[1] == "fwd" else layers[key[0]][1])


@pytest.mark.slow
@pytest.mark.parametrize("width", [14_336, 18_944, 28_672, 37_888])
def test_the_7_8b_configurations_widest_sums_are_exact_at_their_extremes(width):
    """The probe of benchmarks/exactness.py at the widest sums of Llama-3.1-8B / Mistral-7B (down
    forward 14,336, gate_up backward 28,672) and Qwen2-7B (18,944 and 37,888)."""
    w = np.full((2, width), W_MAX, dtype=np.int8)
    w[1] = -W_MAX
    got, expected = _extreme_sum(w, tokens=2)
    np.testing.assert_array_equal(got, expected)


def test_a_layer_that_cannot_be_made_exact_is_refused_before_anything_is_encrypted():
    """Wide quantization (12-bit activations: 1,032 terms per exact sum) and an MLP of 9,000: its
    gate_up backward sums 18,000 terms, 18 sub-sums, more than allowed. The manifest refuses it,
    naming the layer, its width and the bound; so does a client shown a manifest with a wider bound
    than its own."""
    import dataclasses

    from hecommon.model import discover_groups, tiny_llama
    from helora_encoder.handler import build_manifest, quantize_groups

    model, _ = tiny_llama(0, hidden_size=16, intermediate_size=9_000, num_attention_heads=2,
                          num_key_value_heads=1, num_hidden_layers=1)
    groups = discover_groups(model)
    qweights = quantize_groups(model, groups)
    with pytest.raises(InexactLayer, match=r"layer 0\.gate_up bwd: a sum of 18000 terms .*bound is 1032"):
        build_manifest(model, groups, qweights, PS, x_bits=12)
    manifest = build_manifest(model, groups, qweights, PS, x_bits=8)
    assert {e.exact_terms for e in manifest.layers} == {16_384}
    with pytest.raises(InexactLayer, match="0.qkv: the manifest sums up to 16384 terms"):
        dataclasses.replace(manifest, x_bits=12)  # bounds of 8-bit inputs, 12-bit inputs claimed
    from hecommon import wire

    data = wire.encode_manifest(manifest)  # the same refusal when a client or an evaluator decodes one
    assert wire.decode_manifest(data).layers[0].exact_terms == 16_384
    assert data.count(b"\xa6x_bits\x08") == 1  # msgpack: the key "x_bits", then 8
    with pytest.raises(InexactLayer, match="decode exactly only up to 1032"):
        wire.decode_manifest(data.replace(b"\xa6x_bits\x08", b"\xa6x_bits\x0c"))


def test_a_split_product_in_pieces_adds_up_to_the_whole_and_holds_no_more_weights(rng):
    """A request in parts (the evaluator multiplies each alone: ``piece``) whose parts straddle
    the sub-sums' boundary; the float64 weights are held once, not once per sub-sum."""
    from hecommon.he.encrypt import EncryptedBatch

    width, terms = 16_500, exact_terms(PS)
    w = rng.integers(-W_MAX, W_MAX + 1, size=(3, width)).astype(np.int8)
    split = MatrixProduct(w, PS, None, terms=terms, sub_sums=2)
    assert split.d_out == 6 and split.held_bytes == w.size * 8  # float64 weights, once
    b = rng.integers(0, min(PS.primes), size=(width, PS.limbs, PS.n), dtype=np.uint32)
    whole = split.product_on_device(b)
    primes = np.asarray(PS.primes, dtype=np.uint64)[:, None]
    total = np.zeros(whole.shape, np.uint64)
    for lo, hi in ((16_000, 16_500), (0, 7_000), (7_000, 16_000)):
        total = (total + split.piece(b[lo:hi], lo)) % primes
    np.testing.assert_array_equal(total, whole)
    blocks = list(split.row_blocks(EncryptedBatch(PS, b, PS.n), [(0, 1), (1, 4), (4, 6)]))
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


@pytest.mark.parametrize("shards", [1, 3])
def test_a_split_layer_trains_through_the_client_bit_for_bit(rng, shards):
    """End to end: a model whose gate_up backward sums 2 × 8,400 = 16,800 terms (past the message
    bound: one sum would wrap). The client decrypts both sub-sums and adds them; the result equals
    the clear quantized product, at the extremes (every gradient at 255, every weight at ±127); with
    3 evaluators the backward outputs are column shards, each its outputs once per sub-sum."""
    import torch
    from hecommon.model import discover_groups, tiny_llama
    from helora_encoder.handler import quantize_groups
    from helora_orchestrator.backend import QuantizedBackend
    from helora_orchestrator.embedded import make_encrypted_backend

    model, _ = tiny_llama(0, hidden_size=16, intermediate_size=8_400, num_attention_heads=2,
                          num_key_value_heads=1, num_hidden_layers=1)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight.fill_(0.5)
        mlp.up_proj.weight.fill_(0.5)
        mlp.gate_proj.weight[:, 0] = -0.5
    groups = discover_groups(model)
    g = next(x for x in groups if x.name.endswith("gate_up"))
    backend = make_encrypted_backend(model, groups, shards=shards)
    entry = backend.layers[g.name]
    assert entry.sums("bwd") == 2 and entry.out_rows("bwd") == 2 * g.in_features
    clear = QuantizedBackend(quantize_groups(model, groups))
    dy = np.ones((3, g.total_out), dtype=np.float32)  # quantizes to 255 everywhere
    got = backend.backward(g.name, dy)
    np.testing.assert_array_equal(got, clear.backward(g.name, dy))
    x = rng.standard_normal((4, g.in_features)).astype(np.float32)
    np.testing.assert_array_equal(backend.forward(g.name, x), clear.forward(g.name, x))

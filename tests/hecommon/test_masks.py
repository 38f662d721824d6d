"""A session's a·s products (hecommon.he.masks): the ciphertexts and messages of encrypt/decrypt, bit
for bit, from products computed once for a window of coefficients."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hecommon.he import params as P
from hecommon.he.bits import PackedRows
from hecommon.he.encrypt import EncryptedResult, _encrypt_with, decrypt
from hecommon.he.keys import SecretKey
from hecommon.he.masks import decrypt_masked, encrypt_masked, input_masks, output_masks
from hecommon.he.sampling import sample_noise

PSETS = [P.N2048, P.N4096]


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
@pytest.mark.parametrize(("col0", "t"), [(0, 1), (9, 7), (1000, 64), (-1, 1)])
def test_masked_encryption_is_encrypt_bit_for_bit(ps, col0, t, rng):
    col0 = ps.n - t if col0 < 0 else col0
    s, seed = SecretKey.generate().request_secret(ps, os.urandom(16)), os.urandom(16)
    d, window = 30, (max(0, col0 - 3), min(ps.n, col0 + t + 5))  # the window holds the tokens' columns
    mask = input_masks(s, seed, d, window[0], window[1] - window[0])
    m = rng.integers(-ps.max_message, ps.max_message + 1, size=(t, d))
    m[0, :2] = (-ps.max_message, ps.max_message)
    noise = sample_noise(ps, (d, t))
    got = encrypt_masked(ps, m, mask[:, :, col0 - window[0] : col0 - window[0] + t], col0, noise)
    want = _encrypt_with(s, m, seed, noise[:, None, :], col0=col0)
    assert (got.n_tokens, got.col0) == (t, col0)
    np.testing.assert_array_equal(got.b, want.b)
    with pytest.raises(ValueError, match="exceed"):
        encrypt_masked(ps, m + ps.max_message, mask[:, :, col0 - window[0] : col0 - window[0] + t], col0)


@pytest.mark.parametrize("ps", PSETS, ids=lambda p: p.name)
def test_masked_decryption_is_decrypt_bit_for_bit(ps, rng):
    """Results with a sent (packed or not), with a held a, and from the hint (two limbs), decoded
    from the window's masks: decrypt's messages, at the window's start, middle and end."""
    s = SecretKey.generate().request_secret(ps, os.urandom(16))
    d, top = 20, 1 << ps.out_bits
    a = rng.integers(0, top, size=(d, ps.n), dtype=np.uint64)
    a[0, :3] = (0, top // 2 - 1, top // 2)
    w0, w1 = ps.n - 70, ps.n
    for col0, t in ((w0, 1), (w0 + 30, 9), (w1 - 5, 5)):
        b = rng.integers(0, top, size=(d, t), dtype=np.uint64)
        cases = [(EncryptedResult(ps, a, b, t, col0=col0), None),
                 (EncryptedResult(ps, PackedRows.pack(a, ps.out_bits), PackedRows.pack(b, ps.out_bits), t,
                                  col0=col0), None),
                 (EncryptedResult(ps, None, b, t, ps.out_bits, col0).with_held_a(a), None)]
        if ps.limbs == 2:
            hint = np.stack([rng.integers(0, p, size=(d, ps.n)) for p in ps.primes], axis=1).astype(np.uint32)
            hint[0, :, 0] = np.array(ps.primes) - 1
            bh = b >> np.uint64(ps.out_bits - ps.hint_out_bits)
            cases.append((EncryptedResult(ps, None, bh, t, ps.hint_out_bits, col0), hint))
        for result, hint in cases:
            masks = output_masks(s, result, hint, (w0, w1))
            out = np.full((t, d), 5, dtype=np.int64)
            decrypt_masked(result, masks[:, col0 - w0 : col0 - w0 + t], out)
            np.testing.assert_array_equal(out, decrypt(s, result, hint=hint))
            decrypt_masked(result, masks[:, col0 - w0 : col0 - w0 + t], out, add=True)
            np.testing.assert_array_equal(out, 2 * decrypt(s, result, hint=hint))
    with pytest.raises(ValueError, match="masks"):
        decrypt_masked(result, masks[:, :1], out)

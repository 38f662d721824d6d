"""The compiled loops behind ``hecommon.he.kernels`` (numba; imported on first use only).

Reductions mod p (``_mod``) use a float64 quotient estimate and an exact int64 correction: every
operand is an integer well below 2^63 and the quotient far below 2^50, so the estimate is off by one
at most and one correction each way makes the result exact.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_jit = njit(nogil=True, cache=True, boundscheck=False)


@_jit
def _mod(y, p, inv_p):  # pragma: no cover - compiled
    """``y mod p`` in [0, p) for an int64 ``y`` with ``|y/p|`` far below 2^50: the float64 quotient
    estimate, whose relative error is a few 2^-53, is then off by one at most, and one correction
    each way, without a loop or a branch, makes it exact (the loops that call it vectorize)."""
    q = np.int64(np.floor(np.float64(y) * inv_p))
    r = y - q * p
    r = r + p if r < 0 else r
    return r - p if r >= p else r


@_jit
def _decode(x, modulus, qd):  # pragma: no cover - compiled
    """The message of ``x = b + a·s`` (a float64 integer below 2^53) mod ``modulus`` (a power of 2):
    reduced, centered in [-1/2, 1/2) of the modulus, times ``qd = q/Δ``, rounded
    (``encrypt._decode``). Divided by multiplying with ``1/modulus``, which is exact for a power of
    2 (the same floats as numpy's division, without the divider's latency)."""
    inv = 1.0 / modulus
    x -= np.floor(x * inv) * modulus
    frac = x * inv
    frac = frac - 1.0 if frac >= 0.5 else frac
    return np.int64(np.rint(frac * qd))


@_jit
def _rejected(words, mask, p):  # pragma: no cover - compiled
    """How many of ``words`` (a 1-D view), masked, are at or above ``p`` (a loop that vectorizes)."""
    count = 0
    for k in range(words.shape[0]):
        count += (words[k] & mask) >= p
    return count


@_jit
def _centered(w, mask, p, half_p):  # pragma: no cover - compiled
    """A keystream word, masked (below ``p``), as a residue centered mod ``p`` (a float64)."""
    r = np.int64(w & mask)
    return np.float64(r - p if r > half_p else r)


@_jit
def _centered_into(words, mask, p, out):  # pragma: no cover - compiled
    """``words`` (a 1-D view, each masked below ``p``) as residues centered mod ``p``, into ``out``."""
    half_p = p // 2
    for k in range(words.shape[0]):
        out[k] = _centered(words[k], mask, p, half_p)


@_jit
def fold_words(words, mask, p, n, twist, out):  # pragma: no cover - compiled
    """Rows of uniform residues mod ``p`` from keystream words (masked, rejected at or above
    ``p``: ``sampling.expand_a``'s rule), centered, folded and twisted into ``out`` (rows, N/2)
    complex. Residues already below ``p`` pass with ``mask`` all ones. False if a row ran out.

    A word is rejected rarely (3·10^-4 and 8·10^-4 for the default set's two primes, so 54 % and
    20 % of its rows of 2048 have none among their first N words; fewer at N = 4096): a row is
    counted first, and one without a rejection folds its first N words directly; the others are
    copied run by run between their rejected words (found 64 words at a time), then folded. The
    loops over words vectorize; the one kept-index walk per word that this replaces did not
    (1.06 → 0.46 ns a coefficient here, the first prime's keystream)."""
    half = n // 2
    half_p = p // 2
    rows, width = words.shape
    if width < n:  # fewer words than residues: every row runs out
        return rows == 0
    kept = np.empty(n, dtype=np.float64)
    for r in range(rows):
        row = words[r]
        if _rejected(row[:n], mask, p) == 0:
            for k in range(half):
                out[r, k] = complex(_centered(row[k], mask, p, half_p),
                                    _centered(row[k + half], mask, p, half_p)) * twist[k]
            continue
        j = 0  # residues kept
        k = 0  # the next word
        while j < n:
            e = k  # the next rejected word at or after k (width: none)
            while e < width:
                end = min(e + 64, width)
                if _rejected(row[e:end], mask, p):
                    while (row[e] & mask) < p:
                        e += 1
                    break
                e = end
            take = min(e - k, n - j)
            _centered_into(row[k:k + take], mask, p, kept[j:j + take])
            j += take
            if j < n and e >= width:
                return False
            k = e + 1
        for k in range(half):
            out[r, k] = complex(kept[k], kept[k + half]) * twist[k]
    return True


@_jit
def _halves(col0, t, half):  # pragma: no cover - compiled
    """How a window of coefficients ``col0 … col0+T-1`` lies across a folded row of N/2 complex
    values: coefficient j is the real part of column j (j < N/2) or the imaginary part of column
    j − N/2. Returns ``cut`` (the window's first ``cut`` coefficients are real parts, of columns
    ``col0 … col0+cut-1``) and the columns ``w0 … w1-1`` whose imaginary parts are the rest."""
    cut = max(min(col0 + t, half) - col0, 0)
    return cut, max(col0, half) - half, col0 + t - half


@_jit
def _untwisted(z, u, imag):  # pragma: no cover - compiled
    """The real part of ``z·u`` or, with ``imag``, its imaginary part: the coefficient a folded,
    inverse-transformed value holds (``u``: its untwist)."""
    return z.real * u.imag + z.imag * u.real if imag else z.real * u.real - z.imag * u.imag


@_jit
def _encrypt_row(z, u, imag, m, dm, noise, p, inv_p, out):  # pragma: no cover - compiled
    """``finish_encrypt``'s loop over one half of a row's window (1-D views, the same length):
    coefficients from the real parts of ``z · u`` or, with ``imag``, from their imaginary parts."""
    narrow = m.itemsize <= 4  # |m| < 2^32: |m·dm| < 2^59
    for c in range(out.shape[0]):
        y = noise[c] - np.int64(np.rint(_untwisted(z[c], u[c], imag)))  # |y| < 2^38
        # m mod p first, as numpy's path, where m·dm may pass 2^63 (not below 2^32: quantized values)
        y += (np.int64(m[c]) if narrow else _mod(np.int64(m[c]), p, inv_p)) * dm
        out[c] = np.uint32(_mod(y, p, inv_p))


@_jit
def finish_encrypt(spec, untwist, m, dm, noise, p, col0, out, limb):  # pragma: no cover - compiled
    """``b = Δ·m + e - a·s mod p`` for coefficients ``col0 … col0+T-1`` from the inverse transform
    of ``a·s`` (``spec``, rows × N/2, not yet untwisted): ``m`` (rows, T) int64 messages,
    ``dm = Δ mod p``, ``noise`` (rows, L', T: the last of its L' limbs serves the limbs past it),
    into limb ``limb`` of ``out`` (rows, L, T). One loop over each half of the window
    (``_halves``), on 1-D views of the row (contiguous where the arrays are: then both loops
    vectorize)."""
    half = spec.shape[1]
    t = m.shape[1]
    inv_p = 1.0 / p
    e = min(limb, noise.shape[1] - 1)
    cut, w0, w1 = _halves(col0, t, half)
    for r in range(spec.shape[0]):
        if cut:
            _encrypt_row(spec[r, col0:col0 + cut], untwist[col0:col0 + cut], False, m[r, :cut], dm,
                         noise[r, e, :cut], p, inv_p, out[r, limb, :cut])
        if cut < t:
            _encrypt_row(spec[r, w0:w1], untwist[w0:w1], True, m[r, cut:], dm, noise[r, e, cut:], p, inv_p,
                         out[r, limb, cut:])


@_jit
def times_spectrum(x, s):  # pragma: no cover - compiled
    """In place: each row of ``x`` (rows, N/2) complex times ``s`` (N/2,), value by value (numpy's
    complex product, which does not vectorize; this loop does)."""
    for r in range(x.shape[0]):
        row = x[r]
        for k in range(row.shape[0]):
            row[k] = row[k] * s[k]


@_jit
def fold_ternary(raw, n, twist, out):  # pragma: no cover - compiled
    """Rows of ternary coefficients from keystream bytes (255 rejected, the rest mod 3, minus 1:
    ``keys.RowSecrets``), folded and twisted into ``out`` (rows, N/2) complex. False if a row ran
    out of bytes."""
    half = n // 2
    rows, width = raw.shape
    t = np.empty(n, dtype=np.float64)
    for r in range(rows):
        j = 0
        for k in range(width):
            v = raw[r, k]
            if v != 255:
                t[j] = np.float64(np.int64(v % 3) - 1)
                j += 1
                if j == n:
                    break
        if j < n:
            return False
        for k in range(half):
            out[r, k] = complex(t[k], t[k + half]) * twist[k]
    return True


@_jit
def fixed_point(x, scale, limit, out):  # pragma: no cover - compiled
    """``out = rint(x·scale)`` (1-D float64 into int64) where ``|x·scale| ≤ limit``, 0 elsewhere;
    False if any value is past the limit or not finite (``fedsum.encode_fixed``). Without
    branches, so that it vectorizes."""
    bad = False
    for i in range(x.size):
        y = x[i] * scale
        ok = abs(y) <= limit  # False for a NaN
        bad |= not ok
        out[i] = np.int64(np.rint(y if ok else 0.0))
    return not bad


@_jit
def fold_public(a, q_bits, split, scale, twist, hi, lo):  # pragma: no cover - compiled
    """``fedsum._PublicA``'s halves before their forward transforms: rows of ``a`` (uint64 residues
    mod ``2^q_bits``) centered, split into ``a_hi·2^split + a_lo`` (``a_hi = rint(a / 2^split)``),
    each half times ``scale`` (a power of 2), folded and twisted into ``hi`` and ``lo`` (rows, N/2)
    complex. The twist's complex products may round differently from numpy's in the last bits;
    the products ``a·s`` they lead to are exact on both paths (``ring``'s bound; tests)."""
    rows, n = a.shape
    half = n // 2
    top = np.uint64(1) << np.uint64(q_bits - 1)
    wrap = np.float64(2.0**q_bits)
    unit = np.float64(2.0**split)
    for r in range(rows):
        for k in range(half):
            x0 = np.float64(a[r, k]) - (wrap if a[r, k] >= top else 0.0)
            x1 = np.float64(a[r, k + half]) - (wrap if a[r, k + half] >= top else 0.0)
            h0 = np.rint(x0 / unit)
            h1 = np.rint(x1 / unit)
            hi[r, k] = complex(h0 * scale, h1 * scale) * twist[k]
            lo[r, k] = complex((x0 - h0 * unit) * scale, (x1 - h1 * unit) * scale) * twist[k]


@_jit
def group_spectra(spec, a_hi, a_lo, first, hi, lo):  # pragma: no cover - compiled
    """Row r of ``hi`` and ``lo`` (rows, N/2), the block's row ``first + r``: ``spec[j]`` times
    ``a_hi[t]`` and ``a_lo[t]``, ``j = (first + r) // G − first // G``, ``t = (first + r) % G``
    (G = ``a_hi.shape[0]``; ``fedsum._PublicA.times``)."""
    g = a_hi.shape[0]
    for r in range(hi.shape[0]):
        j = (first + r) // g - first // g
        t = (first + r) % g
        for k in range(hi.shape[1]):
            z = spec[j, k]
            hi[r, k] = z * a_hi[t, k]
            lo[r, k] = z * a_lo[t, k]


@intrinsic
def _popcount(typingctx, x):  # pragma: no cover - compiled
    """The number of set bits of a uint64 (LLVM's ``ctpop``)."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@_jit
def _plane_fields(planes, r, f):  # pragma: no cover - compiled
    """Row r's noise fields from ``sampling.plane_binomial``'s planes (rows, 2·eta/w, n) of w-bit
    words into ``f`` (n,) uint64: word c of every plane, plane p at bit p·w; a plane at a time
    (contiguous loops, which vectorize)."""
    width = np.uint64(8 * planes.itemsize)
    for c in range(f.shape[0]):
        f[c] = np.uint64(planes[r, 0, c])
    for p in range(1, planes.shape[1]):
        at = np.uint64(p) * width
        for c in range(f.shape[0]):
            f[c] |= np.uint64(planes[r, p, c]) << at


@_jit
def _binomial(f, low, eta):  # pragma: no cover - compiled
    """The centered-binomial sample of a field ``f`` (uint64; ``low`` = 2^eta − 1): the set bits of
    its low eta bits less those of the next eta."""
    return np.int64(_popcount(f & low)) - np.int64(_popcount(f >> np.uint64(eta)))  # type: ignore[call-arg]


@_jit
def finish_sum_encrypt(hi, lo, untwist, split, m, limit, delta, planes, eta, q_bits, shift, words, f, v):  # pragma: no cover - compiled
    """``fedsum``'s ``b' = round((e + Δ·m − a·s mod 2^q_bits) / 2^shift)`` mod ``2^bits``
    (``bits = q_bits − shift``), packed: from the inverse transforms of ``a_hi·s`` and ``a_lo·s``
    (rows × N/2, not yet untwisted; ``a = a_hi·2^split + a_lo``), ``m`` (rows, N) int64, ``delta =
    Δ``, and the noise's keystream as ``sampling.plane_binomial``'s planes (rows, 2·eta/w, N) of
    w-bit words (``2·eta ≤ 64``): coefficient c's sample counts the set bits among the first eta
    bits of its field (word c of every plane, plane p at bit p·w) less those among the next eta.
    Into ``words`` (rows, N·bits/64) uint64 in ``bits.pack_bits``'s layout; ``f`` (N,) and ``v``
    (N,) uint64 are scratch. ``fedsum``'s numpy path gives the same integers. False, with nothing
    of the row written, if a message of the row lies outside ``±limit``."""
    rows, half = hi.shape
    n = 2 * half
    bits = q_bits - shift
    q_mask = (np.int64(1) << q_bits) - 1
    b_mask = (np.int64(1) << bits) - 1
    rnd = np.int64(1) << (shift - 1)
    e_mask = (np.uint64(1) << np.uint64(eta)) - np.uint64(1)
    for r in range(rows):
        _plane_fields(planes, r, f)
        bad = False
        for k in range(half):  # without branches, so that the loop vectorizes
            m0 = m[r, k]
            m1 = m[r, k + half]
            bad |= (m0 > limit) | (m0 < -limit) | (m1 > limit) | (m1 < -limit)
            h, lw, u = hi[r, k], lo[r, k], untwist[k]
            p0 = (np.int64(np.rint(_untwisted(h, u, False))) << split) + np.int64(np.rint(_untwisted(lw, u, False)))
            p1 = (np.int64(np.rint(_untwisted(h, u, True))) << split) + np.int64(np.rint(_untwisted(lw, u, True)))
            y0 = (_binomial(f[k], e_mask, eta) + m0 * delta - p0) & q_mask
            y1 = (_binomial(f[k + half], e_mask, eta) + m1 * delta - p1) & q_mask
            v[k] = np.uint64(((y0 + rnd) >> shift) & b_mask)
            v[k + half] = np.uint64(((y1 + rnd) >> shift) & b_mask)
        if bad:
            return False
        # pack_rows' loop without its range check (every value is masked below 2^bits): calling
        # pack_rows here measured 0.8 µs a row slower
        acc = np.uint64(0)
        held = 0  # bits of acc in use, always < 64
        pos = 0
        for c in range(n):
            acc |= v[c] << np.uint64(held)
            held += bits
            if held >= 64:
                words[r, pos] = acc
                pos += 1
                held -= 64
                acc = v[c] >> np.uint64(bits - held) if held else np.uint64(0)
    return True


@_jit
def fold_wide(a, bits, split, twist, hi, lo):  # pragma: no cover - compiled
    """Rows of ``a`` mod ``2^bits`` (uint64), centered, split into ``hi·2^split + lo`` and each
    half folded and twisted (``ring.SmallSecretMultiplier.product_wide``'s split)."""
    rows, n = a.shape
    half = n // 2
    modulus = np.float64(2.0**bits)
    scale = np.float64(2.0**split)
    for r in range(rows):
        for k in range(half):
            v0 = np.float64(a[r, k])
            v1 = np.float64(a[r, k + half])
            if v0 >= modulus / 2:
                v0 -= modulus
            if v1 >= modulus / 2:
                v1 -= modulus
            h0 = np.rint(v0 / scale)
            h1 = np.rint(v1 / scale)
            hi[r, k] = complex(h0, h1) * twist[k]
            lo[r, k] = complex(v0 - h0 * scale, v1 - h1 * scale) * twist[k]


@_jit
def _decrypt_wide_row(zh, zl, u, imag, split, b, modulus, qd, out):  # pragma: no cover - compiled
    """``finish_decrypt_wide``'s loop over one half of a row's window (1-D views, the same length),
    as ``_encrypt_row``: the messages into ``out``."""
    scale = np.float64(2.0**split)
    for c in range(out.shape[0]):
        xh = np.rint(_untwisted(zh[c], u[c], imag))
        xl = np.rint(_untwisted(zl[c], u[c], imag))
        out[c] = _decode(xh * scale + xl + np.float64(b[c]), modulus, qd)


@_jit
def finish_decrypt_wide(hi, lo, untwist, split, b, bits, qd, col0, msg):  # pragma: no cover - compiled
    """Messages from the inverse transforms of ``hi·s`` and ``lo·s`` and ``b`` (rows, T) mod
    ``2^bits``: ``x = hi·s·2^split + lo·s + b mod 2^bits`` at coefficients ``col0 … col0+T-1``,
    centered, times ``qd = q/Δ``, rounded, into the first T columns of ``msg`` (rows, T or more): a
    loop over each half of the window (``_halves``) that vectorizes, as ``finish_encrypt``'s."""
    half = hi.shape[1]
    t = b.shape[1]
    modulus = np.float64(2.0**bits)
    cut, w0, w1 = _halves(col0, t, half)
    for r in range(hi.shape[0]):
        if cut:
            c1 = col0 + cut
            _decrypt_wide_row(hi[r, col0:c1], lo[r, col0:c1], untwist[col0:c1], False, split, b[r, :cut], modulus,
                              qd, msg[r, :cut])
        if cut < t:
            _decrypt_wide_row(hi[r, w0:w1], lo[r, w0:w1], untwist[w0:w1], True, split, b[r, cut:], modulus, qd,
                              msg[r, cut:t])


@_jit
def _decrypt_hint_row(z0, z1, u, imag, p0, p1, inv_p0_mod_p1, b, bits, scale, qd, out):  # pragma: no cover - compiled
    """``finish_decrypt_hint``'s loop over one half of a row's window, as ``_encrypt_row``."""
    modulus = np.float64(2.0**bits)
    mask = np.int64((1 << bits) - 1)
    inv0 = 1.0 / p0
    inv1 = 1.0 / p1
    for c in range(out.shape[0]):
        r0 = _mod(np.int64(np.rint(_untwisted(z0[c], u[c], imag))), p0, inv0)  # |a·s| < 2^26·N: small quotients
        r1 = _mod(np.int64(np.rint(_untwisted(z1[c], u[c], imag))), p1, inv1)
        d = _mod(_mod(r1 - r0, p1, inv1) * inv_p0_mod_p1, p1, inv1)  # a product below 2^54: quotient below 2^27
        whole = np.float64(d * p0 + r0)  # a·s mod q, exact below 2^54, rounded to float64
        a_s = np.int64(np.rint(whole * scale)) & mask
        out[c] = _decode(np.float64(a_s) + np.float64(b[c]), modulus, qd)


@_jit
def finish_decrypt_hint(s0, s1, untwist, p0, p1, inv_p0_mod_p1, b, bits, scale, qd, col0, msg):  # pragma: no cover - compiled
    """Messages from the inverse transforms of ``a0·s`` and ``a1·s`` (the hint's two limbs, mod
    p0 and p1), and ``b`` (rows, T) mod ``2^bits``: ``a·s mod q`` rebuilt by CRT, switched to ``2^bits``
    (``scale = 2^bits/q``), added to ``b`` and decoded (``ring.switch_modulus``, ``_decode``) at
    coefficients ``col0 … col0+T-1``; into ``msg`` as ``finish_decrypt_wide``."""
    half = s0.shape[1]
    t = b.shape[1]
    cut, w0, w1 = _halves(col0, t, half)
    for r in range(s0.shape[0]):
        if cut:
            c1 = col0 + cut
            _decrypt_hint_row(s0[r, col0:c1], s1[r, col0:c1], untwist[col0:c1], False, p0, p1, inv_p0_mod_p1,
                              b[r, :cut], bits, scale, qd, msg[r, :cut])
        if cut < t:
            _decrypt_hint_row(s0[r, w0:w1], s1[r, w0:w1], untwist[w0:w1], True, p0, p1, inv_p0_mod_p1, b[r, cut:],
                              bits, scale, qd, msg[r, cut:t])


@_jit
def place_columns(msg, out, col, add):  # pragma: no cover - compiled
    """Row r of ``msg`` (rows, T or more: its first T columns) into column ``col + r`` of ``out``
    (T, ·), or added to it with ``add``: token by token, the rows side by side in out's row (its
    messages are features of one token). ``msg``'s rows are best ``spread_row`` long."""
    rows, t = msg.shape[0], out.shape[0]
    for c in range(t):
        if add:
            for r in range(rows):
                out[c, col + r] += msg[r, c]
        else:
            for r in range(rows):
                out[c, col + r] = msg[r, c]


@_jit
def plane_binomial(planes, eta, out):  # pragma: no cover - compiled
    """``sampling.plane_binomial``'s samples from its planes (rows, 2·eta/w, n) of w-bit words into
    ``out`` (rows, n) int64: the set bits of each field's low eta bits less those of the next eta
    (``_plane_fields``, ``_binomial``), in a loop that vectorizes."""
    rows, _, n = planes.shape
    low = (np.uint64(1) << np.uint64(eta)) - np.uint64(1)
    f = np.empty(n, dtype=np.uint64)
    for r in range(rows):
        _plane_fields(planes, r, f)
        for c in range(n):
            out[r, c] = _binomial(f[c], low, eta)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@_jit
def _centered_binomial(raw, eta, table, out):  # pragma: no cover - compiled
    count, nbytes = raw.shape
    half = nbytes // 2
    odd = nbytes % 2
    for i in range(count):
        pos = 0
        neg = 0
        for j in range(half):
            pos += table[raw[i, j]]
            neg += table[raw[i, half + odd + j]]
        if odd:
            mid = raw[i, half]
            pos += table[mid & 0x0F]
            neg += table[mid >> 4]
        out[i] = pos - neg


def centered_binomial(raw, eta, out):
    """``sampling.centered_binomial``'s samples, from (count, eta/4) bytes into ``out`` (int64)."""
    _centered_binomial(raw, eta, _POPCOUNT, out)


@_jit
def pack_rows(values, bits, out):  # pragma: no cover - compiled
    """``bits.pack_bits``'s layout (value i at stream bits [i·bits, (i+1)·bits), little-endian)
    for ``bits`` <= 56: each row of ``values`` (rows, n; any strides) into the same row of
    ``out`` (rows, ceil(n·bits/64)) uint64 words, whose bytes on a little-endian machine are the
    stream's; a last partial word is padded with zero bits. False if a value does not fit."""
    limit = np.uint64(1) << np.uint64(bits)
    for r in range(values.shape[0]):
        acc = np.uint64(0)
        held = 0  # bits of acc in use, always < 64
        pos = 0
        for i in range(values.shape[1]):
            v = np.uint64(values[r, i])
            if v >= limit:
                return False
            acc |= v << np.uint64(held)
            held += bits
            if held >= 64:
                out[r, pos] = acc
                pos += 1
                held -= 64
                acc = v >> np.uint64(bits - held) if held else np.uint64(0)
        if held:
            out[r, pos] = acc
    return True


@_jit
def unpack_rows(words, bits, out):  # pragma: no cover - compiled
    """Inverse of ``pack_rows``: each row of ``words`` (rows, ceil(n·bits/64) uint64) into the
    same row of ``out`` (rows, n; any unsigned dtype wide enough, any strides)."""
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    for r in range(out.shape[0]):
        acc = np.uint64(0)
        held = 0  # bits of acc not yet read, always < 64
        pos = 0
        for i in range(out.shape[1]):
            if held >= bits:
                out[r, i] = acc & mask
                acc >>= np.uint64(bits)
                held -= bits
            else:  # the value's low `held` bits in acc, the rest at the bottom of the next word
                w = words[r, pos]
                pos += 1
                out[r, i] = (acc | (w << np.uint64(held))) & mask
                used = bits - held
                acc = w >> np.uint64(used)
                held = 64 - used


@intrinsic
def _float_bits(typingctx, x):  # pragma: no cover - compiled
    """A float64's bits as an int64 (LLVM's ``bitcast``)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_float(typingctx, x):  # pragma: no cover - compiled
    """``_float_bits``'s inverse."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@_jit
def _order_key(b):  # pragma: no cover - compiled
    """The bits ``b`` of a float64 as an int64 key in the floats' order (negative floats' bits
    flipped but for the sign; its own inverse): min and max of floats as integer min and max,
    which vectorize where float reductions do not. -0.0 sorts below 0.0 (no result here depends
    on a zero's sign)."""
    return b ^ ((b >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))


_MAX_FLOAT = float(np.finfo(np.float64).max)


@_jit
def _row_range(x, r, col_scale):  # pragma: no cover - compiled
    """``min(0, row)``, ``max(0, row)`` of row r of ``x * col_scale`` (float64), and whether a
    value is not finite, in one loop that vectorizes."""
    lo = np.int64(0)  # the key of 0.0
    hi = np.int64(0)
    bad = False
    for c in range(x.shape[1]):
        v = np.float64(x[r, c]) * col_scale[c]
        bad |= not (abs(v) <= _MAX_FLOAT)  # False for a NaN or an infinity
        k = _order_key(_float_bits(v))  # type: ignore[call-arg]
        lo = k if k < lo else lo
        hi = k if k > hi else hi
    return _bits_float(_order_key(lo)), _bits_float(_order_key(hi)), bad  # type: ignore[call-arg]


#: Rows ``quantize_rows`` quantizes together before writing them transposed.
_TILE = 64


@_jit
def quantize_rows(x, col_scale, levels, r0, r1, values_t, scale, zero):  # pragma: no cover - compiled
    """``quantize.quantize_rows`` of rows ``r0 … r1`` of ``x * col_scale`` (x (rows, cols), any float
    dtype, taken to float64 first): each row's scale and zero point (its range: ``_row_range``),
    and its values written transposed into ``values_t`` (cols, rows). Rows are taken ``_TILE`` at a
    time: each row's range and then its values while the row is in cache (x is read from memory
    once), into a small buffer (contiguous loops the compiler vectorizes) whose rows are
    ``spread_row`` long, which is then written out column by column (``_write_transposed``). The
    numpy path's float64 operations in its order, so its values bit for bit. False if a value is
    not finite (the caller refuses the whole input)."""
    cols = x.shape[1]
    top = np.float64(levels)
    buf = np.empty((_TILE, spread_row(cols, values_t.itemsize)), dtype=values_t.dtype)
    for t0 in range(r0, r1, _TILE):
        t1 = min(t0 + _TILE, r1)
        for r in range(t0, t1):
            lo, hi, bad = _row_range(x, r, col_scale)
            if bad:
                return False
            s = (hi - lo) / levels
            if not s > 0:
                s = 1.0
            scale[r] = s
            z = min(max(np.rint(-lo / s), 0.0), top)
            zero[r] = np.int64(z)
            row = buf[r - t0]
            for c in range(cols):
                v = np.rint(np.float64(x[r, c]) * col_scale[c] / s) + z
                row[c] = min(max(v, 0.0), top)
        _write_transposed(buf, t1 - t0, t0, values_t)
    return True


@_jit
def _write_transposed(buf, rows, t0, values_t):  # pragma: no cover - compiled
    """Column c of ``buf``'s first ``rows`` rows into row c of ``values_t``, from column t0."""
    for c in range(values_t.shape[0]):
        dst = values_t[c, t0 : t0 + rows]
        for j in range(rows):
            dst[j] = buf[j, c]


@_jit
def spread_row(n, itemsize):  # pragma: no cover - compiled
    """The length (>= n) to give the rows of a buffer that is read down its columns, so that its
    rows start in different sets of the L1 cache: a row of an odd number of 64-byte lines. Rows of
    a power of 2 of bytes (2048 tokens of int64, 8192 features of uint8) all start in one set, so
    a walk down a column keeps evicting its own lines (``hecommon.he.kernels``: the figures)."""
    per_line = max(1, 64 // itemsize)
    lines = -(-n // per_line)
    return (lines | 1) * per_line


@_jit
def dequantize(y, zero, sums, scale, col_scale, r0, r1, out):  # pragma: no cover - compiled
    """``quantize._dequantize`` of rows ``r0 … r1``: ``(y - zero ⊗ sums) · scale`` (int64
    difference, then float64 products in the numpy path's order), times ``col_scale`` per column
    (ones where there is none: an exact identity)."""
    for r in range(r0, r1):
        z = zero[r]
        s = scale[r]
        for c in range(y.shape[1]):
            out[r, c] = np.float64(y[r, c] - z * sums[c]) * s * col_scale[c]


@_jit
def reduce_mod(x, primes):  # pragma: no cover - compiled
    """``x - floor(x / p) · p`` in place for (rows, L, n) float64 integers, ``p`` the limb's prime
    (``primes`` float64): ``evaluate``'s reduction of a GEMM's sums, its operations in its order."""
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            p = primes[i]
            for k in range(x.shape[2]):
                v = x[r, i, k]
                x[r, i, k] = v - np.floor(v / p) * p


@_jit
def switch_two_limbs(x, p1, p2, inv_p1, scale, bits, out):  # pragma: no cover - compiled
    """``ring.switch_modulus`` of (rows, 2, n) residues for two limbs: the integer below q by CRT
    (``inv_p1 = p1^-1 mod p2``), times ``scale = 2^bits / q`` in float64, rounded, mod
    ``2^bits``, into ``out`` (rows, n) uint64; the numpy path's integers and floats."""
    mask = np.uint64((1 << bits) - 1)
    inv2 = 1.0 / p2
    for r in range(x.shape[0]):
        for k in range(x.shape[2]):
            r1 = np.int64(x[r, 0, k])
            t = _mod(np.int64(x[r, 1, k]) - r1, p2, inv2)
            t = _mod(t * inv_p1, p2, inv2)
            out[r, k] = np.uint64(np.rint(np.float64(t * p1 + r1) * scale)) & mask

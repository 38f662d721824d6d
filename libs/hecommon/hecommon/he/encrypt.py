"""Secret-key RLWE encryption with tokens in coefficients (DESIGN §3).

Layout: a batch ``M`` of T <= N tokens × d features becomes d ciphertexts; ciphertext j holds
column ``M[:, j]`` in coefficients ``col0 … col0+T-1``. Only those T coefficients of ``b`` travel:
each is an LWE sample under the request's secret (the coefficient's row of the negacyclic matrix
of ``a``), and the others carry no token, so a request of T tokens costs T columns on the wire,
in the server's GEMM and in the client's decryption (``docs/threat-model.md``, "Column windows").
Residues are stored per RNS limb: ``b`` has shape ``(d, L, T)``, ciphertext j, limb i, token k
(coefficient ``col0 + k``). The public ``a`` and everything computed from it alone (the hint
``W·A``, a reply's switched ``a``) keep all N coefficients.

The public ``a`` of each (layer, direction) is fixed for one data owner's session:
``expand_a(owner_a_seed(layer_seed, owner), …)`` regenerates it (AES-256-CTR) from two public
seeds, the layer's in the model manifest (the server's) and the owner's (drawn by its client from
the OS CSPRNG when its session starts, sent with every request). Neither party alone fixes ``a``,
and no two owners or sessions share one. Encryption uses a fresh secret per request
(``SecretKey.request_secret``; a generation session shares one per layer over its steps, never a
coefficient twice: ``helora_orchestrator.encrypted.Session``), so only ``b`` travels, and the server can precompute ``W·A`` once
per owner (the "hint", as in SimplePIR), halving its per-request work. Reusing ``a`` across
independent secrets is the standard multi-secret RLWE setting; each secret sees ``d`` samples.

Encryption: ``b = -a·s + Δ·m + e (mod q)``. Decryption: ``x = b + a·s``, centered, then
``m = round(x / Δ)``, exact while the noise stays below ``Δ/2``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from ..errors import DecryptionError, ParameterMismatch
from . import fft, kernels, parallel
from .bits import PackedRows
from .keys import RequestSecret
from .parallel import map_rows
from .params import ParamSet
from .ring import centered, centered_float, crt_fraction, moduli_column, reduce_float, switch_modulus
from .sampling import a_mask, a_words, expand_a, sample_noise


class ClientA(enum.Enum):
    """What the client already holds of a layer's public output part ``a`` (the same for every
    request of a layer and direction), so what a switched result carries (``switch``)."""

    NOTHING = "nothing"  # the result carries a and b, both at 2^out_bits
    HINT = "hint"  # the layer's hint mod q: b alone, at 2^hint_out_bits
    SWITCHED = "switched"  # the switched a of an earlier reply: b alone, at 2^out_bits


@dataclass(frozen=True)
class EncryptedBatch:
    """Input ciphertexts as they travel: ``b`` only (``a`` is public, from the seed).

    ``reduced``: ``b`` was written by ``encrypt``, whose loop reduces every residue mod its prime
    as it writes it, so a request built on this batch does not read it all again to check that
    (``wire.EncryptedRequest``). ``packed``: with ``encrypt(pack=True)``, the compiled path's
    bit-packed limbs of ``b``, one (d, T·bits/64) uint64 array a limb, the bytes the wire sends
    (``wire.fields``), packed block by block while ``encrypt``'s rows were in cache (a
    Llama-3.2-1B request's ``b`` is 134 MB: read back from memory to be packed, it cost 8 % of the
    client), for windows whose rows fill whole 64-bit words (T a multiple of 64); None otherwise.
    Only ``encrypt`` sets them: they are not arguments, so a batch built any other way, a slice
    or a join of rows (``rows``), one from ``dataclasses.replace`` and one decoded from the wire
    are checked and packed anew. Not part of the batch's value. ``encrypt``'s ``b`` is read-only:
    what travels is what it wrote (and the receiver checks every residue)."""

    params: ParamSet
    b: np.ndarray  # (d, L, T) uint32 residues: coefficients col0 … col0+T-1
    n_tokens: int
    col0: int = 0
    reduced: bool = field(default=False, init=False, compare=False, repr=False)
    packed: tuple[np.ndarray, ...] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_window("EncryptedBatch", self.params, self.n_tokens, self.col0)
        d = self.b.shape[0] if self.b.ndim == 3 else -1
        if self.b.shape != (d, self.params.limbs, self.n_tokens) or self.b.dtype != np.uint32:
            raise ValueError(f"EncryptedBatch.b: (d, {self.params.limbs}, {self.n_tokens}) uint32 expected")

    @property
    def width(self) -> int:
        return int(self.b.shape[0])

    def rows(self, b: np.ndarray) -> EncryptedBatch:
        """The same token window with other ciphertext rows (a slice or a join of this one's)."""
        return EncryptedBatch(self.params, b, self.n_tokens, self.col0)


def check_window(where: str, params: ParamSet, n_tokens: int, col0: int) -> None:
    """``n_tokens`` coefficients from ``col0`` inside the ring's N."""
    if not isinstance(n_tokens, int) or not 1 <= n_tokens <= params.n:
        raise ValueError(f"{where}.n_tokens: {n_tokens!r} outside 1..{params.n}")
    if not isinstance(col0, int) or not 0 <= col0 <= params.n - n_tokens:
        raise ValueError(f"{where}.col0: {col0!r} outside 0..{params.n - n_tokens} for {n_tokens} tokens")


@dataclass(frozen=True)
class EncryptedPartial:
    """Output ciphertexts mod q, before switching: summable across row shards.

    ``a`` is the public part: the residues mod q, or, from an evaluator that holds the whole
    output (a forward layer with one shard, or any backward shard, whose outputs are joined, not
    summed), that part already switched to ``2^out_bits`` and packed (``PackedRows``). It is the
    same for every request of a layer, so the evaluator switches and packs it once, and the
    aggregator passes it into the reply as it came; ``b`` is switched per request as always.
    """

    params: ParamSet
    a: np.ndarray | PackedRows  # (d_out, L, N) uint32, or (d_out, N) switched at out_bits
    b: np.ndarray  # (d_out, L, T) uint32: the request's token window
    n_tokens: int
    col0: int = 0

    def __post_init__(self) -> None:
        check_window("EncryptedPartial", self.params, self.n_tokens, self.col0)
        if self.b.ndim != 3 or self.b.shape[1:] != (self.params.limbs, self.n_tokens):
            raise ValueError(f"EncryptedPartial.b: (d, {self.params.limbs}, {self.n_tokens}) expected, got {self.b.shape}")
        if _columns(self.a) != self.params.n or _rows(self.a) != self.b.shape[0]:
            raise ValueError(f"EncryptedPartial.a: {self.b.shape[0]} rows of {self.params.n} coefficients expected")

    def rows(self, a: np.ndarray | PackedRows, b: np.ndarray) -> EncryptedPartial:
        """The same token window with other output rows."""
        return EncryptedPartial(self.params, a, b, self.n_tokens, self.col0)

    @property
    def a_switched(self) -> bool:
        return isinstance(self.a, PackedRows)

    def __add__(self, other: EncryptedPartial) -> EncryptedPartial:
        """Homomorphic addition (mod q, per limb)."""
        if not isinstance(other, EncryptedPartial):
            return NotImplemented
        if isinstance(self.a, PackedRows) or isinstance(other.a, PackedRows):
            raise ParameterMismatch("cannot add partials whose a part is already switched (row shards send it mod q)")
        if (other.params != self.params or other.a.shape != self.a.shape or other.b.shape != self.b.shape
                or other.col0 != self.col0):
            raise ParameterMismatch("cannot add partials of different shapes, token windows or parameter sets")
        p = moduli_column(self.params).astype(np.uint64)
        a = (self.a.astype(np.uint64) + other.a) % p
        b = (self.b.astype(np.uint64) + other.b) % p
        return self.rows(a.astype(np.uint32), b.astype(np.uint32))

    @staticmethod
    def join(parts: list[EncryptedPartial]) -> EncryptedPartial:
        """Column shards' partials, in output order, as one (their outputs one after the other)."""
        first = parts[0]
        if any((p.params, p.n_tokens, p.col0) != (first.params, first.n_tokens, first.col0) for p in parts):
            raise ParameterMismatch("cannot join partials of different parameter sets or token windows")
        a = concat_rows([p.a for p in parts])
        return first.rows(a, np.concatenate([p.b for p in parts]))

    def switch(self, client_a: ClientA = ClientA.NOTHING) -> EncryptedResult:
        """Modulus-switch to the smallest power of two that keeps results exact, for a client that
        holds ``client_a`` of the public part (``ClientA``: what the result carries)."""
        if not isinstance(client_a, ClientA):
            raise ValueError(f"client_a: a ClientA ({', '.join(c.name for c in ClientA)}) expected, got {client_a!r}")
        if client_a is not ClientA.NOTHING:
            bits = self.params.hint_out_bits if client_a is ClientA.HINT else self.params.out_bits
            return EncryptedResult(self.params, None, switch_rows(self.b, self.params, bits), self.n_tokens, bits,
                                   self.col0)
        if isinstance(self.a, PackedRows) and self.a.bits != self.params.out_bits:
            raise ParameterMismatch(f"the switched a part has {self.a.bits} bits, not {self.params.out_bits}")
        a = self.a if isinstance(self.a, PackedRows) else switch_a(self.a, self.params)
        return EncryptedResult(self.params, a, switch_rows(self.b, self.params), self.n_tokens, col0=self.col0)


def _columns(rows: np.ndarray | PackedRows) -> int:
    """Values per row of an ``a`` or ``b`` part: packed, or an array (d, n) or (d, L, n)."""
    return rows.n if isinstance(rows, PackedRows) else int(rows.shape[-1])


def _rows(rows: np.ndarray | PackedRows) -> int:
    return rows.rows if isinstance(rows, PackedRows) else int(rows.shape[0])


def concat_rows(parts: list[np.ndarray | PackedRows]) -> np.ndarray | PackedRows:
    """Row ranges of ``a`` (or ``b``) parts one after the other: all packed or all arrays."""
    packed = [p for p in parts if isinstance(p, PackedRows)]
    arrays = [p for p in parts if not isinstance(p, PackedRows)]
    if packed and arrays:
        raise ParameterMismatch("cannot join parts with a switched and a mod-q part (packed rows and arrays)")
    return PackedRows.concat(packed) if packed else np.concatenate(arrays)


def unpacked(rows: np.ndarray | PackedRows) -> np.ndarray:
    """Switched values as an array: ``rows`` itself, or its values if it is still packed."""
    return rows.unpack() if isinstance(rows, PackedRows) else rows


def switch_a(a: np.ndarray, params: ParamSet) -> np.ndarray:
    """The public part of outputs mod q, (d, L, N) residues, switched to ``2^out_bits``: (d, N)."""
    return switch_rows(a, params)


def switch_rows(x: np.ndarray, params: ParamSet, bits: int | None = None) -> np.ndarray:
    """``switch_modulus`` of (d, L, n) residues (n: N, or a request's T) to ``2^bits`` (default
    ``out_bits``), ranges of rows in parallel: (d, n) uint64."""
    out = np.empty((x.shape[0], x.shape[2]), dtype=np.uint64)
    k = params.out_bits if bits is None else bits
    if params.limbs == 2 and kernels.enabled():  # one compiled pass (the client's embedded server)
        p1, p2 = params.primes
        loop, scale, inv = kernels.loops().switch_two_limbs, float(1 << k) / params.q, pow(p1, -1, p2)
        map_rows(lambda lo, hi: loop(x[lo:hi], p1, p2, inv, scale, k, out[lo:hi]), x.shape[0], minimum=64,
                 row_size=x[0].size)
        return out

    def rows(lo: int, hi: int) -> None:
        out[lo:hi] = switch_modulus(np.moveaxis(x[lo:hi], 1, 0), params, bits)

    map_rows(rows, x.shape[0], minimum=64, row_size=x[0].size)
    return out


@dataclass(frozen=True)
class EncryptedResult:
    """Output ciphertexts mod ``2^bits`` (what the client receives).

    ``a`` is None when the client holds the layer's public part: its hint mod q (``b`` at
    ``hint_out_bits``) or the switched ``a`` of an earlier reply (``b`` at ``out_bits``);
    ``b_bits`` says which (0: follows from ``a``). ``a`` and ``b`` may stay packed
    (``PackedRows``) as they came over the wire; ``decrypt`` unpacks them block by block.
    """

    params: ParamSet
    a: np.ndarray | PackedRows | None  # (d_out, N) uint64 in [0, 2^out_bits), or None
    b: np.ndarray | PackedRows  # (d_out, T) uint64 in [0, 2^bits): the request's token window
    n_tokens: int
    b_bits: int = 0
    col0: int = 0

    def __post_init__(self) -> None:
        check_window("EncryptedResult", self.params, self.n_tokens, self.col0)
        if _columns(self.b) != self.n_tokens:  # the kernels index b by token: its shape is checked here
            raise ValueError(f"EncryptedResult.b: {self.n_tokens} tokens a row expected, got {_columns(self.b)}")
        if self.a is not None and (_columns(self.a) != self.params.n or _rows(self.a) != _rows(self.b)):
            raise ValueError(f"EncryptedResult.a: {_rows(self.b)} rows of {self.params.n} coefficients expected")
        allowed = (self.params.out_bits,) if self.a is not None else (self.params.out_bits, self.params.hint_out_bits)
        if self.b_bits == 0:  # the default: follows from a
            object.__setattr__(self, "b_bits", allowed[-1])
        if self.b_bits not in allowed:
            raise ParameterMismatch(f"EncryptedResult.b_bits: {self.b_bits} is not one of {allowed}")

    @property
    def width(self) -> int:
        return int(self.b.shape[0])

    @property
    def bits(self) -> int:
        return self.b_bits

    def with_held_a(self, a: PackedRows | np.ndarray) -> EncryptedResult:
        """This result (sent without ``a``, ``b`` at ``out_bits``) with the ``a`` rows the client
        held from an earlier reply of the same layer."""
        if self.a is not None or self.bits != self.params.out_bits:
            raise DecryptionError("only a result sent without a, at out_bits, takes a held a part")
        rows = a.rows if isinstance(a, PackedRows) else a.shape[0]
        if rows != self.width:
            raise DecryptionError(f"the held a part has {rows} rows, the result {self.width}")
        return EncryptedResult(self.params, a, self.b, self.n_tokens, col0=self.col0)

    def rows(self, a: np.ndarray | PackedRows | None, b: np.ndarray | PackedRows) -> EncryptedResult:
        """The same token window and bits with other output rows."""
        return EncryptedResult(self.params, a, b, self.n_tokens, self.b_bits, self.col0)


def _check_message(m: np.ndarray, params: ParamSet) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2 or not 1 <= m.shape[0] <= params.n or m.shape[1] < 1:
        raise ValueError(f"message must be (T <= {params.n}, d >= 1) integers, got {m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
        raise TypeError("message must be an integer array")
    kind = np.iinfo(m.dtype)
    if kind.max > params.max_message or kind.min < -params.max_message:  # the dtype alone does not bound it
        # bounds on min and max, not on |m|: np.abs(int64 min) is negative (and costs a pass)
        lo, hi = parallel.reduce_rows(lambda r0, r1: (int(m[r0:r1].min()), int(m[r0:r1].max())), m.shape[0],
                                      lambda x, y: (min(x[0], y[0]), max(x[1], y[1])), row_size=m.shape[1])
        if hi > params.max_message or lo < -params.max_message:
            raise ValueError(f"message values exceed ±{params.max_message}")
    return m  # its own dtype: the compiled loops take any, the numpy path widens it to int64


def _encrypt_with(secret: RequestSecret, m: np.ndarray, a_seed: bytes, noise: np.ndarray | None,
                  start: int = 0, col0: int = 0, pack: bool = False) -> EncryptedBatch:
    """Deterministic core of ``encrypt`` (known-answer tests): noise (d, n) or (d, L, n) given, n the
    ring's N (its window ``col0 …`` is used) or the T tokens, or None: fresh noise, drawn block by
    block in the threads that encrypt (kernels only); ``pack``: ``encrypt``'s.

    Arithmetic is on float64 integers below 2^39 (exact): ``|a·s| < 2^37``, ``Δ·m mod p < 2^27``.
    Ciphertexts are independent, so ranges of them are encrypted in parallel threads.
    """
    params = secret.params
    m = _check_message(m, params)
    t, d = m.shape
    check_window("encrypt", params, t, col0)
    if noise is None and not kernels.enabled():
        noise = sample_noise(params, (d, t))
    if noise is not None:
        noise = noise.reshape(d, -1, noise.shape[-1])
        if noise.shape[-1] == params.n and t != params.n:
            noise = noise[:, :, col0 : col0 + t]
        if noise.shape[-1] != t:
            raise ValueError(f"encrypt: noise must have {params.n} or {t} columns, got {noise.shape[-1]}")
    mt = m.T  # (d, T) integers
    b = np.empty((d, params.limbs, t), dtype=np.uint32)
    mul = secret.multiplier
    if kernels.enabled():
        fused = kernels.loops()
        widths = [p.bit_length() for p in params.primes]
        packed = (tuple(np.empty((d, t * w // 64), dtype="<u8") for w in widths)  # rows of whole words
                  if pack and all(t * w % 64 == 0 for w in widths) else None)
        packs = [kernels.pack_loop(w) for w in widths] if packed is not None else []

        def blocks(lo: int, hi: int) -> None:  # the same integers, one fused loop each side of the FFTs
            pair = fft.pair((kernels.BLOCK_ROWS, params.n // 2))  # this thread's buffers and plans
            for b0 in range(lo, hi, kernels.BLOCK_ROWS):
                b1 = min(b0 + kernels.BLOCK_ROWS, hi)
                buf = pair.x[: b1 - b0]
                e = noise[b0:b1] if noise is not None else sample_noise(params, (b1 - b0, 1, t))
                m_rows = np.ascontiguousarray(mt[b0:b1])  # this block's features, token by token
                for i, p in enumerate(params.primes):
                    words = a_words(a_seed, params, i, b1 - b0, start + b0)
                    if not fused.fold_words(words, a_mask(p), p, params.n, mul.twist, buf):  # pragma: no cover
                        raise RuntimeError("expand_a: a row ran out of keystream; widen _ROW_SLACK")
                    mul.pair_product(pair, b1 - b0)
                    fused.finish_encrypt(buf, mul.untwist, m_rows, params.delta % p, e, p, col0, b[b0:b1], i)
                    if packed is not None and not packs[i](b[b0:b1, i], widths[i], packed[i][b0:b1]):
                        raise RuntimeError("encrypt: a residue does not fit its prime's bits")  # pragma: no cover

        map_rows(blocks, d, minimum=kernels.BLOCK_ROWS)
        return _encrypted(EncryptedBatch(params, b, t, col0), packed)  # finish_encrypt's _mod: each residue < p

    assert noise is not None
    mt = mt.astype(np.int64, copy=False)  # Δ·m mod p below in int64

    def rows(lo: int, hi: int) -> None:
        a = expand_a(a_seed, params, hi - lo, start=start + lo)  # (rows, L, N)
        for i, p in enumerate(params.primes):
            x = mul.product(centered_float(a[:, i], p))[:, col0 : col0 + t]  # (rows, T) exact a·s
            np.negative(x, out=x)
            x += (mt[lo:hi] % p) * (params.delta % p) % p  # Δ·m mod p in int64 (< 2^54)
            x += noise[lo:hi, min(i, noise.shape[1] - 1)]
            b[lo:hi, i] = reduce_float(x, float(p))

    map_rows(rows, d)
    return _encrypted(EncryptedBatch(params, b, t, col0), None)  # reduce_float: each residue < p


def _encrypted(batch: EncryptedBatch, packed: tuple[np.ndarray, ...] | None) -> EncryptedBatch:
    """``batch``, marked as written by ``encrypt`` (``EncryptedBatch.reduced``), with its packed
    limbs (``EncryptedBatch.packed``) and its ``b`` read-only."""
    batch.b.flags.writeable = False
    object.__setattr__(batch, "reduced", True)
    object.__setattr__(batch, "packed", packed)
    return batch


def encrypt(secret: RequestSecret, m: np.ndarray, a_seed: bytes, start: int = 0, col0: int = 0,
            pack: bool = False) -> EncryptedBatch:
    """Encrypt ``m`` (T tokens × d features, integers) column by column under ``secret``, token k in
    coefficient ``col0 + k`` (a generation session's window; 0 for a request of its own).

    ``start``: ``m`` holds the layer's input features ``start … start+d-1`` (a request sent part
    by part), so its ciphertexts use rows ``start …`` of the layer's public ``a``. The same noise
    sample is used for every limb: it is one integer error, in RNS form. Only the T coefficients
    of the window are computed into ``b`` and travel.

    ``pack``: the batch goes into a message (a client over the wire): its residues are packed for
    it block by block as they are written (``EncryptedBatch.packed``). A batch handed over in
    process (the embedded default) is never packed, so it is not asked for.
    """
    return _encrypt_with(secret, m, a_seed, None, start, col0, pack)


def _decode(frac: np.ndarray, params: ParamSet) -> np.ndarray:
    """Messages from ``x/q`` (or ``x/2^k``) in [0, 1), (d, T): center, scale by ``q/Δ``, round."""
    frac = np.where(frac >= 0.5, frac - 1.0, frac)
    return np.rint(frac * (params.q / params.delta)).astype(np.int64).T  # (T, d)


def decrypt(secret: RequestSecret, ct: EncryptedResult | EncryptedPartial, hint: np.ndarray | None = None,
            out: np.ndarray | None = None, add: bool = False) -> np.ndarray:
    """Decrypt to the integer messages, shape (T, d_out).

    ``hint``: the layer's ``a`` mod q, (d_out, L, N) residues, for results sent without ``a``.
    ``out``: a (T, d_out) int64 array (a view of the caller's, any strides) to write the messages
    into (or, with ``add``, to add them to: pieces of one sum) instead of a new one; returned.
    """
    if not isinstance(secret, RequestSecret):
        raise TypeError("decrypt needs the RequestSecret of the batch")
    params = secret.params
    if ct.params != params:
        raise ParameterMismatch("ciphertext and secret use different parameter sets")
    width = int(ct.b.shape[0])
    if out is not None and (out.shape != (ct.n_tokens, width) or out.dtype != np.int64):
        raise ValueError(f"decrypt: out must be a ({ct.n_tokens}, {width}) int64 array")
    mul = secret.multiplier
    if isinstance(ct, EncryptedResult):
        check_client_a(ct, hint)
        if kernels.enabled() and (ct.a is not None or params.limbs == 2):  # written (or added) in place
            into = np.empty((ct.n_tokens, ct.width), dtype=np.int64) if out is None else out
            map_rows(lambda lo, hi: _decrypt_blocks(mul, ct, hint, into, lo, hi, add and out is not None), ct.width,
                     minimum=kernels.BLOCK_ROWS)
            return into
        messages = _decrypt_result(mul, ct, hint)
    elif isinstance(ct, EncryptedPartial):
        if isinstance(ct.a, PackedRows):
            return decrypt(secret, ct.switch(), hint, out, add)
        p = moduli_column(params)
        a_s = mul.mul(centered(ct.a, p))[:, :, ct.col0 : ct.col0 + ct.n_tokens]
        x = (ct.b.astype(np.int64) + a_s) % p  # (d, L, T)
        messages = _decode(crt_fraction(np.moveaxis(x, 1, 0), params), params)
    else:
        raise DecryptionError("unsupported ciphertext type")
    if out is None:
        return messages
    if add:
        out += messages
    else:
        out[...] = messages
    return out


def check_client_a(ct: EncryptedResult, hint: np.ndarray | None) -> None:
    """A result sent without its ``a`` part decrypts only with what the client holds of it: the
    layer's hint (``b`` at ``hint_out_bits``), or an ``a`` held from an earlier reply, joined first
    (``EncryptedResult.with_held_a``)."""
    params = ct.params
    if ct.a is None and ct.bits != params.hint_out_bits:
        raise DecryptionError("this result was sent without its a part: the a part held from an earlier "
                              "reply is needed (EncryptedResult.with_held_a)")
    if ct.a is None and (hint is None or hint.shape != (ct.width, params.limbs, params.n)):
        raise DecryptionError("this result was sent without its a part: the layer's hint is needed")


def _decrypt_result(mul, ct: EncryptedResult, held: np.ndarray | None) -> np.ndarray:
    """``decrypt`` of a switched result through numpy, by ranges of rows in parallel."""
    params = ct.params
    modulus = float(1 << ct.bits)
    out = np.empty((ct.n_tokens, ct.width), dtype=np.int64)
    window = (ct.col0, ct.col0 + ct.n_tokens)

    def rows(lo: int, hi: int) -> None:
        x = a_s_rows(mul, ct, held, lo, hi, window)
        x += unpacked(ct.b[lo:hi])
        x = reduce_float(x, modulus)
        x /= modulus
        out[:, lo:hi] = _decode(x, params)

    map_rows(rows, ct.width)
    return out


def a_s_rows(mul, ct: EncryptedResult, hint: np.ndarray | None, lo: int, hi: int,
             window: tuple[int, int]) -> np.ndarray:
    """``a·s mod 2^bits`` of rows ``lo … hi`` of a switched result at coefficients ``window``, as
    float64 integers: from its ``a`` part (switched, split for exact products) or, without one, from
    the layer's hint mod q (exact, then switched as the server switches)."""
    params = ct.params
    modulus = float(1 << ct.bits)
    w0, w1 = window
    if ct.a is None:
        assert hint is not None
        return hint_a_s(mul, hint[lo:hi], params, ct.bits, window)
    a = unpacked(ct.a[lo:hi]).astype(np.float64)  # < 2^38
    np.subtract(a, modulus, out=a, where=a >= modulus / 2)
    return reduce_float(mul.product_wide(a)[:, w0:w1], modulus)  # exact, |.| < 2^49


def hint_a_s(mul, hint: np.ndarray, params: ParamSet, bits: int, window: tuple[int, int]) -> np.ndarray:
    """``a·s mod q`` of ``hint``'s rows ((rows, L, N) residues of ``a`` mod each prime) at
    coefficients ``window``, exact, then switched to ``2^bits`` as the server switches ``b``:
    (rows, window) float64 integers."""
    w0, w1 = window
    a_s = np.empty((params.limbs, hint.shape[0], w1 - w0), dtype=np.int64)
    for i, p in enumerate(params.primes):
        a_s[i] = reduce_float(mul.product(centered_float(hint[:, i], p))[:, w0:w1], float(p))
    return switch_modulus(a_s, params, bits).astype(np.float64)


#: Bits of the low half when a switched ``a`` (< 2^38) is split for two exact products.
_WIDE_SPLIT = 20
#: Rows whose messages ``_decrypt_blocks`` places into the caller's (T, width) array together.
PLACE_ROWS = 64


class _BlockRows:
    """Rows ``b0 … b1`` (a block) of a result's ``a`` or ``b`` part as uint64 values, for one
    thread's ``_decrypt_blocks``: packed rows that fill whole 64-bit words (``PackedRows.words``:
    N values, or a window of T tokens with T·bits a multiple of 64) are unpacked by the compiled
    loop straight from the message's words into a buffer the thread reuses; other packed rows
    through ``PackedRows``; an array as it is."""

    def __init__(self, part: np.ndarray | PackedRows) -> None:
        self.part, self.words = part, part.words() if isinstance(part, PackedRows) else None
        if isinstance(part, PackedRows) and self.words is not None:
            self.bits, self.unpack = part.bits, kernels.unpack_loop(part.bits)
            self.buf = np.empty((kernels.BLOCK_ROWS, part.n), dtype=np.uint64)

    def __call__(self, b0: int, b1: int) -> np.ndarray:
        if self.words is None:
            return np.asarray(unpacked(self.part[b0:b1]), dtype=np.uint64)
        out = self.buf[: b1 - b0]
        self.unpack(self.words[b0:b1], self.bits, out)
        return out


def _decrypt_blocks(mul, ct: EncryptedResult, hint: np.ndarray | None, out: np.ndarray, lo: int, hi: int,
                    add: bool) -> None:
    """``decrypt``'s rows ``lo … hi`` of a switched result through the fused kernels (the numpy
    path's integers, so its messages bit for bit), written into ``out`` or, with ``add``, added:
    ``PLACE_ROWS`` rows' messages at a time (each token's row of ``out`` then gets 512 bytes in a
    run, not 256: the writes into a cold ``out`` cost 1.4 ns a value here, not 1.9 to 2.8)."""
    params = ct.params
    half = params.n // 2
    qd = params.q / params.delta
    pair = fft.pair((kernels.BLOCK_ROWS, half), inputs=2)  # this thread's: two products share one spectrum buffer
    fused = kernels.loops()
    # read down its columns by place_columns: rows spread over the cache's sets (_fused.spread_row),
    # the loops use the first T columns
    msg = np.empty((PLACE_ROWS, fused.spread_row(ct.n_tokens, 8)), dtype=np.int64)
    p0, p1 = params.primes[0], params.primes[-1]  # the hint path has two limbs (``decrypt`` checks)
    inv_p0, scale = pow(p0, -1, p1), float(1 << ct.bits) / params.q
    a_rows = _BlockRows(ct.a) if ct.a is not None else None
    b_rows = _BlockRows(ct.b)
    for g0 in range(lo, hi, PLACE_ROWS):
        g1 = min(g0 + PLACE_ROWS, hi)
        for b0 in range(g0, g1, kernels.BLOCK_ROWS):
            b1 = min(b0 + kernels.BLOCK_ROWS, g1)
            one, two, rows = pair.xs[0][: b1 - b0], pair.xs[1][: b1 - b0], msg[b0 - g0 : b1 - g0]
            if ct.a is not None:  # a sent (or held from an earlier reply) at 2^out_bits: split, two products
                assert a_rows is not None
                fused.fold_wide(a_rows(b0, b1), params.out_bits, _WIDE_SPLIT, mul.twist, one, two)
                mul.pair_product(pair, b1 - b0)
                fused.finish_decrypt_wide(one, two, mul.untwist, _WIDE_SPLIT, b_rows(b0, b1), ct.bits, qd, ct.col0,
                                          rows)
            else:  # the hint's two limbs mod q: a·s mod q by CRT, switched as the server would
                assert hint is not None
                for i, (p, buf) in enumerate(((p0, one), (p1, two))):
                    if not fused.fold_words(hint[b0:b1, i], 0xFFFFFFFF, p, params.n, mul.twist, buf):
                        raise DecryptionError("the layer's hint holds residues outside their modulus")
                mul.pair_product(pair, b1 - b0)
                fused.finish_decrypt_hint(one, two, mul.untwist, p0, p1, inv_p0, b_rows(b0, b1), ct.bits, scale,
                                          qd, ct.col0, rows)
        fused.place_columns(msg[: g1 - g0], out, g0, add)


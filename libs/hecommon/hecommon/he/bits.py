"""Bit packing of unsigned integers for the wire (DESIGN §3 Transport: "pack bits").

Layout: value ``i`` occupies stream bits ``[i·bits, (i+1)·bits)``, least significant bit first,
and stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8`` (little-endian bit order, as
``np.packbits(..., bitorder="little")``). The last byte is padded with zero bits, and a decoder
refuses non-zero padding, so every array has exactly one encoding.

Three vectorized paths give the same bytes. Long arrays of 8 to 56 bits go by groups of 8
values, which fill exactly ``bits`` bytes: value ``r`` of every group lies in the 8-byte window
that starts at byte ``r·bits // 8`` of its group, shifted by ``r·bits % 8``, so eight strided
(unaligned) uint64 views of the buffer move all of them in 8 whole-array shifts (about twice as
fast as the next path; the helora widths are 27, 34 and 38 bits). Other long arrays go by groups
of 64 values: 64 values of ``bits`` bits fill exactly ``bits`` 64-bit words, so the work is a
fixed 64-step loop of whole-array shifts and ORs. Short arrays, where those steps' call overhead
dominates, go through a bit matrix (``np.unpackbits``/``np.packbits``), which costs 8x the
memory traffic but only a handful of calls. Where numba is installed (the client), widths up to
56 bits go through one compiled loop instead (``hecommon.he.kernels``), several times faster again;
the widths the parameter sets use go through loops written out for that width (``_packing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MalformedMessage
from . import kernels, parallel

_GROUP = 64  # values per group; a group packs into exactly `bits` uint64 words
#: The byte-window path needs a value plus its shift (< 8) to fit in 64 bits, and windows of
#: one pass not to overlap (a group's ``bits`` bytes hold the 8-byte window): 8 <= bits <= 56.
_WINDOW_BITS = (8, 56)
#: Below this many values the bit-matrix path is faster (measured on a 2-core x86 VM).
_SMALL = 1 << 14
#: Arrays of at least twice this many values are packed and unpacked in pieces, in parallel.
_PARALLEL = 1 << 19
#: The compiled loops (``hecommon.he.kernels``) take widths up to 56 bits (a value and the < 8 bits
#: held before it fit in 64), in pieces of at least this many values.
_KERNEL_BITS = 56
_KERNEL_PIECE = 1 << 15


def packed_size(bits: int, count: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ``ceil(count·bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits: {bits!r} is not an integer in 1..64")


def _steps(bits: int):
    """For each position j of a group: (word, shift, spills into the next word)."""
    for j in range(_GROUP):
        offset = j * bits
        word, shift = offset >> 6, offset & 63
        yield j, word, shift, shift + bits > 64


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers (any shape, C order) at ``bits`` bits each; values must be < 2^bits.

    Long arrays are packed in pieces on the shared thread pool (``hecommon.he.parallel``): a piece
    of a multiple of 64 values fills whole bytes, so the pieces' bytes, one after the other, are
    the whole array's."""
    _check_bits(bits)
    values = np.asarray(values)
    if values.dtype.kind != "u":
        raise TypeError(f"pack_bits: unsigned integers required, got {values.dtype}")
    if bits <= _KERNEL_BITS and kernels.enabled():
        return _pack_kernel(values, bits).tobytes()
    flat = values.reshape(-1)
    ranges = parallel.chunks(flat.size, _PARALLEL, align=_GROUP)
    if bits < 64 and flat.size and max(parallel.map_ranges(lambda lo, hi: int(flat[lo:hi].max()), ranges)) >> bits:
        raise ValueError(f"pack_bits: a value does not fit in {bits} bits")
    return b"".join(parallel.map_ranges(lambda lo, hi: _pack_flat(flat[lo:hi], bits), ranges))


def pack_bits_view(values: np.ndarray, bits: int) -> bytes | memoryview:
    """``pack_bits``'s bytes, as a read-only view of the compiled loop's buffer where it runs (no
    copy into a bytes object: a message joins them in once; ``wire.codec.pack``)."""
    values = np.asarray(values)
    if bits <= _KERNEL_BITS and kernels.enabled() and values.dtype.kind == "u":
        _check_bits(bits)
        return memoryview(_pack_kernel(values, bits)).toreadonly()  # type: ignore[arg-type]
    return pack_bits(values, bits)


def _row_words(n: int, bits: int, rows: int) -> bool:
    """Whether rows of ``n`` values fill whole 64-bit words, so each packs on its own (in
    parallel) through the compiled loops, which move words."""
    return rows > 1 and (n * bits) % 64 == 0


def _pack_kernel(values: np.ndarray, bits: int) -> np.ndarray:
    """``pack_bits`` through the compiled loop (``hecommon.he.kernels``), which writes 64-bit
    words: rows of whole words (no copy of a strided input), or pieces of 64 values (whole
    words) of the flat array, in parallel, into one buffer: the same bytes as the numpy paths
    (uint8, a view of that buffer)."""
    loop = kernels.pack_loop(bits)
    if values.ndim == 2 and _row_words(values.shape[1], bits, values.shape[0]):
        rows, n = values.shape
        out = np.empty((rows, n * bits // 64), dtype="<u8")
        ok = parallel.map_ranges(lambda lo, hi: bool(loop(values[lo:hi], bits, out[lo:hi])),
                                 parallel.chunks(rows, max(1, _KERNEL_PIECE // max(n, 1))))
    else:
        flat = values.reshape(-1)
        out = np.empty((1, -(-flat.size * bits // 64)), dtype="<u8")
        ok = parallel.map_ranges(lambda lo, hi: bool(loop(flat[None, lo:hi], bits, out[:, lo * bits // 64 :])),
                                 parallel.chunks(flat.size, _KERNEL_PIECE, align=_GROUP))
    if not all(ok):
        raise ValueError(f"pack_bits: a value does not fit in {bits} bits")
    return out.view(np.uint8).reshape(-1)[: packed_size(bits, values.size)]


def _unpack_kernel(raw: np.ndarray, bits: int, out: np.ndarray) -> None:
    """``out`` (rows, n) from ``raw`` through the compiled loop, in parallel (see ``_pack_kernel``)."""
    loop = kernels.unpack_loop(bits)
    rows, n = out.shape
    if _row_words(n, bits, rows):
        words = raw.view("<u8").reshape(rows, n * bits // 64)
        parallel.map_ranges(lambda lo, hi: loop(words[lo:hi], bits, out[lo:hi]),
                            parallel.chunks(rows, max(1, _KERNEL_PIECE // max(n, 1))))
        return
    if raw.size % 8:  # a last partial word: the loop reads whole words
        raw = np.concatenate([raw, np.zeros(8 - raw.size % 8, dtype=np.uint8)])
    words = raw.view("<u8")[None, :]
    flat = out.reshape(-1) if out.flags.c_contiguous else np.empty(out.size, dtype=out.dtype)
    parallel.map_ranges(lambda lo, hi: loop(words[:, lo * bits // 64 :], bits, flat[None, lo:hi]),
                        parallel.chunks(flat.size, _KERNEL_PIECE, align=_GROUP))
    if not out.flags.c_contiguous:  # rows that share words, in a strided out
        out[...] = flat.reshape(out.shape)


def _pack_flat(flat: np.ndarray, bits: int) -> bytes:
    count = flat.size
    if count < _SMALL:
        matrix = np.unpackbits(flat.astype("<u8").view(np.uint8).reshape(count, 8), axis=1, bitorder="little")
        return np.packbits(matrix[:, :bits], axis=None, bitorder="little").tobytes()
    if _WINDOW_BITS[0] <= bits <= _WINDOW_BITS[1]:
        return _pack_windows(flat, bits)
    groups = -(-count // _GROUP)
    # (64, groups): row j holds value j of every group, contiguous for the shifts below
    padded = np.zeros(groups * _GROUP, dtype=np.uint64)
    padded[:count] = flat
    lanes = np.ascontiguousarray(padded.reshape(groups, _GROUP).T)
    words = np.zeros((bits, groups), dtype=np.uint64)
    for j, word, shift, spills in _steps(bits):
        words[word] |= lanes[j] << np.uint64(shift)
        if spills:
            words[word + 1] |= lanes[j] >> np.uint64(64 - shift)
    out = np.ascontiguousarray(words.T).astype("<u8", copy=False)  # (groups, bits) words
    return out.tobytes()[: packed_size(bits, count)]


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` values as a 1-D uint64 array.

    Raises ``MalformedMessage`` if ``data`` is not exactly ``packed_size(bits, count)`` bytes or
    its padding bits are not zero.
    """
    raw = _checked(data, bits, count)
    if bits <= _KERNEL_BITS and kernels.enabled():
        out = np.empty(count, dtype=np.uint64)
        _unpack_kernel(raw, bits, out[None, :])
        return out
    ranges = parallel.chunks(count, _PARALLEL, align=_GROUP)  # pieces of whole bytes, as pack_bits cuts
    if len(ranges) == 1:
        return _unpack_flat(raw, bits, count)
    out = np.empty(count, dtype=np.uint64)

    def piece(lo: int, hi: int) -> None:
        out[lo:hi] = _unpack_flat(raw[lo * bits // 8 : packed_size(bits, hi)], bits, hi - lo)

    parallel.map_ranges(piece, ranges)
    return out


def unpack_bits_into(data: bytes, bits: int, out: np.ndarray) -> None:
    """``unpack_bits`` into ``out``, a (rows, n) unsigned array (any strides, e.g. one limb of a
    (rows, L, N) array) whose dtype holds ``bits`` bits, without an intermediate array where the
    compiled loops run."""
    if out.ndim != 2 or out.dtype.kind != "u" or out.dtype.itemsize * 8 < bits:
        raise ValueError(f"unpack_bits_into: a (rows, n) unsigned array of at least {bits} bits is required")
    raw = _checked(data, bits, out.size)
    if bits <= _KERNEL_BITS and kernels.enabled():
        _unpack_kernel(raw, bits, out)
    else:
        out[...] = unpack_bits(data, bits, out.size).reshape(out.shape)


def _checked(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """``data`` as uint8, after checking its length and its zero padding."""
    _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count: {count!r} is not a non-negative integer")
    expected = packed_size(bits, count)
    if len(data) != expected:
        raise MalformedMessage(f"packed data: {len(data)} bytes, expected {expected}")
    pad = expected * 8 - count * bits
    if pad and data[-1] >> (8 - pad):
        raise MalformedMessage("packed data: non-zero padding bits")
    return np.frombuffer(data, dtype=np.uint8)


def _unpack_flat(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    if count >= _SMALL and _WINDOW_BITS[0] <= bits <= _WINDOW_BITS[1]:
        return _unpack_windows(raw, bits, count)
    if count < _SMALL:
        matrix = np.zeros((count, 64), dtype=np.uint8)
        matrix[:, :bits] = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
        return np.packbits(matrix, axis=1, bitorder="little").view("<u8").reshape(count).astype(np.uint64)
    groups = -(-count // _GROUP)
    buf = np.zeros(groups * bits * 8, dtype=np.uint8)
    buf[: raw.size] = raw
    words = np.ascontiguousarray(buf.view("<u8").reshape(groups, bits).T)  # (bits, groups)
    lanes = np.empty((_GROUP, groups), dtype=np.uint64)
    for j, word, shift, spills in _steps(bits):
        lane = words[word] >> np.uint64(shift)
        if spills:
            lane |= words[word + 1] << np.uint64(64 - shift)
        lanes[j] = lane
    if bits < 64:
        lanes &= np.uint64((1 << bits) - 1)
    return lanes.T.reshape(-1)[:count]


def _windows(buf: np.ndarray, bits: int, r: int, groups: int) -> tuple[np.ndarray, np.uint64]:
    """The 8-byte windows holding value ``r`` of each group of 8, as a strided uint64 view of
    ``buf`` (which has 8 bytes of slack at its end), and that value's shift in its window."""
    offset = r * bits
    view = np.ndarray(shape=(groups,), dtype="<u8", buffer=buf, offset=offset >> 3, strides=(bits,))
    return view, np.uint64(offset & 7)


def _pack_windows(flat: np.ndarray, bits: int) -> bytes:
    count = flat.size
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = flat
    values = padded.reshape(groups, 8)
    buf = np.zeros(groups * bits + 8, dtype=np.uint8)
    for r in range(8):  # the windows of one pass are `bits` >= 8 bytes apart: they never overlap
        view, shift = _windows(buf, bits, r, groups)
        view |= values[:, r] << shift
    return buf[: packed_size(bits, count)].tobytes()


def _unpack_windows(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    groups = -(-count // 8)
    buf = np.zeros(groups * bits + 8, dtype=np.uint8)
    buf[: raw.size] = raw
    out = np.empty((groups, 8), dtype=np.uint64)
    for r in range(8):
        view, shift = _windows(buf, bits, r, groups)
        np.right_shift(view, shift, out=out[:, r])
    out &= np.uint64((1 << bits) - 1)
    return out.reshape(-1)[:count]


@dataclass(frozen=True)
class PackedRows:
    """A (rows, n) array of ``bits``-bit unsigned values, kept packed.

    Each row fills whole bytes: ``pack_bits``'s layout row by row, a row of ``n·bits`` bits that
    does not end on a byte padded with zero bits (a request's window of T tokens; rows of N
    values end on a byte, so there the bytes are ``pack_bits`` of the whole array). Ranges of
    rows slice and concatenate as plain bytes, and any byte string of the right length whose
    padding bits are zero is a valid array: a service can pass such an array on, or cut it into
    messages, without unpacking it.
    """

    bits: int
    n: int
    data: bytes | memoryview  # a read-only view of another's bytes: a row range, not copied

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"PackedRows: rows of {self.n!r} values are not rows")
        view = isinstance(self.data, memoryview) and self.data.readonly and self.data.format == "B"
        if not (isinstance(self.data, bytes) or view) or len(self.data) % self.row_bytes:
            raise ValueError(f"PackedRows: data must be bytes, a whole number of {self.row_bytes}-byte rows")
        pad = self.row_bytes * 8 - self.n * self.bits
        if pad and self.data:
            last = np.frombuffer(self.data, dtype=np.uint8).reshape(-1, self.row_bytes)[:, -1]
            if (last >> (8 - pad)).any():
                raise MalformedMessage("packed rows: non-zero padding bits")

    @classmethod
    def pack(cls, values: np.ndarray, bits: int) -> PackedRows:
        """Pack a (rows, n) unsigned array; values must be < 2^bits."""
        values = np.asarray(values)
        if values.ndim != 2:
            raise ValueError(f"PackedRows.pack: a (rows, n) array is required, got {values.shape}")
        rows, n = (int(x) for x in values.shape)
        if (n * bits) % 8 == 0:
            return cls(bits, n, pack_bits(values, bits))
        _check_bits(bits)
        if values.dtype.kind != "u":
            raise TypeError(f"pack_bits: unsigned integers required, got {values.dtype}")
        size = packed_size(bits, n)
        if bits <= _KERNEL_BITS and kernels.enabled():  # rows of whole words, then each row's bytes
            words = np.zeros((rows, -(-n * bits // 64)), dtype="<u8")
            if not kernels.pack_loop(bits)(values, bits, words):
                raise ValueError(f"pack_bits: a value does not fit in {bits} bits")
            data = words.view(np.uint8)[:, :size].tobytes()
        else:
            data = b"".join(pack_bits(row, bits) for row in values)
        return cls(bits, n, data)

    @property
    def row_bytes(self) -> int:
        return packed_size(self.bits, self.n)

    @property
    def rows(self) -> int:
        return len(self.data) // self.row_bytes

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.n)

    def unpack(self) -> np.ndarray:
        """The values, (rows, n) uint64."""
        rows, n, bits = self.rows, self.n, self.bits
        if (n * bits) % 8 == 0:
            return unpack_bits(self.data, bits, rows * n).reshape(rows, n)
        out = np.empty((rows, n), dtype=np.uint64)
        raw = np.frombuffer(self.data, dtype=np.uint8).reshape(rows, self.row_bytes)
        if bits <= _KERNEL_BITS and kernels.enabled():  # each row into whole words, then one loop
            words = np.zeros((rows, -(-n * bits // 64)), dtype="<u8")
            words.view(np.uint8)[:, : self.row_bytes] = raw
            kernels.unpack_loop(bits)(words, bits, out)
        else:
            for r in range(rows):
                out[r] = unpack_bits(raw[r].tobytes(), bits, n)
        return out

    def words(self) -> np.ndarray | None:
        """The rows as (rows, n·bits/64) little-endian 64-bit words, a read-only view of ``data``,
        where each row fills whole words and the width takes the compiled loops (``kernels``); None
        otherwise. The words need not be 8-byte aligned in memory (a decoded message's views are
        where its fields put them): the compiled loops read them with unaligned loads."""
        if self.n * self.bits % 64 or self.bits > _KERNEL_BITS or not kernels.enabled():
            return None
        return np.frombuffer(self.data, dtype=np.uint8).view("<u8").reshape(self.rows, self.n * self.bits // 64)

    def __getitem__(self, rows: slice) -> PackedRows:
        """Rows ``lo:hi`` (a slice with step 1), still packed."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("PackedRows: only row slices with step 1 are supported")
        lo, hi, _ = rows.indices(self.rows)
        view = memoryview(self.data)[lo * self.row_bytes : max(lo, hi) * self.row_bytes]
        return PackedRows(self.bits, self.n, view)  # a view: a layer's held a part is sliced per request

    @staticmethod
    def concat(parts: list[PackedRows]) -> PackedRows:
        """The rows of ``parts`` one after the other; all must have the same width and bits."""
        if not parts or any((p.bits, p.n) != (parts[0].bits, parts[0].n) for p in parts):
            raise ValueError("PackedRows.concat: parts of one width and bit size are required")
        return PackedRows(parts[0].bits, parts[0].n, b"".join(p.data for p in parts))

"""Bit packing unrolled for the widths the parameter sets use (numba; imported on first use only).

``_fused.pack_rows`` and ``unpack_rows`` carry one value at a time through a 64-bit accumulator:
a chain of dependent shifts and a branch per word. Sixty-four values of ``bits`` bits fill
exactly ``bits`` words, so for a width known when the loop is compiled, every value's word and
shift in a group of 64 are constants: the loops here are written out for one width, each word an
OR of the two to four values that meet it, each value a shift of the one or two words that hold
it, with no carried state. Measured on this project's 2-core VM, a (576, 2048) array: packing 27
bits 0.80 → 0.53 ns a value, unpacking 38 bits 0.78 → 0.45.

The source of each width's pair of loops is generated here and compiled once per process on first
use (about a second a loop and argument types; numba cannot cache what has no source file), only
for ``WIDTHS``; other widths take ``_fused``'s loops, and so does the last partial group of a row
whose length is not a multiple of 64. Both give the same words and values
(``tests/hecommon/test_kernels.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from . import _fused

#: The widths the parameter sets' residues, switched values and hint results take
#: (``params.REGISTRY``: 27-bit primes; out_bits 38 and 45; hint_out_bits 34 and 40).
WIDTHS = frozenset({27, 34, 38, 40, 45})
GROUP = 64  # values per group; a group of ``bits``-bit values fills exactly ``bits`` words
_COMPILE = threading.Lock()


def _pack_source(bits: int) -> str:
    """``pack(values, bits, out)``: ``_fused.pack_rows`` for rows of whole groups, written out."""
    lines = [
        "def pack(values, bits, out):",
        "    bad = np.uint64(0)",
        f"    groups = values.shape[1] // {GROUP}",
        "    for r in range(values.shape[0]):",
        "        row, words = values[r], out[r]",
        "        for g in range(groups):",
        f"            i, o = g * {GROUP}, g * {bits}",
    ]
    lines += [f"            v{j} = np.uint64(row[i + {j}])" for j in range(GROUP)]
    lines.append("            bad |= " + " | ".join(f"v{j}" for j in range(GROUP)))
    for w in range(bits):  # word w: the values whose bits [j·bits, (j+1)·bits) meet [64w, 64w+64)
        terms = []
        for j in range(GROUP):
            shift = j * bits - 64 * w
            if -bits < shift < 64:
                terms.append(f"(v{j} << np.uint64({shift}))" if shift >= 0 else f"(v{j} >> np.uint64({-shift}))")
        lines.append(f"            words[o + {w}] = " + " | ".join(terms))
    lines += [
        f"    if groups * {GROUP} < values.shape[1]:  # a last partial group",
        f"        if not _fused.pack_rows(values[:, groups * {GROUP}:], {bits}, out[:, groups * {bits}:]):",
        "            return False",
        f"    return (bad >> np.uint64({bits})) == 0",
    ]
    return "\n".join(lines)


def _unpack_source(bits: int) -> str:
    """``unpack(words, bits, out)``: ``_fused.unpack_rows`` for rows of whole groups, written out."""
    lines = [
        "def unpack(words, bits, out):",
        f"    mask = np.uint64({(1 << bits) - 1})",
        f"    groups = out.shape[1] // {GROUP}",
        "    for r in range(out.shape[0]):",
        "        row, values = words[r], out[r]",
        "        for g in range(groups):",
        f"            i, o = g * {GROUP}, g * {bits}",
    ]
    lines += [f"            w{w} = row[o + {w}]" for w in range(bits)]
    for j in range(GROUP):  # value j: bits [j·bits, (j+1)·bits) of the group, in one word or two
        w, shift = divmod(j * bits, 64)
        value = f"(w{w} >> np.uint64({shift}))" if shift else f"w{w}"
        if shift + bits > 64:
            value += f" | (w{w + 1} << np.uint64({64 - shift}))"
        lines.append(f"            values[i + {j}] = ({value}) & mask")
    lines += [
        f"    if groups * {GROUP} < out.shape[1]:  # a last partial group",
        f"        _fused.unpack_rows(words[:, groups * {bits}:], {bits}, out[:, groups * {GROUP}:])",
    ]
    return "\n".join(lines)


def _compiled(source: str, name: str) -> Callable:
    scope: dict[str, Any] = {"np": np, "_fused": _fused}
    exec(compile(source, f"<hecommon.he._packing {name}>", "exec"), scope)  # noqa: S102 - our own generated source
    loop: Callable = scope[name]
    return njit(nogil=True, boundscheck=False)(loop)


_LOOPS: dict[int, tuple[Callable, Callable]] = {}


def _loops(bits: int) -> tuple[Callable, Callable]:
    """``bits``' pair of loops, made once: pool threads may ask for them together."""
    with _COMPILE:
        if bits not in _LOOPS:
            _LOOPS[bits] = _compiled(_pack_source(bits), "pack"), _compiled(_unpack_source(bits), "unpack")
        return _LOOPS[bits]


def pack_loop(bits: int) -> Callable:
    """``_fused.pack_rows``, or the same loop written out for ``bits`` (one of ``WIDTHS``)."""
    return _loops(bits)[0] if bits in WIDTHS else _fused.pack_rows


def unpack_loop(bits: int) -> Callable:
    """``_fused.unpack_rows``, or the same loop written out for ``bits`` (one of ``WIDTHS``)."""
    return _loops(bits)[1] if bits in WIDTHS else _fused.unpack_rows

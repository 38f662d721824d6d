"""A process's heap: keep freed memory for the next allocation instead of returning it.

An encrypted step allocates hundreds of arrays of tens of MB (residues as float64 for the GEMMs,
their sums, decrypted rows). glibc serves every allocation above its mmap threshold (32 MiB at
most) with fresh pages from the kernel and unmaps them on free, so the kernel faults and
zeroes each such array's pages on first touch, again and again: measured on this 2-core machine,
about a tenth of an embedded SmolLM2 step (60.9 s a step against 54.7 s with the heap kept, means
of two steps; peak memory 11.8 GB against 12.9 GB). ``reuse_freed_memory`` makes glibc take every allocation from its heap
(``M_MMAP_MAX`` 0) and never trim it (``M_TRIM_THRESHOLD``), so a freed block is reused as it is.

The CPU evaluator's GEMMs and the aggregator's sums and switches allocate the same arrays.
Process-wide, so each sets it once: the client when an encrypted session starts
(``EncryptedBackend``), the evaluator and the aggregator when they start
(``broker.process.serve(reuse_memory=True)``); their resident memory then stays at its peak
between requests. ``HELORA_HEAP=default`` leaves the allocator alone (``keep``, the default,
applies it); where the C library is not glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

from .errors import ConfigError

log = logging.getLogger("helora.heap")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
CHOICES = ("keep", "default")
_LOCK = threading.Lock()
_applied: bool | None = None


def choice() -> str:
    value = os.environ.get("HELORA_HEAP", "keep")
    if value not in CHOICES:
        raise ConfigError(f"HELORA_HEAP={value!r}: one of {', '.join(CHOICES)} expected")
    return value


def reuse_freed_memory() -> bool:
    """Apply the policy once per process (``HELORA_HEAP``); whether glibc took it."""
    global _applied
    if choice() == "default":
        return False
    with _LOCK:
        if _applied is None:
            _applied = _mallopt()
        return _applied


def _mallopt() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        log.debug("heap: no mallopt in the C library; left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("heap: freed memory kept for reuse (%s)", "applied" if ok else "refused")
    return ok

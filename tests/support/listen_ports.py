"""Ports for services that tests start: free now, and outside the range the kernel draws the local
ports of outgoing connections from, so none of the test's own connections (to RabbitMQ, Prometheus'
scrapes) can take one before the service binds it. A bind-to-0 probe returns a port of that very
range: CI saw ``helora train --metrics-port`` fail with "Address already in use" that way."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from pathlib import Path

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000  # below: well-known and registered services' habits


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where unreadable)."""
    try:
        lo, hi = (int(x) for x in RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return lo, hi


def _outside_ephemeral() -> list[int]:
    lo, hi = ephemeral_range()
    ports = [p for p in range(LOWEST, 65536) if not lo <= p <= hi]
    random.shuffle(ports)
    return ports


def free_listen_port(host: str = "127.0.0.1", candidates: Iterable[int] | None = None) -> int:
    """The first of ``candidates`` (default: ports outside the ephemeral range, in random order)
    that ``host`` can listen on now."""
    for port in _outside_ephemeral() if candidates is None else candidates:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port to listen on at {host} outside the ephemeral range {ephemeral_range()}")

#!/usr/bin/env python3
"""The images' HEALTHCHECK: exit 0 when this container's helora process answers /healthz with 200.

Usage: ``helora-healthcheck [PATH]`` (default ``/healthz``; ``/readyz`` asks for readiness).
The port is ``HELORA_METRICS_PORT`` (default 9400), the address ``HELORA_METRICS_HOST`` unless it
is a wildcard (0.0.0.0, ::), then the loopback address. Standard library only: the slim images
carry no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def target(environ: dict[str, str], path: str = "/healthz") -> str:
    port = environ.get("HELORA_METRICS_PORT", "9400")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"HELORA_METRICS_PORT={port!r} is not a fixed port (1..65535)")
    host = environ.get("HELORA_METRICS_HOST", "")
    host = "127.0.0.1" if host in WILDCARDS else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{int(port)}{path}"


def main(argv: list[str]) -> int:
    try:
        url = target(dict(os.environ), argv[1] if len(argv) > 1 else "/healthz")
    except ValueError as exc:
        print(f"helora-healthcheck: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as reply:  # noqa: S310 - a local http:// URL
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"helora-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"helora-healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

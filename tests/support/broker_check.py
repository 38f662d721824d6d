"""Whether the local RabbitMQ answers (integration tests skip without it; the image smoke test fails)."""

from __future__ import annotations

import socket

ADDRESS = ("127.0.0.1", 5672)
MISSING = "no RabbitMQ broker on 127.0.0.1:5672 (start it with: rabbitmq-server -detached)"


def broker_answers(timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection(ADDRESS, timeout=timeout_s):
            return True
    except OSError:
        return False

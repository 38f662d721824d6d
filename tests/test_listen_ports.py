"""``listen_ports.free_listen_port``: a port for a service a test starts later, which no outgoing
connection can take in between (CI saw ``helora train --metrics-port`` fail with "Address already
in use" on a port that a bind-to-0 probe had found free a minute before)."""

from __future__ import annotations

import socket

from listen_ports import ephemeral_range, free_listen_port


def test_the_port_is_outside_the_range_outgoing_connections_draw_from():
    lo, hi = ephemeral_range()
    for _ in range(20):
        port = free_listen_port()
        assert not lo <= port <= hi, f"{port} lies in the ephemeral range {lo}-{hi}"


def test_the_port_can_be_listened_on():
    port = free_listen_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert s.getsockname()[1] == port


def test_a_port_in_use_is_passed_over():
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_listen_port()))
        held.listen()
        taken = held.getsockname()[1]
        other = free_listen_port()
        assert free_listen_port(candidates=[taken, other]) == other

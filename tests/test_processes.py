"""comet.processes: what the suite and the benchmarks use to start real
servers on 127.0.0.1."""
from __future__ import annotations

import socket

from comet.processes import free_port


def test_free_port_never_hands_out_a_port_twice_in_a_row():
    """A server is given its port before it binds it: two asked for in a row
    (nginx's two listeners, a cluster node's port and bus) must differ. The
    kernel's port 0 alone repeats one often enough: 1,000 draws from
    28,232 ports collide about 18 times."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:  # and each was free: the last still is
        sock.bind(("127.0.0.1", ports[-1]))

"""Free TCP ports for servers started by tests.

A port picked here is bound later by another process (a server, a proxy), so two pytest
workers (pytest-xdist) asking the OS at the same moment could be handed the same one. Each
worker therefore draws from its own range below the OS's ephemeral range (which the
kernel also uses for outgoing connections), and checks the port is free right now.
"""

from __future__ import annotations

import os
import random
import socket

_FIRST = 20_000
_SPAN = 2_000


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; unset alone
    return int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0


def free_port() -> int:
    """A port on 127.0.0.1, free right now, from this worker's own range."""
    first = _FIRST + _worker_index() * _SPAN
    for _ in range(200):
        port = random.randrange(first, first + _SPAN)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + _SPAN - 1}")

"""Free loopback ports for servers that cannot bind port 0 themselves."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (held open together so that they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()

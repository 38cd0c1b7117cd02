"""Free loopback ports for servers that cannot bind port 0 themselves."""

from __future__ import annotations

import socket
from collections.abc import Iterable


def free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """Ports free right now on 127.0.0.1 (held open together so that they differ), none of them in
    avoid: ports chosen earlier for servers that have not bound them yet."""
    avoid = set(avoid)
    sockets = []
    try:
        while len([s for s in sockets if s.getsockname()[1] not in avoid]) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [p for p in (s.getsockname()[1] for s in sockets) if p not in avoid]
    finally:
        for s in sockets:
            s.close()


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could not listen on host:port now. SO_REUSEADDR as servers set it, so a
    port whose last connections linger in TIME_WAIT is free; without SO_REUSEPORT, so a port a
    gRPC server (which sets it) holds is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False

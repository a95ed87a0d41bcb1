"""Loopback ports for the peers the tests start (sshd, rsync daemons, nats-server, the daemon's metrics)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1: the server started on it may still lose a race for it,
    so the helpers that start one retry on another port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

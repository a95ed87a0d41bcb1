"""Connections to an rsync daemon opened ahead of the sessions that use them (I/O: sockets).

The daemon protocol runs one session per connection, so every rsync:// session needs a new one. Opened when the
session starts, it costs the TCP handshake, and the daemon's first reply waits a round trip more: the daemon sends
its greeting as soon as it accepts, and Nagle holds its next small write (the reply to our greeting) until that
greeting is acknowledged. A connection opened while an earlier session ran has its handshake done and the greeting
read into our socket buffer (and acknowledged) already: the session's first reply comes one round trip after it
starts instead of three (docs/replication.md, "rsync:// on a slow link").

A connection waits at most :data:`MAX_IDLE` seconds (a daemon may close idle connections: its ``timeout``); one the
daemon closed meanwhile (its TCP state is no longer ESTABLISHED) is dropped, and a fresh one made instead.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

MAX_IDLE = 10.0
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (include/net/tcp_states.h)


def _established(s: socket.socket, wait: float) -> bool:
    """Whether the connect of ``s`` (non-blocking, maybe still in progress) completed and the peer has not closed."""
    try:
        _, writable, _ = select.select([], [s], [], wait)
        if not writable or s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return False
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except (OSError, ValueError):
        return False
    return bool(info) and struct.unpack_from("B", info)[0] == TCP_ESTABLISHED


class Pool:
    """Up to ``want`` connections to ``host:port`` kept opening or open, for the next sessions to take."""

    def __init__(self, host: str, port: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port = host, port
        self.clock = clock
        self._idle: list[tuple[float, socket.socket]] = []  # (opened at, socket), oldest first
        self._lock = threading.Lock()
        self._addr: tuple[socket.AddressFamily, tuple[str, int]] | None = None
        self._timer: threading.Timer | None = None  # drops what is still idle once it is too old

    def take(self, timeout: float) -> socket.socket:
        """A connection for a session: an idle one that is still good, else a new one (blocking, ``timeout``)."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                at, s = self._idle.pop(0)
            if self.clock() - at <= MAX_IDLE and _established(s, min(timeout, 5.0)):
                s.setblocking(True)
                s.settimeout(timeout)
                return s
            s.close()
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def fill(self, want: int) -> None:
        """Start connecting until ``want`` connections are idle (the old ones are dropped first); never raises: a
        connection that cannot be made now is the next session's to fail. What nobody takes is closed after
        :data:`MAX_IDLE` seconds, so an idle target holds no process of the daemon."""
        self._expire()
        now = self.clock()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(MAX_IDLE + 0.5, self._expire)
            self._timer.daemon = True
            self._timer.start()
            while len(self._idle) < want:
                try:
                    if self._addr is None:
                        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
                        self._addr = (info[0], (str(info[4][0]), int(info[4][1])))
                    s = socket.socket(self._addr[0], socket.SOCK_STREAM)
                except OSError:
                    return
                s.setblocking(False)
                err = s.connect_ex(self._addr[1])
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    return
                self._idle.append((now, s))

    def _expire(self) -> None:
        now = self.clock()
        with self._lock:
            old = [x for x in self._idle if now - x[0] > MAX_IDLE]
            self._idle = [x for x in self._idle if now - x[0] <= MAX_IDLE]
        for _, s in old:
            s.close()

    def close(self) -> None:
        """Drop every idle connection (the daemon's processes for them end at once)."""
        with self._lock:
            idle, self._idle = self._idle, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for _, s in idle:
            s.close()

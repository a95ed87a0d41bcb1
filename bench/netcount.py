"""A counting TCP proxy on 127.0.0.1: the one way the replication suite measures bytes on the wire for every tool.

Each tool talks to the loopback rsync daemon or sshd through a :class:`CountingProxy` (a listening port that
forwards every connection to the real daemon's port) instead of the daemon's own port. The proxy counts payload
bytes in each direction: ``up`` (client to daemon: what a tool sends towards the mirror) and ``down`` (daemon to
client: acks, file lists, block signatures). Over ssh the counts are the encrypted stream, overhead included; over
the rsync daemon protocol they are the plain protocol stream. The count is the same for every tool, whatever its own
statistics claim; TCP/IP headers are not counted.

Two threads per connection, blocking sockets (recv/sendall release the GIL): simple, and fast enough on loopback for
the sizes measured here; the proxy runs inside the benchmark process, so its CPU is never charged to a tool.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Any

BUF = 1 << 18


class CountingProxy:
    """Forwards 127.0.0.1:``port`` (chosen at :meth:`start`) to 127.0.0.1:``upstream``, counting bytes."""

    def __init__(self, upstream: int, name: str = "") -> None:
        self.upstream = upstream
        self.name = name
        self.port = 0
        self.up = 0  # client -> daemon
        self.down = 0  # daemon -> client
        self.connections = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> CountingProxy:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        self._listener = s
        self.port = int(s.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name=f"proxy {self.name}", daemon=True)
        self._thread.start()
        return self

    def snapshot(self) -> tuple[int, int]:
        """(up, down) bytes so far."""
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._socks.update((client, server))
            pair = [client, server, 2]  # both sockets and how many pumps still run on them
            threading.Thread(target=self._pump, args=(client, server, True, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, pair: list[Any]) -> None:
        try:
            while True:
                data = src.recv(BUF)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            # pass the half-close on (rsync and ssh both rely on EOF); the last pump of a pair closes both sockets
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                pair[2] -= 1
                last = pair[2] == 0
                if last:
                    self._socks.discard(src)
                    self._socks.discard(dst)
            if last:
                src.close()
                dst.close()

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

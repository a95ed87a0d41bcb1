"""kwatch.replicate.rsync_conns: connections opened ahead of the sessions, checked before use (a listener on
127.0.0.1 plays the daemon)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kwatch.replicate.rsync_conns import MAX_IDLE, Pool


class Listener:
    """Accepts connections in a thread and keeps them (``close_all`` plays a daemon closing idle connections)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            c.sendall(b"@RSYNCD: 31.0\n")  # a daemon greets as soon as it accepts
            self.accepted.append(c)

    def wait_accepted(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < n:
            assert time.monotonic() < deadline, f"{len(self.accepted)} of {n} connections accepted"
            time.sleep(0.01)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for c in self.accepted:
            c.close()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


def filled(listener: Listener, n: int, clock: Callable[[], float] = time.monotonic) -> Pool:
    """A pool with ``n`` connections opened ahead, each accepted by ``listener``."""
    pool = Pool("127.0.0.1", listener.port, clock=clock)
    pool.fill(n)
    listener.wait_accepted(n)
    return pool


def test_taken_connections_are_the_ones_opened_ahead(listener: Listener) -> None:
    pool = filled(listener, 2)
    a, b = pool.take(5.0), pool.take(5.0)
    assert len(listener.accepted) == 2, "a new connection was made although two were open"
    assert a.recv(64) == b"@RSYNCD: 31.0\n"  # the greeting waited in the socket's buffer
    assert b.gettimeout() == 5.0
    a.close()
    b.close()
    pool.close()


def test_one_the_peer_closed_is_replaced(listener: Listener) -> None:
    pool = filled(listener, 1)
    listener.accepted[0].close()
    idle = pool._idle[0][1]
    deadline = time.monotonic() + 20
    while not _fin_seen(idle):  # the peer's FIN reaches our socket
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s = pool.take(5.0)
    listener.wait_accepted(2)
    assert s is not idle
    assert s.recv(64) == b"@RSYNCD: 31.0\n"
    s.close()
    pool.close()


def _fin_seen(s: socket.socket) -> bool:
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] != 1  # no longer ESTABLISHED (CLOSE_WAIT)


def test_a_connection_too_old_is_not_used(listener: Listener) -> None:
    now = [100.0]
    pool = filled(listener, 1, clock=lambda: now[0])
    now[0] += MAX_IDLE + 1
    s = pool.take(5.0)
    listener.wait_accepted(2)
    assert _ended(listener.accepted[0]), "the old connection was not closed"
    s.close()
    pool.close()


def test_close_ends_what_is_idle(listener: Listener) -> None:
    pool = filled(listener, 3)
    pool.close()
    assert all(_ended(c) for c in listener.accepted)


def _ended(c: socket.socket) -> bool:
    """Whether our end closed the connection (unread data makes the close a reset)."""
    c.settimeout(20)
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True


def test_nothing_listening_is_the_session_s_failure() -> None:
    port = socket.create_server(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    pool = Pool("127.0.0.1", free)
    pool.fill(1)  # never raises
    with pytest.raises(ConnectionRefusedError):
        pool.take(5.0)
    pool.close()

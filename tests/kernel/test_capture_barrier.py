"""The capture barrier (kwatch.capture.barrier): when a wait returns, and what the reading loop must have done.

With fake sources (a ring with positions, and one without), each wait in a thread of its own and the loop's steps
called by the test; then the real ``pump`` over a real inotify source.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from kwatch.capture.barrier import CaptureBarrier, pump
from kwatch.capture.base import CaptureFilter, SourceStats
from kwatch.events import FileEvent


class Queue:
    """A source without positions (fanotify, inotify); the loop's reads are driven by the test."""

    name = "fake-queue"
    fields: frozenset[str] = frozenset()

    def fileno(self) -> int:
        return -1

    def poll_within(self) -> float | None:
        return None

    def read(self, timeout: float | None = None) -> list[FileEvent]:
        return []

    def stats(self) -> SourceStats:
        return SourceStats()

    def close(self) -> None:
        pass


class Ring(Queue):
    """A source with positions: ``prod`` moves when the kernel reserves a record, ``cons`` when one is read."""

    name = "fake-ring"

    def __init__(self) -> None:
        self.prod = 0
        self.cons = 0
        self.loss_checks = 0

    def produced(self) -> int:
        return self.prod

    def consumed(self) -> int:
        return self.cons

    def check_losses(self) -> None:
        self.loss_checks += 1


class Waiting:
    """One wait() in a thread; ``result`` is None while it waits."""

    def __init__(self, barrier: CaptureBarrier, timeout: float = 60.0) -> None:
        self.result: bool | None = None
        self._t = threading.Thread(target=self._run, args=(barrier, timeout), daemon=True)
        self._t.start()

    def _run(self, barrier: CaptureBarrier, timeout: float) -> None:
        self.result = barrier.wait(timeout)

    def join(self) -> bool | None:
        self._t.join(30)
        return self.result


def _until_registered(barrier: CaptureBarrier, n: int) -> None:
    deadline = time.monotonic() + 30
    while barrier.stats.waits < n:
        assert time.monotonic() < deadline, "the wait did not register"
        time.sleep(0.001)


def test_nothing_produced_since_the_last_fed_read_returns_at_once() -> None:
    ring = Ring()
    b = CaptureBarrier(ring)
    assert b.wait(0.0)  # nothing ever produced
    ring.prod = ring.cons = 64
    b.served(b.begin())  # a read fed everything up to 64
    assert b.wait(0.0)
    assert b.stats.waits == 0, "the fast path needs no loop"
    assert b.stats.calls == 2 and b.stats.wait_seconds == 0.0
    b.close()


def test_a_ring_waiter_is_released_once_the_consumer_passed_its_mark() -> None:
    ring = Ring()
    b = CaptureBarrier(ring)
    ring.prod = 100  # reserved before the wait (one record still BUSY, say)
    w = Waiting(b)
    _until_registered(b, 1)
    ring.prod = 150  # produced after the call: not waited for
    rnd = b.begin()
    assert ring.loss_checks == 1, "the read that serves a waiter reads the loss counters"
    ring.cons = 80  # the reader stopped at the BUSY record
    b.served(rnd)
    assert w.result is None and b.poll_within() is not None, "the loop must read again soon"
    rnd = b.begin()
    ring.cons = 100  # committed and read
    b.served(rnd)
    assert w.join() is True
    assert b.poll_within() is None
    b.close()


def test_a_queue_waiter_is_released_by_a_read_that_began_after_its_call() -> None:
    q = Queue()
    b = CaptureBarrier(q)
    rnd = b.begin()  # a read already under way when the wait is called
    w = Waiting(b)
    _until_registered(b, 1)
    b.served(rnd)
    assert w.result is None, "a read begun before the call may have missed what came before it"
    b.served(b.begin())
    assert w.join() is True
    b.close()


def test_a_timeout_is_false_and_stop_releases_everyone() -> None:
    ring = Ring()
    b = CaptureBarrier(ring)
    ring.prod = 8
    assert b.wait(0.01) is False
    assert b.stats.timeouts == 1
    assert b.stats.waits == 1 and b.stats.wait_seconds >= 0.005
    w = Waiting(b)
    _until_registered(b, 2)
    b.stop()  # the loop reads no more (shutdown): decide by what was delivered
    assert w.join() is True
    assert b.wait(60.0) is True
    b.close()


def test_pump_serves_a_wait_with_a_real_inotify_source(tmp_path: Path) -> None:
    """An event made before the wait has been fed when it returns, whatever the loop was doing."""
    from kwatch.capture.inotify import InotifySource

    source = InotifySource(CaptureFilter.make(roots=[tmp_path]))
    b = CaptureBarrier(source)
    fed: list[bytes] = []
    loop = threading.Thread(target=pump, args=(source, lambda evs: fed.extend(e.path for e in evs), b), daemon=True)
    loop.start()
    try:
        for i in range(20):
            (tmp_path / f"f{i}").write_bytes(b"x")
            assert b.wait(30.0)
            assert os.fsencode(tmp_path / f"f{i}") in fed
    finally:
        b.stop()
        loop.join(10)
        b.close()
        source.close()
    assert not loop.is_alive()

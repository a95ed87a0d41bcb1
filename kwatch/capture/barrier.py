"""The capture barrier: a consumer of events (a replicator's thread) waits until every event produced before its
call has been handed to it, instead of waiting for the capture loop's next batched wake-up.

Why: a replicator reads a file and then asks the events whether some process has it open for writing (a writer
stalled mid-write shows a stable prefix: see ``kwatch.replicate.engine``). An open that happened before the read
but whose event is still in the capture queue would be missed: the BPF ring buffer wakes its reader at most once per
``wake_s`` while events flow (``kwatch.capture.bpf``), so delivery lags by up to that much.

How: the thread that reads the Source (the daemon's loop, or :func:`pump` for ``kwatch replicate``) polls
:meth:`CaptureBarrier.fileno`, an eventfd, beside the source. :meth:`CaptureBarrier.wait` notes a mark and writes the
eventfd; the loop wakes at once, calls :meth:`~CaptureBarrier.begin`, reads the source without waiting, hands the
events to every sink, and calls :meth:`~CaptureBarrier.served`, which releases each waiter its read covered.

- BPF (a source with ``produced``/``consumed`` positions): the mark is the ring's producer position. A record is
  reserved, which moves that position past it, before the syscall that made it returns (the exit tracepoint
  submits it), so every event of an operation that completed before the wait ends at or before the mark. A waiter
  is released once the reader's consumer position has reached the mark and those records were fed. A record
  reserved but not committed yet (BUSY) stops the reader, so it holds the barrier until it is committed; meanwhile
  the loop polls again every :data:`RETRY_S`. The read that serves a waiter also reads the kernel's loss counters
  (``check_losses``): a failed reserve is counted before its syscall returns, and its LOSS marker is fed too.
- fanotify, inotify: no position. A waiter is released after a read that began after its call: that read took
  everything the descriptor held (up to the backend's ``max_batch`` records per read). What the kernel had not
  queued yet is not covered (fanotify and inotify queue an event as the operation happens, so this is the same
  guarantee); inotify's rename pairing may hold a MOVED_FROM back for its window.
- Fast path: when the producer position has not moved past what was fed already, :meth:`wait` returns at once.
- :meth:`wait` returns False after its timeout: the caller must act as if an event it needs may be missing.
- After :meth:`stop` (the reading loop has ended for good, at shutdown) :meth:`wait` returns True at once: nothing
  more will be delivered, so the caller decides by what was.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from kwatch.capture.base import Source
from kwatch.events import FileEvent
from kwatch.metrics.stats import BarrierStats

#: While a waiter waits for a record still being written (BUSY), the loop reads again this often.
RETRY_S = 0.0005


@runtime_checkable
class Positioned(Protocol):
    """A source whose queue has positions (the BPF ring buffer)."""

    def produced(self) -> int: ...

    def consumed(self) -> int: ...

    def check_losses(self) -> None: ...


class _Waiter:
    __slots__ = ("done", "mark", "round")

    def __init__(self, mark: int | None, rnd: int) -> None:
        self.mark = mark  # the producer position to reach (None: a read that begins after ``round``)
        self.round = rnd
        self.done = threading.Event()


class CaptureBarrier:
    """See the module docstring. :meth:`wait` is called from any thread; the other methods by the reading loop."""

    def __init__(self, source: Source, stats: BarrierStats | None = None) -> None:
        self._positions = source if isinstance(source, Positioned) else None
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._waiters: list[_Waiter] = []
        self._round = 0  # reads begun by the loop
        self._fed = self._positions.consumed() if self._positions is not None else 0
        self.stopped = False
        self.stats = stats if stats is not None else BarrierStats()

    # ---- the waiting side ------------------------------------------------------------------------------------------

    def wait(self, timeout: float) -> bool:
        """Return once every event produced before this call has been handed to every sink (True), or after
        ``timeout`` seconds (False). True at once after :meth:`stop`."""
        st = self.stats
        with self._lock:
            st.calls += 1
            if self.stopped:
                return True
            mark = self._positions.produced() if self._positions is not None else None
            if mark is not None and mark <= self._fed:
                return True
            w = _Waiter(mark, self._round)
            self._waiters.append(w)
            st.waits += 1
            os.eventfd_write(self._fd, 1)  # under the lock: close() cannot have closed the descriptor
        t0 = time.monotonic()
        done = w.done.wait(timeout)
        with self._lock:
            st.wait_seconds += time.monotonic() - t0
            if done or w.done.is_set():
                return True
            self._waiters.remove(w)
            st.timeouts += 1
        return False

    # ---- the reading loop's side ----------------------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable when a waiter asks for a read (poll it with the source's descriptor)."""
        return self._fd

    def poll_within(self) -> float | None:
        """How long the loop may wait before reading again (None: until a descriptor is readable)."""
        return RETRY_S if self._waiters else None

    def begin(self) -> int:
        """Call right before a read of the source; returns the read's number for :meth:`served`."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        with self._lock:
            self._round += 1
            if self._waiters and self._positions is not None:
                self._positions.check_losses()
            return self._round

    def served(self, rnd: int) -> None:
        """Call once the events of read ``rnd`` (see :meth:`begin`) were handed to every sink."""
        pos = self._positions.consumed() if self._positions is not None else None
        with self._lock:
            if pos is not None:
                self._fed = pos
            if not self._waiters:
                return
            keep: list[_Waiter] = []
            for w in self._waiters:
                # a position reached, or (without positions) a read that began after the wait's call
                covered = w.round < rnd if w.mark is None else pos is not None and w.mark <= pos
                if covered:
                    w.done.set()
                else:
                    keep.append(w)
            self._waiters = keep

    def stop(self) -> None:
        """The loop reads no more: release every waiter (and any later one at once), and wake the loop."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            for w in self._waiters:
                w.done.set()
            self._waiters = []
            os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        """:meth:`stop`, and close the eventfd (once the loop no longer polls it)."""
        self.stop()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def pump(source: Source, feed: Callable[[list[FileEvent]], None], barrier: CaptureBarrier) -> None:
    """Read ``source`` and hand every batch to ``feed`` until ``barrier`` is stopped, serving its waits: the loop of
    ``kwatch replicate`` (the daemon's loop does the same between its other duties)."""
    ep = select.epoll()
    try:
        ep.register(source.fileno(), select.EPOLLIN)
        ep.register(barrier.fileno(), select.EPOLLIN)
        while not barrier.stopped:
            ep.poll(_soonest(source.poll_within(), barrier.poll_within()))
            rnd = barrier.begin()
            events = source.read(0)
            if events:
                feed(events)
            barrier.served(rnd)
    finally:
        ep.close()


def _soonest(*waits: float | None) -> float:
    """The shortest of ``waits`` for epoll (-1: no limit)."""
    given = [w for w in waits if w is not None]
    return min(given) if given else -1

"""Whether a file read for a batch may land on the mirror, and whether a name gone from the source was renamed
rather than deleted: the checks a transport makes against the event stream while it sends a batch (the capture
barrier first, then the queued events folded, then the coalescer asked). See docs/replication.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kwatch.replicate.coalesce import Coalescer

log = logging.getLogger("kwatch.replicate")

#: How long a replicator waits for the capture barrier before it treats the reads it covers as torn (sent again later)
BARRIER_TIMEOUT = 5.0


class LandingCheck:
    """``barrier`` returns the capture barrier's wait (or None: events fed by hand); ``fold`` folds what is queued."""

    def __init__(self, coalescer: Coalescer, max_delay: float, spec: str, fold: Callable[[], None],
                 barrier: Callable[[], Callable[[float], bool] | None]) -> None:
        self.coalescer = coalescer
        self.max_delay = max_delay
        self.spec = spec
        self.fold = fold
        self.barrier = barrier
        #: name -> since when its reads are dropped because it was reopened for writing (see _being_written)
        self._reopened: dict[bytes, float] = {}

    def _wait_barrier(self) -> bool:
        wait = self.barrier()
        return True if wait is None else wait(BARRIER_TIMEOUT)

    def renamed_away(self, rel: bytes, flags: int) -> bool:
        """Whether ``rel`` (a name of this batch, gone from the source) was renamed, or an ancestor was, since the
        take; its content is then looked at again under its new name in a later batch, not deleted.

        Without this a file made just before its directory was renamed (tar, then ``mv`` of a directory it made) is
        lost: this batch finds its old name gone, the mirror never had it, and the next batch's rename moves a
        directory without it (seen on fanotify, whose events come later than the BPF ring's). The capture barrier
        first, so that a rename made before the lstat that failed has been folded."""
        if self.barrier() is not None:
            self._wait_barrier()  # a timeout leaves the delete: the rescan after a loss repairs the rest
        self.fold()
        cur = self.coalescer.current_name(rel)
        if cur == rel:
            return False
        self.coalescer.retry(cur, time.monotonic(), flags)  # with EXIST: a directory is made there
        return True

    def unlandable(self, paths: list[bytes]) -> set[bytes]:
        """Which of ``paths`` (names of this batch, each read already) must not land: see :meth:`_being_written`.

        A write(2) is not atomic for a reader: the size grows folio by folio while mtime and ctime were set at its
        start, so a writer descheduled mid-write shows a stable prefix that the size and time checks around a read
        cannot tell from a finished file. Whether some process had the file open for writing is known from events,
        and those arrive late (the BPF ring buffer wakes the capture loop at most every ``wake_s`` while events flow).
        So first the capture barrier: it returns once every event made before this call was fed to us. The open of
        a writer whose output the read saw happened before the read (its event was reserved in the ring before
        open(2) returned), so it is among them; what is queued is then folded and the coalescer asked. Without a
        barrier (events fed by hand) this is what arrived so far. If the barrier times out, every read it covers is
        treated as torn: never landed blindly, sent again in a later batch.
        """
        if not paths:
            return set()
        if self.barrier() is not None and not self._wait_barrier():
            log.warning("target %s: capture did not deliver its events within %.0fs; %d reads are sent again later",
                        self.spec, BARRIER_TIMEOUT, len(paths))
            return set(paths)
        self.fold()
        now = time.monotonic()
        return {p for p in paths if self._being_written(p, now)}

    def _being_written(self, rel: bytes, now: float) -> bool:
        """Whether a read of ``rel`` (a name of this batch) made before the events folded so far may hold a
        writer's partial output; the caller does not land it, and the file's close (or the retry) marks it again.

        Two reasons, each as the coalescer holds files at the take: the file is open for writing with a hold younger
        than ``max_delay`` (a file written forever is sent after that, as Coalescer.take does); or it was opened for
        writing since the batch was taken (a writer that opened, wrote and closed while the read ran: the read may
        have seen its prefix). The second holds a file for at most ``max_delay`` in a row (a file rewritten without
        pause must still reach the mirror). The name is followed through renames folded since the take.
        """
        c = self.coalescer
        cur = c.current_name(rel)
        if c.is_writing(cur, now):
            return True
        if not (c.opened_since_take(rel) or c.opened_since_take(cur)):
            self._reopened.pop(rel, None)
            return False
        if len(self._reopened) > 4096:  # names held once and never read again (deleted since): forget the old ones
            self._reopened = {k: t for k, t in self._reopened.items() if now - t < self.max_delay}
        return now - self._reopened.setdefault(rel, now) < self.max_delay


"""The replication engine: one :class:`Replicator` per target keeps a mirror identical to a source tree.

Each replicator runs in its own thread with its own coalescer, so targets progress independently (fan-out) and a
slow or dead target never holds back another. It owns the thread, the queue of events, the reconnect backoff and the
statistics, and is given a transport that carries batches (:mod:`kwatch.replicate.transport`: the kwatch agent,
:mod:`kwatch.replicate.agent_transport`; an rsync daemon or ``rsync --server``, :mod:`kwatch.replicate.rsync_target`).
Its cycle:

1. connect and reconcile: the first batch is a rescan of the whole tree (the transport compares the mirror with a
   scan of the source and sends what differs) - on start, after a reconnect, and after any loss. On start and after
   a loss the files some process holds open for writing are found in ``/proc`` (their opens were not seen): they are
   held like the files whose open was seen, and the reconcile leaves them to a later batch;
2. fold live events into the coalescer; when a batch is due, hand it to the transport. A file read for the batch
   lands only if no writer may have had it open during the read (:meth:`Replicator.unlandable`): the capture
   barrier (:attr:`Replicator.barrier`, see ``kwatch.capture.barrier``) first, so every event made before the check
   has been fed to us, including the open of any writer whose output the read saw; then the coalescer is asked;
3. act on the transport's report, the same for every transport: paths to send again are marked, subtrees rescanned,
   a directory missing on the mirror repaired, transient per-path errors retried with a doubling wait; the counters
   are updated once, here.

A dead target is retried with exponential backoff and jitter (:mod:`kwatch.replicate.backoff`), and why it is down
is kept for the metrics (:mod:`kwatch.replicate.failure`); meanwhile events keep folding into the (bounded)
coalescer and, because we cannot know what the mirror applied before it died, the reconnect reconciles the whole
tree. A remote host without kwatch (exit status 127) falls back to rsync over the same ssh (``rsync --server``),
with a warning of what is lost.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import TargetStats
from kwatch.paths import parent
from kwatch.replicate.ack import TRANSIENT
from kwatch.replicate.agent_transport import AgentTransport
from kwatch.replicate.backoff import Backoff
from kwatch.replicate.coalesce import CONTENT, EXIST, META, Batch, Coalescer
from kwatch.replicate.landing import LandingCheck
from kwatch.replicate.link import LinkError
from kwatch.replicate.options import DELTA_MIN, TargetOptions
from kwatch.replicate.progress import Pacer, Progress, log_line
from kwatch.replicate.retries import PathRetries
from kwatch.replicate.scan import DEFAULT_EXCLUDES, Excluder
from kwatch.replicate.target import Target
from kwatch.replicate.transport import BatchReport, Transport
from kwatch.replicate.writers import scan_writers

if TYPE_CHECKING:
    from kwatch.replicate.rsync_target import RsyncTransport

__all__ = ["DELTA_MIN", "TRANSIENT", "BatchReport", "Replicator", "Target", "TargetOptions", "make_replicator",
           "wait_synced"]

log = logging.getLogger("kwatch.replicate")



def _rsync_transport() -> type[RsyncTransport]:
    """The rsync transport class, imported when a target needs it: its checksum code brings numpy (0.1-0.2 s of
    start-up), which a first sync to the kwatch agent has no use for."""
    from kwatch.replicate.rsync_target import RsyncTransport

    return RsyncTransport


def make_transport(host: Replicator, target: Target, opts: TargetOptions) -> Transport:
    """The transport for ``target``'s kind: the kwatch agent (local pipe or ssh), or a stock rsync daemon."""
    if target.kind == "rsync":
        return _rsync_transport()(host, target.spec, opts)
    return AgentTransport(host, target, opts)


#: seconds between looks at whether a batch that went ahead has ended
AHEAD_POLL = 0.02
#: seconds between progress log lines of a reconcile (see Replicator.report_progress), and between live lines
PROGRESS_INTERVAL = 5.0
LIVE_INTERVAL = 0.2


class MissingRepair:
    """Which directory to rescan for each name the mirror lacked (ENOENT: its parent, or the directory whose
    attributes were set, is not there) while the source still has it, so that the mirror converges without a restart.

    A missing directory should not happen (events bring directories before their contents), but a lost or misread
    event, or someone deleting on the mirror, must not leave a hole until the next reconcile. When the same directory
    fails again the repair goes one level up; once the root's rescan has failed too it stops (the errors stay counted
    and logged) until a batch applies without such an error."""

    def __init__(self) -> None:
        #: directories rescanned since the last batch without such an error
        self._repairing: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._repairing)

    def tops(self, paths: list[bytes], in_source: Callable[[bytes], bytes | None]) -> list[tuple[bytes, bytes]]:
        """(name, directory to rescan) for each of a batch's missing ``paths`` that ``in_source`` still finds
        (under its current name); an empty ``paths`` (a clean batch) ends the repair."""
        if not paths:
            self._repairing.clear()
            return []
        out = []
        for rel in filter(None, map(in_source, paths)):
            top = parent(rel)
            while top in self._repairing and top:
                top = parent(top)
            if top in self._repairing:
                continue  # the root's rescan failed already: wait for a clean batch before trying again
            self._repairing.add(top)
            out.append((rel, top))
        return out


class Replicator:
    """Keeps the mirror at ``target`` identical to ``src_root``; see the module docstring."""

    def __init__(
        self,
        src_root: bytes,
        target: Target,
        opts: TargetOptions | None = None,
        stats: TargetStats | None = None,
        on_agent: Callable[[int], None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.src = src_root.rstrip(b"/") or b"/"
        self.target = target
        self.opts = opts or TargetOptions()
        self.stats = stats or TargetStats(target.spec)
        self.on_agent = on_agent  # told the agent's pid, so capture can ignore a local agent's writes
        self.coalescer = Coalescer(self.src, settle=self.opts.settle, max_delay=self.opts.max_delay)
        self.excluded = Excluder((*DEFAULT_EXCLUDES, *self.opts.excludes))
        # each item: events and when they were handed over (None: stop)
        self._queue: queue.Queue[tuple[float, list[FileEvent]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # stop now: cut what is in flight
        self._stopping = threading.Event()  # stop once the pending changes are sent (at once while down)
        #: --once: one reconcile, then the run ends. An error that retrying cannot fix (LinkError.permanent) ends it
        #: instead of being retried, and nothing is prepared for later batches (see kwatch/replicate/preload.py)
        self.once = False
        #: set when the thread ends (stopped, or gave up: then ``gave_up`` says why)
        self.done = threading.Event()
        self.gave_up: str | None = None
        self._wire_seen = 0  # the transport's wire_bytes() already counted in stats.bytes_wire
        #: carries the batches (given, or made for the target's kind); swapped for rsync over ssh when the remote
        #: host has no kwatch (see _fall_back)
        self.transport: Transport = transport if transport is not None else make_transport(self, target, self.opts)
        self._oldest: float | None = None  # monotonic time of the oldest change not yet on the mirror
        self._first: float | None = None  # arrival (monotonic) of the first event folded in since the last take
        self._stop_seen = False  # the stop request was taken off the queue by _fold_queued
        self.synced = threading.Event()  # set whenever nothing is pending and the mirror is up to date
        self.last_error: str | None = None
        #: shows the progress of a batch that reconciles a tree (the first sync, a rescan): called as
        #: on_progress(target, progress, final) at most every LIVE_INTERVAL seconds and at its end (a terminal's
        #: live line); None: a ``key=value`` log line every ``progress_interval`` seconds and at its end
        self.on_progress: Callable[[str, Progress, bool], None] | None = None
        self.progress_interval = PROGRESS_INTERVAL
        self._progress: Progress | None = None
        self._reported: tuple[int, int, int, int] | None = None  # the transport's last report_progress
        self._progress_every = 0.0  # seconds between workings-out of the figures (0: at the first report)
        self._pacer = Pacer(PROGRESS_INTERVAL)
        self._batch_started = 0.0
        self._progress_at = float("-inf")  # when the progress figures were last worked out
        #: the capture barrier's wait (kwatch.capture.barrier), set by whoever feeds this replicator live events:
        #: True once every event made before the call was fed to us, False after the timeout. None: events are
        #: fed by hand (tests), a read is judged by what arrived so far
        self.barrier: Callable[[float], bool] | None = None
        #: the checks against the event stream before a read lands (see kwatch.replicate.landing)
        self.landing = LandingCheck(self.coalescer, self.opts.max_delay, target.spec, self.fold_queued,
                                    lambda: self.barrier)
        self._repairing = MissingRepair()
        #: paths sent again after a transient error of the mirror, with a doubling wait
        self.retries = PathRetries()

    # ---- the thread -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"replicate {self.target.spec}", daemon=True)
        self._thread.start()

    def feed(self, events: list[FileEvent]) -> None:
        if events:
            self._queue.put((time.monotonic(), events))

    def request_stop(self) -> None:
        """Ask the thread to send what is pending and end; a target that is down ends at once (its backoff wait
        is cut short). Returns without waiting (see :meth:`stop`)."""
        self._queue.put(None)
        self._stopping.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Send what is pending (within ``timeout``), then close the transport. Past ``timeout`` a batch still in
        flight is cut: the agent process is killed, so the mirror keeps whole files only (each lands by rename(2)
        once complete; a cut one stays a temporary, which scans skip)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._stop.set()
                self.transport.cut()  # the thread sees the agent's end and leaves
                self._thread.join(1.0)
        self._stop.set()
        if self._thread is None or not self._thread.is_alive():
            self.transport.close()
            self._count_wire()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.done.set()

    def _loop(self) -> None:
        backoff = Backoff()
        self.coalescer.rescan(b"")
        self._seed_writers()
        stopping = False
        while not self._stop.is_set():
            try:
                if not self.stats.connected:
                    self._connect()
                    backoff.reset()
                    self.stats.down = ""
                stopping = self._wait_and_fold(stopping)
                now = time.monotonic()
                self._mark_due_retries(now)
                due = self._due_in(now)
                self._finish_ahead(wait=due is None or stopping)
                if due is None:
                    if self.coalescer.pending() or self._due_in(time.monotonic()) is not None:
                        continue  # what the batches that went ahead left to do
                    self._mark_synced()
                    if stopping:
                        return
                    continue
                if (due > 0 and not stopping) or self._ahead_full():
                    continue
                batch = self._take(now)
                self._first = None
                self.synced.clear()
                if batch.empty() and not stopping:
                    continue  # an early take that held back only files still open for writing
                if not stopping and self._start_ahead(batch):
                    continue
                self._finish_ahead(wait=True)
                self._sync(batch)
                if stopping and not self.coalescer.pending():
                    self._finish_ahead(wait=True)
                    if not self.coalescer.pending():
                        return
            except (LinkError, OSError) as e:
                self.last_error = str(e)
                self.stats.errors += 1
                self.stats.connected = False
                self._disconnect()
                if self._stop.is_set():
                    return
                if isinstance(e, LinkError) and e.permanent and self.once:
                    log.error("target %s: %s; giving up (retrying cannot fix this)", self.target.spec, e)
                    self.gave_up = str(e)
                    return
                self.stats.down = down_reason(e)
                wait = backoff.next()
                log.warning("target %s: %s; retrying in %.1fs", self.target.spec, e, wait)
                self.coalescer.rescan(b"")  # what the agent applied before it failed is unknown
                if stopping or self._stopping.wait(wait):
                    return
                self.stats.reconnects += 1

    def _due_in(self, now: float) -> float | None:
        """Seconds until a batch should be taken (0: now), None when nothing is pending.

        The coalescer's rule (``settle`` seconds of quiet, or ``max_delay`` after the first event), and one more:
        ``eager`` seconds after the arrival of the first event folded in since the last batch. The thread only gets
        here when the target is idle (a batch is synchronous), so during a long burst the mirror works alongside the
        writer, not ``max_delay`` behind it, while a busy target still gets batches as large as its backlog: events
        that arrived during a batch are eager seconds old when it ends more often than not, and go at once. A file still
        open for writing stays behind in an early batch (the coalescer holds it until it is closed or has waited
        ``max_delay``, as before), so eagerness sends no more partial files than ``max_delay`` does.
        """
        due = self.coalescer.due_in(now)
        if due is None or self._first is None or self.opts.eager is None:
            return due
        return min(due, max(0.0, self._first + self.opts.eager - now))

    def _wait_and_fold(self, stopping: bool) -> bool:
        """Wait for events (until a batch is due) and fold them in; True once a stop was requested."""
        stopping = stopping or self._stop_seen
        now = time.monotonic()
        due = self._due_in(now)
        if due is None and self.retries.next > now:
            # in sync now, not after the wait below (``--once`` waited out its second after the last batch)
            self._mark_synced()
        timeout = 1.0 if due is None else due
        if self._in_flight():  # see the ends of the batches that went ahead soon, without spinning while none may go
            timeout = AHEAD_POLL if self._ahead_full() else min(timeout, AHEAD_POLL)
        timeout = max(0.0, min(timeout, self.retries.next - now))
        try:
            item = self._queue.get(timeout=timeout) if not stopping else self._queue.get_nowait()
        except queue.Empty:
            return stopping
        return self._fold(item) or stopping

    def _mark_synced(self) -> None:
        self.synced.set()
        self._oldest = None
        self.stats.lag_seconds = 0.0

    def fold_queued(self) -> None:
        """Fold what is queued now, without waiting: the link calls it while it waits for the agent, so the events
        of a burst are folded while a batch is sent (an untar's 80,000 events took 0.2-0.5 s to fold after it)."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return
        if self._fold(item):
            self._stop_seen = True

    def _fold(self, item: tuple[float, list[FileEvent]] | None) -> bool:
        """Fold ``item`` and whatever else is queued; True when a stop request was among them."""
        stopping = False
        lost = False
        while True:
            if item is None:
                stopping = True
            else:
                # Timed by arrival, not by this fold: events that came while a batch was being sent have waited
                # already, so the next batch is due at once (eager) instead of eager seconds after the fold, and
                # settle counts quiet from the last event's arrival (after an untar's burst, 0.1-0.2 s per batch).
                arrived, events = item
                if self._oldest is None:
                    self._oldest = arrived
                if self._first is None and events:
                    self._first = arrived
                for ev in events:
                    self.coalescer.add(ev, arrived)
                    lost = lost or ev.op is Op.LOSS
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if self._oldest is not None:
            self.stats.lag_seconds = time.monotonic() - self._oldest
        if lost:
            self._seed_writers()  # opens and closes may be among the lost events
        return stopping

    def renamed_away(self, rel: bytes, flags: int) -> bool:
        """See :meth:`kwatch.replicate.landing.LandingCheck.renamed_away`."""
        return self.landing.renamed_away(rel, flags)

    def unlandable(self, paths: list[bytes]) -> set[bytes]:
        """See :meth:`kwatch.replicate.landing.LandingCheck.unlandable`."""
        return self.landing.unlandable(paths)

    def _seed_writers(self) -> None:
        """Hold the files that some process has open for writing now (found in ``/proc``; see writers)."""
        found = scan_writers(self.src, exclude_pids=(os.getpid(),))
        self.coalescer.seed_writers(found, time.monotonic())
        if found:
            log.info("target %s: %d files open for writing wait for their close", self.target.spec, len(found))

    def _connect(self) -> None:
        try:
            self.transport.connect()
        except LinkError as e:
            if e.down != "missing_command" or self.target.kind != "ssh" or isinstance(self.transport, _rsync_transport()):
                raise
            self._fall_back(e)
            self.transport.connect()
        self.stats.connected = True

    def _fall_back(self, e: LinkError) -> None:
        """The remote host has no kwatch: replicate with rsync over the same ssh (``rsync --server`` there), as an
        rsync user would, and say what that loses."""
        log.warning("target %s: %s", self.target.spec, e)
        log.warning("target %s: falling back to rsync over ssh (rsync --server on %s) until kwatch is installed "
                    "there and kwatch replicate restarted: renames are sent as new files (a similar file in the "
                    "same directory serves as the delta basis), each batch is one rsync session, and a file read "
                    "while a writer has it open may reach the mirror partly written until its next change",
                    self.target.spec, self.target.host)
        self.transport = _rsync_transport()(self, f"ssh://{self.target.host}/", self.opts,
                                        rsh=ssh_rsh(self.target, self.opts), remote_path=self.target.path,
                                        name=self.target.spec)
        self._wire_seen = 0

    def _disconnect(self) -> None:
        self.stats.connected = False
        self._count_wire()
        self.transport.disconnect()

    def _count_wire(self) -> None:
        """Add what the transport wrote since the last count to ``bytes_wire`` (a counter: it only grows)."""
        wire = self.transport.wire_bytes()
        self.stats.bytes_wire += wire - self._wire_seen
        self._wire_seen = wire

    # ---- one batch -------------------------------------------------------------------------------------------------

    def sync_now(self, batch: Batch) -> BatchReport:
        """Apply one batch synchronously (used by tests)."""
        if not self.stats.connected:
            self._connect()
        return self._sync(batch)

    def report_progress(self, files_done: int, files_total: int, bytes_done: int, bytes_total: int) -> None:
        """From the transport, while it sends a batch with rescans: what it has sent of what it planned.

        Called once per file sent: the figures are kept as given, and worked out only as often as anybody may look
        (a first sync of 100,000 small files spent a tenth of its sender's time here when each call advanced them).
        """
        self._reported = (files_done, files_total, bytes_done, bytes_total)
        now = time.monotonic()
        if now - self._progress_at < self._progress_every:
            return
        self._show_progress(now, final=False)

    def _advance(self, now: float) -> Progress | None:
        """Bring the batch's Progress up to the transport's last report (made at its first)."""
        r = self._reported
        if r is None:
            return self._progress
        files_done, files_total, bytes_done, bytes_total = r
        if self._progress is None:
            self._progress = Progress(files_total, bytes_total, self._batch_started)
            self._pacer = Pacer(self.progress_interval if self.on_progress is None else LIVE_INTERVAL)
            self._progress_every = min(LIVE_INTERVAL, self._pacer.interval)
        p = self._progress
        p.files_total, p.bytes_total = max(p.files_total, files_total), max(p.bytes_total, bytes_total)
        p.advance(files_done, bytes_done, now)
        return p

    def _show_progress(self, now: float, *, final: bool) -> None:
        p = self._advance(now)
        if p is None:
            return
        self._progress_at = now
        st = self.stats
        st.sync_files, st.sync_files_total = p.files_done, p.files_total
        st.sync_bytes, st.sync_bytes_total = p.bytes_done, p.bytes_total
        st.sync_bytes_per_s, st.sync_eta_s = round(p.bytes_per_s), p.eta
        st.syncing = not final
        if not self._pacer.due(now, final=final):
            return
        if self.on_progress is not None:
            self.on_progress(self.target.spec, p, final)
        else:
            log.info("%s", log_line(self.target.spec, p, done=final))

    # ---- batches ahead (a transport that may carry several at once: kwatch.replicate.rsync_target) -------------

    def _in_flight(self) -> int:
        count = getattr(self.transport, "in_flight", None)
        return int(count()) if count is not None else 0

    def _ahead_full(self) -> bool:
        full = getattr(self.transport, "ahead_full", None)
        return bool(full()) if full is not None else False

    def _start_ahead(self, b: Batch) -> bool:
        """Hand ``b`` to the transport without waiting for its end when it can go alongside the batches in flight."""
        start = getattr(self.transport, "start_ahead", None)
        return bool(start(b)) if start is not None else False

    def _finish_ahead(self, wait: bool) -> None:
        """Act on the reports of the batches that went ahead and have ended (with ``wait``: of all of them)."""
        finish = getattr(self.transport, "finish_ahead", None)
        if finish is None:
            return
        for b, rep in finish(wait):
            self._after(b, rep)

    def _sync(self, b: Batch) -> BatchReport:
        self._batch_started = time.monotonic()
        self._progress = None
        self._reported = None
        self._progress_every = 0.0
        self._progress_at = float("-inf")
        try:
            rep = self.transport.sync(b)
        finally:
            if self._reported is not None:
                self._show_progress(time.monotonic(), final=True)
                self._progress = self._reported = None
        self._after(b, rep)
        return rep

    def _after(self, b: Batch, rep: BatchReport) -> None:
        """What the replicator does with a batch's report, whatever the transport (see kwatch.replicate.ack)."""
        for new in rep.rescan:  # the mirror never had the old name (created and moved within one batch)
            self.coalescer.rescan(self.coalescer.current_name(new))
        self._repair_missing(rep.missing)
        self._schedule_retries(rep.transient, rep.failed, b)
        for rel in rep.resend:
            # under its current name: events of the time the batch was sent may be folded in already (fold_queued)
            self.coalescer.retry(self.coalescer.current_name(rel), time.monotonic())
        self._record(rep, b)

    def _record(self, rep: BatchReport, b: Batch) -> None:
        """The counters of one batch, whatever the transport."""
        st = self.stats
        st.batches += 1
        st.files += rep.puts + rep.deltas
        st.renames += rep.renames
        st.deletes += rep.deletes
        st.errors += rep.error_count()
        st.bytes_literal += rep.literal
        st.bytes_matched += rep.matched
        self._count_wire()
        st.pending_paths = self.coalescer.pending_paths()
        st.count_rescans(b.rescans)

    def _repair_missing(self, paths: list[bytes]) -> None:
        """Rescan a directory for each name the mirror lacked (see :class:`MissingRepair`)."""
        for rel, top in self._repairing.tops(paths, self._in_source):
            log.warning("target %s: %s is missing on the mirror; rescanning %s", self.target.spec,
                        os.fsdecode(rel), os.fsdecode(top) or "the root")
            self.coalescer.rescan(top)

    def _schedule_retries(self, transient: list[bytes], failed: set[bytes], b: Batch) -> None:
        """Send ``transient`` (names that failed with a :data:`TRANSIENT` error) again later (see
        kwatch.replicate.retries); a name of batch ``b`` that did not fail again landed."""
        self.retries.landed(b.dirty, failed)
        now = time.monotonic()
        here = []
        for failed_name in transient:
            found = self._in_source(failed_name)
            if found is None:
                # not in the source under that name: deleted, or renamed by an event still waiting to be folded in;
                # a mark now is carried along by that rename when it comes (or plans a delete where nothing is)
                self.coalescer.retry(self.coalescer.current_name(failed_name), now, CONTENT | EXIST | META)
                continue
            here.append(found)
        for rel, wait in self.retries.schedule(here, now):
            log.warning("target %s: %s: sent again in %.0f s", self.target.spec, os.fsdecode(rel), wait)
        self.stats.failed_paths = len(self.retries)

    def _take(self, now: float) -> Batch:
        """The coalescer's batch; the names waiting for a retry follow the renames it carries.

        A retry is keyed by the name that failed: when that file or a directory above it is renamed before the retry
        is due, the mirror's stale copy moves with the rename, so the retry must go to the new name (at the old one
        the source has nothing, and only a delete would be planned)."""
        batch = self.coalescer.take(now)
        for old, new in batch.renames:
            self.retries.rename(old, new)
        return batch

    def _mark_due_retries(self, now: float) -> None:
        """Put the names whose retry is due into the next batch: a file whole (content, existence, attributes), a
        directory as a rescan (what was put into it failed too, for want of it)."""
        for due in self.retries.due(now):
            # renamed (itself or a directory above) since the last take: the batch holds that rename already, and
            # a mark under the old name would come after it (a delete there, the stale copy left at the new name)
            rel = self.coalescer.current_name(due)
            if rel != due:
                self.retries.rename(due, rel)
            try:
                is_dir = stat.S_ISDIR(os.lstat(os.path.join(self.src, rel)).st_mode)
            except OSError:
                is_dir = False  # gone meanwhile: the batch plans its delete
            if is_dir:
                self.coalescer.rescan(rel)
            else:
                self.coalescer.retry(rel, now, CONTENT | EXIST | META)
            self.stats.retries += 1
        self.stats.failed_paths = len(self.retries)

    def _in_source(self, rel: bytes) -> bytes | None:
        """``rel``'s current name (after the renames folded since the take) if the source still has it, else None."""
        cur = self.coalescer.current_name(rel)
        return cur if os.path.lexists(os.path.join(self.src, cur)) else None



def ssh_rsh(target: Target, opts: TargetOptions) -> list[str]:
    """The ssh command line (without the remote command) the agent would have been reached with."""
    argv = target.agent_argv(opts)
    return argv[:-1]


def make_replicator(
    src_root: bytes, target: Target, opts: TargetOptions, on_agent: Callable[[int], None] | None = None
) -> Replicator:
    """The replicator for ``target`` with the transport its kind needs."""
    return Replicator(src_root, target, opts, on_agent=on_agent)


def down_reason(e: BaseException) -> str:
    """The metric's reason (kwatch.replicate.failure.REASONS) for a failure of the target's transport."""
    if isinstance(e, LinkError):
        return e.down
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    return "error"


def wait_synced(reps: Iterable[Replicator], timeout: float) -> bool:
    """Wait until every replicator is in sync, or has given up (then False)."""
    deadline = time.monotonic() + timeout
    ok = True
    for r in reps:
        while not r.synced.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if r.done.is_set() or time.monotonic() >= deadline:
                break
        ok = ok and r.synced.is_set() and r.gave_up is None
    return ok

"""What a replicator needs from a transport, and what a transport needs from its replicator. No I/O here.

A :class:`~kwatch.replicate.engine.Replicator` owns the thread, the event queue, the coalescer, the reconnect
backoff and the statistics; it is *given* a :class:`Transport` (the kwatch agent over a pipe or ssh:
:mod:`kwatch.replicate.agent_transport`; a stock rsync daemon or ``rsync --server``:
:mod:`kwatch.replicate.rsync_target`) that carries one batch at a time to the mirror and says what happened in a
:class:`BatchReport`. The replicator then does the same for every transport: paths to send again are marked in
the coalescer, missing directories rescanned, transient failures retried, the counters updated once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kwatch.protocols.agent import PathError
from kwatch.replicate.coalesce import Batch, Coalescer
from kwatch.replicate.scan import Excluder


@dataclass
class BatchReport:
    puts: int = 0
    deltas: int = 0
    renames: int = 0
    deletes: int = 0
    errors: list[PathError] = field(default_factory=list)  # per-path errors of the mirror
    messages: list[str] = field(default_factory=list)  # other per-path errors (rsync's, as text)
    literal: int = 0
    matched: int = 0
    #: what the replicator does after the batch (see kwatch.replicate.ack)
    resend: list[bytes] = field(default_factory=list)  # send again in a later batch (changed while read, held open)
    rescan: list[bytes] = field(default_factory=list)  # reconcile these subtrees (renames the mirror could not replay)
    missing: list[bytes] = field(default_factory=list)  # the mirror lacked their directory
    transient: list[bytes] = field(default_factory=list)  # failed with an error that may pass: retry with backoff
    failed: set[bytes] = field(default_factory=set)  # every path that failed in this batch

    def error_count(self) -> int:
        return len(self.errors) + len(self.messages)


class Host(Protocol):
    """The replicator as a transport sees it: the source, the options, and the checks that need the event stream."""

    src: bytes
    coalescer: Coalescer
    excluded: Excluder
    on_agent: Callable[[int], None] | None
    once: bool  # --once: the link ends after one reconcile

    def report_progress(self, files_done: int, files_total: int, bytes_done: int, bytes_total: int) -> None:
        """While a batch with rescans is sent: files and bytes of file data sent so far, of the totals planned."""

    def fold_queued(self) -> None:
        """Fold the events queued now, without waiting (called while the transport waits for the mirror)."""

    def renamed_away(self, rel: bytes, flags: int) -> bool:
        """Whether ``rel``, gone from the source, was renamed since the take (then it is not deleted)."""

    def unlandable(self, paths: list[bytes]) -> set[bytes]:
        """Which of ``paths`` (read already) a writer may have had open during the read: not to be landed."""


class Transport(Protocol):
    """Carries batches to one mirror."""

    def connect(self) -> None:
        """Make the mirror reachable (LinkError if not); a no-op for a transport with one session per batch."""

    def disconnect(self) -> None:
        """Drop the connection (after a failure, or at the end)."""

    def close(self) -> None:
        """A clean end: what was sent is flushed."""

    def sync(self, b: Batch) -> BatchReport:
        """Apply batch ``b`` to the mirror (LinkError when the transport fails: the replicator reconnects)."""

    def wire_bytes(self) -> int:
        """Bytes written to the mirror since this transport was made (never decreases)."""

    def cut(self) -> None:
        """From another thread: end a batch in flight now, leaving the mirror with whole files only."""

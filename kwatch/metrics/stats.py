"""The daemon's counters: plain data the daemon updates and the collector reads at scrape time. Pure code."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

#: Seconds; action latency (event to command start) and replication lag live in this range.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with +Inf, as Prometheus wants them."""
        out, acc = [], 0
        for bound, c in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            acc += c
            out.append((bound, acc))
        return out


#: every value of a target's down reason (TargetStats.down), in the order docs/metrics.md lists them; which failure
#: is which is kwatch.replicate.failure's to say
DOWN_REASONS = ("refused", "unreachable", "auth", "hostkey", "missing_command", "destination", "disk_full", "timeout",
                "protocol", "error")


@dataclass
class TargetStats:
    """One replication target."""

    name: str
    lag_seconds: float = 0.0
    pending_paths: int = 0
    failed_paths: int = 0  # waiting to be sent again after a transient error of the mirror (ENOSPC...)
    bytes_literal: int = 0
    bytes_matched: int = 0
    bytes_wire: int = 0
    files: int = 0
    renames: int = 0
    deletes: int = 0
    errors: int = 0
    reconnects: int = 0
    batches: int = 0
    rescans_full: int = 0  # batches that reconciled the whole tree
    rescans_subtree: int = 0  # subtrees reconciled (a tree moved in, a loss below one directory, a repair)
    retries: int = 0
    connected: bool = False
    #: why the target is down ("" while it is up or has not failed): one of DOWN_REASONS
    down: str = ""
    #: the progress of the batch reconciling a tree (first sync, rescan) in flight, or of the last one
    #: (kwatch.replicate.progress)
    syncing: bool = False
    sync_files: int = 0
    sync_files_total: int = 0
    sync_bytes: int = 0
    sync_bytes_total: int = 0
    sync_bytes_per_s: int = 0
    sync_eta_s: float | None = None

    def count_rescans(self, rescans: set[bytes]) -> None:
        """Count a batch's rescans (relative paths, ``b""`` for the whole tree) by scope."""
        if b"" in rescans:
            self.rescans_full += 1
        self.rescans_subtree += len(rescans) - (b"" in rescans)


@dataclass
class BarrierStats:
    """The capture barrier's counters (``kwatch.capture.barrier``), updated by the replicators' threads."""

    calls: int = 0  # every wait, the fast path included
    waits: int = 0  # waits that had to wake the capture loop
    timeouts: int = 0  # waits that gave up: the reads they covered were sent again later
    wait_seconds: float = 0.0  # time spent in the waits that woke the loop


@dataclass
class OutputStats:
    """One durable output (``kwatch.outputs``): updated by its writer, read at scrape time."""

    name: str
    kind: str  # file | journal | nats
    records: int = 0  # records written (file, journal) or stored by the server (nats)
    already_stored: int = 0  # nats: of ``records``, those found in the stream after a lost acknowledgement, not resent
    bytes: int = 0
    errors: int = 0  # failed writes, sends or publishes (each retried or counted as lost)
    lost: int = 0  # records that never reached the output; each loss is also announced by a marker record
    skipped: int = 0  # records left out on purpose: the output's own server's file operations (feedback)
    rotations: int = 0
    fsyncs: int = 0
    repaired_bytes: int = 0  # bytes of a torn last line cut off when the file was opened again
    connected: bool = True
    backlog: Callable[[], int] | None = None  # records waiting (queue + spool), read at scrape time
    backlog_bytes: Callable[[], int] | None = None  # bytes of the on-disk spool


@dataclass
class DaemonStats:
    events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, backend)
    lost: Counter[str] = field(default_factory=Counter)  # backend
    rule_matches: Counter[str] = field(default_factory=Counter)  # rule name
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rule, result: started/ok/failed/timeout)
    action_latency: Histogram = field(default_factory=Histogram)
    queues: dict[str, Callable[[], int]] = field(default_factory=dict)  # name -> depth, read at scrape time
    targets: dict[str, TargetStats] = field(default_factory=dict)
    reloads: int = 0
    reload_errors: int = 0
    barrier: BarrierStats = field(default_factory=BarrierStats)
    outputs: dict[str, OutputStats] = field(default_factory=dict)
    alerts: Counter[str] = field(default_factory=Counter)  # rule name

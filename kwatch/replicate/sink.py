"""Replication inside ``kwatch run``: an event sink that feeds every captured batch to the config's replicators.

The daemon asks each sink for ``capture_roots`` (the sources) and ``capture_ops`` before it opens the capture
source, sets :attr:`ReplicationSink.barrier` (the capture barrier's ``wait``, see ``kwatch.capture.barrier``; every
replicator gets it), then calls :meth:`ReplicationSink.start` with that source (local agents are child processes
whose own writes must not come back as events: their pids are excluded in the kernel where the backend can), then
``feed`` per batch, ``close`` at shutdown (pending batches are sent first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from kwatch.capture.base import Source
from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import DaemonStats
from kwatch.replicate.engine import Replicator, Target, TargetOptions, make_replicator
from kwatch.rules.model import ReplicateTarget


def options_from_config(opts: dict[str, object]) -> TargetOptions:
    """TargetOptions from a checked config table (:mod:`kwatch.rules.replication` validated the types)."""
    t = TargetOptions()
    for key in ("delete", "compress", "checksum", "owner"):
        if key in opts:
            setattr(t, key, bool(opts[key]))
    for key in ("settle", "max_delay"):
        if key in opts:
            setattr(t, key, float(opts[key]))  # type: ignore[arg-type]
    if "eager" in opts:
        t.eager = float(opts["eager"]) or None  # type: ignore[arg-type]  # 0: wait for settle/max_delay only
    for key in ("ssh", "agent_command", "password_file", "fsync"):
        if key in opts:
            setattr(t, key, str(opts[key]))
    if "bwlimit" in opts:
        t.bwlimit = int(opts["bwlimit"]) * 1024  # type: ignore[call-overload]
    if "exclude" in opts:
        t.excludes = tuple(os.fsencode(x) for x in opts["exclude"])  # type: ignore[attr-defined]
    return t


class ReplicationSink:
    capture_ops = frozenset(Op) - {Op.LOSS}

    def __init__(self, targets: Iterable[ReplicateTarget], stats: DaemonStats) -> None:
        self.specs = [(os.fsencode(str(t.options["source"])), Target.parse(t.target), options_from_config(t.options))
                      for t in targets]
        self.stats = stats
        self.replicators: list[Replicator] = []
        #: set by the daemon before start: waits until the events made before the call were fed (None: no barrier)
        self.barrier: Callable[[float], bool] | None = None

    @property
    def capture_roots(self) -> list[bytes]:
        return [src for src, _, _ in self.specs]

    def start(self, source: Source) -> None:
        exclude = getattr(source, "exclude_pid", None)
        for src, target, opts in self.specs:
            r = make_replicator(src, target, opts, on_agent=exclude)
            r.barrier = self.barrier
            self.stats.targets[target.spec] = r.stats
            r.start()
            self.replicators.append(r)

    def feed(self, events: list[FileEvent]) -> None:
        for r in self.replicators:
            r.feed(events)

    def close(self) -> None:
        for r in self.replicators:
            r.stop()

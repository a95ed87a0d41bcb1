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
from kwatch.replicate import options
from kwatch.replicate.engine import Replicator, make_replicator
from kwatch.replicate.target import Target
from kwatch.rules.model import ReplicateTarget


class ReplicationSink:
    capture_ops = frozenset(Op) - {Op.LOSS}

    def __init__(self, targets: Iterable[ReplicateTarget], stats: DaemonStats) -> None:
        self.specs = [(os.fsencode(str(t.options["source"])), Target.parse(t.target), options.build(t.options))
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

"""``kwatch replicate --once``: the replicator says it is in sync as soon as the last batch is acked.

It said so only after waiting for more events (up to a second, the idle wait of its thread): every ``--once`` and
every first sync of the daemon took a second longer than its work.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import pytest
from treecmp import tree_differences

from kwatch.replicate.engine import Replicator, Target, TargetOptions


class _WatchedQueue(queue.Queue):  # type: ignore[type-arg]
    """The replicator's event queue, noting whether ``synced`` was set each time the thread blocked on it."""

    def __init__(self, rep: Replicator) -> None:
        super().__init__()
        self.rep = rep
        self.blocked_synced: list[bool] = []
        self.blocked = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None):  # type: ignore[no-untyped-def]
        if block and (timeout is None or timeout > 0) and self.rep.stats.batches:
            self.blocked_synced.append(self.rep.synced.is_set())
            self.blocked.set()
        return super().get(block, timeout)


@pytest.mark.root
def test_synced_is_set_before_the_thread_waits_for_more_events(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(20):
        (src / "d" / f"f{i}").write_bytes(os.urandom(100))
    rep = Replicator(os.fsencode(src), Target.parse(str(tmp_path / "mirror")), TargetOptions())
    watched = _WatchedQueue(rep)
    rep._queue = watched
    rep.start()
    try:
        assert watched.blocked.wait(60), "the replicator never finished its first batch"
        assert watched.blocked_synced[0], "the thread waited for events before saying it was in sync"
        assert rep.synced.is_set()
        assert tree_differences(src, tmp_path / "mirror") == []
    finally:
        rep.stop(timeout=5)

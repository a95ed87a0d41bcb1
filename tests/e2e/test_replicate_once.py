"""``kwatch replicate --once``, a first sync: it shows its progress, and it ends as soon as the last batch is acked.

The replicator said it was in sync only after waiting for more events (up to a second, the idle wait of its thread):
every ``--once`` and every first sync of the daemon took a second longer than its work.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
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


def _fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split("progress ", 1)[1].split(" "))


@pytest.mark.root
def test_a_first_sync_logs_its_progress_up_to_the_totals(tmp_path: Path) -> None:
    """Not on a terminal: ``key=value`` lines, every --progress-interval seconds (0: after every file) and at the
    end; files and bytes only grow, never pass the totals, and the last line is the whole tree."""
    src = tmp_path / "src"
    sizes = [0, 1, 4096, 300_000, 2_000_000] * 8  # empty, small (PutFiles frames), and streamed files
    for i, n in enumerate(sizes):
        d = src / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(n))
    res = subprocess.run([sys.executable, "-m", "kwatch", "replicate", "--once", "--progress-interval", "0",
                          str(src), str(tmp_path / "mirror")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert tree_differences(src, tmp_path / "mirror") == []
    lines = [_fields(line) for line in res.stderr.splitlines() if " progress target=" in line]
    assert len(lines) > 2, res.stderr
    last = lines[-1]
    assert last["done"] == "1" and all(f["done"] == "0" for f in lines[:-1])
    assert (int(last["files"]), int(last["bytes"])) == (len(sizes), sum(sizes))
    assert (int(last["files_total"]), int(last["bytes_total"])) == (len(sizes), sum(sizes))
    assert last["eta_s"] == "0.0"
    before = {"files": 0, "bytes": 0, "elapsed_s": 0.0}
    for f in lines:
        assert int(f["files"]) <= int(f["files_total"]) and int(f["bytes"]) <= int(f["bytes_total"]), f
        assert int(f["files"]) >= before["files"] and int(f["bytes"]) >= before["bytes"], (before, f)
        assert float(f["elapsed_s"]) >= before["elapsed_s"], (before, f)
        before = {"files": int(f["files"]), "bytes": int(f["bytes"]), "elapsed_s": float(f["elapsed_s"])}
        if f["eta_s"] != "-" and float(f["bytes_per_s"]) > 0:  # time left = bytes left at the rate so far
            left = (int(f["bytes_total"]) - int(f["bytes"])) / float(f["bytes_per_s"])
            assert float(f["eta_s"]) == pytest.approx(left, abs=0.1), f


def _replicator(tmp_path: Path) -> tuple[Path, Path, Replicator]:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_bytes(b"old")
    rep = Replicator(os.fsencode(src), Target.parse(str(tmp_path / "mirror")), TargetOptions())
    rep.coalescer.rescan(b"")  # as the thread does on start
    return src, tmp_path / "mirror", rep


@pytest.mark.root
def test_the_scan_made_while_the_agent_starts_serves_the_first_batch(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kwatch.replicate import agent_transport

    scans: list[bytes] = []
    real_scan = agent_transport.scan

    def counting_scan(root: bytes, *a: object, **k: object) -> object:
        scans.append(root)
        return real_scan(root, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_transport, "scan", counting_scan)
    src, mirror, rep = _replicator(tmp_path)
    try:
        rep.sync_now(rep.coalescer.take(time.monotonic() + 10))
        assert len(scans) == 1, "the source was scanned again after the agent was up"
        assert tree_differences(src, mirror) == []
    finally:
        rep.stop(timeout=5)


@pytest.mark.root
def test_a_change_folded_in_after_that_scan_began_is_not_lost(tmp_path: Path) -> None:
    """The root's rescan covers every change without a mark of its own: a scan older than a change must not serve."""
    from kwatch.events import FileEvent, Op

    src, mirror, rep = _replicator(tmp_path)
    try:
        rep._connect()
        prescan = rep.transport._prescan  # type: ignore[attr-defined]
        assert prescan is not None and prescan.result() is not None  # the scan is done: it cannot see what follows
        (src / "d" / "new").write_bytes(b"new")
        rep.coalescer.add(FileEvent(Op.CLOSE_WRITE, os.fsencode(src / "d" / "new")), time.monotonic())
        rep.sync_now(rep.coalescer.take(time.monotonic() + 10))
        assert (mirror / "d" / "new").read_bytes() == b"new"
        assert tree_differences(src, mirror) == []
    finally:
        rep.stop(timeout=5)

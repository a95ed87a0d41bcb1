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
from importprobe import once_importing, run_probed
from treecmp import tree_differences

from kwatch.replicate.engine import Replicator, Target, TargetOptions
from kwatch.replicate.options import DELTA_MIN


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


@pytest.mark.root
def test_a_first_sync_into_an_empty_mirror_sends_while_the_source_is_scanned(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent creates the directories the scan has listed so far while the scan goes on, instead of waiting for
    the whole scan, the diff and the plan (a million files: several seconds of an idle agent). The scan is held after
    the root's listing until the mirror has the root's subdirectory; before, that never happened during the scan."""
    from kwatch.replicate import agent_transport

    src, mirror, rep = _replicator(tmp_path)
    (src / "e").mkdir()
    (src / "e" / "f").write_bytes(b"f")
    os.symlink("d/old", src / "link")
    os.link(src / "e" / "f", src / "e" / "g")
    (src / "big").write_bytes(os.urandom(600_000))
    real_scan = agent_transport.scan
    seen: list[bool] = []

    def holding_scan(root: bytes, *a: object, on_dir: object = None, **k: object) -> object:
        def listed(entries: list[tuple[bytes, object]]) -> None:
            on_dir(entries)  # type: ignore[operator]
            if not seen:  # the root's listing: hold the scan until its directories are on the mirror
                deadline = time.monotonic() + 20
                while not (mirror / "e").is_dir() and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen.append((mirror / "e").is_dir())

        return real_scan(root, *a, on_dir=listed if on_dir is not None else None, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_transport, "scan", holding_scan)
    try:
        rep._connect()
        rep.sync_now(rep.coalescer.take(time.monotonic() + 10))
        assert seen == [True], "nothing reached the mirror before the scan of the source ended"
        assert tree_differences(src, mirror) == []  # the symlink, the hard link and the large file too
        assert os.stat(mirror / "e" / "f").st_ino == os.stat(mirror / "e" / "g").st_ino
    finally:
        rep.stop(timeout=5)


@pytest.mark.root
def test_a_first_sync_into_a_mirror_with_files_plans_against_them(tmp_path: Path) -> None:
    """A mirror that is not empty gets the usual plan (nothing sent during the scan): what it has already is not sent
    again, and what it has extra is deleted."""
    src, mirror, rep = _replicator(tmp_path)
    (mirror / "d").mkdir(parents=True)
    (mirror / "d" / "old").write_bytes(b"old")
    os.utime(mirror / "d" / "old", ns=(os.stat(src / "d" / "old").st_mtime_ns,) * 2)
    (mirror / "extra").write_bytes(b"x")
    (src / "new").write_bytes(b"new")
    try:
        rep._connect()
        r = rep.sync_now(rep.coalescer.take(time.monotonic() + 10))
        assert r.puts == 1 and r.deletes == 1
        assert tree_differences(src, mirror) == []
    finally:
        rep.stop(timeout=5)


@pytest.mark.root
def test_a_first_sync_into_an_empty_mirror_imports_no_numpy_on_either_end(tmp_path: Path) -> None:
    """numpy is the delta engine's (most of its import time): a first sync into an empty mirror makes no delta, so
    neither the replicator nor its agent imports it. With a file that needs a delta both do (the probe works)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    big = os.urandom(DELTA_MIN * 4)
    (src / "d" / "big").write_bytes(big)
    (src / "small").write_bytes(b"x")
    started, numpy = once_importing(tmp_path, src, str(tmp_path / "empty"), "numpy")
    assert tree_differences(src, tmp_path / "empty") == []
    assert started >= 2, "the probe did not see both the replicator and its agent start"
    assert numpy == set(), "a first sync into an empty mirror imported numpy"

    mirror = tmp_path / "stale"
    (mirror / "d").mkdir(parents=True)
    (mirror / "d" / "big").write_bytes(big[:-100] + bytes(100))  # same size, older: a delta
    os.utime(mirror / "d" / "big", ns=(1, 1))
    started, numpy = once_importing(tmp_path, src, str(mirror), "numpy")
    assert tree_differences(src, mirror) == []
    assert started >= 2 and len(numpy) == 2, "a delta did not import numpy on both ends: the probe is broken"


# A live replicator without capture: its first sync, then it waits for both ends' imports (the probe's log) to end.
_LIVE = """\
import os, sys, threading, time
from kwatch.replicate.engine import Replicator, Target, TargetOptions
rep = Replicator(os.fsencode(sys.argv[1]), Target.parse(sys.argv[2]), TargetOptions())
rep.start()
try:
    assert rep.synced.wait(120), "no first sync"
    deadline = time.monotonic() + 120
    log = os.environ["KWATCH_IMPORT_LOG"]
    while open(log).read().count(" imported") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
finally:
    rep.stop(timeout=10)
"""


@pytest.mark.root
def test_a_live_link_imports_the_delta_engine_on_both_ends_before_a_delta_needs_it(tmp_path: Path) -> None:
    """The counterpart: a replicator that stays (not --once) has both ends import the delta engine in the background
    after connecting, so the first live delta does not pay for numpy's import (kwatch/replicate/preload.py)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"x")
    started, numpy = run_probed(tmp_path, [sys.executable, "-c", _LIVE, str(src), str(tmp_path / "mirror")], "numpy")
    assert tree_differences(src, tmp_path / "mirror") == []
    assert started >= 2 and len(numpy) == 2, "a live link did not preload the delta engine on both ends"

"""The inotify backend against the real kernel: the workload table of tests/support/workload.py, each run by a child.

The child finishes before the first read, so a directory created by the workload is only watched when its IN_CREATE
is read: what happened inside it comes from the scan (CREATE/MKDIR with extra["scan"], no MODIFY/CLOSE_WRITE).
That is the new-directory race at its widest, made deterministic; test_new_dir_watched_live covers the other side.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from workload import (
    DEEP,
    NONUTF8,
    WORKLOADS,
    Layout,
    Workload,
    burst_script,
    collect,
    expected,
    run_child,
    run_setup,
    triples,
)

from kwatch.capture import inotify as inotify_mod
from kwatch.capture.base import CaptureError, CaptureFilter
from kwatch.capture.inotify import InotifySource, parse
from kwatch.events import FT_DIR, FT_LNK, FT_REG, Op

C, W, CW, MK, RM, UN, RN, SL, AT = (
    Op.CREATE,
    Op.MODIFY,
    Op.CLOSE_WRITE,
    Op.MKDIR,
    Op.RMDIR,
    Op.UNLINK,
    Op.RENAME,
    Op.SYMLINK,
    Op.ATTRIB,
)
_deep = ["/".join(["d"] * i) for i in range(1, 71)]

EXPECT: dict[str, list[tuple[Op, str | bytes] | tuple[Op, str | bytes, str | bytes]]] = {
    "create_write_close": [(C, "f"), (W, "f"), (CW, "f")],
    "create_empty": [(C, "e"), (CW, "e")],
    "mkdir": [(MK, "d")],
    "mkdir_rmdir": [(MK, "d"), (RM, "d")],
    "rmdir": [(RM, "d")],
    "unlink": [(UN, "f")],
    "rename_same_dir": [(RN, "f", "g")],
    "rename_across_dirs": [(RN, "a/f", "b/g")],
    "rename_over_existing": [(RN, "a", "b")],
    "rename_dir_then_write": [(RN, "a", "c"), (W, "c/s/f"), (CW, "c/s/f")],  # the watches follow the rename
    "rename_exchange": [(RN, "a", "b"), (RN, "b", "a")],
    "move_out": [(UN, "f")],  # a MOVED_FROM alone
    "move_in": [(C, "g")],  # a MOVED_TO alone
    "move_dir_in": [(MK, "t"), (C, "t/g"), (MK, "t/u"), (C, "t/u/f")],  # then watched and scanned
    "move_dir_out": [(RM, "t")],
    "symlink": [(SL, "l")],
    "hardlink": [(C, "h")],
    "chmod": [(AT, "f")],
    "chown": [(AT, "f")],
    "truncate": [(W, "f")],
    "setxattr": [(AT, "f")],
    "utime": [(AT, "f")],
    "chmod_dir": [(AT, "d")],  # from the parent's watch (the directory's own watch repeats it and is ignored)
    "dirfd_relative": [(C, "sub/f"), (W, "sub/f"), (CW, "sub/f"), (RN, "sub/f", "sub/g"), (UN, "sub/g")],
    "absolute_path": [(C, "abs"), (CW, "abs")],
    "name_with_spaces_quotes": [(C, "a b 'c\" d"), (CW, "a b 'c\" d")],
    "name_with_newline": [(C, "line1\nline2"), (CW, "line1\nline2")],
    "name_non_utf8": [(C, NONUTF8), (CW, NONUTF8)],
    "deep_tree_create": [(MK, d) for d in _deep] + [(C, DEEP + "/f")],  # all but "d" from the scan
    "deep_tree_write": [(C, DEEP + "/f"), (CW, DEEP + "/f")],
    "new_dir_race": [(MK, "n"), (C, "n/f")],  # n/f from the scan
    # inotify keeps the real order: Python's buffered write reaches the file at close, after the chmod
    "lifecycle_one_process": [(C, "f"), (AT, "f"), (W, "f"), (CW, "f"), (UN, "f")],
    "tree_create_remove": [(MK, "q"), (RM, "q")],  # q was gone before it could be watched
    # x was renamed before it could be watched: watched and scanned as x2 (empty by then); y2 moved in, scanned
    "rename_dir_chain": [(MK, "x"), (RN, "x", "x2"), (MK, "y2"), (C, "y2/f"), (C, "y2/g")],
}

SCANNED = {"move_dir_in": 3, "deep_tree_create": 70, "new_dir_race": 1, "rename_dir_chain": 2}
FTYPES = {"create_write_close": FT_REG, "symlink": FT_LNK, "mkdir": FT_DIR}
NEEDS_ROOT = {"chown"}


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.make(tmp_path)


def _source(layout: Layout, **kw: float) -> InotifySource:
    return InotifySource(CaptureFilter.make([os.fsencode(layout.root)]), **kw)


def test_table_covers_every_workload() -> None:
    assert set(EXPECT) == set(WORKLOADS)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.root] if n in NEEDS_ROOT else []) for n in sorted(WORKLOADS)]
)
def test_workload(layout: Layout, name: str) -> None:
    w = WORKLOADS[name]
    run_setup(w, layout)
    with _source(layout) as src:
        run_child(w, layout)
        events = collect(src)
        assert src.stats().overflows == 0
    assert triples(events) == expected(layout, EXPECT[name])
    for e in events:
        assert e.backend == "inotify"
        # inotify names no process
        assert (e.pid, e.ppid, e.uid, e.gid, e.comm, e.tid, e.ts_ns) == (None,) * 7
        assert e.target == (b"some/target" if e.op is Op.SYMLINK else None)
    assert sum(1 for e in events if e.extra and e.extra.get("scan")) == SCANNED.get(name, 0)
    if name in FTYPES:
        assert events[0].ftype == FTYPES[name]


def test_new_dir_watched_live(layout: Layout) -> None:
    """Once the new directory's IN_CREATE was read, what happens inside is reported from its own watch."""
    with _source(layout) as src:
        run_child(Workload("mk", 'os.mkdir("n")'), layout)
        assert triples(collect(src)) == expected(layout, [(MK, "n")])
        run_child(Workload("in", 'f = open("n/f", "w"); f.write("x"); f.close(); os.mkdir("n/m")'), layout)
        events = collect(src)
    assert triples(events) == expected(layout, [(C, "n/f"), (W, "n/f"), (CW, "n/f"), (MK, "n/m")])
    assert not any(e.extra for e in events)


def test_scan_and_event_report_a_file_once(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file made after the new directory's watch was added but before its scan: the scan and IN_CREATE both see
    it; it is reported once (by the scan), and its later events from the watch follow."""
    real_add = InotifySource._add_watch

    def add_then_create(self: InotifySource, path: bytes) -> int:
        err = real_add(self, path)
        if path.endswith(b"/n"):
            with open(path + b"/late", "w") as f:
                f.write("x")
        return err

    with _source(layout) as src:
        monkeypatch.setattr(InotifySource, "_add_watch", add_then_create)
        run_child(Workload("mk", 'os.mkdir("n")'), layout)
        events = collect(src)
    assert triples(events) == expected(layout, [(MK, "n"), (C, "n/late"), (W, "n/late"), (CW, "n/late")])
    assert [bool(e.extra) for e in events] == [False, True, False, False]


def test_a_tree_renamed_before_its_new_directories_were_watched(layout: Layout) -> None:
    """mkdir t/sub, write t/sub/f, then rename t to t2, all before the source reads: sub's IN_CREATE is read after
    the rename, so its path is gone when it is to be watched. The rename then watches it under its new name and
    reports what it holds; later writes in it are seen (before, the whole subtree stayed unwatched)."""
    (layout.root / "t").mkdir()
    with _source(layout) as src:
        run_child(Workload("mk", 'os.mkdir("t/sub"); open("t/sub/f", "w").close(); os.rename("t", "t2")'), layout)
        first = {(op, p) for op, p, _n in triples(collect(src))}
        run_child(Workload("in", 'open("t2/sub/g", "w").close()'), layout)
        later = triples(collect(src))
    root = os.fsencode(layout.root)
    assert (Op.CREATE, root + b"/t2/sub/f") in first, first
    assert (Op.CREATE, root + b"/t2/sub/g", None) in later, later


def test_moved_out_directory_is_no_longer_watched(layout: Layout) -> None:
    (layout.root / "t").mkdir()
    with _source(layout) as src:
        watches = src.watches
        run_child(Workload("out", 'os.rename("t", OUT + "/t"); open(OUT + "/t/f", "w").close()'), layout)
        assert triples(collect(src)) == expected(layout, [(RM, "t")])
        assert src.watches == watches - 1


def test_root_removed_and_root_moved(tmp_path: Path) -> None:
    for script, op in (('os.rmdir("r")', Op.RMDIR), ('os.rename("r", "r2")', Op.LOSS)):
        root = tmp_path / "r"
        root.mkdir()
        with InotifySource(CaptureFilter.make([os.fsencode(root)])) as src:
            import subprocess
            import sys

            subprocess.run([sys.executable, "-c", f"import os; {script}"], cwd=tmp_path, check=True)
            events = collect(src)
        assert [(e.op, e.path) for e in events] == [(op, os.fsencode(root))]
        if (tmp_path / "r2").exists():
            (tmp_path / "r2").rmdir()


def test_refuses_slash_and_no_roots(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot watch '/'"):
        InotifySource(CaptureFilter.make(["/"]))
    with pytest.raises(CaptureError, match="roots"):
        InotifySource(CaptureFilter())
    with pytest.raises(CaptureError, match="cannot watch"):
        InotifySource(CaptureFilter.make([os.fsencode(tmp_path / "missing")]))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CaptureError, match="not a directory"):
        InotifySource(CaptureFilter.make([os.fsencode(tmp_path / "file")]))


def _burst_expect(layout: Layout, n: int) -> list[tuple[Op, bytes, bytes | None]]:
    return expected(layout, [item for i in range(n) for item in ((C, f"f{i}"), (CW, f"f{i}"), (UN, f"f{i}"))])


@pytest.mark.slow
def test_burst_reading_concurrently(layout: Layout) -> None:
    """20,000 create/close/unlink while reading: every event delivered in order, or a LOSS marker says not."""
    n = 20_000
    with _source(layout) as src:
        events = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                events.extend(src.read(0.05))

        t = threading.Thread(target=reader)
        t.start()
        try:
            run_child(Workload("burst", burst_script(n)), layout)
        finally:
            stop.set()
            t.join()
        events.extend(collect(src))
    want = _burst_expect(layout, n)
    got = triples(events)
    if any(e.op is Op.LOSS for e in events):  # allowed, never silent: what came is in order
        it = iter(want)
        assert all(any(g == w for w in it) for g in got if g[0] is not Op.LOSS)
    else:
        assert got == want


@pytest.mark.slow
def test_burst_overflow_is_a_marker(layout: Layout) -> None:
    """Read only after 60,000 events: the queue (fs.inotify.max_queued_events) overflows; a prefix, then LOSS."""
    n = 20_000
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if 3 * n <= limit:
        pytest.skip(f"max_queued_events={limit} holds the whole burst")
    with _source(layout) as src:
        run_child(Workload("burst", burst_script(n)), layout)
        events = collect(src)
        assert src.stats().overflows == 1
        assert events[-1].op is Op.LOSS and events[-1].lost is None
        got = triples(events[:-1])
        assert got == _burst_expect(layout, n)[: len(got)] and len(got) == limit
        # still watching afterwards
        run_child(WORKLOADS["create_empty"], layout)
        assert triples(collect(src)) == expected(layout, [(C, "e"), (CW, "e")])


def test_parse_whole_and_truncated() -> None:
    import struct

    name = b"a\nb\xff" + b"\0" * 4
    rec = struct.pack("=iIII", 3, inotify_mod.IN_CREATE, 0, len(name)) + name
    assert parse(rec + rec) == [(3, inotify_mod.IN_CREATE, 0, b"a\nb\xff")] * 2
    for cut in range(len(rec)):
        assert parse(rec[:cut]) == []

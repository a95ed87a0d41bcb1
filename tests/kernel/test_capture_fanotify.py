"""The fanotify backend against the real kernel: the workload table of tests/support/workload.py, each run by a child.

Expectations state exactly what fanotify delivers on Linux 6.18 (measured, then encoded), merged records included:
a merged record is split in the fixed order CREATE, MODIFY, CLOSE_WRITE, ATTRIB, DELETE, and a merged rmdir is moved
behind the records inside the directory (see kwatch/capture/fanotify.py).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
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

from kwatch.capture.base import CaptureError, CaptureFilter
from kwatch.capture.fanotify import (
    FAN_CREATE,
    FAN_DELETE,
    FAN_EVENT_INFO_TYPE_DFID_NAME,
    FAN_EVENT_INFO_TYPE_FID,
    FAN_ONDIR,
    FanotifySource,
    RawEvent,
    _PathWalk,
    _rmdir_positions,
    parse,
)
from kwatch.events import FT_DIR, FT_LNK, FT_REG, Op
from kwatch.replicate.coalesce import Coalescer

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
_deep = [f"{'/'.join(['d'] * i)}" for i in range(1, 71)]
assert _deep[-1] == DEEP

EXPECT: dict[str, list[tuple[Op, str | bytes] | tuple[Op, str | bytes, str | bytes]]] = {
    "create_write_close": [(C, "f"), (W, "f"), (CW, "f")],
    "create_empty": [(C, "e"), (CW, "e")],
    "mkdir": [(MK, "d")],
    "mkdir_rmdir": [(MK, "d"), (RM, "d")],  # one merged record CREATE|DELETE|ONDIR
    "rmdir": [(RM, "d")],
    "unlink": [(UN, "f")],  # the nameless link-count ATTRIB on the object is dropped
    "rename_same_dir": [(RN, "f", "g")],
    "rename_across_dirs": [(RN, "a/f", "b/g")],
    "rename_over_existing": [(RN, "a", "b")],  # the replaced file gets no dirent event
    "rename_dir_then_write": [(RN, "a", "c"), (W, "c/s/f"), (CW, "c/s/f")],
    "rename_exchange": [(RN, "a", "b"), (RN, "b", "a")],  # one FAN_RENAME per direction
    "move_out": [(RN, "f", "../out/f")],  # the filesystem is marked: the outside name is known
    "move_in": [(RN, "../out/g", "g")],
    "move_dir_in": [(RN, "../out/t", "t")],
    "move_dir_out": [(RN, "t", "../out/t")],
    "symlink": [(SL, "l")],
    "hardlink": [(C, "h")],  # fanotify cannot tell a hard link from a new file
    "chmod": [(AT, "f")],
    "chown": [(AT, "f")],
    "truncate": [(W, "f")],
    "setxattr": [(AT, "f")],
    "utime": [(AT, "f")],
    "chmod_dir": [(AT, "d")],  # reported on the directory itself (name ".")
    "dirfd_relative": [(C, "sub/f"), (W, "sub/f"), (CW, "sub/f"), (RN, "sub/f", "sub/g"), (UN, "sub/g")],
    "absolute_path": [(C, "abs"), (CW, "abs")],
    "name_with_spaces_quotes": [(C, "a b 'c\" d"), (CW, "a b 'c\" d")],
    "name_with_newline": [(C, "line1\nline2"), (CW, "line1\nline2")],
    "name_non_utf8": [(C, NONUTF8), (CW, NONUTF8)],
    "deep_tree_create": [(MK, d) for d in _deep] + [(C, DEEP + "/f"), (CW, DEEP + "/f")],
    "deep_tree_write": [(C, DEEP + "/f"), (CW, DEEP + "/f")],
    "new_dir_race": [(MK, "n"), (C, "n/f"), (W, "n/f"), (CW, "n/f")],
    # create, write, chmod, close, unlink: one merged record, split in the fixed order (chmod after close)
    "lifecycle_one_process": [(C, "f"), (W, "f"), (CW, "f"), (AT, "f"), (UN, "f")],
    # mkdir q|rmdir q and mkdir q/r|rmdir q/r are merged records; their rmdirs move behind what happened inside
    "tree_create_remove": [(MK, "q"), (MK, "q/r"), (C, "q/r/f"), (CW, "q/r/f"), (UN, "q/r/f"), (RM, "q/r"), (RM, "q")],
    # paths are those at the time of each record, not at the time of the read
    "rename_dir_chain": [
        (MK, "x"),
        (MK, "x/y"),
        (C, "x/y/f"),
        (CW, "x/y/f"),
        (RN, "x", "x2"),
        (RN, "x2/y", "y2"),
        (C, "y2/g"),
        (CW, "y2/g"),
    ],
}

FTYPES = {"create_write_close": FT_REG, "symlink": FT_LNK, "mkdir": FT_DIR}

root_only = pytest.mark.root


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    """The test's tree on a tmpfs of its own: a filesystem mark sees every change on its filesystem, and on the
    shared root filesystem a busy machine (another test run writing there) overflowed the bounded queue (a LOSS,
    correctly reported, but the exact-sequence tests need the test's own events only). Without root, tmp_path."""
    if os.geteuid() != 0:
        yield Layout.make(tmp_path)
        return
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "kwatch-test", str(fs)], check=True)
    try:
        yield Layout.make(fs)
    finally:
        subprocess.run(["umount", "--lazy", str(fs)], check=False)


def _source(layout: Layout, **kw: object) -> FanotifySource:
    return FanotifySource(CaptureFilter.make([os.fsencode(layout.root)]), **kw)  # type: ignore[arg-type]


def test_table_covers_every_workload() -> None:
    assert set(EXPECT) == set(WORKLOADS)


@root_only
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload(layout: Layout, name: str) -> None:
    w = WORKLOADS[name]
    run_setup(w, layout)
    with _source(layout) as src:
        pid = run_child(w, layout)
        events = collect(src)
        assert src.stats().lost == 0
    assert triples(events) == expected(layout, EXPECT[name])
    for e in events:
        assert e.pid == pid
        assert e.backend == "fanotify"
        # fanotify does not know these; nothing is read from /proc after the fact
        assert (e.ppid, e.uid, e.gid, e.comm, e.tid, e.ts_ns) == (None,) * 6
        if e.op is Op.SYMLINK:
            assert e.target == b"some/target"
        else:
            assert e.target is None
    if name in FTYPES:
        assert events[0].ftype == FTYPES[name]


@pytest.fixture
def bind_layout(layout: Layout) -> Iterator[Layout]:
    """w/a_src bound at w/b_bind, and out/real bound at w/c_view (a mount inside the tree of another place)."""
    mounts = []
    try:
        for src, dst in ((layout.root / "a_src", layout.root / "b_bind"), (layout.out / "real", layout.root / "c_view")):
            src.mkdir()
            dst.mkdir()
            subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
            mounts.append(dst)
        yield layout
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], check=False)


@root_only
def test_bind_mounts(bind_layout: Layout) -> None:
    """A change through any mount of the marked filesystem is seen; it is named through the watched root's mount."""
    lay = bind_layout
    w = Workload(
        "bind",
        'open("b_bind/f", "w").close(); open(OUT + "/real/g", "w").close(); open("c_view/h", "w").close()',
    )
    with _source(lay) as src:
        pid = run_child(w, lay)
        events = collect(src)
    # b_bind/f is a_src/f; out/real is outside the roots by its own name (filtered) and c_view names a directory
    # of the same filesystem reached by handle, which resolves to its canonical path out/real: outside the root.
    assert triples(events) == expected(lay, [(C, "a_src/f"), (CW, "a_src/f")])
    assert {e.pid for e in events} == {pid}


@root_only
def test_root_is_a_bind_mount(layout: Layout) -> None:
    """Watching the bind mount itself: changes made through the original path are named under the watched one."""
    real, view = layout.out / "real", layout.root / "view"
    real.mkdir()
    view.mkdir()
    subprocess.run(["mount", "--bind", str(real), str(view)], check=True)
    try:
        with FanotifySource(CaptureFilter.make([os.fsencode(view)])) as src:
            run_child(Workload("via_real", 'os.mkdir(OUT + "/real/s"); open(OUT + "/real/s/f", "w").close()'), layout)
            events = collect(src)
    finally:
        subprocess.run(["umount", str(view)], check=False)
    v = os.fsencode(view)
    assert triples(events) == [(MK, v + b"/s", None), (C, v + b"/s/f", None), (CW, v + b"/s/f", None)]


@root_only
def test_tmpfs(layout: Layout) -> None:
    """tmpfs has file handles and (since Linux 6.7) an fsid, so it can be marked like ext4."""
    mnt = layout.root / "t"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        with FanotifySource(CaptureFilter.make([os.fsencode(mnt)])) as src:
            pid = run_child(Workload("tmpfs", 'os.mkdir("t/d"); os.rename("t/d", "t/e"); open("t/e/f", "w").close()'), layout)
            events = collect(src)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert triples(events) == expected(layout, [(MK, "t/d"), (RN, "t/d", "t/e"), (C, "t/e/f"), (CW, "t/e/f")])
    assert {e.pid for e in events} == {pid}


@root_only
def test_own_pid_excluded(layout: Layout) -> None:
    with _source(layout) as src:
        (layout.root / "mine").write_bytes(b"x")  # kwatch's own write: never reported
        run_child(Workload("theirs", 'open("theirs", "w").close()'), layout)
        events = collect(src)
    assert triples(events) == expected(layout, [(C, "theirs"), (CW, "theirs")])


@root_only
def test_filter_ops(layout: Layout) -> None:
    filt = CaptureFilter.make([os.fsencode(layout.root)], ops={Op.CLOSE_WRITE})
    with FanotifySource(filt) as src:
        run_child(WORKLOADS["create_write_close"], layout)
        events = collect(src)
    assert triples(events) == expected(layout, [(CW, "f")])


def _burst_expect(layout: Layout, n: int) -> list[tuple[Op, bytes, bytes | None]]:
    return expected(layout, [item for i in range(n) for item in ((C, f"f{i}"), (CW, f"f{i}"), (UN, f"f{i}"))])


@root_only
@pytest.mark.slow
def test_burst_reading_concurrently_loses_nothing(layout: Layout) -> None:
    """4,000 create/close/unlink while reading: all 12,000 events, in order, whatever the kernel merged. At most
    12,000 records of ours: the bounded queue (16384) holds them all even if the reader stalls for a while."""
    n = 4_000
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
        assert src.stats().lost == 0 and src.stats().overflows == 0
    assert triples(events) == _burst_expect(layout, n)


@root_only
@pytest.mark.slow
def test_burst_overflows_the_bounded_queue_with_a_counted_marker(layout: Layout) -> None:
    """Read only after 20,000 files: the kernel's queue (16384 records, never unlimited) overflows; what came is
    exact, then a LOSS marker, counted, which makes a replication target rescan its whole tree."""
    n = 20_000
    with _source(layout) as src:
        run_child(Workload("burst", burst_script(n)), layout)
        events = collect(src)
        stats = src.stats()
    # Other processes share the marked filesystem: when the queue is full their rmdir records are dropped too, so a
    # second marker (directories that could not be resolved) may follow the overflow marker.
    losses = [e for e in events if e.op is Op.LOSS]
    assert losses and losses[0].lost is None and losses[0].extra == {"reason": "fanotify queue overflow"}
    assert stats.overflows == len(losses) and stats.by_op["loss"] == len(losses)
    got = triples(e for e in events if e.op is not Op.LOSS)
    assert 0 < len(got) < 3 * n
    assert got == _burst_expect(layout, n)[: len(got)]
    # the marker is the one the BPF backend sends for a full ring buffer: the coalescer turns it into a rescan
    root = os.fsencode(layout.root)
    co = Coalescer(root)
    for ev in events:
        co.add(ev, 0.0)
    assert b"" in co.take(1e9).rescans


def test_not_root_is_a_clear_error() -> None:
    # The child imports as whoever runs the tests, then drops to nobody (if it can) before trying.
    code = (
        "import os\n"
        "from kwatch.capture.fanotify import FanotifySource\n"
        "from kwatch.capture.base import CaptureError\n"
        "if os.geteuid() == 0:\n    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n    FanotifySource()\nexcept CaptureError as e:\n    print('ERR', e)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", code], cwd="/", env=dict(os.environ, PYTHONPATH=repo), capture_output=True)
    assert r.stdout.startswith(b"ERR fanotify needs CAP_SYS_ADMIN"), r.stderr


@root_only
def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot watch"):
        FanotifySource(CaptureFilter.make([os.fsencode(tmp_path / "nope")]))


# --- the parser and the path walk, without the kernel ------------------------------------------------------------
FSID = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def _handle(n: int) -> bytes:
    return struct.pack("=Ii", 8, 1) + struct.pack("=Q", n)


def _info(info_type: int, handle: bytes, name: bytes | None = None) -> bytes:
    body = FSID + handle + ((name + b"\0") if name is not None else b"")
    body += b"\0" * (-(4 + len(body)) % 4)
    return struct.pack("=BBH", info_type, 0, 4 + len(body)) + body


def _record(mask: int, pid: int, *infos: bytes) -> bytes:
    rest = b"".join(infos)
    return struct.pack("=IBBHQii", 24 + len(rest), 3, 0, 24, mask, -1, pid) + rest


def test_parse_whole_and_truncated() -> None:
    rec = _record(
        FAN_CREATE, 42, _info(FAN_EVENT_INFO_TYPE_DFID_NAME, _handle(1), b"n\nx\xff"), _info(FAN_EVENT_INFO_TYPE_FID, _handle(2))
    )
    buf = rec + rec
    out: list[RawEvent] = []
    assert parse(buf, out) == len(buf)
    assert len(out) == 2
    assert out[0].mask == FAN_CREATE and out[0].pid == 42 and out[0].name == b"n\nx\xff"
    assert out[0].dir_key == FSID + _handle(1) and out[0].obj_key == FSID + _handle(2)
    for cut in range(len(rec)):  # a record cut anywhere is not parsed, and nothing is read past the end
        part: list[RawEvent] = []
        assert parse(rec[:cut], part) == 0 and part == []


class _FakeResolver:
    def __init__(self, now: dict[bytes, bytes]) -> None:
        self.cache = now

    def now(self, key: bytes) -> bytes | None:
        return self.cache.get(key)


def test_path_walk_rewinds_renames_and_finds_removed_dirs() -> None:
    root, q, r = (FSID + _handle(i) for i in (1, 2, 3))
    batch = [
        RawEvent(FAN_CREATE | FAN_DELETE | FAN_ONDIR, 1, dir_key=root, name=b"q", obj_key=q),  # mkdir q .. rmdir q
        RawEvent(FAN_CREATE | FAN_DELETE | FAN_ONDIR, 1, dir_key=q, name=b"r", obj_key=r),
        RawEvent(FAN_CREATE | FAN_DELETE, 1, dir_key=r, name=b"f"),
    ]
    walk = _PathWalk(_FakeResolver({root: b"/w"}), batch)  # type: ignore[arg-type]
    for i in range(len(batch) - 1, -1, -1):
        walk.step(batch[i], i)
    assert [ev.path for ev in batch] == [b"/w/q", b"/w/q/r", b"/w/q/r/f"]
    assert _rmdir_positions(batch) == {0: 2, 1: 2}




# A child (our own pid is excluded) makes (unless they are there) 20 nested directories of 250-byte names by
# descriptor, so the deepest path passes PATH_MAX, writes a file there, then one file at the top.
_DEEP = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for _ in range(20):
    if not os.path.exists(f"/proc/self/fd/{fd}/" + "d" * 250):
        os.mkdir(b"d" * 250, dir_fd=fd)
    nfd = os.open(b"d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = nfd
w = os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
os.write(w, b"x")
os.close(w)
if len(sys.argv) > 2:
    open(sys.argv[2], "wb").close()
"""


@root_only
@pytest.mark.parametrize("made_while_watched", [True, False], ids=["named_by_its_mkdirs", "unnamed"])
def test_a_directory_deeper_than_path_max(layout: Layout, made_while_watched: bool) -> None:
    """Any user can make a directory whose path is longer than PATH_MAX on the marked filesystem. Its records are
    reported with their whole path when the batch's own mkdir records name it, else they are a counted LOSS (a
    replication target rescans); either way the source keeps reading (the path lookup raised ENAMETOOLONG before)."""
    deep = Path(layout.root) / "deep"
    deep.mkdir()
    after = Path(layout.root) / "after"
    if not made_while_watched:
        subprocess.run([sys.executable, "-c", _DEEP, str(deep)], check=True)
    try:
        with _source(layout) as src:
            subprocess.run([sys.executable, "-c", _DEEP, str(deep), str(after)], check=True)
            events = collect(src)
            stats = src.stats()
        got = triples(events)
        assert (Op.CREATE, os.fsencode(after), None) in got, "the events after the deep ones are read"
        deep_file = os.fsencode(deep) + (b"/" + b"d" * 250) * 20 + b"/f"
        if made_while_watched:
            assert (Op.CLOSE_WRITE, deep_file, None) in got
            assert not [e for e in events if e.op is Op.LOSS]
        else:
            assert [e for e in events if e.op is Op.LOSS], "unnamed records must be a loss marker, not silence"
            assert stats.lost >= 1
            assert not [t for t in got if t[1].startswith(os.fsencode(deep) + b"/")]
    finally:
        shutil.rmtree(deep)

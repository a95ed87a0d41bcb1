"""Renames over rsync:// without sending the data again: batches with renames pushed by the rsync target to the real
Debian ``rsync --daemon`` on 127.0.0.1 (started here). The daemon builds the new names from its own copies
(``--link-dest`` move sessions, kwatch.replicate.rsync_moves); the mirror must end identical to the source, with
(almost) no file data on the wire, and a daemon that refuses the option gets the data sent instead."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from rsyncd import RsyncDaemon
from treecmp import tree_differences

from kwatch.replicate.coalesce import EXIST, Batch
from kwatch.replicate.options import TargetOptions
from kwatch.replicate.rsync_target import RsyncTransport
from kwatch.replicate.rsync_transport import push
from kwatch.replicate.scan import Excluder

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs the rsync binary")


class _Host:
    """The replicator as the transport sees it (the source and its excludes)."""

    def __init__(self, src: Path) -> None:
        self.src = os.fsencode(src)
        self.excluded = Excluder(())


def _files(d: Path, n: int, rnd: random.Random, size: int = 3000) -> int:
    d.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        data = rnd.randbytes(size + i % 500)
        (d / f"f{i}").write_bytes(data)
        total += len(data)
    return total


def _batch(renames: list[tuple[str, str]], dirty: tuple[str, ...] = ()) -> Batch:
    b = Batch()
    for old, new in renames:
        b.renames.append((old.encode(), new.encode()))
        b.dirty[old.encode()] = EXIST
        b.dirty[new.encode()] = EXIST
    for p in dirty:
        b.dirty[p.encode()] = EXIST
    return b


def _mv(src: Path, old: str, new: str) -> None:
    (src / new).parent.mkdir(parents=True, exist_ok=True)
    os.rename(src / old, src / new)


@pytest.fixture(params=["chroot", "no_chroot"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RsyncDaemon]:
    """A daemon as Debian's runs as root by default (``use chroot = yes``), and one without chroot (which makes it
    confine every path itself: rsync's sanitize_paths)."""
    with RsyncDaemon(tmp_path / "rsyncd", extra_conf="use chroot = yes" if request.param == "chroot" else "") as d:
        yield d


def _seed(tmp_path: Path, d: RsyncDaemon) -> tuple[Path, Path, int]:
    """A source with a tree of two levels (``top/A`` with 300 files below it, ``x/y/C``, loose files) pushed whole."""
    rnd = random.Random(5)
    src = tmp_path / "src"
    size = _files(src / "top/A", 150, rnd) + _files(src / "top/A/sub", 150, rnd)
    size += _files(src / "x/y/C", 40, rnd, 20000) + _files(src / "loose", 5, rnd, 50000)
    push(os.fsencode(src), d.url("push"), None, delete=True)
    mirror = d.module_path("push")
    assert tree_differences(src, mirror) == []
    return src, mirror, size


# (name, what is done in the source, the batch's renames, other dirty paths, whether all of it moves)
CASES: list[tuple[str, Callable[[Path], None], list[tuple[str, str]], tuple[str, ...]]] = [
    ("dir_in_place", lambda s: _mv(s, "top/A", "top/B"), [("top/A", "top/B")], ()),
    ("dir_to_new_parent", lambda s: _mv(s, "top/A", "new/deep/A2"), [("top/A", "new/deep/A2")], ("new",)),
    ("dir_up_and_across", lambda s: _mv(s, "x/y/C", "C"), [("x/y/C", "C")], ()),
    ("dir_twice", lambda s: (_mv(s, "top/A", "top/B"), _mv(s, "top/B", "z")), [("top/A", "top/B"), ("top/B", "z")],
     ()),
    ("dir_same_name_new_parent", lambda s: _mv(s, "top/A", "p/A"), [("top/A", "p/A")], ("p",)),
    ("tree_into_moved_tree", lambda s: (_mv(s, "top/A", "top/B"), _mv(s, "x/y/C", "top/B/C")),
     [("top/A", "top/B"), ("x/y/C", "top/B/C")], ()),
    ("file_across_dirs", lambda s: (_mv(s, "loose/f1", "top/f1"), _mv(s, "loose/f2", "top/other")),
     [("loose/f1", "top/f1"), ("loose/f2", "top/other")], ()),
]


@pytest.mark.parametrize(("name", "work", "renames", "dirty"), CASES, ids=[c[0] for c in CASES])
def test_rename_moves_on_the_daemon(tmp_path: Path, daemon: RsyncDaemon, name: str, work: Callable[[Path], None],
                                    renames: list[tuple[str, str]], dirty: tuple[str, ...]) -> None:
    src, mirror, size = _seed(tmp_path, daemon)
    work(src)
    t = RsyncTransport(_Host(src), daemon.url("push"), TargetOptions())  # type: ignore[arg-type]
    rep = t.sync(_batch(renames, dirty))
    assert tree_differences(src, mirror) == [], daemon.log()
    assert rep.messages == []
    assert rep.renames >= 1
    # the renamed files were linked, not sent
    if name == "file_across_dirs" and "use chroot = yes" not in daemon.extra_conf:
        # A new name in another directory is found by the fuzzy search in the basis dir, but a daemon without
        # chroot (rsync 3.5.0) cannot open it there ('file has vanished: "/top/loose/f2"'): it is sent.
        assert rep.literal == (src / "top/other").stat().st_size
        return
    assert rep.literal == 0, (rep.literal, rep.matched)
    assert t.wire_bytes() < size // 100


def test_dir_rename_with_edits_inside(tmp_path: Path, daemon: RsyncDaemon) -> None:
    src, mirror, size = _seed(tmp_path, daemon)
    _mv(src, "top/A", "top/B")
    (src / "top/B/f3").write_bytes(b"edited after the rename")
    os.unlink(src / "top/B/sub/f4")
    (src / "top/B/sub/new").write_bytes(b"new file")
    os.rename(src / "top/B/f5", src / "top/B/sub/f5-moved")
    t = RsyncTransport(_Host(src), daemon.url("push"), TargetOptions())  # type: ignore[arg-type]
    rep = t.sync(_batch([("top/A", "top/B"), ("top/B/f5", "top/B/sub/f5-moved")],
                        ("top/B/f3", "top/B/sub/f4", "top/B/sub/new")))
    assert tree_differences(src, mirror) == [], daemon.log()
    # the edited and the new file go; the file renamed inside the tree is found in the old tree by the fuzzy search,
    # except on a daemon without chroot (see test_rename_moves_on_the_daemon)
    sent = len(b"edited after the rename") + len(b"new file")
    if "use chroot = yes" not in daemon.extra_conf:
        sent += (src / "top/B/sub/f5-moved").stat().st_size
    assert rep.literal == sent
    assert t.wire_bytes() < size // 100


def test_daemon_refusing_link_dest_gets_the_data(tmp_path: Path) -> None:
    with RsyncDaemon(tmp_path / "rsyncd", extra_conf="refuse options = link-dest") as d:
        src, mirror, _size = _seed(tmp_path, d)
        _mv(src, "top/A", "top/B")
        t = RsyncTransport(_Host(src), d.url("push"), TargetOptions())  # type: ignore[arg-type]
        rep = t.sync(_batch([("top/A", "top/B")]))
        assert tree_differences(src, mirror) == [], d.log()
        assert rep.renames == 0
        # sent again: in-place fuzzy finds nothing for files of another directory
        moved = sum(p.stat().st_size for p in (src / "top/B").rglob("*") if p.is_file())
        assert rep.literal == moved


def test_moved_dir_holds_a_file_open_for_writing(tmp_path: Path, daemon: RsyncDaemon) -> None:
    """A file held open for writing inside a moved tree is left out of the move and of the batch (sent after its
    close); everything else moves."""
    src, mirror, _size = _seed(tmp_path, daemon)
    _mv(src, "top/A", "top/B")
    (src / "top/B/f7").write_bytes(b"partial")
    t = RsyncTransport(_Host(src), daemon.url("push"), TargetOptions())  # type: ignore[arg-type]
    b = _batch([("top/A", "top/B")])
    b.writing.add(b"top/B/f7")
    rep = t.sync(b)
    assert rep.resend == [b"top/B/f7"]
    assert tree_differences(src, mirror, ignore=[b"top/B/f7"]) == []
    assert not (mirror / "top/B/f7").exists() or (mirror / "top/B/f7").read_bytes() != b"partial"


@pytest.mark.root
def test_live_dir_rename_is_moved_not_sent(tmp_path: Path) -> None:
    """`kwatch replicate SRC rsync://...` with real BPF capture: a directory of 1,000 files renamed into a new
    parent reaches the daemon with no file data sent."""
    src = tmp_path / "src"
    rnd = random.Random(3)
    _files(src / "tree/A", 500, rnd, 2000)
    _files(src / "tree/A/sub", 500, rnd, 2000)
    with RsyncDaemon(tmp_path / "rsyncd") as d, \
            LiveReplicate(src, [d.url("push")], tmp_path / "replicate.log").start() as live:
        mirror = d.module_path("push")
        wait_identical(src, mirror, 60, what="first sync", live=live)
        offset = live.log_size()
        (src / "moved").mkdir()
        os.rename(src / "tree/A", src / "moved/B")
        wait_identical(src, mirror, 60, what="after the rename", live=live)
        lines = live.wait_batches(offset)
        assert sum(b.literal for b in lines) == 0, live.log_text(offset)
        assert "; 1 moves" in live.log_text(offset)


def test_a_linked_file_moved_across_directories_stays_linked(tmp_path: Path, daemon: RsyncDaemon) -> None:
    """``ln loose/f1 top/h1; mv loose/f1 w/r1`` in one batch: the source has one inode under top/h1 and w/r1, and so
    must the mirror (the fault matrix once ended with two copies after a move session listed the moved name alone)."""
    src, mirror, _ = _seed(tmp_path, daemon)
    os.link(src / "loose/f1", src / "top/h1")
    _mv(src, "loose/f1", "w/r1")
    t = RsyncTransport(_Host(src), daemon.url("push"), TargetOptions())  # type: ignore[arg-type]
    rep = t.sync(_batch([("loose/f1", "w/r1")], ("top/h1", "w")))
    if rep.resend:
        rep = t.sync(_batch([], tuple(os.fsdecode(p) for p in rep.resend)))
    assert tree_differences(src, mirror) == [], daemon.log()
    assert (mirror / "top/h1").stat().st_ino == (mirror / "w/r1").stat().st_ino, "two copies on the mirror"

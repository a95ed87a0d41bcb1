"""Hard links made while the mirror is failing: a full disk, a put dropped because its file changed while it was read,
a directory renamed for a target without renames. Cases the fault matrix (tests/e2e/test_netfaults.py) found, made
deterministic: an in-process :class:`Replicator` against a real agent (its mirror on a small tmpfs the test fills) or
a real ``rsync --daemon``, one batch per step, the retries made due at once instead of waited for.

What must hold: a hard-linked name never shows a content the source never had under it (a link to a stale copy of
its other name), no name is left missing, and once the fault is over the mirror has the source's link groups (treecmp
compares which paths share an inode).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rsyncd import RsyncDaemon
from treecmp import assert_trees_equal, tree_differences

from kwatch.events import FileEvent, Op
from kwatch.replicate.engine import BatchReport, Replicator, Target, TargetOptions

pytestmark = pytest.mark.root

SIZE = 100_000
ROUNDS = 8  # batches allowed to converge once the fault is over (each retry made due at once)


@contextlib.contextmanager
def _tmpfs(where: Path, mib: int) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def _fill(fs: Path) -> None:
    with open(fs / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (64 << 10))
            f.flush()


def _free(fs: Path) -> None:
    (fs / "filler").unlink()


@contextlib.contextmanager
def _replicator(src: Path, target: str) -> Iterator[Replicator]:
    rep = Replicator(os.fsencode(src), Target.parse(target), TargetOptions())
    try:
        rep.coalescer.rescan(b"")
        assert not rep.sync_now(rep.coalescer.take(time.monotonic())).errors
        yield rep
    finally:
        rep.stop()


def _batch(rep: Replicator, events: list[FileEvent]) -> BatchReport:
    now = time.monotonic()
    for ev in events:
        rep.coalescer.add(ev, now)
    return rep.sync_now(rep._take(now + 5))


def _settle(rep: Replicator, src: Path, mirror: Path) -> None:
    """Run batches (every retry made due at once) until nothing is pending; the mirror must equal the source."""
    for _ in range(ROUNDS):
        later = time.monotonic() + 3600
        rep._mark_due_retries(later)
        if not rep.coalescer.pending():
            break
        rep.sync_now(rep._take(later))
    assert not rep.coalescer.pending() and not len(rep.retries), "still retrying after the fault"
    assert_trees_equal(src, mirror)


def _write(p: Path, data: bytes) -> list[FileEvent]:
    existed = p.exists()
    p.write_bytes(data)
    path = os.fsencode(p)
    return [FileEvent(Op.OPEN_WRITE if existed else Op.CREATE, path), FileEvent(Op.CLOSE_WRITE, path)]


def _link(a: Path, b: Path) -> list[FileEvent]:
    os.link(a, b)
    return [FileEvent(Op.LINK, os.fsencode(a), os.fsencode(b))]


def _assert_never_stale(mirror: Path, name: str, allowed: set[bytes]) -> None:
    p = mirror / name
    if p.exists():
        assert p.read_bytes() in allowed, f"{name} on the mirror holds a content the source never had under it"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(source, mirror, the mirror's file system: 2 MiB of tmpfs)."""
    src = tmp_path / "src"
    src.mkdir()
    with _tmpfs(tmp_path / "mfs", 2) as fs:
        (fs / "mirror").mkdir()
        yield src, fs / "mirror", fs


def test_link_to_a_name_whose_put_failed_while_the_disk_stays_full(disk: tuple[Path, Path, Path]) -> None:
    """As above, with the disk full for several more batches (every retry and repair made due at once, all failing):
    the names' puts and links fail again and again; once the disk is freed both names must come, as one inode."""
    src, mirror, fs = disk
    with _replicator(src, str(mirror)) as rep:
        _fill(fs)
        _batch(rep, _write(src / "n", b"n" * SIZE))
        _batch(rep, _link(src / "n", src / "h"))
        for _ in range(4):
            later = time.monotonic() + 3600
            rep._mark_due_retries(later)
            rep.sync_now(rep._take(later))
        _free(fs)
        _settle(rep, src, mirror)


def test_link_made_while_the_new_data_cannot_land(disk: tuple[Path, Path, Path]) -> None:
    """``echo new > a; ln a h`` in one batch on a full disk: a's put fails (ENOSPC), so the mirror's a still has the
    old data; h must not become a link to it, and once the disk is freed a and h are one inode with the new data."""
    src, mirror, fs = disk
    old, new = b"o" * SIZE, b"n" * SIZE
    (src / "a").write_bytes(old)
    with _replicator(src, str(mirror)) as rep:
        _fill(fs)
        r = _batch(rep, _write(src / "a", new) + _link(src / "a", src / "h"))
        assert r.failed, "the disk was not full"
        _assert_never_stale(mirror, "h", {new})
        _free(fs)
        _settle(rep, src, mirror)


def test_link_to_a_name_whose_put_failed(disk: tuple[Path, Path, Path]) -> None:
    """A new file n whose put failed (full disk), then ``ln n h`` in the next batch: the planner believes the mirror
    has n (it was not new in that batch); the link fails there, and neither name may be left missing."""
    src, mirror, fs = disk
    with _replicator(src, str(mirror)) as rep:
        _fill(fs)
        assert _batch(rep, _write(src / "n", b"n" * SIZE)).transient == [b"n"]
        _batch(rep, _link(src / "n", src / "h"))
        _free(fs)
        _settle(rep, src, mirror)


def test_link_to_a_name_whose_rewrite_failed_in_an_earlier_batch(disk: tuple[Path, Path, Path]) -> None:
    """a rewritten in place (same size; its mtime as before, as a rewrite within one clock tick leaves it) while the
    disk is full: its put fails, the mirror keeps the old data under the same size and mtime. Then ``ln a h`` in the
    next batch: no size/mtime check can tell the mirror's a is stale, so h must not be linked to it."""
    src, mirror, fs = disk
    old, new = b"o" * SIZE, b"n" * SIZE
    (src / "a").write_bytes(old)
    with _replicator(src, str(mirror)) as rep:
        st = os.stat(src / "a")
        _fill(fs)
        events = _write(src / "a", new)
        os.utime(src / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
        assert _batch(rep, events).transient == [b"a"]
        _batch(rep, _link(src / "a", src / "h"))
        _assert_never_stale(mirror, "h", {new})
        _free(fs)
        _settle(rep, src, mirror)


def test_link_and_rewrite_of_the_first_name_while_full(disk: tuple[Path, Path, Path]) -> None:
    """``ln a h`` lands; then a is rewritten while the disk is full (its put fails), then the disk is freed: the retry
    of a must bring h along (one inode, the new data), not leave h with the old data."""
    src, mirror, fs = disk
    (src / "a").write_bytes(b"o" * SIZE)
    with _replicator(src, str(mirror)) as rep:
        assert not _batch(rep, _link(src / "a", src / "h")).failed
        _fill(fs)
        with open(src / "a", "r+b") as f:
            f.write(b"NEW DATA")
        r = _batch(rep, [FileEvent(Op.OPEN_WRITE, os.fsencode(src / "a")),
                         FileEvent(Op.CLOSE_WRITE, os.fsencode(src / "a"))])
        assert r.failed
        _free(fs)
        _settle(rep, src, mirror)


def test_link_to_a_put_dropped_as_torn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new file and its link in one batch, the file's read judged unlandable (a writer may have had it open): its
    put is dropped and sent again next batch; the link must follow (not be left missing or a separate copy)."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    with _replicator(src, str(mirror)) as rep:
        real = rep.landing.unlandable
        spoil = {b"n"}

        def unlandable(paths: list[bytes]) -> set[bytes]:
            hit = spoil & set(paths)
            spoil.difference_update(hit)
            return hit | real(paths)

        monkeypatch.setattr(rep.landing, "unlandable", unlandable)
        r = _batch(rep, _write(src / "n", b"n" * SIZE) + _link(src / "n", src / "h"))
        assert not spoil, "the put was not dropped"
        assert b"n" in r.resend
        _settle(rep, src, mirror)


def test_rsync_directory_renamed_keeps_its_hard_links(tmp_path: Path) -> None:
    """``rsync://`` has no rename: a renamed directory is sent again under its new name. A file in it that has
    another name outside must be linked to that name on the mirror, not land as a second copy (here the other name
    is in another directory, so no listing the session makes for the rename carries it)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "x").mkdir()
    (src / "x" / "a").write_bytes(b"a" * SIZE)
    os.link(src / "x" / "a", src / "d" / "h")
    with RsyncDaemon(tmp_path / "rsyncd") as daemon, _replicator(src, daemon.url("push")) as rep:
        mirror = daemon.module_path("push")
        assert_trees_equal(src, mirror)
        os.rename(src / "d", src / "e")
        r = _batch(rep, [FileEvent(Op.RENAME, os.fsencode(src / "d"), os.fsencode(src / "e"))])
        assert not r.messages, r.messages
        assert tree_differences(src, mirror) == []
        assert r.literal == 0, "the renamed name was sent as data, not linked"


def test_rsync_directory_moved_in_with_a_link_to_a_name_inside(tmp_path: Path) -> None:
    """A directory moved into the tree from outside holds a second name of a file the mirror has: the session that
    sends the directory cannot know that name beforehand; a follow-up batch must link the two on the mirror."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "x").mkdir(parents=True)
    (outside / "m").mkdir(parents=True)
    (src / "x" / "a").write_bytes(b"a" * SIZE)
    os.link(src / "x" / "a", outside / "m" / "h")
    with RsyncDaemon(tmp_path / "rsyncd") as daemon, _replicator(src, daemon.url("push")) as rep:
        mirror = daemon.module_path("push")
        os.rename(outside / "m", src / "m")
        r = _batch(rep, [FileEvent(Op.RENAME, os.fsencode(outside / "m"), os.fsencode(src / "m"))])
        assert not r.messages, r.messages
        for _ in range(ROUNDS):
            if not rep.coalescer.pending():
                break
            r = rep.sync_now(rep._take(time.monotonic() + 5))
            assert not r.messages, r.messages
        assert tree_differences(src, mirror) == []

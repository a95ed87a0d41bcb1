"""A large batch to a real ``rsync --daemon`` goes as several sessions at the same time (kwatch.replicate.rsync_split):
the mirror ends identical (stale names deleted inside every directory the batch lists as content, directory mtimes
right whichever session ends last), and the daemon saw more than one connection for the batch."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from rsyncd import RsyncDaemon
from treecmp import tree_differences

from kwatch.replicate.coalesce import CONTENT, EXIST, META, Batch, Coalescer
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


def _tree(root: Path, rnd: random.Random, dirs: int = 8, files: int = 12) -> None:
    for i in range(dirs):
        d = root / f"top/s{i}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(files):
            (d / f"f{j}").write_bytes(rnd.randbytes(rnd.randint(20_000, 60_000)))


def _sessions(d: RsyncDaemon) -> int:
    return d.log().count("rsync allowed access on module push")


@pytest.mark.parametrize("fuzzy", [True, False], ids=["fuzzy", "no_fuzzy"])
def test_a_large_batch_goes_as_parts_and_deletes_only_what_it_should(tmp_path: Path, fuzzy: bool) -> None:
    rnd = random.Random(11)
    src = tmp_path / "src"
    _tree(src, rnd)
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        mirror = d.module_path("push")
        push(os.fsencode(src), d.url("push"), None, delete=True)
        # the mirror has names the source does not have, in directories the batch lists as content (top: dirty)
        # and below them
        (src / "top/s9/deep").mkdir(parents=True)
        _tree(src, rnd)  # every file rewritten
        (src / "top/s9/deep/new").write_bytes(b"new")
        (mirror / "top/stale").write_bytes(b"stale")
        (mirror / "top/s3/stale").write_bytes(b"stale")
        (mirror / "top/s3/staledir").mkdir()
        before = _sessions(d)
        t = RsyncTransport(_Host(src), d.url("push"), TargetOptions(fuzzy=fuzzy))  # type: ignore[arg-type]
        b = Batch()
        b.dirty = {os.fsencode(p.relative_to(src)): EXIST for p in src.rglob("*")}
        rep = t.sync(b)
        assert rep.messages == []
        assert tree_differences(src, mirror) == [], d.log()
        assert _sessions(d) - before > 1, "the batch was not cut into parts"


def test_a_batch_that_deletes_goes_as_one_session(tmp_path: Path) -> None:
    """Batches with deletions (and renames, rescans, linked files) are not cut (see RsyncTransport._may_split)."""
    rnd = random.Random(12)
    src = tmp_path / "src"
    _tree(src, rnd)
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        push(os.fsencode(src), d.url("push"), None, delete=True)
        shutil.rmtree(src / "top/s5")
        _tree(src, rnd, dirs=5)
        before = _sessions(d)
        t = RsyncTransport(_Host(src), d.url("push"), TargetOptions())  # type: ignore[arg-type]
        b = Batch()
        b.dirty = {os.fsencode(p.relative_to(src)): EXIST for p in src.rglob("*")}
        b.dirty[b"top/s5"] = EXIST  # gone
        rep = t.sync(b)
        assert rep.messages == []
        assert tree_differences(src, d.module_path("push")) == [], d.log()
        assert _sessions(d) - before == 1


class _LiveHost(_Host):
    """The host with a coalescer: what a batch that goes ahead holds back is marked there again."""

    def __init__(self, src: Path) -> None:
        super().__init__(src)
        self.coalescer = Coalescer(self.src)


def _dirty(root: Path, paths: list[Path]) -> Batch:
    b = Batch()
    b.dirty = {os.fsencode(p.relative_to(root)): EXIST for p in paths}
    return b


def test_batches_go_ahead_of_those_in_flight_and_the_mirror_ends_identical(tmp_path: Path) -> None:
    """Two create/change batches in flight at once (RsyncTransport.start_ahead): the second's rewrite of a file the
    first is sending is held back and marked, nothing is deleted meanwhile, and the batch of the directories listed
    again once none is in flight deletes the stale names the mirror had (which --delete in the first two would
    have deleted) and leaves the mirror identical."""
    rnd = random.Random(13)
    src = tmp_path / "src"
    _tree(src, rnd)
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        mirror = d.module_path("push")
        push(os.fsencode(src), d.url("push"), None, delete=True)
        (mirror / "top/s3/stale").write_bytes(b"stale")  # as if the source lost it in a way no batch names
        host = _LiveHost(src)
        t = RsyncTransport(host, d.url("push"), TargetOptions(ahead=True))  # type: ignore[arg-type]
        first = [src / "top/s1"] + [src / f"top/s1/f{j}" for j in range(12)]
        for p in first[1:]:
            p.write_bytes(rnd.randbytes(30_000))
        assert t.start_ahead(_dirty(src, first))
        for p in first[1:4]:  # rewritten while the first batch may still be sending them
            p.write_bytes(rnd.randbytes(31_000))
        (src / "top/s3/new").write_bytes(b"new")
        second = [src / "top/s3", *first[1:4]]
        assert t.start_ahead(_dirty(src, second))
        assert t.in_flight() == 2
        again = {os.fsencode(p.relative_to(src)) for p in first[1:4]}
        assert again <= set(host.coalescer.take(0.0).dirty), "the rewritten files were not marked again"
        reports = t.finish_ahead(wait=True)
        assert len(reports) == 2 and all(not rep.messages for _, rep in reports)
        assert (mirror / "top/s3/stale").exists(), "a batch that went ahead deleted"
        assert set(reports[-1][1].resend) >= {b"top/s1", b"top/s3"}
        # a batch taken before the sessions in flight ended goes first, alone (the replicator drains, then syncs it)
        (src / "top/s5/other").write_bytes(b"other")
        assert t.sync(_dirty(src, [src / "top/s5/other"])).messages == []
        b = _dirty(src, [src / os.fsdecode(p) for p in {*reports[-1][1].resend, *again}])
        assert not t.start_ahead(b), "the directories listed again went ahead (without --delete)"
        assert t.sync(b).messages == []
        assert tree_differences(src, mirror) == [], d.log()


@contextlib.contextmanager
def _pushed(tmp_path: Path, seed: int, dirs: int, files: int) -> Iterator[tuple[Path, Path, RsyncTransport]]:
    """A tree pushed whole to a daemon: (source, mirror, a transport to it)."""
    src = tmp_path / "src"
    _tree(src, random.Random(seed), dirs=dirs, files=files)
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        push(os.fsencode(src), d.url("push"), None, delete=True)
        yield src, d.module_path("push"), RsyncTransport(_Host(src), d.url("push"), TargetOptions())  # type: ignore[arg-type]


def test_a_directory_whose_attributes_alone_changed_goes_without_its_subtree(tmp_path: Path) -> None:
    """A directory dirty for its attributes only (META: a utimes, as tar's last step sets every directory's mtime)
    goes alone: the session's bytes are those of a short list, not of a list of the tree below it; the mirror ends
    identical (its mtime right)."""
    with _pushed(tmp_path, 14, 20, 40) as (src, mirror, t):
        for sub in (src / "top", src / "top/s3"):
            os.utime(sub, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        b = Batch()
        b.dirty = {b"top": META, b"top/s3": META}
        assert t.sync(b).messages == []
        assert tree_differences(src, mirror) == []
        assert t.wire_bytes() < 4000, "the directories went with their subtrees"


def test_a_directory_whose_attributes_alone_changed_below_one_listed_whole_keeps_its_new_names(tmp_path: Path) -> None:
    """A directory dirty for its attributes only below a directory listed whole (dirty for its content: a retry, a
    directory listed again after batches ahead) goes with that listing, subtree included: a new file in it, dirty
    too, reaches the mirror (listed alone, the whole listing above left its subtree out, and the new file with it)."""
    with _pushed(tmp_path, 15, 4, 5) as (src, mirror, t):
        (src / "top/s2/new").write_bytes(b"new")
        b = Batch()
        b.dirty = {b"top": CONTENT, b"top/s2": META, b"top/s2/new": EXIST}
        assert t.sync(b).messages == []
        assert tree_differences(src, mirror) == []

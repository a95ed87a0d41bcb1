"""Hard links in live replication: a ``link(2)`` is a hard link on the mirror, not a copy, and data written under one
name of a linked file reaches every name.

Two layers, both against a real local agent and checked with treecmp (which compares which paths share an inode):

- in-process: the :class:`Replicator` is fed the events the capture would report for each scripted step (one batch
  per step) and the bytes it sent are checked too (a link sends no data);
- live: ``kwatch replicate`` as a real process with BPF capture runs the same kinds of steps.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from treecmp import assert_trees_equal

from kwatch.events import FileEvent, Op
from kwatch.protocols import agent as ap
from kwatch.replicate.engine import BatchReport, Replicator, Target, TargetOptions

pytestmark = pytest.mark.root

CONVERGE = 60.0
SIZE = 100_000  # above the delta threshold: a write to a linked file goes as a delta against the mirror's copy

# An operation on the source: ("write", path, data) creates or rewrites in place (O_TRUNC), ("patch", path, data)
# overwrites the start in place, ("link", old, new), ("unlink", path), ("mkdir", path), ("rename", old, new).
Action = tuple[str, ...]


def _apply(src: bytes, action: Action) -> list[FileEvent]:
    """Do ``action`` on the source and return the events the capture reports for it."""
    kind, *args = action
    p = [src + b"/" + a.encode() for a in (args[:1] if kind in ("write", "patch") else args)]
    if kind == "write":
        existed = os.path.exists(p[0])
        with open(p[0], "wb") as f:
            f.write(args[1].encode() * (SIZE // len(args[1])))
        return [FileEvent(Op.OPEN_WRITE if existed else Op.CREATE, p[0]), FileEvent(Op.CLOSE_WRITE, p[0])]
    if kind == "patch":
        with open(p[0], "r+b") as f:
            f.write(args[1].encode())
        return [FileEvent(Op.OPEN_WRITE, p[0]), FileEvent(Op.CLOSE_WRITE, p[0])]
    if kind == "link":
        os.link(p[0], p[1])
        return [FileEvent(Op.LINK, p[0], p[1])]
    if kind == "unlink":
        os.unlink(p[0])
        return [FileEvent(Op.UNLINK, p[0])]
    if kind == "mkdir":
        os.mkdir(p[0])
        return [FileEvent(Op.MKDIR, p[0])]
    if kind == "rename":
        os.rename(p[0], p[1])
        return [FileEvent(Op.RENAME, p[0], p[1])]
    raise AssertionError(f"unknown action {action}")


# (name, initial files, steps: [(actions of one batch, most literal bytes that batch may send)])
Steps = list[tuple[list[Action], int | None]]
CASES: list[tuple[str, list[str], Steps]] = [
    ("link", ["a"], [([("link", "a", "b")], 0)]),
    ("link_across_directories", ["d1/a"], [([("link", "d1/a", "d2/sub/b")], 0)]),
    ("link_into_a_directory_made_in_the_same_batch", ["a"], [([("mkdir", "n"), ("link", "a", "n/b")], 0)]),
    ("three_names", ["a"], [([("link", "a", "b"), ("link", "b", "c")], 0)]),
    ("link_then_write_one_name_in_the_next_batch", ["a"],
     [([("link", "a", "b")], 0), ([("patch", "b", "NEW DATA")], 20_000)]),
    ("link_then_rewrite_one_name_in_the_same_batch", ["a"], [([("link", "a", "b"), ("write", "b", "rewrite")], None)]),
    ("write_the_old_name_reaches_every_name", ["a"],
     [([("link", "a", "b"), ("link", "a", "d/c")], 0), ([("write", "a", "fresh ")], None)]),
    ("unlink_one_name_keeps_the_other", ["a"], [([("link", "a", "b")], 0), ([("unlink", "a")], 0)]),
    ("link_then_unlink_the_first_name_in_one_batch", ["a"], [([("link", "a", "b"), ("unlink", "a")], 0)]),
    ("new_file_and_its_link_in_one_batch_send_the_data_once", [],
     [([("write", "n", "new "), ("link", "n", "m")], SIZE + 100)]),
    ("renamed_name_still_gets_new_data", ["a"],
     [([("link", "a", "b")], 0), ([("rename", "b", "c"), ("patch", "a", "AFTER RENAME")], 20_000)]),
    ("link_over_an_existing_file", ["a", "b"], [([("unlink", "b"), ("link", "a", "b")], 0)]),
    # ``ln a b; rm a`` and its variations in one batch: the mirror's a is linked, then deleted (no data)
    ("two_links_then_unlink_the_first_name", ["a"],
     [([("link", "a", "b"), ("link", "a", "d/c"), ("unlink", "a")], 0)]),
    ("chain_of_links_and_unlinks", ["a"],
     [([("link", "a", "b"), ("unlink", "a"), ("link", "b", "c"), ("unlink", "b")], 0)]),
    ("link_unlink_then_rename_the_new_name", ["a"], [([("link", "a", "b"), ("unlink", "a"), ("rename", "b", "d/c")], 0)]),
    ("link_then_rename_the_first_name_then_unlink_it", ["a"],
     [([("link", "a", "b"), ("rename", "a", "d/x"), ("unlink", "d/x")], 0)]),
    ("link_unlink_in_a_renamed_directory", ["d1/a"],
     [([("link", "d1/a", "d1/b"), ("unlink", "d1/a"), ("rename", "d1", "d3")], 0)]),
    ("link_then_write_the_first_name_then_unlink_it", ["a"],
     [([("link", "a", "b"), ("patch", "a", "WRITTEN THROUGH a"), ("unlink", "a")], None)]),
    ("link_unlink_and_a_new_file_at_the_old_name", ["a"],
     [([("link", "a", "b"), ("unlink", "a"), ("write", "a", "another ")], None)]),
    ("link_unlink_and_a_rename_onto_the_old_name", ["a", "x"],
     [([("link", "a", "b"), ("unlink", "a"), ("rename", "x", "a")], None)]),
    ("new_file_linked_and_its_first_name_unlinked", [],
     [([("write", "n", "new "), ("link", "n", "m"), ("unlink", "n")], SIZE + 100)]),
]


# A name made and renamed within one batch: the replayed rename fails on the mirror (it never had the old name), which
# queues a rescan of the new name for the next batch (engine._sync); that batch finds it in place and sends nothing.
FOLLOW_UP = {"link_unlink_then_rename_the_new_name"}


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    yield src, mirror


@contextlib.contextmanager
def _mirrored(src: Path, mirror: Path) -> Iterator[Replicator]:
    """A Replicator for src -> mirror (a real local agent) after its initial sync made them identical."""
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions())
    try:
        rep.coalescer.rescan(b"")
        first = rep.sync_now(rep.coalescer.take(time.monotonic()))
        assert not first.errors
        assert_trees_equal(src, mirror)
        yield rep
    finally:
        rep.stop()


def _batch(rep: Replicator, events: list[FileEvent]) -> BatchReport:
    """Fold ``events`` in and replicate them as one batch."""
    now = time.monotonic()
    for ev in events:
        rep.coalescer.add(ev, now)
    return rep.sync_now(rep.coalescer.take(now + 5))


@pytest.mark.parametrize(("name", "initial", "steps"), CASES, ids=[c[0] for c in CASES])
def test_links_in_process(name: str, initial: list[str], steps: Steps, trees: tuple[Path, Path]) -> None:
    src, mirror = trees
    s = os.fsencode(src)
    for rel in initial:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode() * (SIZE // len(rel)))
    for d in ("d", "d2/sub"):
        (src / d).mkdir(parents=True, exist_ok=True)
    with _mirrored(src, mirror) as rep:
        for i, (actions, most) in enumerate(steps):
            r = _batch(rep, [ev for action in actions for ev in _apply(s, action)])
            assert not r.errors, f"step {i}: {r.errors}"
            literal = r.literal
            if name in FOLLOW_UP:
                r = rep.sync_now(rep.coalescer.take(time.monotonic() + 5))
                assert not r.errors, f"step {i}, follow-up: {r.errors}"
                literal += r.literal
            assert not rep.coalescer.pending(), f"step {i}: something was queued again"
            assert_trees_equal(src, mirror)
            if most is not None:
                assert literal <= most, f"step {i} {actions}: {literal} literal bytes sent (at most {most})"


# ``ln a b; rm a`` when the mirror's a is not what the planner believes (changed behind kwatch's back), or with an
# agent that does not check links (an older peer): the data is sent, never a link to the wrong content.
STALE_CASES = [
    # (name, change to the mirror's a before the batch, capabilities removed, literal bytes of the first batch)
    ("mirror_copy_changed", "rewrite", frozenset(), 0),
    ("mirror_copy_gone", "unlink", frozenset(), 0),
    ("older_peer_without_linkcheck", None, frozenset({"linkcheck"}), SIZE),
]


@pytest.mark.parametrize(("name", "spoil", "without", "first"), STALE_CASES, ids=[c[0] for c in STALE_CASES])
def test_link_to_a_removed_name_is_checked(name: str, spoil: str | None, without: frozenset[str], first: int,
                                           trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src, mirror = trees
    monkeypatch.setattr(ap, "CAPABILITIES", ap.CAPABILITIES - without)
    (src / "a").write_bytes(b"a" * SIZE)
    with _mirrored(src, mirror) as rep:
        if spoil == "rewrite":  # same size, another mtime: what the agent checks
            (mirror / "a").write_bytes(b"z" * SIZE)
        elif spoil == "unlink":
            (mirror / "a").unlink()
        events = [ev for action in [("link", "a", "b"), ("unlink", "a")] for ev in _apply(os.fsencode(src), action)]
        r = _batch(rep, events)
        assert (r.errors, r.literal) == ([], first), r
        assert not (mirror / "b").exists() or (mirror / "b").read_bytes() == b"a" * SIZE
        if first == 0:  # refused by the agent: b goes as data in the next batch
            assert rep.coalescer.pending()
            r = rep.sync_now(rep.coalescer.take(time.monotonic() + 5))
            assert (r.errors, r.literal) == ([], SIZE), r
        assert not rep.coalescer.pending()
        assert_trees_equal(src, mirror)


def test_hard_link_in_a_rescanned_subtree_links_to_a_name_outside(trees: tuple[Path, Path]) -> None:
    """A directory moved in from outside the tree is rescanned; a file in it linked to a mirrored file is linked."""
    src, mirror = trees
    outside = src.parent / "outside"
    outside.mkdir()
    (src / "a").write_bytes(b"a" * SIZE)
    with _mirrored(src, mirror) as rep:
        os.link(src / "a", outside / "b")  # a second name: the index now learns the group from the next write
        os.link(src / "a", src / "c")
        assert _batch(rep, [FileEvent(Op.LINK, os.fsencode(src / "a"), os.fsencode(src / "c"))]).literal == 0
        os.rename(outside, src / "moved-in")
        r = _batch(rep, [FileEvent(Op.RENAME, os.fsencode(outside), os.fsencode(src / "moved-in"))])
        assert (r.literal, r.errors) == (0, [])
        assert_trees_equal(src, mirror)


def test_link_to_a_file_of_a_subtree_rescanned_in_the_same_batch(trees: tuple[Path, Path]) -> None:
    """``mv /outside/m src/m; ln src/m/f src/c`` in one batch: m is rescanned (sent), c is linked to m/f."""
    src, mirror = trees
    outside = src.parent / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"f" * SIZE)
    with _mirrored(src, mirror) as rep:
        os.rename(outside, src / "m")
        os.link(src / "m" / "f", src / "c")
        r = _batch(rep, [FileEvent(Op.RENAME, os.fsencode(outside), os.fsencode(src / "m")),
                         FileEvent(Op.LINK, os.fsencode(src / "m" / "f"), os.fsencode(src / "c"))])
        assert (r.puts, r.errors) == (1, []), r
        assert r.literal <= SIZE + 100, r
        assert_trees_equal(src, mirror)


def test_link_into_a_subtree_rescanned_in_the_same_batch(trees: tuple[Path, Path]) -> None:
    """``mv /outside/m src/m; ln src/a src/m/h`` in one batch: m is rescanned and sends h as data (the rescan does not
    know a, which had one name until now); a must then be linked to that put, not left a separate copy. (The fault
    matrix hit this at 1 Mbit/s: a directory made and renamed within one batch is rescanned under its new name.)"""
    src, mirror = trees
    outside = src.parent / "outside"
    outside.mkdir()
    (src / "a").write_bytes(b"a" * SIZE)
    with _mirrored(src, mirror) as rep:
        os.rename(outside, src / "m")
        os.link(src / "a", src / "m" / "h")
        r = _batch(rep, [FileEvent(Op.RENAME, os.fsencode(outside), os.fsencode(src / "m")),
                         FileEvent(Op.LINK, os.fsencode(src / "a"), os.fsencode(src / "m" / "h"))])
        assert not r.errors, r
        assert_trees_equal(src, mirror)


# ---------------------------------------------------------------------------------------------------------------
# live: kwatch replicate with BPF capture


@pytest.mark.slow
def test_links_live(tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    (src / "a").write_bytes(b"first " * 20_000)
    (src / "d1").mkdir()
    (src / "d1" / "x").write_bytes(b"x" * 5000)
    with LiveReplicate(src, [str(mirror)], tmp_path / "replicate.log") as live:
        wait_identical(src, mirror, CONVERGE, what="initial", live=live)
        a_ino = os.stat(mirror / "a").st_ino

        offset = live.log_size()
        os.link(src / "a", src / "b")
        os.link(src / "d1" / "x", src / "x-top")
        wait_identical(src, mirror, CONVERGE, what="after ln", live=live)
        assert os.stat(mirror / "b").st_ino == a_ino, "the mirror's a was replaced"
        sent = live.wait_batches(offset)  # an `== 0` of lines not written yet would pass: wait for the batch's line
        assert sum(x.puts + x.deltas for x in sent) == 0 and sum(x.literal for x in sent) == 0, sent

        (src / "newdir" / "deep").mkdir(parents=True)
        os.link(src / "a", src / "newdir" / "deep" / "c")
        wait_identical(src, mirror, CONVERGE, what="after ln into a new directory", live=live)

        with open(src / "b", "r+b") as f:  # in place: every name of the inode shows it
            f.write(b"CHANGED THROUGH b")
        wait_identical(src, mirror, CONVERGE, what="after a write to one name", live=live)

        with open(src / "a", "wb") as f:  # O_TRUNC rewrite under the other name
            f.write(b"rewritten " * 30_000)
        wait_identical(src, mirror, CONVERGE, what="after a rewrite of the other name", live=live)

        os.unlink(src / "a")
        os.unlink(src / "d1" / "x")
        wait_identical(src, mirror, CONVERGE, what="after unlinking one name of each", live=live)
        assert (mirror / "b").read_bytes().startswith(b"rewritten ")

        (src / "fresh").write_bytes(b"fresh " * 50_000)
        os.link(src / "fresh", src / "d1" / "fresh-link")
        with open(src / "d1" / "fresh-link", "ab") as f:
            f.write(b"appended through the link")
        wait_identical(src, mirror, CONVERGE, what="after a new file, its link and an append", live=live)
        assert live.stop() == 0
    for x in live.batches():
        assert x.errors == 0, f"batch with errors: {x}\n{live.log_text()[-3000:]}"
    assert_trees_equal(src, mirror)

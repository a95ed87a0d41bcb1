"""kwatch.replicate.rsync_ahead: the part of a batch's list that may go while earlier sessions are in flight (no name
sent twice with different content, nothing sent into a directory that is held back), and the directories to list
again once none is in flight."""

from __future__ import annotations

import stat

import pytest

from kwatch.protocols.rsync.flist import FileEntry
from kwatch.replicate.rsync_ahead import InFlight, plan, stale_dirs, tops

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777


def d(name: bytes, mtime: int = 1, content: bool = True) -> FileEntry:
    return FileEntry(name=name, mode=DIR, mtime=mtime, content_dir=content)


def f(name: bytes, size: int = 10, mtime: int = 1) -> FileEntry:
    return FileEntry(name=name, mode=REG, size=size, mtime=mtime)


def ln(name: bytes, target: bytes) -> FileEntry:
    return FileEntry(name=name, mode=LNK, link_target=target)


CASES = [
    # (name, in flight, new list, names that go, names marked again)
    ("nothing in flight", [], [d(b"a"), f(b"a/x")], [b"a", b"a/x"], []),
    ("disjoint trees", [d(b"a"), f(b"a/x")], [d(b"b"), f(b"b/y")], [b"b", b"b/y"], []),
    ("a new file in a directory in flight goes: no session in flight deletes",
     [d(b"a"), f(b"a/x")], [d(b"a", mtime=2), f(b"a/x"), f(b"a/y")], [b"a", b"a/y"], []),
    ("the same file with the same attributes is on its way: left out, not marked",
     [d(b"a"), f(b"a/x")], [d(b"a"), f(b"a/x")], [b"a"], []),
    ("the same file changed since: held back and marked",
     [d(b"a"), f(b"a/x")], [d(b"a"), f(b"a/x", size=11)], [b"a"], [b"a/x"]),
    ("a symlink with another target: held back",
     [d(b"a"), ln(b"a/l", b"x")], [d(b"a"), ln(b"a/l", b"y")], [b"a"], [b"a/l"]),
    ("a file that became a directory: held with its subtree, marked once",
     [d(b"a"), f(b"a/x")], [d(b"a"), d(b"a/x"), f(b"a/x/1"), d(b"a/x/s"), f(b"a/x/s/2")], [b"a"], [b"a/x"]),
    ("a directory that became a file: held back",
     [d(b"a"), d(b"a/x"), f(b"a/x/1")], [d(b"a"), f(b"a/x")], [b"a"], [b"a/x"]),
]


@pytest.mark.parametrize(("name", "inflight", "new", "go", "again"), CASES, ids=[c[0] for c in CASES])
def test_plan(name: str, inflight: list[FileEntry], new: list[FileEntry], go: list[bytes], again: list[bytes]) -> None:
    kept, marked = plan(new, InFlight([inflight]))
    assert [e.name for e in kept] == go
    assert marked == again
    sent = {e.name: e for e in inflight}
    for e in kept:  # the invariant: a name in both is a directory in both
        o = sent.get(e.name)
        assert o is None or (o.is_dir and e.is_dir)


def test_plan_against_several_sessions() -> None:
    inflight = InFlight([[d(b"a"), f(b"a/x")], [d(b"b"), f(b"b/y")]])
    kept, again = plan([d(b"a"), f(b"a/x", size=3), d(b"b"), f(b"b/y"), f(b"b/z")], inflight)
    assert [e.name for e in kept] == [b"a", b"b", b"b/z"]
    assert again == [b"a/x"]


def test_stale_dirs_are_those_with_other_attributes() -> None:
    older = [d(b"a", mtime=1), d(b"a/s", mtime=5), f(b"a/s/x")]
    newer = [d(b"a", mtime=2), d(b"a/s", mtime=5), d(b"b")]
    assert stale_dirs(older, newer) == [b"a"]


def test_tops() -> None:
    assert tops([b"a/b", b"a", b"a-b", b"a-b/c", b"c/d/e", b"c/d"]) == [b"a", b"a-b", b"c/d"]

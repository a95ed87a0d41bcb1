"""kwatch.replicate.rsync_split: a batch's file list cut into parts that rsync sessions send at the same time without
getting in each other's way (a content directory's deletion never reaches another part's names)."""

from __future__ import annotations

import stat

import pytest

from kwatch.protocols.rsync.flist import FileEntry
from kwatch.replicate.rsync_split import ENTRY_COST, split

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
BIG = 200_000


def d(name: bytes, content: bool = True) -> FileEntry:
    return FileEntry(name=name, mode=DIR, content_dir=content)


def f(name: bytes, size: int = BIG, inode: tuple[int, int] | None = None) -> FileEntry:
    return FileEntry(name=name, mode=REG, size=size, inode=inode)


def gone(name: bytes) -> FileEntry:
    return FileEntry(name=name, mode=0)


def tree(top: bytes, dirs: int, files: int, content: bool = True) -> list[FileEntry]:
    out = [d(top, content)]
    for i in range(dirs):
        sub = top + b"/s%d" % i
        out.append(d(sub))
        out += [f(sub + b"/f%d" % j) for j in range(files)]
    return out


def parent(name: bytes) -> bytes:
    return name.rpartition(b"/")[0] or b"."




def check(entries: list[FileEntry], parts: list[list[FileEntry]]) -> None:
    """What makes parts safe to send at once (see the module docstring)."""
    names = {e.name for e in entries}
    original = {e.name: e for e in entries}
    sent: dict[bytes, int] = {}  # non-directory name -> its part
    content_in: dict[bytes, int] = {}  # content directory -> the part that sends it as one
    for k, part in enumerate(parts):
        here = {e.name for e in part}
        assert len(here) == len(part), "a name twice in one part"
        assert [e.name for e in part] == [e.name for e in entries if e.name in here], "order kept"
        for e in part:
            assert all(a in here for a in _ancestors(e.name) if a in names), f"{e.name!r}: an ancestor missing"
            o = original[e.name]
            assert (e.mode, e.size, e.mtime, e.inode) == (o.mode, o.size, o.mtime, o.inode)
            if e.is_dir and e.content_dir:
                assert o.content_dir
                assert e.name not in content_in, f"{e.name!r} sent as a content directory twice"
                content_in[e.name] = k
                # every direct child of a content directory is in its part (else its deletion removes it)
                assert {c for c in names if parent(c) == e.name} <= here
            elif not e.is_dir:
                assert e.name not in sent, f"{e.name!r} in two parts"
                sent[e.name] = k
    assert set(sent) == {e.name for e in entries if not e.is_dir}, "every file in some part"
    assert set(content_in) == {e.name for e in entries if e.is_dir and e.content_dir}
    inode_parts: dict[tuple[int, int], set[int]] = {}
    for name, k in sent.items():
        if original[name].inode is not None:
            inode_parts.setdefault(original[name].inode, set()).add(k)  # type: ignore[arg-type]
    assert all(len(ks) == 1 for ks in inode_parts.values()), "the names of one inode in two parts"


def _ancestors(name: bytes) -> list[bytes]:
    parts = name.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


CASES: list[tuple[str, list[FileEntry], int]] = [
    ("small", tree(b"a", 2, 2)[:3], 1),
    ("one_content_dir_untarred", tree(b"top", 8, 4), 6),
    ("plain_ancestors", [d(b"p", False), d(b"p/q", False)] + [f(b"p/q/f%d" % i) for i in range(12)]
     + [d(b"p/r", False)] + [f(b"p/r/g%d" % i) for i in range(12)], 2),
    ("two_trees", tree(b"a", 3, 5) + tree(b"b", 3, 5), 6),
    ("deletes", [d(b"p", False), gone(b"p/x"), gone(b"p/y")] + [f(b"p/f%d" % i) for i in range(20)], 1),
    ("content_with_many_files", [d(b"c")] + [f(b"c/f%d" % i) for i in range(30)], 1),
    ("linked_across", [d(b"a", False), d(b"a/x"), f(b"a/x/l", 10, (1, 7)), *[f(b"a/x/f%d" % i) for i in range(6)],
                       d(b"a/y"), f(b"a/y/l", 10, (1, 7)), *[f(b"a/y/f%d" % i) for i in range(6)]], 1),
]


@pytest.mark.parametrize(("name", "entries", "want"), CASES, ids=[c[0] for c in CASES])
def test_split(name: str, entries: list[FileEntry], want: int) -> None:
    parts = split(entries)
    assert len(parts) == want
    check(entries, parts)


def test_a_whole_tree_is_cut_below_its_root() -> None:
    entries = [FileEntry(name=b".", mode=DIR, top_dir=True), f(b"loose"), *tree(b"a", 8, 8), *tree(b"b", 2, 2)]
    parts = split(entries)
    assert len(parts) == 6
    check(entries, parts)
    root = [p for p in parts if p[0].name == b"."]
    assert len(root) == 1 and {e.name for e in root[0] if b"/" not in e.name} == {b".", b"loose", b"a", b"b"}


def test_parts_are_balanced_by_bytes() -> None:
    entries = tree(b"top", 12, 6)
    parts = split(entries, max_parts=4)
    loads = [sum(ENTRY_COST + e.size for e in p if not e.is_dir) for p in parts]
    assert len(parts) == 4
    assert max(loads) <= 2 * min(loads)
    check(entries, parts)


def test_a_split_content_dir_lists_its_subdirectories_plainly_elsewhere() -> None:
    entries = tree(b"top", 8, 4)
    parts = split(entries)
    for part in parts:
        for e in part:
            if e.name == b"top" and e.content_dir:
                # all eight subdirectories are there (as plain directories where their files went elsewhere)
                assert {x.name for x in part if parent(x.name) == b"top"} == {b"top/s%d" % i for i in range(8)}

"""Test helper: compare two directory trees and report every difference readably.

Independent of ``kwatch.replicate.scan`` on purpose (an oracle must not share the code it checks): it walks with
``os.lstat`` and reads content itself. Compared: the set of paths, type, content of regular files, permission bits
(not for symlinks, whose mode Linux fixes), mtime_ns (files, directories and symlinks; not the roots themselves),
symlink targets, hard-link structure (which paths share an inode), and optionally uid/gid.

Usage: ``assert_trees_equal(src, mirror)``; ``tree_differences`` returns the list instead of raising.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from kwatch.events import display_path

AnyPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


def _kind(st: os.stat_result) -> str:
    return _TYPES.get(stat.S_IFMT(st.st_mode), "unknown")


def walk_lstat(root: bytes, ignore: Iterable[bytes] = ()) -> dict[bytes, os.stat_result]:
    """Every path below ``root`` (relative bytes) with its lstat; symlinks are not followed.

    Tests poll a mirror that a receiver is still writing: a name that goes between the listing and its lstat (an
    rsync temporary renamed into place) is not in the result, as if the walk had come a moment later.
    """
    skip = set(ignore)
    out: dict[bytes, os.stat_result] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        base = root + b"/" + rel if rel else root
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            if not rel:
                raise
            continue
        for name in names:
            path = rel + b"/" + name if rel else name
            if path in skip:
                continue
            try:
                st = os.lstat(root + b"/" + path)
            except FileNotFoundError:
                continue
            out[path] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
    return out


def _same_content(a: bytes, b: bytes) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca = fa.read(1 << 20)
            cb = fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def _link_groups(tree: dict[bytes, os.stat_result]) -> set[frozenset[bytes]]:
    by_inode: dict[tuple[int, int], set[bytes]] = {}
    for path, st in tree.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), set()).add(path)
    return {frozenset(group) for group in by_inode.values() if len(group) > 1}


def _unset(st: os.stat_result, setid: bool) -> int:
    """Mode bits a mirror leaves out: setuid/setgid of a non-directory when owners are not replicated."""
    return 0 if setid or stat.S_ISDIR(st.st_mode) else stat.S_ISUID | stat.S_ISGID


def tree_differences(
    a: AnyPath,
    b: AnyPath,
    *,
    owner: bool = False,
    mtime: bool = True,
    hardlinks: bool = True,
    ignore: Iterable[bytes] = (),
    setid: bool = True,
) -> list[str]:
    """Human-readable differences between the trees at ``a`` and ``b`` (empty list: identical).

    ``setid=False``: ``b`` is a mirror made without the source's owners, so its files must carry no setuid/setgid
    bits; ``a``'s are compared without them (directories keep theirs).
    """
    ra = os.fsencode(a)
    rb = os.fsencode(b)
    ignored = list(ignore)
    ta = walk_lstat(ra, ignored)
    tb = walk_lstat(rb, ignored)
    out: list[str] = []
    for path in sorted(ta.keys() - tb.keys()):
        out.append(f"only in {display_path(ra)}: {display_path(path)} ({_kind(ta[path])})")
    for path in sorted(tb.keys() - ta.keys()):
        out.append(f"only in {display_path(rb)}: {display_path(path)} ({_kind(tb[path])})")
    for path in sorted(ta.keys() & tb.keys()):
        sa, sb = ta[path], tb[path]
        shown = display_path(path)
        ka, kb = _kind(sa), _kind(sb)
        if ka != kb:
            out.append(f"{shown}: type {ka} != {kb}")
            continue
        try:
            if ka == "file":
                if sa.st_size != sb.st_size:
                    out.append(f"{shown}: size {sa.st_size} != {sb.st_size}")
                elif not _same_content(ra + b"/" + path, rb + b"/" + path):
                    out.append(f"{shown}: content differs (same size {sa.st_size})")
            if ka == "symlink":
                la = os.readlink(ra + b"/" + path)
                lb = os.readlink(rb + b"/" + path)
                if la != lb:
                    out.append(f"{shown}: symlink target {display_path(la)!r} != {display_path(lb)!r}")
        except FileNotFoundError:
            out.append(f"{shown}: went away during the comparison")
            continue
        if ka != "symlink" and stat.S_IMODE(sa.st_mode) & ~_unset(sa, setid) != stat.S_IMODE(sb.st_mode):
            out.append(f"{shown}: mode {stat.S_IMODE(sa.st_mode):04o} != {stat.S_IMODE(sb.st_mode):04o}"
                       + ("" if setid else " (setuid/setgid bits dropped)"))
        if mtime and sa.st_mtime_ns != sb.st_mtime_ns:
            out.append(f"{shown}: mtime_ns {sa.st_mtime_ns} != {sb.st_mtime_ns}")
        if owner and (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            out.append(f"{shown}: owner {sa.st_uid}:{sa.st_gid} != {sb.st_uid}:{sb.st_gid}")
    if hardlinks:
        ga, gb = _link_groups(ta), _link_groups(tb)
        for group in sorted(ga - gb, key=sorted):
            out.append(f"hard links only in {display_path(ra)}: " + ", ".join(display_path(p) for p in sorted(group)))
        for group in sorted(gb - ga, key=sorted):
            out.append(f"hard links only in {display_path(rb)}: " + ", ".join(display_path(p) for p in sorted(group)))
    return out


def assert_trees_equal(
    a: AnyPath,
    b: AnyPath,
    *,
    owner: bool = False,
    mtime: bool = True,
    hardlinks: bool = True,
    ignore: Iterable[bytes] = (),
) -> None:
    """Raise ``AssertionError`` listing every difference between the two trees (at most 50 lines shown)."""
    diffs = tree_differences(a, b, owner=owner, mtime=mtime, hardlinks=hardlinks, ignore=ignore)
    if diffs:
        shown = diffs[:50]
        more = f"\n  ... and {len(diffs) - 50} more" if len(diffs) > 50 else ""
        raise AssertionError(f"trees differ ({len(diffs)} differences):\n  " + "\n  ".join(shown) + more)


def snapshot(root: AnyPath) -> dict[bytes, tuple[str, int, int, int, bytes]]:
    """A comparable picture of a tree (type, mode, size, mtime_ns, content or link target) for "unchanged" checks."""
    r = os.fsencode(root)
    out: dict[bytes, tuple[str, int, int, int, bytes]] = {}
    st_root = os.lstat(r)
    out[b""] = ("dir", stat.S_IMODE(st_root.st_mode), 0, st_root.st_mtime_ns, b"")
    for path, st in walk_lstat(r).items():
        full = r + b"/" + path
        data = b""
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                data = f.read()
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(full)
        out[path] = (_kind(st), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, data)
    return out

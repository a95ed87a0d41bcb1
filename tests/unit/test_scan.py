"""kwatch.replicate.scan: scanning real trees (every type, odd names, errors) and diff plans as tables of cases."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import xxhash

from kwatch.replicate.scan import (
    Delete,
    Entry,
    Hardlink,
    Kind,
    Manifest,
    Mkdir,
    Plan,
    Put,
    ScanError,
    SetAttr,
    Symlink,
    diff,
    scan,
)

NON_UTF8 = b"caf\xe9-\xff\xfe"
NEWLINE = b"two\nlines"


def build(root: Path) -> bytes:
    """A tree with every type: files, dirs, symlinks (relative, absolute, dangling), hard links, fifo, odd names."""
    r = os.fsencode(root)
    os.makedirs(r + b"/d/e")
    with open(r + b"/a", "wb") as f:
        f.write(b"hello")
    open(r + b"/empty", "wb").close()
    with open(r + b"/d/e/deep", "wb") as f:
        f.write(b"x" * 5000)
    os.link(r + b"/a", r + b"/d/a-link")
    os.symlink(b"a", r + b"/rel-link")
    os.symlink(b"/nonexistent/target", r + b"/dangling")
    os.symlink(b"d", r + b"/dir-link")  # must not be descended
    os.mkfifo(r + b"/fifo")
    with open(r + b"/" + NON_UTF8, "wb") as f:
        f.write(b"latin1")
    with open(r + b"/d/" + NEWLINE, "wb") as f:
        f.write(b"nl")
    os.chmod(r + b"/empty", 0o600)
    os.chmod(r + b"/d/e", 0o750)
    return r


# ---------------------------------------------------------------------------------------------------------------
# scan


def test_scan_every_type(tmp_path: Path) -> None:
    r = build(tmp_path)
    m = scan(r)
    assert m.errors == []
    assert set(m.entries) == {
        b"a",
        b"empty",
        b"d",
        b"d/e",
        b"d/e/deep",
        b"d/a-link",
        b"rel-link",
        b"dangling",
        b"dir-link",
        b"fifo",
        NON_UTF8,
        b"d/" + NEWLINE,
    }
    a = m[b"a"]
    assert (a.kind, a.size, a.mode, a.nlink) == (Kind.FILE, 5, 0o644 & ~_umask(), 2)
    assert m[b"empty"].mode == 0o600 and m[b"empty"].size == 0
    assert m[b"d/e"].kind is Kind.DIR and m[b"d/e"].mode == 0o750 and m[b"d/e"].size == 0
    assert m[b"rel-link"].kind is Kind.SYMLINK and m[b"rel-link"].target == b"a"
    assert m[b"dangling"].target == b"/nonexistent/target"
    assert m[b"dir-link"].kind is Kind.SYMLINK  # not followed
    assert m[b"fifo"].kind is Kind.OTHER
    assert m[NON_UTF8].size == 6 and m[b"d/" + NEWLINE].size == 2
    # hard links: same (dev, ino)
    assert (m[b"a"].dev, m[b"a"].ino) == (m[b"d/a-link"].dev, m[b"d/a-link"].ino)
    st = os.lstat(r + b"/d/e/deep")
    assert (m[b"d/e/deep"].mtime_ns, m[b"d/e/deep"].uid, m[b"d/e/deep"].gid) == (st.st_mtime_ns, st.st_uid, st.st_gid)
    assert all(e.digest is None for e in m.entries.values())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_scan_checksum(tmp_path: Path) -> None:
    r = build(tmp_path)
    m = scan(r, checksum=True)
    assert m.checksum
    assert m[b"a"].digest == xxhash.xxh3_128(b"hello").digest()
    assert m[b"d/e/deep"].digest == xxhash.xxh3_128(b"x" * 5000).digest()
    assert m[b"empty"].digest == xxhash.xxh3_128(b"").digest()
    assert m[b"rel-link"].digest is None and m[b"d"].digest is None


def test_scan_big_file_hash_streams(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)  # crosses the 1 MiB read size
    (tmp_path / "big").write_bytes(data)
    assert scan(os.fsencode(tmp_path), checksum=True)[b"big"].digest == xxhash.xxh3_128(data).digest()


@dataclass
class ExcludeCase:
    name: str
    patterns: tuple[bytes, ...]
    gone: set[bytes]


EXCLUDE_CASES = [
    ExcludeCase("basename glob at any depth", (b"deep",), {b"d/e/deep"}),
    ExcludeCase("directory is not descended", (b"e",), {b"d/e", b"d/e/deep"}),
    ExcludeCase("anchored path", (b"/d/e",), {b"d/e", b"d/e/deep"}),
    ExcludeCase("path glob", (b"d/*-link",), {b"d/a-link"}),
    ExcludeCase("non-UTF-8 glob", (b"caf\xe9*",), {NON_UTF8}),
    ExcludeCase("glob matches a newline", (b"two?lines",), {b"d/" + NEWLINE}),
    ExcludeCase("several", (b"*link", b"fifo"), {b"d/a-link", b"rel-link", b"dir-link", b"fifo"}),
    ExcludeCase("none", (), set()),
]


@pytest.mark.parametrize("case", EXCLUDE_CASES, ids=lambda c: c.name)
def test_scan_excludes(tmp_path: Path, case: ExcludeCase) -> None:
    r = build(tmp_path)
    full = set(scan(r))
    assert full - set(scan(r, excludes=case.patterns)) == case.gone


@pytest.mark.parametrize("case", EXCLUDE_CASES, ids=lambda c: c.name)
def test_scan_sub_excludes_as_the_whole_scan(tmp_path: Path, case: ExcludeCase) -> None:
    """A scan of ``sub`` leaves out what the whole tree's scan leaves out there: patterns see paths relative to the
    root, not to ``sub`` (an anchored ``/d/e`` is ``d/e`` also when only ``d`` is walked)."""
    r = build(tmp_path)
    whole = {p for p in scan(r, excludes=case.patterns) if p.startswith(b"d/")}
    assert {b"d/" + p for p in scan(r, excludes=case.patterns, sub=b"d")} == whole


@dataclass
class PruneCase:
    name: str
    kw: dict[str, Any]
    sub: bytes
    listed: set[bytes]


PRUNE_CASES = [
    PruneCase("pruned directory listed, not descended", {"prune": {b"d/e"}}, b"",
              {b"a", b"d", b"d/e", b"x", b"x/y"}),
    PruneCase("prune is relative to the root under sub", {"prune": {b"d/e"}}, b"d", {b"e"}),
    PruneCase("not recursive: direct children only", {"recursive": False}, b"", {b"a", b"d", b"x"}),
    PruneCase("not recursive under sub", {"recursive": False}, b"d", {b"e"}),
]


@pytest.mark.parametrize("case", PRUNE_CASES, ids=lambda c: c.name)
def test_scan_prune_and_depth(tmp_path: Path, case: PruneCase) -> None:
    for d in ("d/e/f", "x/y"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "d/e/f/g").write_bytes(b"g")
    assert set(scan(os.fsencode(tmp_path), sub=case.sub, **case.kw)) == case.listed


def test_scan_exclude_test_callable(tmp_path: Path) -> None:
    """An exclude test instead of patterns gets each name and its path relative to the root."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d/keep").write_bytes(b"k")
    (tmp_path / "d/drop").write_bytes(b"d")
    seen: list[tuple[bytes, bytes]] = []

    def test(name: bytes, rel: bytes) -> bool:
        seen.append((name, rel))
        return name == b"drop"

    assert set(scan(os.fsencode(tmp_path), excludes=test, sub=b"d")) == {b"keep"}
    assert sorted(seen) == [(b"drop", b"d/drop"), (b"keep", b"d/keep")]


def test_scan_default_excludes_receiver_temps(tmp_path: Path) -> None:
    (tmp_path / ".a.kwatch-tmp-0123456789abcdef").write_bytes(b"partial")
    (tmp_path / "a").write_bytes(b"a")
    assert set(scan(os.fsencode(tmp_path))) == {b"a"}
    assert set(scan(os.fsencode(tmp_path), excludes=())) == {b"a", b".a.kwatch-tmp-0123456789abcdef"}


class _VanishingScandir:
    """Wraps os.scandir: lists the directory, then removes the entry named ``victim`` before anyone stats it (the
    scanner lists a directory fd: entries are looked at relative to it)."""

    def __init__(self, real: Any, victim: bytes) -> None:
        self.real = real
        self.victim = victim

    def __call__(self, dir_fd: int) -> _VanishingScandir:
        with self.real(dir_fd) as it:
            self.items = list(it)
        for de in self.items:
            if os.fsencode(de.name) == self.victim:
                os.unlink(de.name, dir_fd=dir_fd)
        self.it: Iterator[Any] = iter(self.items)
        return self

    def __enter__(self) -> _VanishingScandir:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        pass

    def __next__(self) -> Any:
        return next(self.it)


def test_scan_vanished_file_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = os.fsencode(tmp_path)
    (tmp_path / "stays").write_bytes(b"1")
    (tmp_path / "goes").write_bytes(b"2")
    monkeypatch.setattr(os, "scandir", _VanishingScandir(os.scandir, b"goes"))
    m = scan(r)
    assert set(m) == {b"stays"}
    assert m.errors == [ScanError(b"goes", errno.ENOENT, "vanished during scan")]


def test_scan_permission_denied_is_reported(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the scan as another user")
    top = tempfile.mkdtemp(prefix="kwatch-scan-perm-")  # /tmp itself: pytest's tmp dir is 0700, closed to nobody
    try:
        os.chmod(top, 0o755)
        os.makedirs(top + "/open/x")
        os.makedirs(top + "/closed/y")
        os.chmod(top + "/closed", 0o700)
        # A forked child drops to nobody (root is never denied); it reports back through a pipe.
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            try:
                os.close(rfd)
                os.setgid(65534)
                os.setuid(65534)
                m = scan(os.fsencode(top))
                res = repr((sorted(m.entries), [(e.path, e.errno) for e in m.errors])).encode()
                os.write(wfd, res)
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            got = f.read()
        os.waitpid(pid, 0)
        assert got == repr(([b"closed", b"open", b"open/x"], [(b"closed", errno.EACCES)])).encode()
    finally:
        shutil.rmtree(top)


def test_scan_root_errors_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan(os.fsencode(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        scan(os.fsencode(tmp_path / "file"))
    with pytest.raises(TypeError):
        scan(str(tmp_path))  # type: ignore[arg-type]


def test_scan_symlinked_root_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"1")
    (tmp_path / "link").symlink_to("real")
    assert set(scan(os.fsencode(tmp_path / "link"))) == {b"f"}


def test_scan_deep_tree_no_recursion_limit(tmp_path: Path) -> None:
    depth = sys.getrecursionlimit() + 100
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(depth):  # relative mkdir/open so the path length never hits PATH_MAX
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    try:
        m = scan(os.fsencode(tmp_path))
        assert len(m) == depth and m.errors == []
    finally:
        # pytest's own tmp cleanup (shutil.rmtree) recurses per level and would hit the recursion limit
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)


@pytest.mark.slow
def test_scan_large_tree_memory(tmp_path: Path) -> None:
    """1,000,000 entries (1000 dirs x 999 files) on tmpfs: time and memory of the manifest, printed for the record."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,nr_inodes=2m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs")
    try:
        code = textwrap.dedent(
            f"""
            import os, time
            root = {os.fsencode(mnt)!r}
            for i in range(1000):
                d = root + b"/dir%04d" % i
                os.mkdir(d)
                for j in range(999):
                    os.close(os.open(d + b"/file-with-a-longish-name-%06d" % j, os.O_CREAT | os.O_WRONLY, 0o644))
            def rss():
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            from kwatch.replicate.scan import scan, diff
            before = rss()
            t = time.perf_counter()
            m = scan(root)
            dt = time.perf_counter() - t
            grown = rss() - before
            t = time.perf_counter()
            p = diff(m, m, delete=True, checksum=False)
            dd = time.perf_counter() - t
            print(len(m), len(m.errors), round(dt, 2), round(grown / 1e6, 1), round(dd, 2), len(p))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
        ).stdout.decode().split()
        n, nerr, secs, mb, dsecs, plan_len = out
        print(f"\nscan of {n} entries: {secs} s, manifest {mb} MB RSS; diff against itself {dsecs} s")
        assert int(n) == 1_000_000 and int(nerr) == 0 and int(plan_len) == 0
        assert float(mb) < 600
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------------------------
# diff (pure: manifests are built by hand)

MT = 1_700_000_000_000_000_000
_ino = iter(range(1000, 10_000_000))


def F(size: int = 3, mtime: int = MT, mode: int = 0o644, *, digest: bytes | None = None, ino: int | None = None,
      nlink: int = 1, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(Kind.FILE, mode, size, mtime, uid, gid, nlink, next(_ino) if ino is None else ino, 1, None, digest)


def D(mtime: int = MT, mode: int = 0o755) -> Entry:
    return Entry(Kind.DIR, mode, 0, mtime, 0, 0, 2, next(_ino), 1)


def L(target: bytes, mtime: int = MT) -> Entry:
    return Entry(Kind.SYMLINK, 0o777, len(target), mtime, 0, 0, 1, next(_ino), 1, target)


def O() -> Entry:  # noqa: E743
    return Entry(Kind.OTHER, 0o644, 0, MT, 0, 0, 1, next(_ino), 1)


def man(entries: dict[bytes, Entry], errors: list[ScanError] | None = None, identities: bool = True) -> Manifest:
    return Manifest(dict(entries), list(errors or []), identities=identities)


@dataclass
class DiffCase:
    name: str
    src: dict[bytes, Entry]
    dst: dict[bytes, Entry]
    expect: list[object]  # the whole of plan.ops(), in order
    delete: bool = False
    checksum: bool = False
    owner: bool = False
    skipped: list[bytes] = field(default_factory=list)
    src_errors: list[ScanError] = field(default_factory=list)
    identities: bool = True  # the mirror's manifest tells which paths are one inode (agent capability "inodes")


H1 = xxhash.xxh3_128(b"one").digest()
H2 = xxhash.xxh3_128(b"two").digest()
SHARED = F(ino=77, nlink=2)
SHARED_DST = F(ino=88, nlink=2)
G2 = F(ino=78, nlink=3)  # a second source group
ALL5 = F(ino=89, nlink=5)
THREE = F(ino=90, nlink=3)
WITH_X = F(ino=91, nlink=2)

DIFF_CASES = [
    DiffCase("identical trees: nothing to do", {b"a": F(), b"d": D()}, {b"a": F(), b"d": D()}, []),
    DiffCase("new file", {b"a": F()}, {}, [Put(b"a", 3, 0o644, MT)]),
    DiffCase("new file in existing dir restores dir mtime",
             {b"d": D(), b"d/a": F()}, {b"d": D()},
             [Put(b"d/a", 3, 0o644, MT), SetAttr(b"d", None, MT)]),
    DiffCase("size changed: put with basis", {b"a": F(size=4)}, {b"a": F(size=3)},
             [Put(b"a", 4, 0o644, MT, basis=True)]),
    DiffCase("mtime changed, no checksum: quick check sends it", {b"a": F(mtime=MT + 1)}, {b"a": F()},
             [Put(b"a", 3, 0o644, MT + 1, basis=True)]),
    DiffCase("mtime only, checksum equal: setattr", {b"a": F(mtime=MT + 1, digest=H1)}, {b"a": F(digest=H1)},
             [SetAttr(b"a", None, MT + 1)], checksum=True),
    DiffCase("same size and mtime but content differs, checksum", {b"a": F(digest=H1)}, {b"a": F(digest=H2)},
             [Put(b"a", 3, 0o644, MT, basis=True, digest=H1)], checksum=True),
    DiffCase("checksum without a digest on the mirror: sent", {b"a": F(digest=H1)}, {b"a": F()},
             [Put(b"a", 3, 0o644, MT, basis=True, digest=H1)], checksum=True),
    DiffCase("mode only", {b"a": F(mode=0o600)}, {b"a": F()}, [SetAttr(b"a", 0o600, None)]),
    DiffCase("dir mode only", {b"d": D(mode=0o700)}, {b"d": D()}, [SetAttr(b"d", 0o700, None)]),
    DiffCase("dir mtime only", {b"d": D(mtime=MT + 5)}, {b"d": D()}, [SetAttr(b"d", None, MT + 5)]),
    DiffCase("dir mode change plus content change also restores its mtime",
             {b"d": D(mode=0o700), b"d/f": F()}, {b"d": D()},
             [Put(b"d/f", 3, 0o644, MT), SetAttr(b"d", 0o700, MT)]),
    DiffCase("deleted, delete=False: kept", {}, {b"a": F(), b"d": D(), b"d/x": F()}, []),
    DiffCase("deleted, delete=True: children first",
             {}, {b"a": F(), b"d": D(), b"d/x": F(), b"d/x.y": F(), b"d/y": D(), b"d/y/z": F()},
             [Delete(b"d/y/z", Kind.FILE), Delete(b"d/y", Kind.DIR), Delete(b"d/x.y", Kind.FILE),
              Delete(b"d/x", Kind.FILE), Delete(b"d", Kind.DIR), Delete(b"a", Kind.FILE)], delete=True),
    DiffCase("delete inside a kept dir restores its mtime",
             {b"d": D()}, {b"d": D(), b"d/x": F()},
             [Delete(b"d/x", Kind.FILE), SetAttr(b"d", None, MT)], delete=True),
    DiffCase("type change file -> dir (even with delete=False)",
             {b"a": D(), b"a/f": F()}, {b"a": F()},
             [Delete(b"a", Kind.FILE), Mkdir(b"a", 0o755), Put(b"a/f", 3, 0o644, MT), SetAttr(b"a", 0o755, MT)]),
    DiffCase("type change dir -> file removes the subtree",
             {b"a": F()}, {b"a": D(), b"a/x": D(), b"a/x/y": F()},
             [Delete(b"a/x/y", Kind.FILE), Delete(b"a/x", Kind.DIR), Delete(b"a", Kind.DIR), Put(b"a", 3, 0o644, MT)]),
    DiffCase("type change file -> symlink", {b"a": L(b"t")}, {b"a": F()},
             [Delete(b"a", Kind.FILE), Symlink(b"a", b"t", MT)]),
    DiffCase("type change symlink -> file: no basis", {b"a": F()}, {b"a": L(b"t")},
             [Delete(b"a", Kind.SYMLINK), Put(b"a", 3, 0o644, MT)]),
    DiffCase("new symlink", {b"l": L(b"../x")}, {}, [Symlink(b"l", b"../x", MT)]),
    DiffCase("symlink retargeted", {b"l": L(b"new")}, {b"l": L(b"old")}, [Symlink(b"l", b"new", MT)]),
    DiffCase("symlink mtime only: no mode", {b"l": L(b"t", MT + 9)}, {b"l": L(b"t")}, [SetAttr(b"l", None, MT + 9)]),
    DiffCase("new read-only dir tree: parents first, modes after contents, deepest first",
             {b"d": D(mode=0o555), b"d/e": D(mode=0o500, mtime=MT + 1), b"d/e/f": F()}, {},
             [Mkdir(b"d", 0o755), Mkdir(b"d/e", 0o700), Put(b"d/e/f", 3, 0o644, MT),
              SetAttr(b"d/e", 0o500, MT + 1), SetAttr(b"d", 0o555, MT)]),
    DiffCase("new hard-link group: one put, links after",
             {b"a": SHARED, b"b": SHARED, b"c/d": SHARED, b"c": D()}, {b"c": D()},
             [Put(b"a", 3, 0o644, MT), Hardlink(b"b", b"a", 3, MT), Hardlink(b"c/d", b"a", 3, MT), SetAttr(b"c", None, MT)]),
    DiffCase("hard-link group already linked in the mirror",
             {b"a": SHARED, b"b": SHARED}, {b"a": SHARED_DST, b"b": SHARED_DST}, []),
    DiffCase("hard-link group: mirror has a separate copy at one name",
             {b"a": SHARED, b"b": SHARED}, {b"a": F(), b"b": F(size=9)}, [Hardlink(b"b", b"a", 3, MT)]),
    DiffCase("restart: the mirror has the group's names as two copies: linked, no data",
             {b"a": SHARED, b"b": SHARED}, {b"a": F(), b"b": F()}, [Hardlink(b"b", b"a", 3, MT)]),
    DiffCase("restart: the mirror has one name as a copy and two on one inode: the one is linked to the two",
             {b"a": G2, b"b": G2, b"c": G2}, {b"a": F(), b"b": SHARED_DST, b"c": SHARED_DST},
             [Hardlink(b"a", b"b", 3, MT)]),
    DiffCase("mirror inode shared with a name outside the manifest the source lacks: not kept",
             {b"a": SHARED, b"b": SHARED}, {b"a": SHARED_DST, b"b": F()}, [Hardlink(b"a", b"b", 3, MT)]),
    DiffCase("mirror inode with a name outside the manifest, as the source's (a subtree rescan): kept",
             {b"a": G2, b"b": G2}, {b"a": THREE, b"b": THREE}, []),
    DiffCase("mirror links a, b, c; the source links a, b and has c apart: only c is sent",
             {b"a": SHARED, b"b": SHARED, b"c": F()}, {b"a": THREE, b"b": THREE, b"c": THREE},
             [Put(b"c", 3, 0o644, MT, basis=True)]),
    DiffCase("mirror links the names of two source groups: the larger keeps the inode, the other is sent once",
             {b"a": SHARED, b"b": SHARED, b"c": G2, b"d": G2, b"e": G2},
             {b"a": ALL5, b"b": ALL5, b"c": ALL5, b"d": ALL5, b"e": ALL5},
             [Put(b"a", 3, 0o644, MT, basis=True), Hardlink(b"b", b"a", 3, MT)]),
    DiffCase("mirror inode also named by an extraneous path, delete=True: kept, the path deleted",
             {b"a": F(mode=0o600)}, {b"a": WITH_X, b"x": WITH_X},
             [Delete(b"x", Kind.FILE), SetAttr(b"a", 0o600, None)], delete=True),
    DiffCase("mirror inode also named by an extraneous path, delete=False: the source's name is sent apart",
             {b"a": F(mode=0o600)}, {b"a": WITH_X, b"x": WITH_X}, [Put(b"a", 3, 0o600, MT, basis=True)]),
    DiffCase("kept link group with only an mtime change (checksum): one setattr for the inode",
             {b"a": F(ino=5, nlink=2, mtime=MT + 1, digest=H1), b"b": F(ino=5, nlink=2, mtime=MT + 1, digest=H1)},
             {b"a": F(ino=6, nlink=2, digest=H1), b"b": F(ino=6, nlink=2, digest=H1)},
             [SetAttr(b"a", None, MT + 1)], checksum=True),
    DiffCase("mirror without identities: every name but the leader gets a Hardlink (a no-op where linked)",
             {b"a": SHARED, b"b": SHARED, b"c": SHARED}, {b"a": F(ino=0), b"b": F(ino=0), b"c": F(ino=0)},
             [Hardlink(b"b", b"a", 3, MT), Hardlink(b"c", b"a", 3, MT)], identities=False),
    DiffCase("mirror without identities: a link the source lacks cannot be seen",
             {b"a": F(), b"b": F()}, {b"a": F(ino=0), b"b": F(ino=0)}, [], identities=False),
    DiffCase("hard-link group: leader is the name the mirror has",
             {b"a": SHARED, b"b": SHARED}, {b"b": F()}, [Hardlink(b"a", b"b", 3, MT)]),
    DiffCase("hard-link group changed: leader sent, link renewed",
             {b"a": F(ino=5, nlink=2, size=9), b"b": F(ino=5, nlink=2, size=9)}, {b"a": SHARED_DST, b"b": SHARED_DST},
             [Put(b"a", 9, 0o644, MT, basis=True), Hardlink(b"b", b"a", 9, MT)]),
    DiffCase("mirror has a hard link the source does not: one name keeps the inode, the other is sent apart",
             {b"a": F(mode=0o600), b"b": F()}, {b"a": SHARED_DST, b"b": SHARED_DST},
             [Put(b"b", 3, 0o644, MT, basis=True), SetAttr(b"a", 0o600, None)]),
    DiffCase("link group with one member in the tree is a plain file",
             {b"a": F(ino=99, nlink=3)}, {}, [Put(b"a", 3, 0o644, MT)]),
    DiffCase("special files are skipped", {b"p": O()}, {}, [], skipped=[b"p"]),
    DiffCase("no delete under a source read error",
             {b"d": D()}, {b"d": D(), b"d/x": F(), b"y": F()},
             [Delete(b"y", Kind.FILE)], delete=True, skipped=[b"d/x"],
             src_errors=[ScanError(b"d", errno.EACCES, "cannot list directory")]),
    DiffCase("vanished source file does not protect deletes",
             {}, {b"gone": F()}, [Delete(b"gone", Kind.FILE)], delete=True,
             src_errors=[ScanError(b"gone", errno.ENOENT, "vanished during scan")]),
    DiffCase("owner compared only when asked (off)", {b"a": F(uid=5)}, {b"a": F()}, []),
    DiffCase("owner compared only when asked (on)", {b"a": F(uid=5, gid=6), b"d": D()}, {b"a": F(), b"d": D()},
             [SetAttr(b"a", None, None, 5, 6)], owner=True),
    DiffCase("non-UTF-8 and newline names", {NON_UTF8: F(), NEWLINE: F()}, {NEWLINE: F(size=1)},
             [Put(NEWLINE, 3, 0o644, MT, basis=True), Put(NON_UTF8, 3, 0o644, MT)]),
]


@pytest.mark.parametrize("case", DIFF_CASES, ids=lambda c: c.name)
def test_diff(case: DiffCase) -> None:
    plan = diff(man(case.src, case.src_errors), man(case.dst, identities=case.identities), delete=case.delete,
                checksum=case.checksum,
                owner=case.owner)
    got = list(plan.ops())
    # puts come from dict order; compare them as a set, everything else in order
    assert sorted(op for op in got if isinstance(op, Put)) == sorted(op for op in case.expect if isinstance(op, Put))
    assert [op for op in got if not isinstance(op, Put)] == [op for op in case.expect if not isinstance(op, Put)]
    assert [p for p, _why in plan.skipped] == case.skipped
    assert len(plan) == len(case.expect) and plan.empty == (not case.expect)


def test_plan_order_is_fixed() -> None:
    p = Plan(
        deletes=[Delete(b"x", Kind.FILE)],
        mkdirs=[Mkdir(b"d", 0o755)],
        puts=[Put(b"d/f", 1, 0o644, MT)],
        symlinks=[Symlink(b"l", b"t", MT)],
        hardlinks=[Hardlink(b"h", b"d/f", 3, MT)],
        setattrs=[SetAttr(b"a", 0o600)],
        dir_setattrs=[SetAttr(b"d", 0o755, MT)],
    )
    assert [type(op).__name__ for op in p.ops()] == ["Delete", "Mkdir", "Put", "Symlink", "Hardlink", "SetAttr",
                                                      "SetAttr"]


def test_diff_of_real_trees(tmp_path: Path) -> None:
    """scan + diff on disk: a copy with one change differs by exactly that change."""
    a = build(tmp_path / "a")
    b = os.fsencode(tmp_path / "b")
    subprocess.run(["cp", "-a", a, b], check=True)
    assert diff(scan(a, checksum=True), scan(b, checksum=True), delete=True, checksum=True).empty
    with open(b + b"/d/e/deep", "r+b") as f:
        f.write(b"y")
    st = os.stat(a + b"/d/e/deep")
    os.utime(b + b"/d/e/deep", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only checksum sees it
    assert diff(scan(a), scan(b), delete=True, checksum=False).empty
    plan = diff(scan(a, checksum=True), scan(b, checksum=True), delete=True, checksum=True)
    assert [op.path for op in plan.ops()] == [b"d/e/deep", b"d/e"]

"""Tree scanning and diffing: what a tree holds (:func:`scan`) and what to do to make a mirror equal it (:func:`diff`).

This module owns the *reconciliation* half of replication (docs/design.md, "Restart and loss recovery"): on start, and
after any event loss, the source and the mirror are each scanned into a :class:`Manifest` and compared into a
:class:`Plan` of operations. Applying a plan is the receiver's job (``kwatch.mirror.receiver``); sending it over a
wire is the transports' job.

- Paths are relative ``bytes`` (no leading slash, ``/``-separated), never decoded. The root itself is not an entry.
- :func:`scan` never follows symlinks, and never raises for a single path: vanished files and permission errors are
  collected in ``Manifest.errors``. Only a root that cannot be listed at all raises, because an empty manifest for an
  unreadable source would make a ``delete=True`` diff wipe the mirror.
- :func:`diff` is pure: no I/O, no clock.

Memory: an entry is one ``NamedTuple`` (a tuple: no per-instance ``__dict__``); small repeated values (permission
bits, uid, gid, device) are interned per scan so a million entries share a handful of those int objects. Measured
numbers are in ``tests/unit/test_scan.py::test_scan_large_tree_memory`` (run with ``-m slow``).
"""

from __future__ import annotations

import contextlib
import enum
import errno as errno_mod
import fnmatch
import gc
import os
import re
import stat
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import xxhash

from kwatch.fsutil import READ_FLAGS, open_beneath
from kwatch.paths import parent
from kwatch.replicate.linkplan import plan_group

#: Temporaries the receiver writes (``.<name>.kwatch-tmp-<hex>``); never part of a tree, so excluded by default.
TEMP_PATTERN = b".*.kwatch-tmp-*"
DEFAULT_EXCLUDES: tuple[bytes, ...] = (TEMP_PATTERN,)

_R = TypeVar("_R")

_HASH_CHUNK = 1 << 20  # 1 MiB reads: big enough that per-call overhead vanishes, small enough to stay in cache


class Kind(enum.IntEnum):
    """Entry type. Members are singletons, so storing one costs a pointer per entry."""

    FILE = 1
    DIR = 2
    SYMLINK = 3
    OTHER = 4  # fifo, socket, device node: listed, never replicated (see Plan.skipped)


class Entry(NamedTuple):
    """One scanned path. ``mode`` is the permission bits only (``st_mode & 0o7777``); the type is ``kind``.

    ``ino``/``dev``/``nlink`` let :func:`diff` find hard links (same ``(dev, ino)`` at two paths). ``target`` is set
    for symlinks only, ``digest`` (xxh3_128, 16 bytes) for regular files when scanned with ``checksum=True``.
    A directory's ``size`` is 0: it means nothing portable.
    """

    kind: Kind
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    nlink: int
    ino: int
    dev: int
    target: bytes | None = None
    digest: bytes | None = None


class ScanError(NamedTuple):
    """A path that could not be scanned (or hashed) and why. ``errno`` is None when no OS error applies."""

    path: bytes
    errno: int | None
    reason: str


@dataclass(slots=True)
class Manifest:
    """What a tree holds: ``entries`` keyed by relative path, plus the per-path ``errors`` met while scanning."""

    entries: dict[bytes, Entry] = field(default_factory=dict)
    errors: list[ScanError] = field(default_factory=list)
    checksum: bool = False
    #: Whether ``nlink``/``dev``/``ino`` of the entries tell which paths are one inode. True for a local scan; a
    #: mirror's manifest from an agent without the ``inodes`` capability has no identity (nlink 1, ino 0).
    identities: bool = True

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.entries)

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def __getitem__(self, path: bytes) -> Entry:
        return self.entries[path]

    def get(self, path: bytes) -> Entry | None:
        return self.entries.get(path)


# ---------------------------------------------------------------------------------------------------------------
# excludes


class Excluder:
    """Compiled exclude patterns (shell globs, as bytes).

    A pattern without ``/`` matches a name at any depth (``*.o``, ``.git``); a pattern with ``/`` matches the whole
    relative path, a leading ``/`` anchoring it at the root (``/build``, ``src/*.tmp``). An excluded directory is not
    descended. This is the useful core of rsync's ``--exclude`` without its include/exclude ordering.
    """

    __slots__ = ("_name", "_path")

    def __init__(self, patterns: Iterable[bytes]) -> None:
        names: list[str] = []
        paths: list[str] = []
        for pat in patterns:
            if not isinstance(pat, bytes):
                raise TypeError(f"exclude patterns are bytes, got {pat!r}")
            # latin-1 maps every byte to one code point and back, so globbing arbitrary (non-UTF-8) bytes is exact.
            text = pat.decode("latin-1")
            if "/" in text.rstrip("/"):
                paths.append(fnmatch.translate(text.lstrip("/").rstrip("/")))
            else:
                names.append(fnmatch.translate(text.rstrip("/")))
        self._name = re.compile("|".join(names).encode("latin-1"), re.DOTALL) if names else None
        self._path = re.compile("|".join(paths).encode("latin-1"), re.DOTALL) if paths else None

    def __call__(self, name: bytes, rel: bytes) -> bool:
        if self._name is not None and self._name.match(name):
            return True
        return self._path is not None and self._path.match(rel) is not None


# ---------------------------------------------------------------------------------------------------------------
# scan


def hash_file(path: bytes, dir_fd: int | None = None) -> bytes:
    """xxh3_128 of a regular file's content, read in 1 MiB chunks. Never follows a symlink (O_NOFOLLOW), never
    blocks opening a FIFO swapped in since the stat (O_NONBLOCK; anything but a regular file raises EINVAL)."""
    flags = READ_FLAGS
    try:
        # O_NOATIME: hashing a whole tree should not dirty every inode; it needs ownership or CAP_FOWNER.
        fd = os.open(path, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno_mod.EINVAL, "not a regular file", path)
        h = xxhash.xxh3_128()
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            h.update(view[:n])
        digest: bytes = h.digest()
        return digest
    finally:
        os.close(fd)


#: an exclude test: (name, path relative to the scanned root) -> excluded; an :class:`Excluder` is one
Exclude = Callable[[bytes, bytes], bool]

#: called by :func:`scan` with the entries of each directory once it is listed (paths relative to what is walked)
OnDir = Callable[[list[tuple[bytes, Entry]]], None]


def scan(root: bytes, excludes: Iterable[bytes] | Exclude = DEFAULT_EXCLUDES, checksum: bool = False, *,
         sub: bytes = b"", prune: Collection[bytes] = (), recursive: bool = True,
         on_dir: OnDir | None = None) -> Manifest:
    """Walk ``root`` (or its subdirectory ``sub``) without following symlinks into a :class:`Manifest` keyed by
    path relative to what was walked.

    Every directory is opened beneath ``root`` with no symlink anywhere in its path (kwatch.fsutil.open_beneath;
    ``root`` itself may be a symlink: the caller named it), and entries are looked at relative to that directory's
    fd: a directory swapped for a symlink during the walk is an error for that path, never a way out of the tree.
    ``excludes`` are glob patterns (see :class:`Excluder`) or an exclude test, given each name and its path
    relative to ``root`` (not ``sub``: an anchored pattern means the same whatever part of the tree is walked); the
    default skips receiver temporaries. A directory in ``prune`` (paths relative to ``root``) is listed but not
    descended; without ``recursive`` no directory below the top is. With ``checksum`` every regular file is hashed
    (xxh3_128). Per-path problems land in ``Manifest.errors``; a root (or ``sub``) that cannot be opened as a
    directory raises ``OSError``. ``on_dir`` is given each directory's entries as soon as it is listed (a parent's
    before its subdirectories'), so that a caller can act on them during the walk.
    """
    if not isinstance(root, bytes) or not isinstance(sub, bytes):
        raise TypeError("root and sub must be bytes")
    excluded = excludes if callable(excludes) else Excluder(excludes)
    walk = _Walk(excluded, checksum, prune, recursive, on_dir)
    return _without_gc(lambda: _scan(root.rstrip(b"/") or b"/", sub.strip(b"/"), walk))


def entry_at(root: bytes, rel: bytes) -> Entry:
    """The entry :func:`scan` would list for ``root/rel`` (without a digest), from its lstat; raises ``OSError``."""
    path = os.path.join(root, rel)
    st = os.lstat(path)
    m = st.st_mode
    kind = Kind.FILE if stat.S_ISREG(m) else Kind.DIR if stat.S_ISDIR(m) else Kind.SYMLINK if stat.S_ISLNK(m) \
        else Kind.OTHER
    target = os.readlink(path) if kind is Kind.SYMLINK else None
    size = st.st_size if kind is Kind.FILE or kind is Kind.SYMLINK else 0
    return Entry(kind, m & 0o7777, size, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_nlink, st.st_ino, st.st_dev,
                 target)


class _Walk(NamedTuple):
    """What a walk leaves out and how deep it goes (see :func:`scan`)."""

    excluded: Exclude
    checksum: bool
    prune: Collection[bytes]
    recursive: bool
    on_dir: OnDir | None


def _without_gc(fn: Callable[[], _R]) -> _R:
    """Run ``fn`` with the cyclic GC paused. A scan or diff allocates millions of acyclic tuples; each allocation
    burst would trigger collections that traverse them for nothing (measured: 15-25% of a 300k-entry scan)."""
    was = gc.isenabled()
    gc.disable()
    try:
        return fn()
    finally:
        if was:
            gc.enable()


def _scan(root: bytes, sub: bytes, walk: _Walk) -> Manifest:
    try:
        root_fd = os.open(root, _O_LIST_DIR)  # follows a symlinked root on purpose: the caller named it
    except NotADirectoryError:
        raise NotADirectoryError(errno_mod.ENOTDIR, "scan root is not a directory", root) from None
    try:
        top = open_beneath(root_fd, sub, _O_LIST_DIR) if sub else root_fd
        try:
            return _scan_fd(root_fd, top, sub + b"/" if sub else b"", walk)
        finally:
            if top != root_fd:
                os.close(top)
    finally:
        os.close(root_fd)


_O_LIST_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_LIST_SUBDIR = _O_LIST_DIR | os.O_NOFOLLOW


def _scan_fd(root_fd: int, top_fd: int, base: bytes, walk: _Walk) -> Manifest:
    """The walk of :func:`scan` from the open directory ``top_fd`` (``base``: its path beneath ``root_fd``)."""
    checksum = walk.checksum
    man = Manifest(checksum=checksum)
    entries = man.entries
    errors = man.errors
    excluded = walk.excluded
    # Interning: equal small ints from different stat calls are different objects; sharing them saves ~28 bytes a
    # field per entry on big trees, where mode/uid/gid/dev take a handful of distinct values.
    intern: dict[int, int] = {}
    ix = intern.setdefault
    fs_enc = sys.getfilesystemencoding()  # os.fsencode's own steps, without its call per name
    # Explicit stack instead of recursion: deep trees must not hit the recursion limit. Each item is the rel
    # prefix (trailing slash, or empty for the top). A directory is opened when its turn comes, beneath the root
    # (fds are not held for the whole stack: a wide tree would run out of them).
    stack: list[bytes] = [b""]
    s_isdir, s_isreg, s_islnk = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK
    k_file, k_dir, k_link, k_other = Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.OTHER
    while stack:
        prefix = stack.pop()
        listing = _list_dir(root_fd, top_fd, base, prefix, errors)
        if listing is None:
            continue
        dfd, it = listing
        listed: list[tuple[bytes, Entry]] | None = [] if walk.on_dir is not None else None
        with it, _closing(dfd):
            while True:
                try:
                    de = next(it)
                except StopIteration:
                    break
                except OSError as e:  # getdents failing mid-directory (EIO, directory removed)
                    errors.append(ScanError(prefix[:-1], e.errno, f"error while listing directory: {e.strerror}"))
                    break
                name = de.name.encode(fs_enc, "surrogateescape")
                rel = prefix + name
                if excluded(name, base + rel if base else rel):
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError as e:
                    why = "vanished during scan" if e.errno == errno_mod.ENOENT else f"cannot stat: {e.strerror}"
                    errors.append(ScanError(rel, e.errno, why))
                    continue
                m = st.st_mode
                target: bytes | None = None
                digest: bytes | None = None
                if s_isreg(m):
                    kind = k_file
                    size = st.st_size
                    if checksum:
                        try:
                            digest = hash_file(name, dir_fd=dfd)
                        except OSError as e:
                            errors.append(ScanError(rel, e.errno, f"cannot hash: {e.strerror}"))
                elif s_isdir(m):
                    kind = k_dir
                    size = 0
                    if walk.recursive and not (walk.prune and base + rel in walk.prune):
                        stack.append(rel + b"/")
                elif s_islnk(m):
                    kind = k_link
                    size = st.st_size
                    try:
                        target = os.readlink(name, dir_fd=dfd)
                    except OSError as e:
                        errors.append(ScanError(rel, e.errno, f"cannot read symlink: {e.strerror}"))
                        continue
                else:
                    kind = k_other
                    size = 0
                entries[rel] = ent = Entry(
                    kind,
                    ix(m & 0o7777, m & 0o7777),
                    size,
                    st.st_mtime_ns,
                    ix(st.st_uid, st.st_uid),
                    ix(st.st_gid, st.st_gid),
                    st.st_nlink,
                    st.st_ino,
                    ix(st.st_dev, st.st_dev),
                    target,
                    digest,
                )
                if listed is not None:
                    listed.append((rel, ent))
        if listed and walk.on_dir is not None:
            walk.on_dir(listed)
    return man


def _list_dir(root_fd: int, top_fd: int, base: bytes, prefix: bytes,
              errors: list[ScanError]) -> tuple[int, os._ScandirIterator[str]] | None:
    """The fd and listing of the directory ``prefix`` (with its trailing slash; empty: the top) opened beneath the
    root, or None when it cannot be opened or listed (in ``errors``; the top itself failing raises)."""
    try:
        dfd = os.dup(top_fd) if not prefix else open_beneath(root_fd, base + prefix[:-1], _O_LIST_SUBDIR)
    except OSError as e:
        errors.append(ScanError(prefix[:-1], e.errno, f"cannot open directory: {e.strerror}"))
        return None
    try:
        it = os.scandir(dfd)  # names come back as str (surrogate-escaped); fsencode gives the bytes back
    except OSError as e:
        os.close(dfd)
        if prefix:  # an empty manifest for an unlistable top would look like an empty tree
            errors.append(ScanError(prefix[:-1], e.errno, f"cannot list directory: {e.strerror}"))
            return None
        raise
    return dfd, it


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# plan operations


class Delete(NamedTuple):
    """Remove ``path`` (of ``kind`` in the mirror). Listed children before parents."""

    path: bytes
    kind: Kind


class Mkdir(NamedTuple):
    """Create a directory. ``mode`` always has ``u+rwx`` so contents can be written; the real mode comes in the
    directory's :class:`SetAttr`, which runs after its contents."""

    path: bytes
    mode: int
    uid: int | None = None
    gid: int | None = None


class Put(NamedTuple):
    """Send a whole regular file (or a delta against ``basis`` when the mirror has a regular file there)."""

    path: bytes
    size: int
    mode: int
    mtime_ns: int
    uid: int | None = None
    gid: int | None = None
    basis: bool = False
    digest: bytes | None = None


class Symlink(NamedTuple):
    """Create (or replace) a symlink with this target."""

    path: bytes
    target: bytes
    mtime_ns: int
    uid: int | None = None
    gid: int | None = None


class Hardlink(NamedTuple):
    """Make ``path`` another name of ``existing`` (which is already in place when this op runs). With ``size`` and
    ``mtime_ns`` the mirror links only if ``existing`` has them (what the planner believes the mirror holds)."""

    path: bytes
    existing: bytes
    size: int | None = None
    mtime_ns: int | None = None


class SetAttr(NamedTuple):
    """Change metadata only; ``None`` fields stay as they are."""

    path: bytes
    mode: int | None = None
    mtime_ns: int | None = None
    uid: int | None = None
    gid: int | None = None


PlanOp = Delete | Mkdir | Put | Symlink | Hardlink | SetAttr


@dataclass(slots=True)
class Plan:
    """What to do to the mirror, by kind; :meth:`ops` gives the one order that is safe to apply.

    Order: deletes (children first; this also clears the way for type changes), mkdirs (parents first), puts,
    symlinks, hard links (their leader file is in place by then), file/symlink setattrs, and last the directory
    setattrs, deepest first: creating or removing a name inside a directory bumps its mtime, so directory times are
    only final once nothing more happens inside.
    """

    deletes: list[Delete] = field(default_factory=list)
    mkdirs: list[Mkdir] = field(default_factory=list)
    puts: list[Put] = field(default_factory=list)
    symlinks: list[Symlink] = field(default_factory=list)
    hardlinks: list[Hardlink] = field(default_factory=list)
    setattrs: list[SetAttr] = field(default_factory=list)
    dir_setattrs: list[SetAttr] = field(default_factory=list)
    skipped: list[tuple[bytes, str]] = field(default_factory=list)  # (path, why): special files, protected deletes

    def ops(self) -> Iterator[PlanOp]:
        yield from self.deletes
        yield from self.mkdirs
        yield from self.puts
        yield from self.symlinks
        yield from self.hardlinks
        yield from self.setattrs
        yield from self.dir_setattrs

    def clearing_deletes(self) -> tuple[list[Delete], list[Delete]]:
        """``deletes`` split into those at or under a path this plan creates (the mirror has an object of another
        type there: they must go before the creates, or they remove the new object) and the rest, which a sender may
        keep for the end so that the mirror serves the old data until the new is in place. Each list keeps its order
        (children first)."""
        made = {op.path for ops in (self.mkdirs, self.puts, self.symlinks, self.hardlinks) for op in ops}
        if not made:
            return [], list(self.deletes)
        first: list[Delete] = []
        last: list[Delete] = []
        for d in self.deletes:
            p = d.path
            while p and p not in made:
                p = parent(p)
            (first if p else last).append(d)
        return first, last

    def __len__(self) -> int:
        return (
            len(self.deletes)
            + len(self.mkdirs)
            + len(self.puts)
            + len(self.symlinks)
            + len(self.hardlinks)
            + len(self.setattrs)
            + len(self.dir_setattrs)
        )

    @property
    def empty(self) -> bool:
        return len(self) == 0


# ---------------------------------------------------------------------------------------------------------------
# diff


def _under_any(path: bytes, tops: set[bytes]) -> bool:
    """True when ``path`` or one of its ancestors is in ``tops``."""
    p = path
    while p:
        if p in tops:
            return True
        p = parent(p)
    return False


def same_content(s: Entry, d: Entry, checksum: bool) -> bool:
    """Whether the mirror's file ``d`` holds the source file ``s``'s data: same size and mtime (the quick check), or
    with ``checksum`` the same strong hash."""
    if s.size != d.size:
        return False
    if checksum:
        return s.digest is not None and s.digest == d.digest
    return s.mtime_ns == d.mtime_ns


def diff(src: Manifest, dst: Manifest, *, delete: bool, checksum: bool, owner: bool = False) -> Plan:
    """The :class:`Plan` that turns the tree ``dst`` describes into the one ``src`` describes.

    Quick check as rsync's: a file is sent when the size or the mtime differs; with ``checksum`` when the size or
    the content hash differs (mtime is then fixed by a setattr). A file whose content is equal but whose mode or
    mtime differs gets a :class:`SetAttr`. ``owner`` also compares uid/gid. Type changes are a delete then a create,
    whatever ``delete`` says; ``delete`` controls only extraneous mirror paths. Mirror paths under a source path that
    could not be read (``src.errors`` other than "vanished") are never deleted, as rsync skips deletion on I/O
    errors: an unreadable directory must not wipe its mirror.
    """
    return _without_gc(lambda: _diff(src, dst, delete, checksum, owner))


def _diff(src: Manifest, dst: Manifest, delete: bool, checksum: bool, owner: bool) -> Plan:
    plan = Plan()
    s_entries = src.entries
    d_entries = dst.entries
    dst_get = d_entries.get
    touched: set[bytes] = set()  # directories whose listing the plan changes (their mtime must be restored)
    replaced: set[bytes] = set()  # dst paths whose type changes: deleted, then created again
    put_paths: set[bytes] = set()
    links: dict[tuple[int, int], list[bytes]] = {}  # src hard-link groups by (dev, ino)
    identities = dst.identities
    k_file, k_dir, k_link = Kind.FILE, Kind.DIR, Kind.SYMLINK

    def own(e: Entry) -> tuple[int | None, int | None]:
        return (e.uid, e.gid) if owner else (None, None)

    def attr_change(path: bytes, s: Entry, d: Entry, with_mode: bool = True) -> SetAttr | None:
        mode = s.mode if with_mode and s.mode != d.mode else None
        mtime = s.mtime_ns if s.mtime_ns != d.mtime_ns else None
        uid = s.uid if owner and s.uid != d.uid else None
        gid = s.gid if owner and s.gid != d.gid else None
        if mode is None and mtime is None and uid is None and gid is None:
            return None
        return SetAttr(path, mode, mtime, uid, gid)

    def put(path: bytes, s: Entry, d: Entry | None) -> None:
        uid, gid = own(s)
        basis = d is not None and d.kind == k_file and path not in replaced
        plan.puts.append(Put(path, s.size, s.mode, s.mtime_ns, uid, gid, basis, s.digest))
        put_paths.add(path)
        touched.add(parent(path))

    for path, s in s_entries.items():
        d = dst_get(path)
        if d is not None and d.kind != s.kind:
            replaced.add(path)
            d = None
        kind = s.kind
        if kind == k_file:
            if s.nlink > 1 or (d is not None and d.nlink > 1 and identities):
                # a source link group, or a lone file the mirror holds as one name of several: see _plan_links
                links.setdefault((s.dev, s.ino), []).append(path)
                continue
            if d is None or not same_content(s, d, checksum):
                put(path, s, d)
            else:
                sa = attr_change(path, s, d)
                if sa is not None:
                    plan.setattrs.append(sa)
        elif kind == k_dir:
            if d is None:
                uid, gid = own(s)
                plan.mkdirs.append(Mkdir(path, s.mode | 0o700, uid, gid))
                touched.add(parent(path))
                # the final mode/mtime come once the contents are in place
                plan.dir_setattrs.append(SetAttr(path, s.mode, s.mtime_ns, uid, gid))
            else:
                sa = attr_change(path, s, d)
                if sa is not None:
                    plan.dir_setattrs.append(sa)
        elif kind == k_link:
            assert s.target is not None
            if d is None or d.target != s.target:
                uid, gid = own(s)
                plan.symlinks.append(Symlink(path, s.target, s.mtime_ns, uid, gid))
                touched.add(parent(path))
            else:
                sa = attr_change(path, s, d, with_mode=False)  # a symlink's mode is always 0777 on Linux
                if sa is not None:
                    plan.setattrs.append(sa)
        else:
            plan.skipped.append((path, "special file (fifo, socket or device) is not replicated"))

    protected = {e.path for e in src.errors if e.errno != errno_mod.ENOENT}
    if links:
        _plan_links(plan, links, src, dst, replaced, protected, delete, checksum, owner, put, attr_change, touched)

    _plan_deletes(plan, s_entries, d_entries, replaced, protected, delete, touched)
    plan.mkdirs.sort()  # a parent is a prefix of its children, so byte order puts parents first
    _restore_dir_times(plan, s_entries, touched)
    return plan


def _plan_deletes(plan: Plan, s_entries: dict[bytes, Entry], d_entries: dict[bytes, Entry], replaced: set[bytes],
                  protected: set[bytes], delete: bool, touched: set[bytes]) -> None:
    """Deletes: extraneous mirror paths (``delete``), and everything under/at a replaced path whatever ``delete``;
    never under a source path that had a read error (``protected``)."""
    dels: list[bytes] = []
    for path in d_entries:
        if path in s_entries and path not in replaced:
            continue
        if path not in replaced and not delete and not (replaced and _under_any(parent(path), replaced)):
            continue
        if protected and _under_any(path, protected):
            plan.skipped.append((path, "not deleted: the source had a read error at or above this path"))
            continue
        dels.append(path)
    # Reverse byte order puts every descendant before its ancestor (an ancestor is a prefix, so it sorts first).
    dels.sort(reverse=True)
    for path in dels:
        plan.deletes.append(Delete(path, d_entries[path].kind))
        touched.add(parent(path))


def _restore_dir_times(plan: Plan, s_entries: dict[bytes, Entry], touched: set[bytes]) -> None:
    """A directory whose listing changed (``touched``) needs its mtime (and nothing else) restored, even when it
    matched before the plan ran."""
    have = {sa.path: i for i, sa in enumerate(plan.dir_setattrs)}
    for t in touched:
        if not t:
            continue
        st = s_entries.get(t)
        if st is None or st.kind != Kind.DIR:
            continue
        i = have.get(t)
        if i is None:
            plan.dir_setattrs.append(SetAttr(t, None, st.mtime_ns, None, None))
        elif plan.dir_setattrs[i].mtime_ns is None:  # a mode-only change: the mtime needs restoring too
            plan.dir_setattrs[i] = plan.dir_setattrs[i]._replace(mtime_ns=st.mtime_ns)
    plan.dir_setattrs.sort(key=lambda sa: sa.path, reverse=True)  # deepest first (cosmetic: utime is per inode)


def _mirror_inode_owners(groups: dict[tuple[int, int], list[bytes]], src: Manifest, dst: Manifest,
                         replaced: set[bytes], protected: set[bytes], delete: bool,
                         ) -> tuple[dict[tuple[int, int], tuple[int, int]], set[tuple[int, int]]]:
    """For each mirror inode with several names (by (dev, ino)), the source group that keeps it: the one with the
    most names on it; and which of those inodes can be kept. Nothing without identities."""
    s_entries, d_entries = src.entries, dst.entries
    owner_of: dict[tuple[int, int], tuple[int, int]] = {}  # mirror inode (nlink > 1) -> the source group keeping it
    keepable: set[tuple[int, int]] = set()
    if not dst.identities:
        return owner_of, keepable
    group_of = {p: key for key, names in groups.items() for p in names}
    m_names: dict[tuple[int, int], list[bytes]] = {}
    for p, d in d_entries.items():
        if d.kind == Kind.FILE and d.nlink > 1:
            m_names.setdefault((d.dev, d.ino), []).append(p)
    for ino, names in m_names.items():
        counts: dict[tuple[int, int], int] = {}
        for p in names:
            g = group_of.get(p)
            if g is not None and p not in replaced:
                counts[g] = counts.get(g, 0) + 1
        if not counts:
            continue
        g = min(counts, key=lambda k: (-counts[k], min(groups[k])))
        owner_of[ino] = g
        # Keepable: every name of the inode is the owner's, or is rewritten (a name of another group or a
        # lone source file: sent or linked elsewhere; a type change: deleted), or is deleted as extraneous; and
        # it has no more names outside the manifest than the source's inode has outside the scan (a subtree
        # rescan sees only part of a group; a name elsewhere that the source lacks must not share new attrs).
        hidden = d_entries[names[0]].nlink - len(names)
        s0 = s_entries[groups[g][0]]
        if hidden > s0.nlink - len(groups[g]):
            continue
        if all(p in s_entries or (delete and not (protected and _under_any(p, protected))) for p in names):
            keepable.add(ino)
    return owner_of, keepable


def _plan_links(
    plan: Plan,
    groups: dict[tuple[int, int], list[bytes]],
    src: Manifest,
    dst: Manifest,
    replaced: set[bytes],
    protected: set[bytes],
    delete: bool,
    checksum: bool,
    owner: bool,
    put: Callable[[bytes, Entry, Entry | None], None],
    attr_change: Callable[[bytes, Entry, Entry], SetAttr | None],
    touched: set[bytes],
) -> None:
    """Plan the files that are (or should be) hard links: source groups by ``(dev, ino)``, and, when the mirror's
    manifest has inode identities, every lone source file the mirror holds as one name of several.

    Each source group ends as one inode on the mirror holding exactly the group's names. Where the mirror already has
    an inode with the group's content that it can keep (see ``keepable``), the group's other names are linked to it
    and no data is sent; otherwise one name (the leader) is sent and the others are linked to it. A mirror inode
    whose names belong to several source groups is kept by the group with the most names on it; the other names are
    linked or sent elsewhere, which breaks the mirror's link the source does not have.

    Without identities (an agent without the ``inodes`` capability) nothing tells two mirror names of one inode from
    two copies: every name but the leader gets a Hardlink (the agent does nothing for a name already on that inode),
    and links the source does not have cannot be seen, so they stay.
    """
    s_entries, d_entries = src.entries, dst.entries
    k_file = Kind.FILE

    def mirror_file(p: bytes) -> Entry | None:
        d = None if p in replaced else d_entries.get(p)
        return d if d is not None and d.kind == k_file else None

    MKey = tuple[int, int] | bytes  # a mirror inode: (dev, ino) when it has several names, else its one path
    owner_of, keepable = _mirror_inode_owners(groups, src, dst, replaced, protected, delete)
    for key, group in groups.items():
        group.sort()
        on: dict[MKey, list[bytes]] = {}  # candidate mirror inodes with the group's content -> the names on them
        for p in group:
            dp = mirror_file(p)
            if dp is None or not same_content(s_entries[p], dp, checksum):
                continue
            on.setdefault((dp.dev, dp.ino) if dst.identities and dp.nlink > 1 else p, []).append(p)
        keep: list[bytes] = []
        for m, names in sorted(on.items(), key=lambda kv: (-len(kv[1]), kv[1][0])):
            if isinstance(m, bytes) or (owner_of.get(m) == key and m in keepable):
                keep = names
                break
        if keep and not dst.identities:
            keep = keep[:1]  # two names with the same content may still be two inodes
        # sent, if it is, under a name the mirror has a file at if any (a delta needs a basis)
        ops = plan_group(group, keep, [p for p in group if mirror_file(p) is not None])
        leader = ops.leader
        if ops.put:
            put(leader, s_entries[leader], None if leader in replaced else d_entries.get(leader))
            expect = (s_entries[leader].size, s_entries[leader].mtime_ns)
        else:
            dl = mirror_file(leader)
            assert dl is not None
            sa = attr_change(leader, s_entries[leader], dl)
            if sa is not None:
                plan.setattrs.append(sa)
            # the links run before the leader's setattr: they expect the mirror's file as it is now
            expect = (dl.size, dl.mtime_ns)
        for p in ops.links:
            # the expected size and mtime let the mirror refuse a link to a name that is not what this plan
            # believes (the put of the leader failed, or the mirror changed since its manifest was made)
            plan.hardlinks.append(Hardlink(p, leader, *expect))
            touched.add(parent(p))

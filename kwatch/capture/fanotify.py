"""The fanotify backend: whole-filesystem marks with directory file handles and names, parsed without libraries.

Owns (the calls themselves are in :mod:`kwatch.libc`): the parser of the event stream (``struct fanotify_event_metadata`` followed by info records), the translation of directory file handles
back to paths, and :class:`FanotifySource`.

How it works. ``fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID ...)``
(Linux 5.17, commit 7326e382c21e "fanotify: report old and/or new parent+name in FAN_RENAME event") makes every
directory-entry event carry the parent directory's file handle and the entry name, plus the handle of the object
itself; ``FAN_MARK_FILESYSTEM`` (Linux 4.20) subscribes to every inode of the filesystem holding each watched root,
whichever mount (bind mounts included) the change came through. A directory handle is turned back into a path with
``open_by_handle_at(mount_fd, handle, O_PATH)`` and ``readlink("/proc/self/fd/N")``.

What fanotify delivers, and so what this backend reports (measured on Linux 6.18; see tests/kernel/test_capture_fanotify.py):

- Events for one object that are still queued are merged into one record whose mask holds several bits
  (``fanotify_should_merge`` in fs/notify/fanotify/fanotify.c: same pid, same parent handle, name and object
  handle). The order of the merged operations is lost; each bit becomes one :class:`FileEvent`, in the fixed order
  CREATE/MKDIR/SYMLINK, MODIFY, CLOSE_WRITE, ATTRIB, UNLINK/RMDIR. A create, write, chmod, close and unlink of one
  file by one process while the queue was not read can thus arrive as one record: five events in that order.
  Directory and non-directory events are never merged, nor is FAN_RENAME with anything.
- A rename is one FAN_RENAME record with the old and the new parent+name (``Op.RENAME``, ``path`` -> ``new_path``);
  RENAME_EXCHANGE gives two such records, one per direction. FAN_MOVED_FROM/FAN_MOVED_TO are not subscribed: they
  repeat what FAN_RENAME says, in two records without a cookie to pair them.
- A symlink is a CREATE whose object is a symlink: reported as ``Op.SYMLINK`` with ``target`` read from the object
  by its handle (so a later rename of the link does not matter; if the link is already gone it stays ``Op.CREATE``).
- A hard link is a CREATE of the new name: fanotify cannot tell it from a new file, so it is ``Op.CREATE`` (the
  object handle is the existing file's; ``extra["nlink"]`` is not guessed).
- Truncation is MODIFY; chmod/chown/setxattr/utimes are all ATTRIB (fanotify does not say which).
- The link-count ATTRIB that link/unlink/rename-over send to the object itself (``fsnotify_link_count``) carries no
  parent and no name; it is dropped (the dirent event says the same thing). FAN_DELETE_SELF/FAN_MOVE_SELF are not
  subscribed for the same reason: they would double the queue cost of every unlink.
- ``pid`` is the process (thread group) id from the record. ppid, uid, gid, comm, tid and the syscall's flags are not
  known to fanotify and stay ``None``/0; nothing is read from /proc after the fact (it would be racy).
- The paths are those of the directories *when the batch is processed*, rewound through the renames and rmdirs in
  that batch (see :class:`_PathWalk`); a directory renamed or removed after the batch was read and before it was
  resolved can still give a wrong or unknown path (counted as lost, with an ``Op.LOSS`` marker). A path is the one
  seen through the mount of the watched root whose filesystem it is on, whatever mount the change came through.
- io_uring operations are seen (unlike syscall tracepoints).
- The queue is bounded (``fs.fanotify.max_queued_events``, 16384 records by default). ``FAN_UNLIMITED_QUEUE`` is
  not used: the mark covers a whole filesystem, so any user who can write on it could grow kernel memory without
  bound and make the backlog (and our lag) as long as they like. An overflow (``FAN_Q_OVERFLOW``) is one
  ``Op.LOSS`` with ``lost=None`` (fanotify does not say how many), counted in ``SourceStats.overflows``: the same
  marker as a full BPF ring buffer, so a replication target rescans its tree. Raise the sysctl for bursty trees.

Needs CAP_SYS_ADMIN (FAN_MARK_FILESYSTEM) and CAP_DAC_READ_SEARCH (open_by_handle_at).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from kwatch import libc
from kwatch.capture.base import CaptureError, CaptureFilter, FdSource, SourceStats, check_watched_root
from kwatch.events import FT_DIR, FT_LNK, FT_UNKNOWN, FileEvent, Op, join
from kwatch.paths import is_under, rebase

# --- include/uapi/linux/fanotify.h -------------------------------------------------------------------------------
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10  # not used: see the module docstring
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100

FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12

FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100

INIT_FLAGS = (
    FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID | FAN_NONBLOCK | FAN_CLOEXEC
)
#: What is subscribed; see the module docstring for why MOVED_FROM/MOVED_TO/DELETE_SELF/MOVE_SELF are not.
MARK_MASK = FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_CLOSE_WRITE | FAN_MODIFY | FAN_ATTRIB | FAN_ONDIR

#: Merged bits are split in this order (the kernel does not keep the order in which they happened).
_SPLIT_ORDER = (FAN_CREATE, FAN_MODIFY, FAN_CLOSE_WRITE, FAN_ATTRIB, FAN_DELETE)

_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata: 24 bytes
_INFO_HDR = struct.Struct("=BBH")  # struct fanotify_event_info_header
_HANDLE_HDR = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type

#: The ops this backend can produce.
FANOTIFY_OPS = frozenset(
    {Op.CREATE, Op.MKDIR, Op.SYMLINK, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.MODIFY, Op.CLOSE_WRITE, Op.ATTRIB, Op.LOSS}
)
_FIELDS = frozenset({"pid", "ftype", "target", "lost"})

DEFAULT_BUFFER = 256 * 1024
#: One read() returns after this many raw records even if more are queued (the descriptor stays readable).
DEFAULT_MAX_BATCH = 200_000
_CACHE_MAX = 65_536
#: How many times a batch with unresolved directories is extended by what was queued meanwhile and walked again.
_REWALKS = 3
#: How many vanished directories deep a path is rebuilt from a batch's mkdir/rename/rmdir records.
_MAX_CHAIN = 200


def _fsid_of(path: bytes) -> bytes:
    """The 8-byte ``__kernel_fsid_t`` fanotify puts in its records for the filesystem holding ``path``."""
    if ctypes.sizeof(ctypes.c_long) != 8:
        raise CaptureError("fanotify backend: only LP64 Linux is supported (struct statfs layout)")
    try:
        buf = libc.statfs(path)
    except OSError as e:
        raise CaptureError(f"fanotify: statfs({path!r}) failed: {os.strerror(e.errno or 0)}") from e
    return struct.pack("=ii", buf.f_fsid[0], buf.f_fsid[1])


# --- the parsed stream ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class RawEvent:
    """One fanotify record. Handle keys are ``fsid + struct file_handle`` bytes, usable as dict keys."""

    mask: int
    pid: int
    dir_key: bytes | None = None  # DFID_NAME / DFID (also the directory itself, name b".", for events on a dir)
    name: bytes | None = None
    old_key: bytes | None = None  # FAN_RENAME: OLD_DFID_NAME
    old_name: bytes | None = None
    new_key: bytes | None = None  # FAN_RENAME: NEW_DFID_NAME
    new_name: bytes | None = None
    obj_key: bytes | None = None  # FID: the object itself (FAN_REPORT_TARGET_FID: also for dirent events)
    # filled in by the path walk
    path: bytes | None = None
    new_path: bytes | None = None


def parse(buf: bytes | memoryview, out: list[RawEvent]) -> int:
    """Append the records in ``buf`` to ``out``; return how many bytes were whole records.

    Validates every length against the buffer: a malformed record ends the parse rather than reading past it.
    """
    mv = memoryview(buf)
    n = len(mv)
    off = 0
    while off + _META.size <= n:
        event_len, vers, _res, meta_len, mask, fd, pid = _META.unpack_from(mv, off)
        if event_len < _META.size or off + event_len > n or meta_len < _META.size or meta_len > event_len:
            break
        if vers != FANOTIFY_METADATA_VERSION:
            raise CaptureError(f"fanotify: metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}")
        if fd >= 0:  # not with FID reporting, but never leak a descriptor the kernel gave us
            os.close(fd)
        ev = RawEvent(mask, pid)
        end = off + event_len
        o = off + meta_len
        while o + _INFO_HDR.size <= end:
            info_type, _pad, info_len = _INFO_HDR.unpack_from(mv, o)
            if info_len < _INFO_HDR.size or o + info_len > end:
                break
            if info_type in (
                FAN_EVENT_INFO_TYPE_FID,
                FAN_EVENT_INFO_TYPE_DFID_NAME,
                FAN_EVENT_INFO_TYPE_DFID,
                FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
                FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
            ) and info_len >= 4 + 8 + _HANDLE_HDR.size:
                handle_bytes, _htype = _HANDLE_HDR.unpack_from(mv, o + 12)
                key_end = o + 12 + _HANDLE_HDR.size + handle_bytes
                if key_end <= o + info_len:
                    key = bytes(mv[o + 4 : key_end])
                    name: bytes | None = None
                    if info_type in (
                        FAN_EVENT_INFO_TYPE_DFID_NAME,
                        FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
                        FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
                    ):
                        raw = bytes(mv[key_end : o + info_len])
                        nul = raw.find(b"\0")
                        name = raw if nul < 0 else raw[:nul]
                    if info_type == FAN_EVENT_INFO_TYPE_FID:
                        ev.obj_key = key
                    elif info_type == FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                        ev.old_key, ev.old_name = key, name
                    elif info_type == FAN_EVENT_INFO_TYPE_NEW_DFID_NAME:
                        ev.new_key, ev.new_name = key, name
                    else:
                        ev.dir_key, ev.name = key, name
            o += info_len
        out.append(ev)
        off += event_len
    return off


# --- handle -> path --------------------------------------------------------------------------------------------------
class _Resolver:
    """Turns handle keys into paths *now*, through an O_PATH descriptor of a mount of the handle's filesystem."""

    def __init__(self, mount_fds: dict[bytes, list[int]]) -> None:
        self.mount_fds = mount_fds
        self.cache: dict[bytes, bytes] = {}  # dir handle key -> path, valid as of the end of the last batch

    def open(self, key: bytes, flags: int = os.O_PATH) -> int | None:
        fds = self.mount_fds.get(key[:8])
        if not fds:
            return None
        try:
            return libc.open_by_handle_at(fds[0], key[8:], flags | os.O_CLOEXEC)
        except OSError:
            return None

    def now(self, key: bytes) -> bytes | None:
        """The current path of a directory handle (cached), or None when it no longer exists."""
        path = self.cache.get(key)
        if path is not None:
            return path
        fd = self.open(key)
        if fd is None:
            return None
        try:
            path = os.readlink(f"/proc/self/fd/{fd}".encode())
        except OSError:
            # ENAMETOOLONG: a directory deeper than PATH_MAX, which any user on the marked filesystem can make, has
            # no path to give; its records count as unresolved (a LOSS marker), never an error out of read()
            return None
        finally:
            os.close(fd)
        # An unlinked directory still open somewhere reads as "/x (deleted)"; it has no path any more.
        if not path.startswith(b"/") or path.endswith(b" (deleted)"):
            return None
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
        self.cache[key] = path
        return path

    def object_type(self, key: bytes) -> tuple[int, bytes | None]:
        """(S_IFMT bits, symlink target) of the object a handle names, (0, None) if it is gone."""
        fd = self.open(key, os.O_PATH | os.O_NOFOLLOW)
        if fd is None:
            return FT_UNKNOWN, None
        try:
            mode = stat.S_IFMT(os.fstat(fd).st_mode)
            target = os.readlink(b"", dir_fd=fd) if mode == FT_LNK else None
            return mode, target
        except OSError:
            return FT_UNKNOWN, None
        finally:
            os.close(fd)


def _unresolved(ev: RawEvent) -> bool:
    return not ev.mask & FAN_Q_OVERFLOW and (ev.path is None or bool(ev.mask & FAN_RENAME and ev.new_path is None))


def _is_dir_rename(ev: RawEvent) -> bool:
    return bool(ev.mask & FAN_RENAME and ev.mask & FAN_ONDIR)


def _is_rmdir(ev: RawEvent) -> bool:
    return bool(ev.mask & FAN_DELETE and ev.mask & FAN_ONDIR)


class _PathWalk:
    """Assigns paths to one batch of records by walking it backwards from the present.

    A handle resolved now gives the directory's path after every rename in the batch. Walking from the last record
    to the first, each directory rename undoes itself on every path already known (new prefix -> old prefix), and
    each rmdir records the removed directory's path (which resolution could no longer find). So every record gets
    the path its directory had when the record was queued, not when it was read.
    """

    def __init__(self, resolver: _Resolver, batch: Iterable[RawEvent]) -> None:
        self.r = resolver
        self.known: dict[bytes, bytes] = {}  # handle -> path at the walk's current position
        self.undo: list[tuple[bytes, bytes]] = []  # (old, new) dir renames after the current position, latest first
        # Records that name a directory (mkdir, rename, rmdir), by the directory's handle, for directories that no
        # longer exist when the batch is resolved. A merged record keeps the place of its first event: "mkdir q"
        # merged with "rmdir q" sits before the records inside q, so the walk meets those before it learns q's path.
        self.naming: dict[bytes, list[tuple[int, RawEvent]]] = {}
        for i, ev in enumerate(batch):
            if ev.mask & FAN_ONDIR and ev.mask & (FAN_CREATE | FAN_DELETE | FAN_RENAME) and ev.obj_key is not None:
                self.naming.setdefault(ev.obj_key, []).append((i, ev))
        self.pos = 0
        self._resolving: set[bytes] = set()

    def _named(self, key: bytes) -> bytes | None:
        """The path of a vanished directory at the walk's position, from the records of this batch that name it."""
        recs = self.naming.get(key)
        # Each level is two frames of recursion: give up (the records count as lost) on an absurdly deep chain.
        if not recs or key in self._resolving or len(self._resolving) > _MAX_CHAIN:
            return None
        later = [(i, ev) for i, ev in recs if i >= self.pos]
        earlier = [(i, ev) for i, ev in recs if i < self.pos]
        parent: bytes | None
        name: bytes | None
        self._resolving.add(key)
        try:
            if later:  # the name it had until then: rmdir's name, or a rename's old name
                ev = later[0][1]
                if ev.mask & FAN_RENAME:
                    parent, name = self.dir_path(ev.old_key), ev.old_name
                else:
                    parent, name = self.dir_path(ev.dir_key), ev.name
            else:  # the name it got then: mkdir's name, or a rename's new name
                ev = earlier[-1][1]
                if ev.mask & FAN_RENAME:
                    parent, name = self.dir_path(ev.new_key), ev.new_name
                else:
                    parent, name = self.dir_path(ev.dir_key), ev.name
        finally:
            self._resolving.discard(key)
        if parent is None or name is None:
            return None
        return join(parent, name)

    def dir_path(self, key: bytes | None) -> bytes | None:
        if key is None:
            return None
        path = self.known.get(key)
        if path is not None:
            return path
        path = self.r.now(key)
        if path is not None:
            for old, new in self.undo:
                if is_under(path, new):
                    path = rebase(path, new, old)
        else:
            path = self._named(key)
            if path is None:
                return None
        self.known[key] = path
        return path

    def step(self, ev: RawEvent, pos: int) -> None:
        """Fill ``ev.path``/``ev.new_path`` (``ev`` is ``batch[pos]``), then move the walk to just before ``ev``."""
        self.pos = pos
        if ev.mask & FAN_RENAME:
            old_dir, new_dir = self.dir_path(ev.old_key), self.dir_path(ev.new_key)
            if old_dir is not None and ev.old_name is not None:
                ev.path = join(old_dir, ev.old_name)
            if new_dir is not None and ev.new_name is not None:
                ev.new_path = join(new_dir, ev.new_name)
            if _is_dir_rename(ev) and ev.path is not None and ev.new_path is not None:
                old, new = ev.path, ev.new_path
                for k, p in self.known.items():
                    if is_under(p, new):
                        self.known[k] = rebase(p, new, old)
                if ev.obj_key is not None:
                    self.known[ev.obj_key] = old
                self.undo.append((old, new))
            return
        d = self.dir_path(ev.dir_key)
        if d is not None and ev.name is not None:
            ev.path = join(d, ev.name)
        if _is_rmdir(ev) and ev.path is not None and ev.obj_key is not None:
            self.known[ev.obj_key] = ev.path
        elif ev.mask & FAN_CREATE and ev.mask & FAN_ONDIR and not ev.mask & FAN_DELETE and ev.obj_key is not None:
            # Before its mkdir the directory did not exist (unless the same record also holds its rmdir).
            self.known.pop(ev.obj_key, None)


def _forget_moved(resolver: _Resolver, batch: Iterable[RawEvent]) -> None:
    """Keep the cross-batch cache true for "now": drop what this batch's dir renames and rmdirs made stale."""
    cache = resolver.cache
    if not cache:
        return
    for ev in batch:
        if _is_rmdir(ev):
            if ev.obj_key is not None:
                cache.pop(ev.obj_key, None)
        elif _is_dir_rename(ev):
            old = cache.get(ev.obj_key) if ev.obj_key is not None else None
            if old is None:
                cache.clear()  # which cached paths lay under it is unknown: start over
                return
            for k in [k for k, p in cache.items() if is_under(p, old)]:
                del cache[k]


def _rmdir_positions(batch: list[RawEvent]) -> dict[int, int]:
    """Where in the batch each merged rmdir really belongs: after the last record that refers to the directory.

    A directory can only be removed once empty, and after its removal nothing can refer to its handle, so every
    later record naming it (as parent, or the directory itself) happened before the rmdir. A record merging
    "mkdir q" and "rmdir q" sits at the mkdir's place; its RMDIR is moved behind those records (and, transitively,
    behind the deferred rmdirs of subdirectories). Files are not moved: another hard link may still be written.
    """
    last: dict[bytes, int] = {}
    at: dict[int, int] = {}
    for i in range(len(batch) - 1, -1, -1):
        ev = batch[i]
        end = i
        if _is_rmdir(ev) and ev.obj_key is not None:
            end = max(i, last.get(ev.obj_key, i))
            if end != i:
                at[i] = end
        for key in (ev.dir_key, ev.old_key, ev.new_key, ev.obj_key):
            if key is not None and last.get(key, -1) < end:
                last[key] = end
    return at


@dataclass
class _Counters:
    dropped_nameless: int = 0  # FID-only records (link-count ATTRIB)
    unresolved: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


class FanotifySource(FdSource):
    """Capture with fanotify; see the module docstring for what it reports and what it cannot know.

    ``filt``: the roots to watch (each one's whole filesystem is marked; the filter keeps what is under the roots),
    the ops and the pids to drop (kwatch's own pid is always dropped). No roots: the filesystem holding "/" only.
    The kernel's queue limit (``/proc/sys/fs/fanotify/max_queued_events``) applies; an overflow becomes an
    ``Op.LOSS`` marker.
    """

    name = "fanotify"
    fields = _FIELDS

    def __init__(
        self,
        filt: CaptureFilter | None = None,
        *,
        buffer_bytes: int = DEFAULT_BUFFER,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.filter = filt if filt is not None else CaptureFilter()
        self._exclude = self.filter.exclude_pids | {os.getpid()}
        self._bufsize = max(buffer_bytes, 4096)
        self._max_batch = max_batch
        self._stats = SourceStats()
        self._counters = _Counters()
        self._pending = b""
        self._fd = -1
        mount_fds: dict[bytes, list[int]] = {}
        self._resolver = _Resolver(mount_fds)
        try:
            fd = libc.fanotify_init(INIT_FLAGS, os.O_RDONLY | os.O_LARGEFILE)
        except OSError as e:
            err = e.errno or errno.EIO
            if err == errno.EPERM:
                raise CaptureError("fanotify needs CAP_SYS_ADMIN: run as root, or use the inotify backend") from e
            if err == errno.EINVAL:
                raise CaptureError(
                    "fanotify: this kernel rejects FAN_REPORT_DFID_NAME|FAN_REPORT_TARGET_FID (Linux >= 5.17 is "
                    "needed); use the bpf or inotify backend"
                ) from e
            if err == errno.ENOSYS:
                raise CaptureError("fanotify: kernel built without CONFIG_FANOTIFY; use the inotify backend") from e
            raise CaptureError(f"fanotify_init failed: {os.strerror(err)}") from e
        self._fd = fd
        try:
            roots = self.filter.roots or (b"/",)
            marked: set[bytes] = set()
            for root in roots:
                check_watched_root("fanotify", root)
                fsid = _fsid_of(root)
                if fsid not in marked:
                    try:
                        libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, MARK_MASK, AT_FDCWD, root)
                    except OSError as e:
                        err = e.errno or errno.EIO
                        if err == errno.EPERM:
                            # without FAN_UNLIMITED_QUEUE an unprivileged fanotify_init succeeds (Linux >= 5.13);
                            # the filesystem mark is what needs the capability
                            raise CaptureError("fanotify needs CAP_SYS_ADMIN: run as root, or use the inotify backend") from e
                        hint = {
                            errno.ENODEV: "the filesystem has no file handles (fanotify FID mode needs them)",
                            errno.EXDEV: "the filesystem has no unique fsid (e.g. a subvolume or overlay)",
                            errno.EOPNOTSUPP: "the filesystem does not support file handles",
                            errno.EINVAL: "the kernel rejects the event mask (FAN_RENAME needs Linux >= 5.17)",
                        }.get(err, os.strerror(err))
                        raise CaptureError(f"fanotify_mark(FAN_MARK_FILESYSTEM, {root!r}) failed: {hint}") from e
                    marked.add(fsid)
                mount_fds.setdefault(fsid, []).append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise

    # --- Source interface -----------------------------------------------------------------------------------------
    def stats(self) -> SourceStats:
        self._stats.by_op = dict(self._counters.by_op)
        return self._stats

    @property
    def dropped_nameless(self) -> int:
        """FID-only records dropped (the link-count ATTRIB a link/unlink sends to the object itself)."""
        return self._counters.dropped_nameless

    def close(self) -> None:
        for fds in self._resolver.mount_fds.values():
            for mfd in fds:
                os.close(mfd)
        self._resolver.mount_fds.clear()
        super().close()

    def read(self, timeout: float | None = None) -> list[FileEvent]:
        if not self._poll(timeout):
            return []
        return self._process(self._drain())

    # --- internals ------------------------------------------------------------------------------------------------
    def _drain(self) -> list[RawEvent]:
        batch: list[RawEvent] = []
        while len(batch) < self._max_batch:
            try:
                chunk = os.read(self._fd, self._bufsize)
            except BlockingIOError:
                break
            if not chunk:
                break
            # The kernel only hands out whole records; a remainder would mean a malformed one (dropped by parse).
            parse(chunk, batch)
        return batch

    def _process(self, batch: list[RawEvent]) -> list[FileEvent]:
        _forget_moved(self._resolver, batch)
        wanted = self._walk(batch)
        # A directory that vanished between our read and its resolution (rm -rf racing with us) was removed by a
        # record that is queued by now: read on and walk again, so its rmdir names it instead of counting a loss.
        for _ in range(_REWALKS):
            if not any(want and _unresolved(ev) for ev, want in zip(batch, wanted, strict=True)):
                break
            more = self._drain()
            if not more:
                break
            _forget_moved(self._resolver, more)
            batch.extend(more)
            wanted = self._walk(batch)
        rmdir_at = _rmdir_positions(batch)
        deferred: dict[int, list[tuple[int, FileEvent]]] = {}
        out: list[FileEvent] = []
        unresolved = 0
        for i, (ev, want) in enumerate(zip(batch, wanted, strict=True)):
            if ev.dir_key is None and not ev.mask & (FAN_RENAME | FAN_Q_OVERFLOW):
                self._counters.dropped_nameless += 1
            if want:
                if ev.mask & FAN_Q_OVERFLOW:
                    self._emit_loss(out, None, "fanotify queue overflow")
                elif _unresolved(ev):
                    unresolved += 1
                else:
                    for fe in self._split(ev):
                        end = rmdir_at.get(i, i) if fe.op is Op.RMDIR else i
                        if end == i:
                            self._deliver(out, fe)
                        else:
                            deferred.setdefault(end, []).append((i, fe))
            for _, fe in sorted(deferred.pop(i, ()), key=lambda t: -t[0]):
                self._deliver(out, fe)
        if unresolved:
            self._counters.unresolved += unresolved
            self._stats.lost += unresolved
            self._emit_loss(out, unresolved, "directory gone before its handle was resolved")
        return out

    def _walk(self, batch: list[RawEvent]) -> list[bool]:
        """Give every record its paths (see _PathWalk); True for the records to report."""
        walk = _PathWalk(self._resolver, batch)
        wanted = [False] * len(batch)
        for i in range(len(batch) - 1, -1, -1):
            ev = batch[i]
            ev.path = ev.new_path = None
            structural = _is_dir_rename(ev) or _is_rmdir(ev) or bool(ev.mask & FAN_CREATE and ev.mask & FAN_ONDIR)
            if ev.mask & FAN_Q_OVERFLOW:
                wanted[i] = True
                continue
            keep = ev.pid not in self._exclude
            if not keep and not structural:
                continue
            if ev.dir_key is None and not ev.mask & FAN_RENAME:
                continue  # the nameless link-count ATTRIB: counted when reporting
            walk.step(ev, i)
            wanted[i] = keep
        return wanted

    def _emit_loss(self, out: list[FileEvent], lost: int | None, reason: str) -> None:
        self._stats.overflows += 1
        self._deliver(out, FileEvent(Op.LOSS, b"/", lost=lost, backend=self.name, extra={"reason": reason}))

    def _deliver(self, out: list[FileEvent], fe: FileEvent) -> None:
        if not self.filter.accepts(fe):
            self._stats.filtered += 1
            return
        self._stats.events += 1
        by_op = self._counters.by_op
        by_op[fe.op.label] = by_op.get(fe.op.label, 0) + 1
        out.append(fe)

    def _split(self, ev: RawEvent) -> list[FileEvent]:
        """One FileEvent per bit of a (maybe merged) record, in ``_SPLIT_ORDER``."""
        assert ev.path is not None
        is_dir = bool(ev.mask & FAN_ONDIR)
        ftype = FT_DIR if is_dir else FT_UNKNOWN
        if ev.mask & FAN_RENAME:
            return [FileEvent(Op.RENAME, ev.path, new_path=ev.new_path, pid=ev.pid, ftype=ftype, backend=self.name)]
        if not self._maybe_wanted(ev.path):
            self._stats.filtered += 1
            return []
        target: bytes | None = None
        if ev.mask & FAN_CREATE and not is_dir and ev.obj_key is not None:
            ftype, target = self._resolver.object_type(ev.obj_key)
        out = []
        for bit in _SPLIT_ORDER:
            if not ev.mask & bit:
                continue
            op: Op
            if bit == FAN_CREATE:
                op = Op.MKDIR if is_dir else (Op.SYMLINK if ftype == FT_LNK else Op.CREATE)
            elif bit == FAN_DELETE:
                op = Op.RMDIR if is_dir else Op.UNLINK
            elif bit == FAN_MODIFY:
                op = Op.MODIFY
            elif bit == FAN_CLOSE_WRITE:
                op = Op.CLOSE_WRITE
            else:
                op = Op.ATTRIB
            tgt = target if op is Op.SYMLINK else None
            out.append(FileEvent(op, ev.path, target=tgt, pid=ev.pid, ftype=ftype, backend=self.name))
        return out

    def _maybe_wanted(self, path: bytes) -> bool:
        # Cheap pre-check so events outside the roots cost no handle lookups; accepts() stays the exact check.
        roots = self.filter.roots
        return not roots or any(is_under(path, r) for r in roots)

"""The inotify backend: the unprivileged fallback, one watch per directory under the given roots.

Owns (the calls themselves are in :mod:`kwatch.libc`): the parser of ``struct inotify_event`` records, the watch table (wd <-> directory path, kept true across directory renames), rename
pairing by cookie, the scan that closes the new-directory race, and :class:`InotifySource`.

What it reports, and what it cannot know:

- inotify names no process: ``pid``, ``ppid``, ``uid``, ``gid``, ``comm`` are ``None``.
- Roots are required and must be directories; "/" is refused (one watch per directory of a whole system exhausts
  ``fs.inotify.max_user_watches`` and takes minutes to set up): use the fanotify or BPF backend for that.
- A new directory is watched when its IN_CREATE is read, so whatever was created inside it before that moment has
  no event. The directory is therefore scanned right after its watch is added, and every entry found is reported
  (``Op.CREATE``/``Op.MKDIR``/``Op.SYMLINK`` with ``extra["scan"] = True``), subdirectories watched and scanned in
  turn. An entry the scan found whose IN_CREATE then arrives anyway (it was created after the watch) is reported
  once, by the scan. A file found by the scan gets no MODIFY/CLOSE_WRITE for writes that happened before its
  directory was watched; the scan's CREATE stands for them. A directory moved in from outside the roots is treated
  the same way (MKDIR, then its contents).
- Renames: IN_MOVED_FROM and IN_MOVED_TO with one cookie become one ``Op.RENAME`` at the MOVED_FROM's place in the
  stream. A MOVED_FROM with no MOVED_TO within ``move_window`` seconds (moved out of the roots) becomes UNLINK/RMDIR
  (and the watches below a directory moved out are removed); a MOVED_TO alone (moved in) becomes CREATE/MKDIR.
- Symlinks are IN_CREATE; ``lstat`` of the new name tells a symlink (``Op.SYMLINK``, ``target`` by ``readlink``).
  This is by path, after the fact: if the name was already removed or replaced, the event stays ``Op.CREATE``.
  Hard links are ``Op.CREATE`` (inotify cannot tell them apart from a new file).
- Truncation is MODIFY; chmod/chown/setxattr/utimes are all ATTRIB. Events on the watched root itself (ATTRIB,
  removal) are reported; a moved root gives ``Op.LOSS`` (its new name is unknown).
- Queue overflow (IN_Q_OVERFLOW, ``fs.inotify.max_queued_events``): one ``Op.LOSS`` with ``lost=None``; afterwards
  the roots are walked again so directories created meanwhile get their watch (not reported: the consumer rescans
  after a loss). A directory that could not be watched (ENOSPC, EACCES) is an ``Op.LOSS`` with the reason in
  ``extra``.
- Events are those of the watched paths: a change through another mount of the same files (a bind mount elsewhere)
  is seen, and reported under the watched path. Writes to a file after its last name was removed are not reported
  (IN_EXCL_UNLINK).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import time
from dataclasses import dataclass

from kwatch import libc
from kwatch.capture.base import CaptureError, CaptureFilter, FdSource, SourceStats, check_watched_root
from kwatch.events import FT_DIR, FT_LNK, FT_UNKNOWN, FileEvent, Op, join
from kwatch.paths import is_under, rebase

# --- include/uapi/linux/inotify.h ----------------------------------------------------------------------------------
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CLOSE_WRITE
    | IN_MODIFY
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)

_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of NUL-padded name

INOTIFY_OPS = frozenset(
    {Op.CREATE, Op.MKDIR, Op.SYMLINK, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.MODIFY, Op.CLOSE_WRITE, Op.ATTRIB, Op.LOSS}
)
_FIELDS = frozenset({"ftype", "target", "lost"})

DEFAULT_BUFFER = 256 * 1024
DEFAULT_MOVE_WINDOW = 0.05
DEFAULT_MAX_BATCH = 200_000


def parse(buf: bytes | memoryview) -> list[tuple[int, int, int, bytes]]:
    """The records in ``buf`` as (wd, mask, cookie, name); the kernel only hands out whole records."""
    mv = memoryview(buf)
    out: list[tuple[int, int, int, bytes]] = []
    off = 0
    n = len(mv)
    while off + _EVENT.size <= n:
        wd, mask, cookie, ln = _EVENT.unpack_from(mv, off)
        start = off + _EVENT.size
        if start + ln > n:
            break
        name = bytes(mv[start : start + ln])
        nul = name.find(b"\0")
        out.append((wd, mask, cookie, name if nul < 0 else name[:nul]))
        off = start + ln
    return out


@dataclass
class _PendingMove:
    slot: int  # index in the output being built
    deadline: float
    path: bytes
    is_dir: bool


class InotifySource(FdSource):
    """Capture with inotify under ``filt.roots`` (required); see the module docstring for what it reports.

    ``move_window``: how long a MOVED_FROM waits for its MOVED_TO before it counts as moved out of the roots.
    """

    name = "inotify"
    fields = _FIELDS

    def __init__(
        self,
        filt: CaptureFilter,
        *,
        move_window: float = DEFAULT_MOVE_WINDOW,
        buffer_bytes: int = DEFAULT_BUFFER,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.filter = filt
        if not filt.roots:
            raise CaptureError("inotify needs the directories to watch (roots); for the whole system use fanotify/bpf")
        if b"/" in filt.roots:
            raise CaptureError(
                "inotify cannot watch '/': one watch per directory of the whole system is too many; "
                "use the fanotify or bpf backend (as root)"
            )
        for root in filt.roots:
            check_watched_root("inotify", root)
        self._move_window = move_window
        self._bufsize = max(buffer_bytes, 4096)
        self._max_batch = max_batch
        self._stats = SourceStats()
        self._wd_path: dict[int, bytes] = {}
        self._path_wd: dict[bytes, int] = {}
        self._root_wds: set[int] = set()
        self._pending: dict[int, _PendingMove] = {}
        # Names the scan of a new directory reported, per wd: their own IN_CREATE (if queued) is not reported again.
        # Two generations; one that lived through a whole drain of the queue can no longer match and is dropped.
        self._seen_cur: dict[int, set[bytes]] = {}
        #: new directories that could not be watched because their path was gone (ENOENT/ENOTDIR) when their IN_CREATE
        #: was read: deleted, or moved with an ancestor. The event that says which is queued already: a directory
        #: rename below (``_moved_dir``) watches them under their new name; a read that empties the queue forgets the rest.
        self._gone_new_dirs: set[bytes] = set()
        self._seen_prev: dict[int, set[bytes]] = {}
        #: Directories that could not be watched at start (path, errno); their subtrees are blind.
        self.unwatched: list[tuple[bytes, int]] = []
        try:
            self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except OSError as e:
            hint = " (fs.inotify.max_user_instances reached)" if e.errno == errno.EMFILE else ""
            raise CaptureError(f"inotify_init1 failed: {os.strerror(e.errno or 0)}{hint}") from e
        try:
            for root in filt.roots:
                err = self._add_watch(root)
                if err:
                    raise CaptureError(f"inotify: cannot watch root {root!r}: {_watch_error(err)}")
                self._root_wds.add(self._path_wd[root])
                self._watch_tree(root, None)
        except BaseException:
            self.close()
            raise

    # --- Source interface -----------------------------------------------------------------------------------------
    def stats(self) -> SourceStats:
        return self._stats

    @property
    def watches(self) -> int:
        return len(self._wd_path)

    def read(self, timeout: float | None = None) -> list[FileEvent]:
        if not self._poll(timeout):
            return []
        out: list[FileEvent | None] = []
        drained = self._drain(out)
        # A rename's MOVED_TO is queued right after its MOVED_FROM (fsnotify_move), but maybe after this read's last
        # byte: wait for it up to the window. Once the queue stays empty that long, what is unpaired moved out.
        rounds = 0
        while self._pending:
            wait = min(p.deadline for p in self._pending.values()) - time.monotonic()
            if wait > 0 and rounds < 100 and self._poll(wait):
                drained = self._drain(out) and drained
                rounds += 1
                continue
            for p in self._pending.values():
                self._moved_out(p, out)
            self._pending.clear()
        if drained:
            self._seen_prev, self._seen_cur = self._seen_cur, {}
            self._gone_new_dirs.clear()
        result: list[FileEvent] = []
        for fe in out:
            if fe is None:
                continue
            if self.filter.accepts(fe):
                self._stats.events += 1
                self._stats.by_op[fe.op.label] = self._stats.by_op.get(fe.op.label, 0) + 1
                result.append(fe)
            else:
                self._stats.filtered += 1
        return result

    # --- reading --------------------------------------------------------------------------------------------------
    def _drain(self, out: list[FileEvent | None]) -> bool:
        """Read and handle every queued record; True when the queue was found empty (not cut by max_batch)."""
        count = 0
        while count < self._max_batch:
            try:
                chunk = os.read(self._fd, self._bufsize)
            except BlockingIOError:
                return True
            if not chunk:
                return True
            for wd, mask, cookie, name in parse(chunk):
                count += 1
                self._handle(wd, mask, cookie, name, out)
        return False

    def _event(
        self,
        op: Op,
        path: bytes,
        *,
        new_path: bytes | None = None,
        target: bytes | None = None,
        ftype: int = FT_UNKNOWN,
        extra: dict[str, object] | None = None,
    ) -> FileEvent:
        return FileEvent(op, path, new_path=new_path, target=target, ftype=ftype, backend=self.name, extra=extra or {})

    def _handle(self, wd: int, mask: int, cookie: int, name: bytes, out: list[FileEvent | None]) -> None:
        if mask & IN_Q_OVERFLOW:
            self._stats.overflows += 1
            out.append(self._event(Op.LOSS, b"/", extra={"reason": "inotify queue overflow"}))
            self._rewatch_roots(out)
            return
        if mask & IN_IGNORED:
            self._forget_wd(wd)
            return
        base = self._wd_path.get(wd)
        if base is None:
            return  # a watch we already dropped (moved out, removed); its last records are stale
        if self._pending and any(p.is_dir and is_under(base, p.path) for p in self._pending.values()):
            # A directory's MOVED_TO follows its MOVED_FROM at once; anything in between from the watches below it
            # happened after it left the watched tree (moved out): not ours to report.
            return
        if not name:
            self._self_event(wd, mask, base, out)
            return
        path = join(base, name)
        is_dir = bool(mask & IN_ISDIR)
        ftype = FT_DIR if is_dir else FT_UNKNOWN
        if mask & IN_CREATE:
            if self._take_seen(wd, name):
                return
            self._appeared(path, is_dir, out, scan=False)
        elif mask & IN_DELETE:
            self._drop_seen(wd, name)
            out.append(self._event(Op.RMDIR if is_dir else Op.UNLINK, path, ftype=ftype))
            if is_dir:
                self._path_wd.pop(path, None)
        elif mask & IN_MOVED_FROM:
            self._drop_seen(wd, name)
            self._pending[cookie] = _PendingMove(len(out), time.monotonic() + self._move_window, path, is_dir)
            out.append(None)
        elif mask & IN_MOVED_TO:
            if self._take_seen(wd, name):
                return
            p = self._pending.pop(cookie, None)
            if p is None:
                self._appeared(path, is_dir, out, scan=False)
                return
            out[p.slot] = self._event(Op.RENAME, p.path, new_path=path, ftype=ftype)
            if is_dir:
                self._moved_dir(p.path, path, out)
        elif mask & IN_MODIFY:
            out.append(self._event(Op.MODIFY, path, ftype=ftype))
        elif mask & IN_CLOSE_WRITE:
            out.append(self._event(Op.CLOSE_WRITE, path, ftype=ftype))
        elif mask & IN_ATTRIB:
            out.append(self._event(Op.ATTRIB, path, ftype=ftype))

    def _self_event(self, wd: int, mask: int, base: bytes, out: list[FileEvent | None]) -> None:
        # A watched directory's own events repeat what its parent's watch reports with a name; only a root has no
        # watched parent.
        if wd not in self._root_wds:
            return
        if mask & IN_DELETE_SELF:
            out.append(self._event(Op.RMDIR, base, ftype=FT_DIR))
        elif mask & IN_MOVE_SELF:
            self._stats.overflows += 1
            out.append(self._event(Op.LOSS, base, extra={"reason": "watched root moved away"}))
        elif mask & (IN_ATTRIB | IN_MODIFY):
            out.append(self._event(Op.ATTRIB, base, ftype=FT_DIR))

    def _moved_out(self, p: _PendingMove, out: list[FileEvent | None]) -> None:
        out[p.slot] = self._event(Op.RMDIR if p.is_dir else Op.UNLINK, p.path, ftype=FT_DIR if p.is_dir else 0)
        if p.is_dir:
            for wd in [wd for wd, path in self._wd_path.items() if is_under(path, p.path)]:
                with contextlib.suppress(OSError):  # gone with its directory already
                    libc.inotify_rm_watch(self._fd, wd)
                self._forget_wd(wd)

    # --- watches --------------------------------------------------------------------------------------------------
    def _add_watch(self, path: bytes) -> int:
        """Watch one directory; 0 or the errno."""
        try:
            wd = libc.inotify_add_watch(self._fd, path, WATCH_MASK)
        except OSError as e:
            return e.errno or errno.EIO
        old = self._wd_path.get(wd)
        if old is not None and old != path:
            # The same directory reached by two paths (a bind mount inside the tree): keep the first name.
            return 0
        self._wd_path[wd] = path
        self._path_wd[path] = wd
        return 0

    def _forget_wd(self, wd: int) -> None:
        path = self._wd_path.pop(wd, None)
        if path is not None and self._path_wd.get(path) == wd:
            del self._path_wd[path]
        self._seen_cur.pop(wd, None)
        self._seen_prev.pop(wd, None)
        self._root_wds.discard(wd)

    def _rebase(self, old: bytes, new: bytes) -> None:
        for wd, path in list(self._wd_path.items()):
            if is_under(path, old):
                moved = rebase(path, old, new)
                self._wd_path[wd] = moved
                if self._path_wd.get(path) == wd:
                    del self._path_wd[path]
                self._path_wd[moved] = wd

    def _moved_dir(self, old: bytes, new: bytes, out: list[FileEvent | None]) -> None:
        """A watched directory was renamed: its watches follow, and the directories below it that were made but not
        watched (renamed, or an ancestor was, before their IN_CREATE was read) are watched now under their new names
        and their contents reported; without this a tree renamed right after its creation stays unwatched, and
        everything made in it is missed."""
        self._rebase(old, new)
        gone = sorted(d for d in self._gone_new_dirs if is_under(d, old))
        self._gone_new_dirs.difference_update(gone)
        for d in [old, *gone]:
            moved = new + d[len(old) :]
            if moved not in self._path_wd:
                self._watch_tree(moved, out, report=True)

    def _appeared(self, path: bytes, is_dir: bool, out: list[FileEvent | None], *, scan: bool) -> None:
        """Report a new name; a new directory is watched, then scanned for what was made before the watch."""
        extra: dict[str, object] = {"scan": True} if scan else {}
        if is_dir:
            out.append(self._event(Op.MKDIR, path, ftype=FT_DIR, extra=extra))
            self._watch_tree(path, out, report=True)
            return
        try:
            mode = stat.S_IFMT(os.lstat(path).st_mode)
        except OSError:
            mode = FT_UNKNOWN
        if mode == FT_LNK:
            try:
                target: bytes | None = os.readlink(path)
            except OSError:
                target = None
            out.append(self._event(Op.SYMLINK, path, target=target, ftype=FT_LNK, extra=extra))
        else:
            out.append(self._event(Op.CREATE, path, ftype=mode, extra=extra))

    def _watch_tree(self, top: bytes, out: list[FileEvent | None] | None, *, report: bool = False) -> None:
        """Watch ``top`` (unless already watched) and every directory below it, depth first, without recursion.

        ``report``: every entry found is reported as it is met, parents before children, and remembered so that
        its own IN_CREATE, if it is queued too, is not reported twice. ``out`` None: at start, where failures are
        collected in ``unwatched``; else a directory that cannot be watched is an ``Op.LOSS``.
        """
        stack: list[tuple[bytes, bool]] = [(top, False)]
        while stack:
            d, announce = stack.pop()
            if announce and out is not None:
                out.append(self._event(Op.MKDIR, d, ftype=FT_DIR, extra={"scan": True}))
            if d not in self._path_wd:
                err = self._add_watch(d)
                if err:
                    if err in (errno.ENOENT, errno.ENOTDIR):
                        if out is not None:
                            self._gone_new_dirs.add(d)  # deleted (its removal has its own event) or moved: see above
                        continue
                    if out is None:
                        self.unwatched.append((d, err))
                    else:
                        self._stats.overflows += 1
                        reason = f"cannot watch directory: {_watch_error(err)}"
                        out.append(self._event(Op.LOSS, d, extra={"reason": reason}))
                    continue
            wd = self._path_wd.get(d)
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            subdirs: list[bytes] = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if report and out is not None and wd is not None:
                    self._seen_cur.setdefault(wd, set()).add(entry.name)
                    if not is_dir:
                        self._appeared(entry.path, False, out, scan=True)
                if is_dir:
                    subdirs.append(entry.path)
            stack.extend((sub, report) for sub in reversed(subdirs))

    def _rewatch_roots(self, out: list[FileEvent | None]) -> None:
        for root in self.filter.roots:
            self._watch_tree(root, out)

    def _take_seen(self, wd: int, name: bytes) -> bool:
        for gen in (self._seen_cur, self._seen_prev):
            names = gen.get(wd)
            if names is not None and name in names:
                names.discard(name)
                return True
        return False

    def _drop_seen(self, wd: int, name: bytes) -> None:
        for gen in (self._seen_cur, self._seen_prev):
            names = gen.get(wd)
            if names is not None:
                names.discard(name)


def _watch_error(err: int) -> str:
    if err == errno.ENOSPC:
        return "too many watches (raise fs.inotify.max_user_watches)"
    return os.strerror(err)

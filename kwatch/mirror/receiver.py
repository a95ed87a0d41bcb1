"""The mirror side of replication: apply operations to a mirror root, confined to it, never showing partial files.

This module owns every write a mirror receives, whoever sends it: the kwatch agent (operations decoded from the
wire) and local mirrors (:func:`apply_plan`, which reads the source tree directly). It does no networking and speaks
no protocol.

Safety rules (docs/design.md, "Receiver safety"), enforced here and nowhere else:

- A path is relative ``bytes``; :func:`validate_path` refuses absolute paths, ``.``/``..``, NUL bytes and empty
  components before anything touches the disk.
- The parent directory is opened with :func:`kwatch.fsutil.open_beneath` (``openat2(root_fd, parent,
  RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``, or, where openat2 is missing, a walk of one component at a time with
  ``O_PATH | O_NOFOLLOW | O_DIRECTORY``). Either way a symlink anywhere in the parent chain is refused,
  never followed, so nothing outside the root can be reached through a link planted inside it.
- The last component is only ever used with ``*at`` calls that do not follow it (``O_NOFOLLOW``, ``unlinkat``,
  ``renameat``, ``linkat`` without ``AT_SYMLINK_FOLLOW``, ``AT_SYMLINK_NOFOLLOW``): a symlink there is replaced or
  removed itself, its target is never written.
- File content goes to ``.<name>.kwatch-tmp-<hex>`` in the target directory and is renamed into place after its
  mode and mtime are set; on any failure (ENOSPC included) the temporary is removed. :meth:`Receiver.cleanup_temps`
  removes the ones a crash left behind.

Every failure is a :class:`ReceiverError` naming the path and the reason. Callers applying a batch collect them
(:func:`apply_plan` returns them) instead of stopping at the first one.

Not defended against: another local process racing the receiver inside the mirror (moving a directory out of the
root between the parent lookup and the final ``*at`` call). The mirror root is assumed to be written by kwatch only.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import itertools
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

from kwatch.events import display_path
from kwatch.fsutil import have_openat2, open_beneath, open_regular
from kwatch.libc import syncfs
from kwatch.paths import NAME_MAX, UnsafePathError, check_relpath, plain_relpath
from kwatch.replicate.scan import Delete, Hardlink, Mkdir, Plan, Put, SetAttr, Symlink

FsyncMode = Literal["none", "file", "batch"]

TEMP_MARK = b".kwatch-tmp-"
_TEMP_RE = re.compile(rb"\A\..*\.kwatch-tmp-[0-9a-f]{16}\Z", re.DOTALL)
_TEMP_OVERHEAD = 1 + len(TEMP_MARK) + 16
_COPY_CHUNK = 1 << 20

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_T = TypeVar("_T")


class ReceiverError(Exception):
    """An operation on the mirror failed or was refused. ``path`` is the relative path it was about."""

    def __init__(self, path: bytes, reason: str, errno: int | None = None) -> None:
        super().__init__(path, reason, errno)
        self.path = path
        self.reason = reason
        self.errno = errno

    def __str__(self) -> str:
        where = display_path(self.path) if self.path else "<mirror root>"
        return f"{where}: {self.reason}"


# ---------------------------------------------------------------------------------------------------------------
# path validation


def validate_path(path: bytes) -> list[bytes]:
    """Split a mirror-relative path into components, or raise :class:`ReceiverError` saying what is wrong
    (:func:`kwatch.paths.check_relpath`: the same check the protocol runs on every frame)."""
    try:
        check_relpath(path)
    except UnsafePathError as e:
        name = path if isinstance(path, bytes) else repr(path).encode()
        raise ReceiverError(name, f"refused: {e}", e.errno) from None
    return path.split(b"/")


def is_temp_name(name: bytes) -> bool:
    """True for a name the receiver uses for temporaries (``.<name>.kwatch-tmp-<16 hex>``)."""
    return _TEMP_RE.match(name) is not None


_temp_ids = itertools.count(int.from_bytes(os.urandom(8), "big"))


def temp_name(name: bytes) -> bytes:
    """A fresh temporary name beside ``name``; long names are shortened so the result fits NAME_MAX.

    The 16 hex digits are a counter from a random start (one getrandom per process, not per file): unique among this
    process's temporaries, unlikely to meet another run's, and a name taken anyway fails O_EXCL, never reuses a file.
    """
    return b"." + name[: NAME_MAX - _TEMP_OVERHEAD] + TEMP_MARK + b"%016x" % (next(_temp_ids) & 0xFFFF_FFFF_FFFF_FFFF)


# ---------------------------------------------------------------------------------------------------------------
# process state


def _umask() -> int | None:
    """This process's umask from /proc/self/status (Linux 4.7), or None: os.umask can only read it by setting
    it, which races with other threads creating files."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------------------------------------------
# receiver


@dataclass(slots=True, eq=False)
class PutHandle:
    """An in-progress put: the open temporary and where it goes. Owned by the :class:`Receiver` that made it."""

    path: bytes
    dir_fd: int
    name: bytes
    tmp: bytes
    fd: int
    mode: int
    mtime_ns: int | None
    uid: int | None
    gid: int | None
    written: int = 0


class _At:
    """A resolved parent directory fd and the final name, as a context manager that closes the fd."""

    __slots__ = ("fd", "name")

    def __init__(self, fd: int, name: bytes) -> None:
        self.fd = fd
        self.name = name

    def __enter__(self) -> _At:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class Receiver:
    """Applies operations to the mirror rooted at ``root``; see the module docstring for the safety rules.

    ``fsync``: ``"none"`` leaves durability to the kernel; ``"file"`` fsyncs each file before its rename and the
    directory after it (crash-safe per file, slow); ``"batch"`` calls ``syncfs`` once per :meth:`commit`.
    ``preserve_owner`` applies uid/gid only when running as root (as rsync does; others cannot chown).
    ``use_openat2=None`` detects openat2; ``False`` forces the component-by-component walk (tests use both).
    """

    def __init__(
        self,
        root: bytes,
        *,
        fsync: FsyncMode = "none",
        preserve_owner: bool = False,
        use_openat2: bool | None = None,
    ) -> None:
        if fsync not in ("none", "file", "batch"):
            raise ValueError(f"fsync must be 'none', 'file' or 'batch', not {fsync!r}")
        self.root = root
        self.fsync: FsyncMode = fsync
        self.preserve_owner = preserve_owner and os.geteuid() == 0
        self.use_openat2 = have_openat2() if use_openat2 is None else use_openat2
        try:
            # The root itself may be reached through a symlink: the operator chose it. Nothing below it may be.
            self._root_fd = os.open(root, _O_PATH_DIR)
        except OSError as e:
            raise ReceiverError(b"", f"cannot open mirror root {display_path(root)}: {e.strerror}", e.errno) from e
        self._puts: set[PutHandle] = set()
        self._umask = _umask()

    # -- lifecycle

    def close(self) -> None:
        for h in list(self._puts):
            self.put_abort(h)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def commit(self) -> None:
        """End of a batch: with ``fsync="batch"``, make everything written so far durable (one syncfs)."""
        if self.fsync == "batch":
            fd = os.open(b".", _O_READ_DIR, dir_fd=self._root_fd)
            try:
                syncfs(fd)
            except OSError as e:
                raise ReceiverError(b"", f"syncfs failed: {e.strerror}", e.errno) from e
            finally:
                os.close(fd)

    # -- resolution

    def _open_dir(self, path: bytes, parts: list[bytes]) -> int:
        """An O_PATH fd for the directory ``parts`` below the root; symlinks anywhere in it are refused."""
        if not parts:
            return os.dup(self._root_fd)
        try:
            return open_beneath(self._root_fd, b"/".join(parts), _O_PATH_DIR, use_openat2=self.use_openat2)
        except OSError as e:
            raise _resolve_error(self._root_fd, path, parts, e) from e

    def _at(self, path: bytes) -> _At:
        parts = validate_path(path)
        return _At(self._open_dir(path, parts[:-1]), parts[-1])

    def _lstat(self, at: _At) -> os.stat_result | None:
        try:
            return os.stat(at.name, dir_fd=at.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- operations

    def mkdir(self, path: bytes, mode: int = 0o755, *, uid: int | None = None, gid: int | None = None) -> None:
        """Create a directory with exactly ``mode`` (not masked by umask); an existing directory just gets the mode."""
        with self._at(path) as at:
            try:
                os.mkdir(at.name, 0o700, dir_fd=at.fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise _fail(path, "mkdir failed", e) from e
            st = self._lstat(at)
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise ReceiverError(path, "cannot mkdir: a non-directory is in the way; delete it first",
                                    errno_mod.EEXIST)
            try:
                _attrs_at(at.fd, at.name, st, mode, None, uid, gid, self.preserve_owner)
                _sync_dir(at.fd, self.fsync)
            except OSError as e:
                raise _fail(path, "cannot set directory attributes", e) from e

    def put_begin(
        self, path: bytes, *, mode: int = 0o644, mtime_ns: int | None = None, uid: int | None = None,
        gid: int | None = None,
    ) -> PutHandle:
        """Start writing a whole file; it appears under ``path`` only at :meth:`put_end`."""
        at = self._at(path)
        try:
            st = self._lstat(at)
        except OSError as e:
            os.close(at.fd)
            raise _fail(path, "cannot look at the target", e) from e
        if st is not None and stat.S_ISDIR(st.st_mode):
            os.close(at.fd)
            raise ReceiverError(path, "cannot write a file: a directory is in the way; delete it first",
                                errno_mod.EISDIR)
        return self._begin_at(path, at.fd, at.name, mode, mtime_ns, uid, gid)

    def _begin_at(
        self, path: bytes, dir_fd: int, name: bytes, mode: int, mtime_ns: int | None, uid: int | None,
        gid: int | None,
    ) -> PutHandle:
        """Create the temporary; the handle takes ownership of ``dir_fd`` (closed here if this fails)."""
        tmp = temp_name(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
        except OSError as e:
            os.close(dir_fd)
            raise _fail(path, "cannot create temporary file", e) from e
        h = PutHandle(path, dir_fd, name, tmp, fd, mode, mtime_ns, uid, gid)
        self._puts.add(h)
        return h

    def put_write(self, h: PutHandle, data: bytes | bytearray | memoryview) -> None:
        """Append to the temporary. On failure (ENOSPC...) the put is aborted: temp removed, error raised."""
        view = memoryview(data)
        try:
            while view:
                n = os.write(h.fd, view)
                view = view[n:]
                h.written += n
        except OSError as e:
            self.put_abort(h)
            raise _fail(h.path, f"write failed after {h.written} bytes; nothing was put", e) from e

    def put_end(self, h: PutHandle) -> None:
        """Set mode/owner/mtime on the temporary, then rename it over ``path`` (atomically replacing a file or link)."""
        if h not in self._puts:
            raise ReceiverError(h.path, "put_end on a put that is not open (already ended or aborted)")
        try:
            if self.preserve_owner and (h.uid is not None or h.gid is not None):
                os.fchown(h.fd, -1 if h.uid is None else h.uid, -1 if h.gid is None else h.gid)
            os.fchmod(h.fd, _safe_mode(h.mode, h.uid, h.gid, self.preserve_owner))
            if h.mtime_ns is not None:
                os.utime(h.fd, ns=(h.mtime_ns, h.mtime_ns))
            if self.fsync == "file":
                os.fsync(h.fd)
            fd, h.fd = h.fd, -1
            os.close(fd)  # close can report a delayed write error (NFS, ENOSPC on some filesystems)
            os.rename(h.tmp, h.name, src_dir_fd=h.dir_fd, dst_dir_fd=h.dir_fd)
        except OSError as e:
            self.put_abort(h)
            raise _fail(h.path, "cannot finish the file; nothing was put", e) from e
        self._puts.discard(h)
        try:
            _sync_dir(h.dir_fd, self.fsync)
        except OSError as e:
            raise _fail(h.path, "fsync of the directory failed", e) from e
        finally:
            os.close(h.dir_fd)

    def put_abort(self, h: PutHandle) -> None:
        """Drop an unfinished put: close and remove the temporary. Safe to call twice."""
        if h not in self._puts:
            return
        self._puts.discard(h)
        if h.fd >= 0:
            with contextlib.suppress(OSError):  # the error being reported already says what went wrong
                os.close(h.fd)
            h.fd = -1
        _unlink_quiet(h.dir_fd, h.tmp)
        os.close(h.dir_fd)

    def put(
        self, path: bytes, chunks: Iterable[bytes], *, mode: int = 0o644, mtime_ns: int | None = None,
        uid: int | None = None, gid: int | None = None,
    ) -> int:
        """put_begin + put_write for each chunk + put_end; returns the byte count."""
        h = self.put_begin(path, mode=mode, mtime_ns=mtime_ns, uid=uid, gid=gid)
        try:
            for chunk in chunks:
                self.put_write(h, chunk)
        except BaseException:
            self.put_abort(h)
            raise
        self.put_end(h)
        return h.written

    def put_files(
        self, files: Iterable[tuple[bytes, int, int | None, bytes]], *, replace_dirs: bool = False
    ) -> list[ReceiverError]:
        """Put many small whole files, each ``(path, mode, mtime_ns, data)``; returns the per-path failures.

        The same guarantees as :meth:`put` (a temporary in the target directory, mode and mtime set on it, then
        renamed over the final name), with less work per file: each parent directory is resolved (openat2, same
        confinement) once for all the files in it rather than once per file, and the final name is not looked at
        first: a directory in the way makes the rename fail (EISDIR) and, with ``replace_dirs``, is removed and the
        rename retried (without it, that file fails as :meth:`put_begin` would).
        """
        errors: list[ReceiverError] = []
        dirs: dict[bytes, int] = {}  # parent path -> O_PATH fd, for this call only
        try:
            for path, mode, mtime_ns, data in files:
                try:
                    parent, _, name = path.rpartition(b"/")
                    dfd = dirs.get(parent) if type(path) is bytes and plain_relpath(path) else None
                    if dfd is None:  # a new directory, or a path that needs the full check (and its error)
                        parts = validate_path(path)
                        dfd = dirs.get(parent)
                        if dfd is None:
                            dfd = dirs[parent] = self._open_dir(path, parts[:-1])
                    if _put_small(path, dfd, name, mode, mtime_ns, data, replace_dirs, self._umask, self.fsync):
                        # a directory was removed: a cached fd may now be a deleted directory; resolve afresh
                        for fd in dirs.values():
                            os.close(fd)
                        dirs.clear()
                except ReceiverError as e:
                    errors.append(e)
                    for fd in dirs.values():  # rare: start afresh rather than reason about what the failure moved
                        os.close(fd)
                    dirs.clear()
        finally:
            for fd in dirs.values():
                os.close(fd)
        return errors

    def rename(self, old: bytes, new: bytes) -> None:
        """Move ``old`` to ``new`` inside the mirror (replacing a file or empty directory there, as rename(2))."""
        po = validate_path(old)
        pn = validate_path(new)
        if po == pn:
            return
        if pn[: len(po)] == po:
            raise ReceiverError(new, f"cannot move {display_path(old)} into itself", errno_mod.EINVAL)
        with _At(self._open_dir(old, po[:-1]), po[-1]) as ao, _At(self._open_dir(new, pn[:-1]), pn[-1]) as an:
            try:
                os.rename(ao.name, an.name, src_dir_fd=ao.fd, dst_dir_fd=an.fd)
                _sync_dir(an.fd, self.fsync)
                if self.fsync == "file" and po[:-1] != pn[:-1]:
                    _sync_dir(ao.fd, self.fsync)
            except OSError as e:
                raise _fail(old, f"rename to {display_path(new)} failed", e) from e

    def delete(self, path: bytes) -> bool:
        """Remove a file, symlink (the link, never its target) or whole directory tree. False if it was absent."""
        with self._at(path) as at:
            try:
                st = self._lstat(at)
                if st is None:
                    return False
                if stat.S_ISDIR(st.st_mode):
                    _rmtree_at(at.fd, at.name)
                else:
                    os.unlink(at.name, dir_fd=at.fd)
                _sync_dir(at.fd, self.fsync)
            except FileNotFoundError:
                return False
            except OSError as e:
                raise _fail(path, "delete failed", e) from e
            return True

    def symlink(
        self, path: bytes, target: bytes, *, mtime_ns: int | None = None, uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """Create or replace a symlink. Its target is stored verbatim and never resolved by the receiver."""
        if not target or b"\0" in target:
            raise ReceiverError(path, "symlink target must be non-empty and contain no NUL byte")
        with self._at(path) as at:
            tmp = temp_name(at.name)
            try:
                os.symlink(target, tmp, dir_fd=at.fd)
            except OSError as e:
                raise _fail(path, "symlink failed", e) from e
            try:
                st = os.stat(tmp, dir_fd=at.fd, follow_symlinks=False)
                _attrs_at(at.fd, tmp, st, None, mtime_ns, uid, gid, self.preserve_owner)
                os.rename(tmp, at.name, src_dir_fd=at.fd, dst_dir_fd=at.fd)
                _sync_dir(at.fd, self.fsync)
            except OSError as e:
                _unlink_quiet(at.fd, tmp)
                raise _fail(path, "cannot put the symlink in place", e) from e

    def hardlink(self, path: bytes, existing: bytes, *, expect: tuple[int, int] | None = None) -> None:
        """Make ``path`` another name for the file at ``existing`` (replacing whatever non-directory is there).

        ``expect`` is (size, mtime_ns) that ``existing`` must be a regular file of; otherwise ESTALE and nothing
        changes (the sender thought the mirror had that content there; it sends the data instead).
        """
        pp = validate_path(path)
        pe = validate_path(existing)
        with _At(self._open_dir(existing, pe[:-1]), pe[-1]) as ae, _At(self._open_dir(path, pp[:-1]), pp[-1]) as ap:
            try:
                est = os.stat(ae.name, dir_fd=ae.fd, follow_symlinks=False)
            except OSError as e:
                raise _fail(path, f"link source {display_path(existing)} unusable", e) from e
            if stat.S_ISDIR(est.st_mode):
                raise ReceiverError(path, f"cannot hard-link a directory ({display_path(existing)})", errno_mod.EPERM)
            if expect is not None and (
                not stat.S_ISREG(est.st_mode) or (est.st_size, est.st_mtime_ns) != expect
            ):
                raise ReceiverError(
                    path, f"not linked: {display_path(existing)} is not the file expected (size {est.st_size}, "
                    f"mtime_ns {est.st_mtime_ns}; expected {expect[0]}, {expect[1]})", errno_mod.ESTALE)
            cur = self._lstat(ap)
            if cur is not None and (cur.st_dev, cur.st_ino) == (est.st_dev, est.st_ino):
                return  # already that inode; rename(2) of two links to one inode would do nothing anyway
            if cur is not None and stat.S_ISDIR(cur.st_mode):
                raise ReceiverError(path, "cannot hard-link: a directory is in the way; delete it first",
                                    errno_mod.EISDIR)
            tmp = temp_name(ap.name)
            try:
                # linkat without AT_SYMLINK_FOLLOW: a symlink at ``existing`` is linked itself, never its target.
                os.link(ae.name, tmp, src_dir_fd=ae.fd, dst_dir_fd=ap.fd, follow_symlinks=False)
            except OSError as e:
                raise _fail(path, f"link to {display_path(existing)} failed", e) from e
            try:
                os.rename(tmp, ap.name, src_dir_fd=ap.fd, dst_dir_fd=ap.fd)
                _sync_dir(ap.fd, self.fsync)
            except OSError as e:
                _unlink_quiet(ap.fd, tmp)
                raise _fail(path, "cannot put the hard link in place", e) from e

    def setattr(
        self, path: bytes, *, mode: int | None = None, mtime_ns: int | None = None, uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """Change metadata of ``path`` itself (a symlink's own mtime/owner; its mode is left alone)."""
        with self._at(path) as at:
            try:
                st = self._lstat(at)
                if st is None:
                    raise ReceiverError(path, "cannot set attributes: no such file", errno_mod.ENOENT)
                _attrs_at(at.fd, at.name, st, mode, mtime_ns, uid, gid, self.preserve_owner)
            except OSError as e:
                raise _fail(path, "cannot set attributes", e) from e

    def open_read(self, path: bytes) -> int | None:
        """A read-only fd of the file at ``path`` (a final symlink is not followed), or None when nothing is there.

        For the agent's signatures and delta bases: reading goes through the same confinement as writing.
        """
        try:
            at = self._at(path)
        except ReceiverError as e:
            if e.errno in (errno_mod.ENOENT, errno_mod.ENOTDIR):
                return None
            raise
        with at:
            try:
                return os.open(at.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=at.fd)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:
                raise _fail(path, "cannot open for reading", e) from e

    def cleanup_temps(self) -> list[bytes]:
        """Remove temporaries left by an interrupted run (not those of puts open in this receiver).

        Walks the whole mirror without following symlinks; returns the relative paths removed.
        """
        live = {h.tmp for h in self._puts}  # 16 random hex digits: no other directory's temp shares a name
        removed: list[bytes] = []
        for dfd, rel, name in _walk_names(self._root_fd):
            if is_temp_name(name) and name not in live:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(name, dir_fd=dfd)
                        removed.append(rel + name)
                except FileNotFoundError:
                    pass
        return removed


# ---------------------------------------------------------------------------------------------------------------
# fd-based tree helpers (never follow a symlink: every directory is opened O_NOFOLLOW relative to its parent)


def _resolve_error(root_fd: int, path: bytes, parts: list[bytes], e: OSError) -> ReceiverError:
    """Say which component of ``parts`` below ``root_fd`` stopped the lookup and why (only runs on the error
path)."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            where = display_path(b"/".join(parts[: i + 1]))
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return ReceiverError(path, f"parent directory {where} does not exist", errno_mod.ENOENT)
            except OSError as e2:
                return ReceiverError(path, f"cannot look up {where}: {e2.strerror}", e2.errno)
            if stat.S_ISLNK(st.st_mode):
                return ReceiverError(
                    path, f"refused: {where} is a symlink (symlinks in a path are never followed)", errno_mod.ELOOP
                )
            if not stat.S_ISDIR(st.st_mode):
                return ReceiverError(path, f"{where} is not a directory", errno_mod.ENOTDIR)
            nfd = os.open(part, _O_PATH_DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError:
        pass
    finally:
        os.close(fd)
    if e.errno == errno_mod.EXDEV:
        return ReceiverError(path, "refused: resolves outside the mirror root", e.errno)
    return ReceiverError(path, f"cannot open parent directory: {e.strerror}", e.errno)


def _sync_dir(dir_fd: int, fsync: FsyncMode) -> None:
    """With ``fsync="file"``: fsync the directory ``dir_fd`` (after a name in it changed)."""
    if fsync == "file":
        fd = os.open(b".", _O_READ_DIR, dir_fd=dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _safe_mode(mode: int, uid: int | None, gid: int | None, preserve_owner: bool, *, is_dir: bool = False) -> int:
    """``mode`` as the mirror may hold it: setuid/setgid only on a file whose owner and group are the source's.

    Without both (no ``preserve_owner``, not root, or the sender left one out) the file belongs to whoever runs
    the receiver, often root: keeping the bits would turn a user's 04755 file into a root one. The sender
    cannot ask for them otherwise, whatever its frames say. A directory keeps setgid: there it only picks the
    group of new entries, and only kwatch writes into the mirror.
    """
    mode &= 0o7777
    if is_dir or (preserve_owner and uid is not None and gid is not None):
        return mode
    return mode & ~(stat.S_ISUID | stat.S_ISGID)


def _attrs_at(
    dir_fd: int, name: bytes, st: os.stat_result, mode: int | None, mtime_ns: int | None,
    uid: int | None, gid: int | None, preserve_owner: bool,
) -> None:
    """Set metadata on ``name`` without following it. chown first: it clears setuid/setgid bits (the kernel
    does so for root too), so a chown alone never leaves them on a file of another owner."""
    if preserve_owner and (uid is not None or gid is not None):
        os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid, dir_fd=dir_fd,
                 follow_symlinks=False)
    if mode is not None and not stat.S_ISLNK(st.st_mode):  # a symlink's mode is fixed (0777) on Linux
        # fchmodat(AT_SYMLINK_NOFOLLOW): glibc does it through an O_PATH fd, so a symlink is never followed.
        os.chmod(name, _safe_mode(mode, uid, gid, preserve_owner, is_dir=stat.S_ISDIR(st.st_mode)), dir_fd=dir_fd,
                 follow_symlinks=False)
    if mtime_ns is not None:
        # atime is set to mtime: Python's utime has no UTIME_OMIT, and a mirror's atime carries no meaning.
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _fail(path: bytes, what: str, e: OSError) -> ReceiverError:
    return ReceiverError(path, f"{what}: {e.strerror}", e.errno)


def _put_small(
    path: bytes, dir_fd: int, name: bytes, mode: int, mtime_ns: int | None, data: bytes, replace_dirs: bool,
    umask: int | None, fsync: FsyncMode,
) -> bool:
    """One file of :meth:`Receiver.put_files` (the process's ``umask``, if known); True when a directory in
    the way was removed."""
    tmp = temp_name(name)
    # Created with its final mode when the umask leaves that mode alone (no fchmod then); setuid, setgid and
    # sticky bits always go through fchmod. The temporary shows no more than the final file will.
    exact = umask is not None and not mode & ~0o777 and not mode & umask
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode if exact else 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise _fail(path, "cannot create temporary file", e) from e
    removed = False
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if not exact:
                os.fchmod(fd, _safe_mode(mode, None, None, False))  # no owner in these: never setuid/setgid
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            if fsync == "file":
                os.fsync(fd)
        finally:
            os.close(fd)  # close can report a delayed write error (NFS, ENOSPC on some filesystems)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            if not replace_dirs:
                raise ReceiverError(path, "cannot write a file: a directory is in the way; delete it first",
                                    errno_mod.EISDIR) from None
            _rmtree_at(dir_fd, name)
            removed = True
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        _sync_dir(dir_fd, fsync)
    except OSError as e:
        _unlink_quiet(dir_fd, tmp)
        raise _fail(path, "cannot put the file; nothing was put", e) from e
    except BaseException:
        _unlink_quiet(dir_fd, tmp)
        raise
    return removed


def _unlink_quiet(dir_fd: int, name: bytes) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _retry_writable(dir_fd: int, name: bytes | str | None, op: Callable[[], _T]) -> _T:
    """Run ``op``; if permission is denied, make the directory (``name`` under ``dir_fd``, or ``dir_fd`` itself)
    u+rwx and try once more. Only the receiver's own tree is deleted this way: a read-only directory in a mirror
    (mode 0555, copied from the source) must not make it undeletable for a non-root receiver."""
    try:
        return op()
    except PermissionError:
        if name is None:
            os.fchmod(dir_fd, 0o700)
        else:
            os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
        return op()


def _rmtree_at(dir_fd: int, name: bytes) -> None:
    """Remove the directory ``name`` under ``dir_fd`` and everything in it, iteratively (deep trees are fine)."""
    top = _retry_writable(dir_fd, name, lambda: os.open(name, _O_READ_DIR, dir_fd=dir_fd))
    # Each frame: (fd of this directory, its listing, fd of its parent, its name in the parent)
    stack: list[tuple[int, Iterator[os.DirEntry[str]], int, bytes | str]] = [(top, os.scandir(top), dir_fd, name)]
    try:
        while stack:
            fd, it, pfd, nm = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                os.close(fd)
                os.rmdir(nm, dir_fd=pfd)
                continue
            # scandir(fd) yields str names (surrogate-escaped), which the *at calls turn back into the same bytes.
            ename = entry.name
            if entry.is_dir(follow_symlinks=False):
                cfd = _retry_writable(fd, ename, lambda: os.open(ename, _O_READ_DIR, dir_fd=fd))  # noqa: B023
                stack.append((cfd, os.scandir(cfd), fd, ename))
            else:
                with contextlib.suppress(FileNotFoundError):
                    _retry_writable(fd, None, lambda: os.unlink(ename, dir_fd=fd))  # noqa: B023
    finally:
        for fd, _it, _pfd, _nm in stack:
            os.close(fd)


def _walk_names(root_fd: int) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield (dir fd, relative dir prefix, name) for every name below ``root_fd``, without following symlinks."""
    stack: list[tuple[int, bytes]] = [(os.open(b".", _O_READ_DIR, dir_fd=root_fd), b"")]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        name = os.fsencode(entry.name)
                        yield fd, prefix, name
                        if entry.is_dir(follow_symlinks=False):
                            # vanished or unreadable: nothing of ours can be in it
                            with contextlib.suppress(OSError):
                                stack.append((os.open(name, _O_READ_DIR, dir_fd=fd), prefix + name + b"/"))
            finally:
                os.close(fd)
    finally:
        for fd, _prefix in stack:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# local mirror: apply a scan.diff plan reading content from a source tree


def apply_plan(receiver: Receiver, plan: Plan, src_root: bytes) -> list[ReceiverError]:
    """Apply ``plan`` (from :func:`kwatch.replicate.scan.diff`) to ``receiver``, reading files from ``src_root``.

    Returns the per-path failures; one failing path does not stop the others. A source file is stat'ed (fstat,
    before reading) for the mode and mtime given to the mirror, so a file modified during the copy keeps an older
    mtime in the mirror and the next scan sends it again; such a file is also reported.
    """
    errors: list[ReceiverError] = []
    base = src_root.rstrip(b"/") + b"/"
    for op in plan.ops():
        try:
            if isinstance(op, Delete):
                receiver.delete(op.path)
            elif isinstance(op, Mkdir):
                receiver.mkdir(op.path, op.mode, uid=op.uid, gid=op.gid)
            elif isinstance(op, Put):
                err = _copy_file(receiver, base, op)
                if err is not None:
                    errors.append(err)
            elif isinstance(op, Symlink):
                receiver.symlink(op.path, op.target, mtime_ns=op.mtime_ns, uid=op.uid, gid=op.gid)
            elif isinstance(op, Hardlink):
                receiver.hardlink(op.path, op.existing)
            elif isinstance(op, SetAttr):
                receiver.setattr(op.path, mode=op.mode, mtime_ns=op.mtime_ns, uid=op.uid, gid=op.gid)
        except ReceiverError as e:
            errors.append(e)
    try:
        receiver.commit()
    except ReceiverError as e:
        errors.append(e)
    return errors


def _copy_file(receiver: Receiver, base: bytes, op: Put) -> ReceiverError | None:
    try:
        # beneath the source root, no symlink anywhere in the path: a directory swapped for a link since the plan
        # is refused, not followed
        fd, st = open_regular(base, op.path)
    except OSError as e:
        raise ReceiverError(op.path, f"cannot read source file: {e.strerror}", e.errno) from e
    try:
        h = receiver.put_begin(
            op.path,
            mode=stat.S_IMODE(st.st_mode),
            mtime_ns=st.st_mtime_ns,
            uid=None if op.uid is None else st.st_uid,
            gid=None if op.gid is None else st.st_gid,
        )
        try:
            while True:
                chunk = os.read(fd, _COPY_CHUNK)
                if not chunk:
                    break
                receiver.put_write(h, chunk)
        except OSError as e:
            receiver.put_abort(h)
            raise ReceiverError(op.path, f"reading source file failed: {e.strerror}", e.errno) from e
        receiver.put_end(h)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return ReceiverError(op.path, "source changed while it was copied; the next pass sends it again")
        return None
    finally:
        os.close(fd)

"""Opening paths beneath a root without following any symlink: the one helper both ends of replication use.

kwatch runs as root and reads trees that other users write (the source) or writes trees only it should write (the
mirror). A path string is only a hint there: between the moment a path was planned and the moment it is opened,
a user who owns a directory in it can swap that directory for a symlink (``renameat2(RENAME_EXCHANGE)``), and a
plain ``open`` (even with ``O_NOFOLLOW``, which guards the last component only) would follow it anywhere.

:func:`open_beneath` resolves a relative path under a root fd with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (Linux 5.6, through :mod:`kwatch.libc`: Python has no binding), or,
where openat2 is missing (ENOSYS, or a seccomp filter's EPERM), by walking one component at a time with
``O_PATH | O_DIRECTORY | O_NOFOLLOW``. Either way a symlink anywhere in the path fails (ELOOP or ENOTDIR),
``..`` cannot climb out, and what was opened is what the caller then inspects with ``fstat``.

Also :func:`grow_pipe`, for the pipes both ends of the agent link read and write.

:func:`open_regular` is the reading side's use of it: a regular file only, opened ``O_NONBLOCK`` so a FIFO or
device swapped in is refused instead of hanging the reader, with the ``fstat`` of the descriptor it returned.

:class:`DirFds` does what :func:`open_regular` does for many files of a tree: each parent directory is opened beneath
the root once (an fd kept for the next files), and the file by name relative to it, as the scan lists a tree.

Pure I/O helpers: no policy, no logging.
"""

from __future__ import annotations

import collections
import contextlib
import errno as errno_mod
import fcntl
import os
import stat

from kwatch.libc import openat2

__all__ = [
    "READ_FLAGS",
    "RESOLVE_BENEATH",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "DirFds",
    "grow_pipe",
    "have_openat2",
    "open_beneath",
    "open_regular",
]

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_AT_FDCWD = -100
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: How a regular file is opened for reading: never the target of a final symlink, never a controlling tty, and
#: never blocking in open (a FIFO without a writer would block a plain O_RDONLY open forever).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


_openat2_ok: bool | None = None


def have_openat2() -> bool:
    """Whether openat2 with RESOLVE_BENEATH works here (not before 5.6; seccomp filters may return ENOSYS/EPERM)."""
    global _openat2_ok
    if _openat2_ok is None:
        try:
            os.close(openat2(_AT_FDCWD, b"/", _O_PATH_DIR, RESOLVE_NO_SYMLINKS))
            _openat2_ok = True
        except OSError:
            _openat2_ok = False
    return _openat2_ok


def open_beneath(root: int | bytes, rel: bytes, flags: int, mode: int = 0, *, use_openat2: bool | None = None) -> int:
    """Open ``rel`` (relative, ``/``-separated; ``b""`` is the root itself) beneath ``root``, following no symlink.

    ``root`` is a directory fd, or a path opened here for the call (the root itself may be reached through a
    symlink: the operator named it; nothing below it may). ``flags`` apply to the last component, which is opened
    ``O_NOFOLLOW`` in the fallback walk (openat2's RESOLVE_NO_SYMLINKS covers it otherwise). Raises ``OSError``:
    ELOOP or ENOTDIR for a symlink in the way, EXDEV for a path leaving the root.
    """
    if isinstance(root, bytes):
        root_fd = os.open(root, _O_PATH_DIR)
        try:
            return open_beneath(root_fd, rel, flags, mode, use_openat2=use_openat2)
        finally:
            os.close(root_fd)
    rel = rel.strip(b"/")
    if not rel:
        return os.open(b".", flags | os.O_CLOEXEC, mode, dir_fd=root)
    if have_openat2() if use_openat2 is None else use_openat2:
        return openat2(root, rel, flags | os.O_CLOEXEC, _BENEATH, mode)
    parts = rel.split(b"/")
    if b".." in parts:  # RESOLVE_BENEATH refuses a climb out of the root; the walk refuses every ".."
        raise OSError(errno_mod.EXDEV, "path leaves the root", rel)
    fd = os.dup(root)
    try:
        for part in parts[:-1]:
            # O_NOFOLLOW|O_DIRECTORY: a symlink component fails (ELOOP/ENOTDIR) instead of being followed.
            nfd = os.open(part, _O_PATH_DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def open_regular(root: int | bytes, rel: bytes, *, use_openat2: bool | None = None) -> tuple[int, os.stat_result]:
    """A read-only fd of the regular file ``rel`` beneath ``root`` (see :func:`open_beneath`) and its ``fstat``.

    Size, mode, owner and mtime are to be taken from that ``fstat``: it describes what was opened, whatever the
    path names by now. Anything but a regular file raises ``OSError`` (EINVAL when something else is there; the
    open itself never blocks). The fd is left non-blocking, which regular files ignore.
    """
    return _regular(open_beneath(root, rel, READ_FLAGS, use_openat2=use_openat2), rel)


def _regular(fd: int, rel: bytes) -> tuple[int, os.stat_result]:
    """``fd`` and its fstat when it is a regular file; else ``fd`` is closed and OSError(EINVAL) raised."""
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno_mod.EINVAL, "not a regular file", rel)
    return fd, st


class DirFds:
    """:func:`open_regular` for the files of one tree, opened directory by directory.

    Each parent directory is opened beneath the root once (:func:`open_beneath`: no symlink anywhere in its path,
    never out of the root) and its fd kept (the last ``keep`` directories); a file is then opened by its name
    relative to that fd, ``O_NOFOLLOW``, as :func:`kwatch.replicate.scan.scan` stats the names of a directory it has
    open. A directory swapped for a symlink after it was opened is not followed: the fd is the directory that was
    beneath the root. One ``openat2`` (a path walk from the root through ctypes) per file was the largest cost of
    reading a tree of small files for a first sync; one per directory is not. ``root`` is a path or a directory fd
    (duplicated: the caller keeps its own). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, root: bytes | int, keep: int = 16) -> None:
        # the root itself may be a symlink: the operator named it
        self._root = os.dup(root) if isinstance(root, int) else os.open(root, _O_PATH_DIR)
        self._keep = keep
        self._dirs: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def open_regular(self, rel: bytes) -> tuple[int, os.stat_result]:
        """A read-only fd of the regular file ``rel`` beneath the root and its fstat (see :func:`open_regular`)."""
        parent, _, name = rel.strip(b"/").rpartition(b"/")
        if name in (b"", b".", b".."):
            return open_regular(self._root, rel)  # the full check and its error
        dfd = self._dirs.get(parent)
        if dfd is None:
            dfd = self._root if not parent else open_beneath(self._root, parent, _O_PATH_DIR | os.O_NOFOLLOW)
            if parent:
                self._dirs[parent] = dfd
                if len(self._dirs) > self._keep:
                    os.close(self._dirs.popitem(last=False)[1])
        else:
            self._dirs.move_to_end(parent)
        return _regular(os.open(name, READ_FLAGS, dir_fd=dfd), rel)

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def __enter__(self) -> DirFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # fcntl has the name from Python 3.10 on


def grow_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Make the pipe at ``fd`` hold ``size`` bytes (F_SETPIPE_SZ, Linux 2.6.35); quietly nothing if ``fd`` is not a
    pipe or the size is above /proc/sys/fs/pipe-max-size for an unprivileged user.

    The default 64 KiB fills with a few small-file frames: the writer then sleeps in select until the reader has
    drained it, one wake-up per 64 KiB on each side; 1 MiB lets both run longer between switches.
    """
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)

"""Which regular files under a source root some process holds open for writing right now (read from ``/proc``).

The coalescer holds a file that is open for writing until its CLOSE_WRITE, so that a file is sent once, finished.
It learns of opens from events, so it cannot know of opens made before capture attached (a restarted daemon, whose
predecessor's knowledge died with it) or while events were lost; such a file would be read and sent mid-write.
:func:`scan_writers` finds them: every ``/proc/<pid>/fd/<n>`` whose link names a path under the root and whose
``/proc/<pid>/fdinfo/<n>`` ``flags:`` access mode is ``O_WRONLY`` or ``O_RDWR``. Their CLOSE_WRITE does arrive: the
BPF backend reports one for every writable descriptor of a regular file that goes away, whenever it was opened;
fanotify and inotify report one when the last reference to a writable open file goes away (``fsnotify_close``).

The parsing is pure (:func:`writable`, :func:`candidate`); :func:`scan_writers` does the reading.

Limits (the hold is released ``max_delay`` after it began anyway, see ``Coalescer.take``): a writer whose
``/proc/<pid>/fd`` we may not read (another user's, without root) is not seen; writes through ``mmap`` of a file
whose descriptor is already closed, and io_uring registered files, have no descriptor to find; a process found
with the file open on two descriptors that share one open file description counts twice, while fanotify/inotify
report one close for them (the hold then ends by age).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection

from kwatch.replicate.coalesce import relative

_ACCMODE = os.O_ACCMODE  # the access mode bits of the open flags (include/uapi/asm-generic/fcntl.h)


def writable(fdinfo: bytes) -> bool:
    """Whether ``/proc/<pid>/fdinfo/<n>`` text describes a descriptor open for writing (``flags:`` is octal; its
    access mode is O_WRONLY or O_RDWR). An O_PATH descriptor (access mode 0) or text without the line: False."""
    for line in fdinfo.splitlines():
        if line.startswith(b"flags:"):
            try:
                flags = int(line[6:].strip(), 8)
            except ValueError:
                return False
            return flags & _ACCMODE in (os.O_WRONLY, os.O_RDWR)
    return False


def candidate(root: bytes, link: bytes) -> bytes | None:
    """The path relative to ``root`` that a ``/proc/<pid>/fd/<n>`` link names, None when it is not a path under
    ``root`` (``pipe:[...]``, ``socket:[...]``, ``anon_inode:...``, elsewhere, or the root itself). A deleted
    file's link ends with `` (deleted)``; that is left to the caller, which checks that the name is the inode."""
    if not link.startswith(b"/"):
        return None
    rel = relative(root, link)
    return rel or None


def scan_writers(root: bytes, *, exclude_pids: Collection[int] = (), proc: bytes = b"/proc") -> dict[bytes, int]:
    """Regular files under ``root`` open for writing, as path relative to ``root`` -> number of such descriptors.

    A name counts only while it still names the open inode (a file deleted or replaced since it was opened is not
    under that name any more). Processes that exit or close meanwhile are skipped; this is a snapshot.
    """
    counts: dict[bytes, int] = {}
    try:
        pids = os.listdir(proc)
    except OSError:
        return counts
    for pid in pids:
        if not pid.isdigit() or int(pid) in exclude_pids:
            continue
        fd_dir = proc + b"/" + pid + b"/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, a kernel thread, or not ours to read
        for fd in fds:
            entry = fd_dir + b"/" + fd
            try:
                link = os.readlink(entry)
            except OSError:
                continue
            rel = candidate(root, link)
            if rel is None:
                continue
            try:
                with open(proc + b"/" + pid + b"/fdinfo/" + fd, "rb") as f:
                    info = f.read()
                opened = os.stat(entry)  # the open file itself
                named = os.lstat(link)
            except OSError:
                continue
            if not writable(info) or not stat.S_ISREG(opened.st_mode):
                continue
            if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
                continue
            counts[rel] = counts.get(rel, 0) + 1
    return counts

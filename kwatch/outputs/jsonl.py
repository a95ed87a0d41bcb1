"""JSON lines to a file, rotated by size and count, with an fsync policy; never a torn line.

- **Whole lines only.** A batch of lines goes to the file in one ``write`` (``O_APPEND``); a short write (disk full,
  quota) is undone with ``ftruncate`` back to where the batch began, so a reader never sees half a line, and the
  batch is counted as lost and announced by a marker record once a write succeeds again.
- **A torn last line after a crash** (power loss while the page cache held half a batch, or a file another program
  cut) is found when the file is opened: everything after the last newline is cut off (:func:`repair_cut`), counted
  in ``repaired_bytes``, and a ``loss`` marker record says how many bytes went; it never holds a whole record, since
  whole records end with the newline that was never written.
- **Rotation** (logrotate's numbering): before a batch would take the file past ``max_bytes``, ``NAME`` becomes
  ``NAME.1``, ``NAME.1`` becomes ``NAME.2``, ..., and ``NAME.<keep>`` is removed; a batch bigger than ``max_bytes``
  alone is split at line boundaries. ``max_bytes = 0`` never rotates.
- **fsync**: ``none`` (the kernel writes back when it likes), ``interval`` (a background thread fsyncs a written file
  every ``fsync_interval`` seconds, and the file is synced before it is rotated or closed), ``every`` (each batch is
  fsynced before ``write`` returns). Renames of a rotation are made durable with an fsync of the directory, except
  with ``none``.

Pure: :func:`rotation_plan`, :func:`repair_cut`, :func:`split_lines`. I/O: :class:`JsonlWriter`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Sequence

from kwatch.metrics.stats import OutputStats
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.record import Record

TAIL_SCAN = 1 << 16  # bytes read backwards at a time when looking for the last newline


def rotated_name(path: str, n: int) -> str:
    return path if n == 0 else f"{path}.{n}"


def rotation_plan(path: str, keep: int) -> tuple[str | None, list[tuple[str, str]]]:
    """What a rotation does: the file to remove (the oldest kept one), then renames, oldest first."""
    return rotated_name(path, keep), [(rotated_name(path, n - 1), rotated_name(path, n)) for n in range(keep, 0, -1)]


def repair_cut(size: int, tail: bytes) -> int:
    """Where a file whose last ``len(tail)`` bytes are ``tail`` must be cut so that it ends with a whole line.

    Returns ``size`` when nothing must go; -1 when ``tail`` holds no newline (look further back)."""
    if not tail or tail.endswith(b"\n"):
        return size
    nl = tail.rfind(b"\n")
    if nl < 0:
        return -1
    return size - len(tail) + nl + 1


def split_lines(data: bytes, room: int, limit: int) -> tuple[bytes, bytes]:
    """The longest prefix of whole lines of ``data`` that fits in ``room`` bytes, and the rest.

    With no room for even the first line, that line alone when the file is new (``room == limit``): a line longer
    than ``max_bytes`` still gets written, in a file of its own."""
    if len(data) <= room:
        return data, b""
    cut = data.rfind(b"\n", 0, room) + 1
    if cut == 0:
        if room < limit:
            return b"", data
        cut = data.index(b"\n") + 1
    return data[:cut], data[cut:]


class JsonlWriter:
    """One JSON-lines file output. ``write`` is called from one thread (the daemon's); the fsync thread shares the
    descriptor under a lock."""

    def __init__(self, spec: OutputSpec, stats: OutputStats, *, loss_marker: Callable[[int, str], Record]) -> None:
        self.spec = spec
        self.path = spec.path
        self.stats = stats
        self.loss_marker = loss_marker
        self._lock = threading.Lock()
        self._dirty = False
        self._pending_loss = 0
        self._stop = threading.Event()
        self._fd = -1
        self._size = 0
        os.makedirs(os.path.dirname(self.path) or "/", exist_ok=True)
        self._open()
        self._syncer: threading.Thread | None = None
        if spec.fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, name=f"fsync {self.path}", daemon=True)
            self._syncer.start()

    # -- opening and repair ----------------------------------------------------------------------------------------

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        size = os.fstat(self._fd).st_size
        cut = self._find_cut(size)
        if cut < size:
            os.ftruncate(self._fd, cut)
            if self.spec.fsync != "none":
                os.fsync(self._fd)
            self.stats.repaired_bytes += size - cut
            self._size = cut
            self._write_now(self.loss_marker(0, f"cut {size - cut} bytes of a torn last line at {cut} in {self.path} "
                                                "(written before a crash)").line)
        else:
            self._size = size

    def _find_cut(self, size: int) -> int:
        with open(self.path, "rb") as f:
            end = size
            while end > 0:
                start = max(0, end - TAIL_SCAN)
                f.seek(start)
                chunk = f.read(end - start)
                if end == size:
                    cut = repair_cut(size, chunk)
                else:  # the file's last newline lies before this chunk: cut after the newline found here
                    nl = chunk.rfind(b"\n")
                    cut = -1 if nl < 0 else start + nl + 1
                if cut >= 0:
                    return cut
                end = start
        return 0

    # -- writing ---------------------------------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> None:
        self.write_lines([r.line for r in records])

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """Write whole lines (each ending with a newline), in one write where rotation allows."""
        data = b"".join(lines)
        if not data:
            return
        n = len(lines)
        with self._lock:
            if self._pending_loss:
                marker = self.loss_marker(self._pending_loss, "writes to the file failed").line
                if self._write_all(marker, 0):
                    self._pending_loss = 0
            if not self._write_all(data, n):
                self._pending_loss += n
                self.stats.lost += n

    def _write_all(self, data: bytes, n: int) -> bool:
        limit = self.spec.max_bytes
        try:
            while data:
                if limit and self._size + len(data) > limit:
                    part, rest = split_lines(data, limit - self._size, limit)
                    if not part:
                        self._rotate()
                        continue
                else:
                    part, rest = data, b""
                self._write_now(part)
                data = rest
                if data:
                    self._rotate()
        except OSError as e:
            self.stats.errors += 1
            self.stats.connected = e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
            return False
        self.stats.records += n
        self.stats.connected = True
        return True

    def _write_now(self, data: bytes) -> None:
        """One write of whole lines; on a short write or error the file is cut back to where it was."""
        try:
            done = os.write(self._fd, data)
            if done != len(data):
                raise OSError(errno.ENOSPC, f"short write ({done} of {len(data)} bytes)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += done
        self.stats.bytes += done
        self._dirty = True
        if self.spec.fsync == "every":
            self._fsync()

    def _fsync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
            self.stats.fsyncs += 1

    def _rotate(self) -> None:
        if self.spec.fsync != "none":
            self._fsync()
        os.close(self._fd)
        self._fd = -1
        oldest, renames = rotation_plan(self.path, self.spec.keep)
        if oldest is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(oldest)
        for src, dst in renames:
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, dst)
        self.stats.rotations += 1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = 0
        if self.spec.fsync != "none":
            dfd = os.open(os.path.dirname(self.path) or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.spec.fsync_interval):
            with self._lock:  # a descriptor of its own: the fsync must not hold up writes, nor meet a rotation's close
                if self._fd < 0 or not self._dirty:
                    continue
                fd = os.dup(self._fd)
                self._dirty = False
            try:
                os.fsync(fd)
                self.stats.fsyncs += 1
            except OSError:
                self.stats.errors += 1
            finally:
                os.close(fd)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._fd >= 0:
                if self.spec.fsync != "none":
                    try:
                        self._fsync()
                    except OSError:
                        self.stats.errors += 1
                os.close(self._fd)
                self._fd = -1

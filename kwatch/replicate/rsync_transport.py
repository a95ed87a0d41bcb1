"""The I/O edge of the native rsync client: drive :class:`~kwatch.protocols.rsync.client.PushSession` over a
TCP connection to ``rsync --daemon`` or over a pipe to ``rsync --server`` (ssh, or any command).

One connection per batch: :func:`push` sends a whole tree, or a list of paths, in one session.

What a batch can express (the rsync protocol has no rename or delete message of its own):

- whole tree (``paths=None``): the file list is the full tree; with ``delete=True`` the receiver removes anything
  not in the list (``--delete``).
- paths: each path is sent with its parent directories as plain non-content directories (their other content is
  left alone); a path that is a directory is sent with its whole subtree, and ``delete=True`` also prunes inside
  it; a path that no longer exists is sent as a mode-0 entry with ``--delete-missing-args``, which deletes it
  (with ``fuzzy=True``: its parent goes as a content directory listing its children, see :func:`scan_paths`).
- a rename is a delete of the old path plus a send of the new one. The new file is sent as a delta against
  nothing, unless ``fuzzy=True``: then ``--fuzzy`` lets the receiver use a same-size/same-mtime or similarly
  named file in the destination directory as the basis, and deletions are delayed (``--delete-after``) so the
  old name is still there to serve as that basis. A rename across directories cannot reuse data this way: a
  session of its own with ``subdir`` (the new name) and ``link_dest`` (the old one) lets the receiver link the
  files from its copy (see kwatch.replicate.rsync_moves).

Every mtime is compared to the nanosecond on the receiver (``-@-1``, see ``build_server_args``): directories,
files and symlinks all end with the source's mtime, also when they were created in the same second.

``bwlimit`` paces everything written to the peer (as rsync's own ``--bwlimit`` does in io.c, where it sleeps after
each write of the socket): a token bucket refilled at ``bwlimit`` bytes per second and holding at most
:data:`BURST` bytes, so a pause (waiting for the receiver's block checksums) does not save up credit for a burst.
While the bucket is empty nothing is written and no more file data is generated (the session's output stays below
:data:`OUT_HIGH_WATER`), so memory stays bounded whatever the batch.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import selectors
import shlex
import socket
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kwatch.fsutil import DirFds, open_beneath
from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError
from kwatch.protocols.rsync.client import (
    NEED_DATA,
    DeleteStats,
    FileRequested,
    Mode,
    Motd,
    Negotiated,
    PushOptions,
    PushSession,
    RemoteMessage,
    SessionDone,
    build_server_args,
)
from kwatch.protocols.rsync.codec import Msg
from kwatch.protocols.rsync.flist import FileEntry
from kwatch.replicate.scan import Entry, Exclude, Kind, entry_at, scan

DEFAULT_PORT = 873
IO_TIMEOUT = 60.0
BURST = 32 << 10  # bytes a paced connection may write at once (the bucket's size)
OUT_HIGH_WATER = 4 << 20  # stop answering file requests while this much waits to be written


@dataclass
class PushResult:
    bytes_sent: int = 0
    bytes_received: int = 0
    literal_bytes: int = 0
    matched_bytes: int = 0
    files: int = 0  # regular files whose data was sent
    errors: list[str] = field(default_factory=list)
    protocol: int = 0
    checksum: str = ""
    compat_flags: int = 0
    deleted: int = 0
    #: the names of each inode with several names that the list carried (by the source's (st_dev, st_ino))
    inodes: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)
    #: the paths of ``hold`` that the list would have carried and left out
    held: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class RsyncURL:
    scheme: str  # "rsync" or "ssh"
    host: str
    port: int
    user: str | None
    module: bytes  # daemon module ("" for ssh)
    path: bytes  # path inside the module, or the remote path for ssh


def parse_url(url: str) -> RsyncURL:
    """``rsync://[user@]host[:port]/module/path`` or ``ssh://[user@]host[:port]/path``."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("rsync", "ssh") or not u.hostname:
        raise ValueError(f"not an rsync:// or ssh:// URL: {url!r}")
    if u.hostname.startswith("-") or (u.username or "").startswith("-"):
        # ssh would read "-oProxyCommand=..." as an option; no host or user name starts with "-"
        raise ValueError(f"{url!r}: a host or user name cannot start with '-'")
    path = urllib.parse.unquote_to_bytes(u.path)
    if u.scheme == "rsync":
        parts = path.lstrip(b"/").split(b"/", 1)
        if not parts[0]:
            raise ValueError(f"rsync URL without a module: {url!r}")
        return RsyncURL("rsync", u.hostname, u.port or DEFAULT_PORT, u.username, parts[0],
                        parts[1] if len(parts) > 1 else b"")
    return RsyncURL("ssh", u.hostname, u.port or 22, u.username, b"", path)


# --- the source side: the file list from the scan (kwatch.replicate.scan walks the tree) ----------------------


_O_LIST_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_S_IFMT = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}
#: a directory or entry gone (or swapped for a symlink) since it was listed: left out, the next batch has it
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _file_entry(name: bytes, e: Entry, top_dir: bool = False, content_dir: bool = True) -> FileEntry | None:
    """The file-list entry of a scanned one; None for what is not replicated (devices, fifos, sockets)."""
    fmt = _S_IFMT.get(e.kind)
    if fmt is None:
        return None
    target = e.target
    inode = (e.dev, e.ino) if fmt == stat.S_IFREG and e.nlink > 1 else None
    return FileEntry(name, fmt | e.mode, len(target) if target is not None else e.size, e.mtime_ns // 10**9,
                     e.mtime_ns % 10**9, target, top_dir, content_dir, inode)


def _below(root: bytes, rel: bytes, exclude: Exclude | None, shallow: Collection[bytes] = (),
           recursive: bool = True) -> list[FileEntry]:
    """The entries below the directory ``root/rel`` (see :func:`~kwatch.replicate.scan.scan`: not following
    symlinks, ``exclude`` leaving out an entry and its subtree). A directory among ``shallow``, and without
    ``recursive`` every subdirectory, is a plain non-content dir (the receiver deletes nothing inside it), not
    descended. What vanished meanwhile is left out; any other error raises: a directory sent as content without
    its children would have them deleted on the receiver."""
    sub = b"" if rel == b"." else rel
    try:
        man = scan(root, exclude if exclude is not None else (), sub=sub, prune=shallow, recursive=recursive)
    except OSError as exc:
        if exc.errno not in _VANISHED:
            raise
        return []
    for err in man.errors:
        if err.errno not in _VANISHED:
            raise OSError(err.errno or errno.EIO, err.reason, os.path.join(sub, err.path))
    prefix = sub + b"/" if sub else b""
    out = []
    for name, se in man.entries.items():
        full = prefix + name
        content = recursive and not (se.kind is Kind.DIR and full in shallow)
        fe = _file_entry(full, se, content_dir=content)
        if fe is not None:
            out.append(fe)
    return out


def scan_tree(root: bytes, rel: bytes = b".", top: bool = True, exclude: Exclude | None = None,
              shallow: Collection[bytes] = ()) -> list[FileEntry]:
    """All entries under ``root/rel`` (``rel`` itself included), without following symlinks; an entry ``exclude``
    matches is left out with everything below it. A directory among ``shallow`` below ``rel`` is listed as a plain
    non-content dir (the receiver deletes nothing inside it) and not descended."""
    e = _file_entry(rel, entry_at(root, rel), top_dir=top)
    if e is None:
        return []
    return [e, *_below(root, rel, exclude, shallow)] if e.is_dir else [e]


def _list_dir(root: bytes, rel: bytes, exclude: Exclude | None) -> list[FileEntry]:
    """``rel`` as a content directory with its direct children (subdirectories as non-content dirs): the receiver
    deletes whatever else is in it and leaves the subdirectories' own content alone."""
    se = entry_at(root, rel)
    if se.kind is not Kind.DIR:
        return []
    top = _file_entry(rel, se, top_dir=rel == b".")
    assert top is not None
    return [top, *_below(root, rel, exclude, recursive=False)]


def scan_paths(root: bytes, paths: Iterable[bytes], delete: bool, fuzzy: bool = False,
               exclude: Exclude | None = None, shallow: Collection[bytes] = ()) -> tuple[list[FileEntry], bool]:
    """Entries for a batch of changed paths; returns (entries, whether mode-0 delete entries are present).

    Every existing path goes with its whole subtree and its ancestors (plain non-content dirs, so the receiver
    creates them and sets their attributes, and touch_up_dirs re-sets their mtimes at the end). A path below a
    component that is no longer a directory is replaced by that component.

    With ``delete``, a path that no longer exists is deleted at its topmost missing component. Without
    ``fuzzy`` that is a mode-0 entry (``--delete-missing-args``), which the generator deletes as soon as it
    reaches the entry in list order (generator.c recv_generator). With ``fuzzy`` that is too early: a new file
    sorted before it in the same directory may have chosen it as its fuzzy basis, the receiver process opens
    that basis only later (receiver.c recv_files), finds it gone and aborts the session on the first block
    match ("got a block match with no basis file"). So with ``fuzzy`` the missing path's existing parent is sent
    as a content directory with all its direct children, and ``--delete-after`` removes the stale names once
    every file is in place (generator.c generate_files runs do_delete_pass before the final touch_up_dirs, so
    directory mtimes still come out right) - what rsync's manual advises for ``--fuzzy`` with deletion.

    A directory among ``shallow`` goes alone, as its ancestors do (a plain non-content dir, its subtree left out):
    a tree an earlier session of the batch brought up to date gets its attributes and its ancestors' only.
    """
    by_name: dict[bytes, FileEntry] = {}
    prune: set[bytes] = set()  # fuzzy: directories to send as content dirs with their direct children
    missing = False
    # A batch of a new tree names each directory and everything in it: what a directory's scan listed, and the
    # ancestors already found to be directories, are not looked at again (in sorted order a directory comes
    # before its content).
    whole: set[bytes] = set()  # listed with everything below them
    parents: set[bytes] = set()  # found to be directories and listed
    for raw in sorted(paths):
        rel = os.path.normpath(raw).lstrip(b"/")
        if rel in (b"", b".") or rel.startswith(b"../") or rel == b"..":
            raise ValueError(f"path outside the source root: {raw!r}")
        parts = rel.split(b"/")
        for i in range(1, len(parts) + 1):
            pre = b"/".join(parts[:i])
            if pre in whole:
                break
            if i < len(parts) and pre in parents:
                continue
            try:
                se = entry_at(root, pre)
            except (FileNotFoundError, NotADirectoryError):
                if delete and pre not in by_name:
                    if fuzzy:
                        prune.add(b"/".join(parts[: i - 1]) or b".")
                    else:
                        by_name[pre] = FileEntry(name=pre, mode=0)
                        missing = True
                break
            is_dir = se.kind is Kind.DIR
            if i == len(parts) and pre in shallow and is_dir:
                fe = _file_entry(pre, se, content_dir=False)
                if fe is not None and pre not in by_name:
                    by_name[pre] = fe
                break
            if i == len(parts) or not is_dir:
                fe = _file_entry(pre, se)
                if fe is not None:
                    by_name[pre] = fe
                    for e in _below(root, pre, exclude, shallow) if is_dir else ():
                        by_name[e.name] = e
                whole.add(pre)
                break
            if pre not in by_name:
                # A plain non-content dir (not FLAG_IMPLIED_DIR, which a receiver without -R skips): created and
                # its attributes set, but nothing inside it is deleted.
                fe = _file_entry(pre, se, content_dir=False)
                if fe is not None:
                    by_name[pre] = fe
            parents.add(pre)
    _add_listings(by_name, root, prune, exclude)
    return list(by_name.values()), missing


def _add_listings(by_name: dict[bytes, FileEntry], root: bytes, dirs: Iterable[bytes],
                  exclude: Exclude | None) -> None:
    """Each of ``dirs`` (the parents of missing paths, with ``fuzzy``) as a content directory with its direct
    children, unless ``by_name`` has it with its whole subtree already; what ``by_name`` has of the children stays."""
    for d in sorted(dirs):
        old = by_name.get(d)
        if old is not None and old.is_dir and old.content_dir:
            continue  # sent with its whole subtree already
        try:
            listed = _list_dir(root, d, exclude)
        except OSError as exc:  # gone or replaced (by a symlink: ELOOP) since the lstat: the next batch has it
            if exc.errno not in _VANISHED:
                raise
            continue
        for i, e in enumerate(listed):
            if i == 0 or e.name not in by_name:
                by_name[e.name] = e


# --- the byte pump -------------------------------------------------------------------------------------------


class _Channel:
    """Non-blocking read/write over a socket or a pair of pipe fds."""

    def __init__(self, rfd: int, wfd: int, sock: socket.socket | None = None) -> None:
        self.rfd, self.wfd, self.sock = rfd, wfd, sock
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)

    def read(self) -> bytes:
        if self.sock is not None:
            return self.sock.recv(1 << 18)
        return os.read(self.rfd, 1 << 18)

    def write(self, data: memoryview) -> int:
        if self.sock is not None:
            return self.sock.send(data)
        return os.write(self.wfd, data)


class _Pacer:
    """A token bucket: ``rate`` bytes per second, at most :data:`BURST` at once; ``rate`` None: no limit."""

    def __init__(self, rate: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = float(BURST)
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self.tokens = min(float(BURST), self.tokens + (now - self.at) * self.rate)
        self.at = now

    def allowance(self) -> int:
        """Bytes that may be written now."""
        if not self.rate:
            return 1 << 62
        self._refill()
        return int(self.tokens)

    def spent(self, n: int) -> None:
        if self.rate:
            self.tokens -= n

    def delay(self, want: int) -> float:
        """Seconds until ``want`` bytes (at most a bucketful) may be written."""
        if not self.rate:
            return 0.0
        self._refill()
        return max(0.0, (min(want, BURST) - self.tokens) / self.rate)


def _append(out: bytearray, more: bytearray) -> bytearray:
    """``out`` followed by ``more``, copying only when both hold bytes (the session's buffer is ours to keep)."""
    if not out:
        return more
    out += more
    return out


#: a session's progress: (files, files in the list, bytes of their data, bytes in the list), see :class:`_Tally`
OnProgress = Callable[[int, int, int, int], None]
REPORT_EVERY = 0.05  # seconds between a session's progress reports (the live line shows one every 0.2 s)


class _Tally:
    """A session's progress by the regular files of its list: once the file at index ``ndx`` is requested and sent,
    every regular file before it in the list is done too (the daemon's generator goes through the list in order and
    requests only what differs: the others were already up to date)."""

    def __init__(self, entries: Sequence[FileEntry], report: OnProgress) -> None:
        self.report = report
        self.reported = float("-inf")
        self.files: list[int] = []  # regular files up to and including each index
        self.nbytes: list[int] = []
        nf = nb = 0
        for e in entries:
            if e.is_reg:
                nf += 1
                nb += e.size
            self.files.append(nf)
            self.nbytes.append(nb)
        report(0, nf, 0, nb)

    def sent(self, ndx: int, *, final: bool = False) -> None:
        # once per file sent: the figures go out at most every REPORT_EVERY seconds (a reconcile of 20,000 small
        # files spent 0.8 s of the client's CPU reporting each one)
        now = time.monotonic()
        if not final and now - self.reported < REPORT_EVERY:
            return
        self.reported = now
        if 0 <= ndx < len(self.files):
            self.report(self.files[ndx], self.files[-1], self.nbytes[ndx], self.nbytes[-1])

    def finish(self) -> None:
        if self.files:
            self.sent(len(self.files) - 1, final=True)


def _run(session: PushSession, ch: _Channel, root: int, result: PushResult, timeout: float,
         pacer: _Pacer | None = None, tally: _Tally | None = None) -> None:
    sel = selectors.DefaultSelector()
    files = DirFds(root)
    out = bytearray()
    eof = False
    done = False
    pacer = pacer or _Pacer(None)
    quiet_since = time.monotonic()  # the last read or write: the peer is "silent" after ``timeout`` without one
    try:
        while True:
            # Drain events first (not while much waits to be written: a paced or slow peer bounds the memory). What
            # the session writes is taken once the events are drained, not after each one (a first sync of small
            # files has one event per file).
            while not done and len(out) + session.pending_output() < OUT_HIGH_WATER:
                ev = session.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, FileRequested):
                    _send_one(session, ev, files, result)
                    if tally is not None:
                        tally.sent(ev.ndx)
                elif isinstance(ev, RemoteMessage):
                    if ev.code in (Msg.ERROR, Msg.ERROR_XFER, Msg.ERROR_SOCKET, Msg.ERROR_UTF8):
                        result.errors.append(ev.text.decode(errors="replace").strip())
                    elif ev.code is Msg.DELETED:
                        result.deleted += 1
                elif isinstance(ev, Negotiated):
                    result.protocol, result.checksum, result.compat_flags = ev.protocol, ev.checksum, ev.compat_flags
                elif isinstance(ev, DeleteStats):
                    result.deleted = max(result.deleted, ev.files + ev.dirs + ev.symlinks)
                elif isinstance(ev, SessionDone):
                    done = True
                elif isinstance(ev, Motd):
                    pass
            out = _append(out, session.data_to_send())
            if done and not out:
                return
            if eof:
                if done:
                    return
                session.receive_data(b"")
                session.next_event()  # raises the early-close error
                raise RemoteProtocolError("the rsync peer closed the connection early")
            allowed = pacer.allowance() if out else 0
            # a paced connection writes a bucketful at a time, or waits for one (or for the rest of ``out``)
            writing = bool(out) and allowed >= min(len(out), BURST)
            wait = timeout
            if out and not writing:
                wait = min(timeout, max(0.001, pacer.delay(len(out))))
            sel.register(ch.rfd, selectors.EVENT_READ, "r")
            if writing:
                if ch.wfd == ch.rfd:
                    sel.modify(ch.rfd, selectors.EVENT_READ | selectors.EVENT_WRITE, "rw")
                else:
                    sel.register(ch.wfd, selectors.EVENT_WRITE, "w")
            ready = sel.select(wait)
            sel.unregister(ch.rfd)
            if writing and ch.wfd != ch.rfd:
                sel.unregister(ch.wfd)
            if not ready:
                if time.monotonic() - quiet_since < timeout:
                    continue  # a pacing wait ended
                raise TimeoutError(f"rsync peer silent for {timeout:.0f}s ({session.state.value})")
            quiet_since = time.monotonic()
            for key, mask in ready:
                if mask & selectors.EVENT_WRITE and out:
                    try:
                        n = ch.write(memoryview(out)[:allowed])
                    except (BrokenPipeError, ConnectionResetError):
                        n = 0
                        eof = True
                    del out[:n]
                    pacer.spent(n)
                    result.bytes_sent += n
                if mask & selectors.EVENT_READ and key.fd == ch.rfd:
                    try:
                        data = ch.read()
                    except ConnectionResetError:
                        data = b""
                    except BlockingIOError:
                        continue
                    if not data:
                        eof = True
                    else:
                        result.bytes_received += len(data)
                        session.receive_data(data)
    finally:
        sel.close()
        files.close()


def _send_one(session: PushSession, ev: FileRequested, files: DirFds, result: PushResult) -> None:
    try:
        # beneath the root (an fd held for the session) with no symlink in the path (a directory swapped for one
        # since the file list was built is refused, not followed), a regular file only, never blocking on a FIFO;
        # each directory opened once for the files the list has in a row in it (see kwatch.fsutil.DirFds)
        fd, st = files.open_regular(ev.entry.name)
    except OSError as exc:
        result.errors.append(f"{ev.entry.name!r}: {exc.strerror}")
        session.skip_file(ev.ndx)
        return
    try:
        if st.st_size <= SMALL_FILE:
            session.send_file(ev.ndx, _read_small(fd, st.st_size))
        elif not ev.sums.count:
            # nothing to match (the receiver has no copy): read in pieces straight into the output, no snapshot
            # first (pread cannot fault like a mapping when the file shrinks: it just returns less)
            session.send_literal(ev.ndx, _pieces(fd, st.st_size))
        else:
            with _snapshot(fd, st.st_size) as data:
                session.send_file(ev.ndx, data)
    finally:
        os.close(fd)
    result.files += 1


PIECE = 1 << 20


def _pieces(fd: int, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of the file in pieces of :data:`PIECE` (fewer if it shrank meanwhile: sent as read,
    as rsync does; the file checksum covers it and the next event brings the rest)."""
    got = 0
    while got < size:
        part = os.pread(fd, min(PIECE, size - got), got)
        if not part:
            return
        yield part
        got += len(part)


def _read_small(fd: int, size: int) -> bytes:
    """A small file's content, read into memory (see :func:`_snapshot`); usually one pread."""
    data = os.pread(fd, size, 0)
    if len(data) < size and data:
        parts, got = [data], len(data)
        while got < size:
            part = os.pread(fd, size - got, got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
    return data


SMALL_FILE = 1 << 20


@contextlib.contextmanager
def _snapshot(fd: int, size: int) -> Iterator[bytes | memoryview]:
    """The file's content as the sender reads it, immune to the file changing meanwhile.

    A mapping of the source file itself is not: its owner can truncate it while the matcher reads the mapping and
    the daemon dies of SIGBUS. Small files are read into memory; larger ones are copied in the kernel (sendfile)
    into a memfd only this process holds, which is mapped instead. A file that shrank is sent as it was read (the
    file checksum covers it; the next event brings the rest), as rsync does.
    """
    if size <= SMALL_FILE:
        yield _read_small(fd, size)
        return
    mfd = os.memfd_create("kwatch-send", os.MFD_CLOEXEC)
    try:
        got = 0
        while got < size:
            n = os.sendfile(mfd, fd, got, size - got)
            if n == 0:
                break
            got += n
        if got == 0:
            yield b""
            return
        with mmap.mmap(mfd, got, prot=mmap.PROT_READ) as m:
            mv = memoryview(m)
            try:
                yield mv
            finally:
                mv.release()
    finally:
        os.close(mfd)


def _read_password(password: str | bytes | None, password_file: str | None) -> bytes | None:
    if password is not None:
        return password.encode() if isinstance(password, str) else password
    if password_file is not None:
        with open(password_file, "rb") as f:
            return f.readline().rstrip(b"\r\n")
    env = os.environb.get(b"RSYNC_PASSWORD")
    return env


def _shell_argv(target: RsyncURL, opts: PushOptions, dest: bytes, rsh: Sequence[str] | None, rsh_quote: bool,
                remote_rsync: str) -> list[str]:
    """The command that starts ``rsync --server`` for ``opts`` at ``dest`` (see :func:`push`'s ``rsh``)."""
    remote = [remote_rsync, *(a.decode() for a in build_server_args(opts)), os.fsdecode(dest or b".")]
    if rsh is None:
        who = f"{target.user}@{target.host}" if target.user else target.host
        return ["ssh", "-p", str(target.port), "--", who, shlex.join(remote)]
    if rsh_quote:  # ``rsh`` is an ssh command ending with the host: the remote shell gets one quoted string
        return [*rsh, shlex.join(remote)]
    return [*rsh, *remote]


def _run_over_command(argv: list[str], session: PushSession, root: int, result: PushResult, timeout: float,
                      pacer: _Pacer, tally: _Tally | None = None) -> None:
    """Run ``session`` over the pipes of ``argv`` (ssh running ``rsync --server``, or any command)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        _run(session, _Channel(proc.stdout.fileno(), proc.stdin.fileno()), root, result, timeout, pacer, tally)
    except RemoteProtocolError as exc:
        # the exit status tells a missing remote rsync (127) or an ssh failure (255) from a protocol problem
        try:
            status = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = None
        err = proc.stderr.read().decode(errors="replace").strip()
        raise RemoteProtocolError(f"{exc}; exit status {status}; remote stderr: {err}") from None
    finally:
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        proc.stderr.close()


def _open_base(root: bytes, sub: bytes) -> tuple[int, bytes]:
    """An fd of the session's directory (``root``, or its subdirectory ``sub``) and a path that names it."""
    if not sub:
        return os.open(root, _O_LIST_DIR & ~os.O_NOFOLLOW), root  # the operator may name the root by a symlink
    # the subdirectory pinned by an fd opened with no symlink in its path: a directory swapped for a symlink since
    # the batch was planned is refused (ELOOP/ENOTDIR), not followed out of the tree
    fd = open_beneath(root, sub, _O_LIST_DIR)
    return fd, f"/proc/self/fd/{fd}".encode()


def _file_list(base: bytes, prefix: bytes, paths: Sequence[bytes] | None, delete: bool, fuzzy: bool,
               exclude: Exclude | None, shallow: Collection[bytes], hold: Collection[bytes],
               scanned: list[FileEntry] | None = None) -> tuple[list[FileEntry], bool, list[bytes]]:
    """:func:`push`'s file list of ``base`` (the session's directory, ``prefix`` its path under the source root, to
    which ``paths``, ``shallow``, ``hold`` and the ``exclude`` test's paths are relative): (entries, whether
    mode-0 delete entries are present, the names of ``hold`` left out). ``scanned``: the list made already."""

    def local(names: Iterable[bytes]) -> set[bytes]:
        return {n[len(prefix):] for n in names if n.startswith(prefix)} if prefix else set(names)

    sub_exclude = exclude
    if exclude is not None and prefix:
        def sub_exclude(name: bytes, rel: bytes) -> bool:
            return exclude(name, prefix + rel)
    if scanned is not None:
        entries = scanned
        missing = any(e.mode == 0 for e in entries)
    elif paths is None:
        entries = scan_tree(base, exclude=sub_exclude)
        missing = False
    else:
        entries, missing = scan_paths(base, local(paths), delete, fuzzy, sub_exclude, local(shallow))
        if prefix and not any(e.name == b"." for e in entries):
            dot = _file_entry(b".", entry_at(base, b"."), content_dir=False)
            if dot is not None:
                entries.append(dot)
    held: list[bytes] = []
    if hold:
        sub_hold = local(hold)
        held = [e.name for e in entries if e.name in sub_hold]
        if held:
            entries = [e for e in entries if e.name not in sub_hold]
    return entries, missing, held


def push(
    src_root: bytes,
    url: str,
    paths: Sequence[bytes] | None = None,
    delete: bool = False,
    password: str | bytes | None = None,
    *,
    password_file: str | None = None,
    protocol: int = 31,
    fuzzy: bool = False,
    negotiate: bool = True,
    compress: bool = False,
    rsh: Sequence[str] | None = None,
    rsh_quote: bool = False,
    remote_path: bytes | None = None,
    remote_rsync: str = "rsync",
    timeout: float = IO_TIMEOUT,
    bwlimit: int | None = None,
    hard_links: bool = False,
    hold: Collection[bytes] = (),
    exclude: Exclude | None = None,
    subdir: bytes = b"",
    link_dest: Sequence[bytes] = (),
    fuzzy_alt: bool = False,
    shallow: Collection[bytes] = (),
    scanned: list[FileEntry] | None = None,
    on_progress: OnProgress | None = None,
    connect: Callable[[], socket.socket] | None = None,
    expect: tuple[int, int] | None = None,
) -> PushResult:
    """Push ``src_root`` (or just ``paths`` under it) to ``url`` in one rsync session.

    ``rsync://`` connects to a daemon; ``ssh://`` runs ``rsync --server`` through ``rsh`` (default ``ssh``;
    any argv prefix, e.g. ``["sh", "-c"]``-style wrappers are up to the caller). Raises
    :class:`~kwatch.protocols.errors.RemoteProtocolError` for an unknown module, failed auth, a read-only module,
    a protocol mismatch or a peer that closes early; per-file problems land in ``PushResult.errors``.
    ``bwlimit`` (bytes per second) paces everything written to the peer. With ``hard_links`` (``-H``, protocol >=
    30) the names of one inode in the list are linked on the receiver, its data sent at most once.
    ``hold``: paths (files open for writing) the list leaves out, whatever the receiver has there staying as it
    is (a protect rule keeps ``--delete`` from removing it); the ones the list would have carried are in
    ``PushResult.held``. ``rsh_quote``: ``rsh`` hands the remote command to a shell (ssh), so it is passed as one
    quoted word; ``remote_path`` replaces the URL's path (a path relative to the remote home). ``exclude`` (name,
    relative path) leaves matching entries and their subtrees out of the file list.

    ``subdir`` (a directory under ``src_root``): the session is about that directory only, sent to the same place
    under the destination (created with its missing parents, ``--mkpath``); ``paths``, ``hold``, ``shallow`` and
    the names in the result are still relative to ``src_root``, and with ``paths`` the directory itself goes as a
    plain non-content dir. ``link_dest``: ``--link-dest`` dirs, relative to the session's destination (see
    :class:`~kwatch.protocols.rsync.client.PushOptions`); ``fuzzy_alt``: the fuzzy search looks in them too.
    ``shallow``: directories sent without their subtree (see :func:`scan_paths`). ``scanned``: the list
    :func:`scan_paths` made of ``paths`` already (or a part of it), sent as it is (no ``subdir``).
    ``on_progress(files, files_total, bytes, bytes_total)``: called as the session goes through its list (see
    :class:`_Tally`), and with the totals once it has ended. ``connect``: makes the connection to an ``rsync://``
    daemon (kwatch.replicate.rsync_conns: one opened ahead), instead of connecting when the list is made.
    ``expect``: (protocol, compat flags) of an earlier session with the daemon (``PushResult``): the file list goes
    with the greeting (see :class:`~kwatch.protocols.rsync.client.PushOptions`).
    """
    root = os.fsencode(src_root)
    sub = subdir.strip(b"/")
    with contextlib.ExitStack() as stack:
        base_fd, base = _open_base(root, sub)
        stack.callback(os.close, base_fd)
        target = parse_url(url)
        prefix = sub + b"/" if sub else b""
        dest = remote_path if remote_path is not None else target.path
        if sub:
            dest = dest.rstrip(b"/") + b"/" + sub if dest else sub

        entries, missing, held = _file_list(base, prefix, paths, delete, fuzzy, exclude, shallow, hold, scanned)
        opts = PushOptions(
            dest=dest,
            delete=delete,
            delete_missing=missing,
            fuzzy=fuzzy,
            fuzzy_alt=fuzzy_alt,
            link_dest=tuple(link_dest),
            mkpath=bool(sub),
            protocol=protocol,
            negotiate=negotiate,
            compress=compress,
            hard_links=hard_links,
            user=(target.user or os.environ.get("USER") or "nobody").encode(),
            password=_read_password(password, password_file) if target.scheme == "rsync" else None,
            protect=tuple(held),
            expect=expect if target.scheme == "rsync" else None,
        )
        result = PushResult(held=[prefix + h for h in held])
        for e in entries:
            if e.inode is not None:
                result.inodes.setdefault(e.inode, []).append(prefix + e.name)
        if target.scheme == "rsync":
            session = PushSession(entries, opts, Mode.DAEMON, target.module)
            tally = _Tally(session.entries, on_progress) if on_progress is not None else None
            sock = connect() if connect is not None else socket.create_connection((target.host, target.port),
                                                                                   timeout=timeout)
            with sock:
                _run(session, _Channel(sock.fileno(), sock.fileno(), sock), base_fd, result, timeout, _Pacer(bwlimit),
                     tally)
        else:
            session = PushSession(entries, opts, Mode.SHELL)
            tally = _Tally(session.entries, on_progress) if on_progress is not None else None
            argv = _shell_argv(target, opts, dest, rsh, rsh_quote, remote_rsync)
            _run_over_command(argv, session, base_fd, result, timeout, _Pacer(bwlimit), tally)
        if tally is not None:
            tally.finish()
        result.literal_bytes = session.counters.literal_bytes
        result.matched_bytes = session.counters.matched_bytes
        if session.counters.remote_errors and not result.errors:
            result.errors.extend(session.counters.remote_errors)
        return result


__all__ = ["LocalProtocolError", "PushResult", "RemoteProtocolError", "RsyncURL", "parse_url", "push"]

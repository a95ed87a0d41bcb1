"""``kwatch agent``: the mirror end of the agent protocol, applying what a sender streams to a :class:`Receiver`.

It reads frames from a byte stream (stdin when started by ssh or as a local pipe), drives an
:class:`AgentConnection` in the receiver role, and turns each operation into a Receiver call. Per-path failures are
collected and reported in the next :class:`Ack`, never fatal; a peer that breaks the protocol gets an ``Error`` frame
and the agent exits non-zero. Deltas are applied as they stream in (basis blocks copied, literals written into the
put's temporary), so memory stays bounded whatever the file size.

The source tree has precedence: a put, symlink or hard link that finds a directory in the way, or a mkdir that finds
a file, removes the obstacle first (rsync's ``--force``); the sender only asks for that when its source says so.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import xxhash

from kwatch.events import display_path
from kwatch.fsutil import grow_pipe
from kwatch.mirror.receiver import PutHandle, Receiver, ReceiverError
from kwatch.protocols import agent as ap
from kwatch.protocols.errors import ProtocolError, RemoteProtocolError
from kwatch.replicate.preload import preload_delta
from kwatch.replicate.scan import Entry as ScanEntry
from kwatch.replicate.scan import Kind, Manifest, scan

if TYPE_CHECKING:
    # imported where a signature or a delta is first needed: it brings numpy (about 0.1 s of every agent's start,
    # a first sync into an empty mirror needs none of it)
    from kwatch.replicate.delta import Patcher

#: Replies waiting to be written above which the agent stops taking frames (and so stops reading): one request
#: can ask for a lot (a ManifestRequest of the root is the whole tree), and a stream of them must not queue up.
OUT_HIGH = 4 << 20
MANIFEST_CHUNK = 2000  # entries per ManifestEntries frame: well under the frame cap even with long names
SIG_CHUNK = 8192  # blocks per Signature frame (8192 * 20 bytes = 160 KiB)

_KIND = {Kind.FILE: ap.EntryType.FILE, Kind.DIR: ap.EntryType.DIR, Kind.SYMLINK: ap.EntryType.SYMLINK,
         Kind.OTHER: ap.EntryType.OTHER}


@dataclass
class _Put:
    """A put or delta being received."""

    path: bytes
    handle: PutHandle | None  # None once it failed: later chunks are dropped
    hasher: xxhash.xxh3_128
    basis: BinaryIO | None = None
    patcher: Patcher | None = None  # a delta's
    size: int = 0


@dataclass
class AgentServer:
    """Applies one connection's operations to ``receiver``. Feed it bytes; it returns bytes to send back."""

    receiver: Receiver
    conn: ap.AgentConnection = field(default_factory=lambda: ap.AgentConnection(ap.Role.RECEIVER))
    errors: list[ap.PathError] = field(default_factory=list)
    #: the paths of ``errors``: a hard link to one of them in the same batch is refused (see _hardlink)
    _failed: set[bytes] = field(default_factory=set)
    closed: bool = False
    _put: _Put | None = None
    _sigs: dict[int, int] = field(default_factory=dict)  # sig id -> block size we answered with
    _out: bytearray = field(default_factory=bytearray)
    _backlog: bool = False

    def start(self) -> bytes:
        self.receiver.cleanup_temps()  # leftovers of a crash: never visible under a final name, now gone too
        return self.conn.send(self.conn.hello())

    def feed(self, data: bytes) -> bytes:
        """Process bytes from the sender (``b""`` at EOF); return what to write back.

        At most about :data:`OUT_HIGH` bytes of replies are made per call (plus one request's): frames left then
        stay buffered and :attr:`backlog` is True; call :meth:`pump` after writing the reply, and read nothing more
        until :attr:`backlog` is False, so a sender that does not read its replies stops being served.
        """
        self.conn.receive_data(data)
        return self.pump()

    @property
    def backlog(self) -> bool:
        """Whether frames already received wait for :meth:`pump` (the last call stopped at the output bound)."""
        return self._backlog

    def pump(self) -> bytes:
        """Process frames already received, until more input is needed or OUT_HIGH bytes of replies are made."""
        self._backlog = False
        while True:
            if len(self._out) >= OUT_HIGH:
                self._backlog = True
                break
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError as e:
                self._emit(ap.error_for(e))
                self.closed = True
                raise
            if isinstance(ev, ap.NeedData):
                break
            if isinstance(ev, ap.ConnectionClosed):
                self.closed = True
                break
            self._handle(ev)
        out = bytes(self._out)
        self._out.clear()
        return out

    def _emit(self, msg: ap.Message) -> None:
        self._out += self.conn.send(msg)

    def _fail(self, path: bytes, e: BaseException) -> None:
        code = "EIO"
        if isinstance(e, (ReceiverError, OSError)) and getattr(e, "errno", None):
            code = errno_mod.errorcode.get(e.errno or 0, "EIO")
        self._error(ap.PathError(path, code, str(e)))

    def _error(self, err: ap.PathError) -> None:
        self.errors.append(err)
        self._failed.add(err.relpath)

    # ---- dispatch ------------------------------------------------------------------------------------------------

    def _handle(self, m: ap.Message) -> None:
        r = self.receiver
        if isinstance(m, ap.Hello):
            # the sender's Hello says whether it closes after one reconcile: only a link that stays gets the delta
            # engine imported ahead of its first delta
            if "oneshot" not in self.conn.capabilities:
                preload_delta()
            return
        if isinstance(m, ap.ManifestRequest):
            self._manifest(m)
        elif isinstance(m, ap.SigRequest):
            self._signature(m)
        elif isinstance(m, ap.PutFile):
            self._put_file(m)
        elif isinstance(m, ap.PutFiles):
            self._put_files(m)
        elif isinstance(m, ap.PutBegin):
            self._begin(m.relpath, m.mode, None)
        elif isinstance(m, ap.DeltaBegin):
            self._begin(m.relpath, m.mode, m.sig_id)
        elif isinstance(m, ap.PutChunk):
            self._write(m.data)
        elif isinstance(m, ap.DeltaChunk):
            self._delta(m.ops)
        elif isinstance(m, (ap.PutEnd, ap.DeltaEnd)):
            self._end(m.digest)
        elif isinstance(m, ap.Mkdir):
            self._forced(m.relpath, lambda: r.mkdir(m.relpath, m.mode))
        elif isinstance(m, ap.Symlink):
            self._forced(m.relpath, lambda: r.symlink(m.relpath, m.target))
        elif isinstance(m, ap.Hardlink):
            self._hardlink(m)
        elif isinstance(m, ap.Rename):
            self._call(m.src, lambda: r.rename(m.src, m.dst))
        elif isinstance(m, ap.Delete):
            self._call(m.relpath, lambda: self._delete(m.relpath))
        elif isinstance(m, ap.SetAttr):
            self._call(m.relpath, lambda: r.setattr(m.relpath, mode=m.mode, mtime_ns=m.mtime_ns, uid=m.uid,
                                                    gid=m.gid))
        elif isinstance(m, ap.Commit):
            self._call(b"", r.commit)
            errors, self.errors = tuple(self.errors), []
            self._failed.clear()
            self._emit(ap.Ack(m.seq, errors))
        elif isinstance(m, ap.Error):
            raise RemoteProtocolError(f"sender reported {m.code}: {m.message}")

    def _hardlink(self, m: ap.Hardlink) -> None:
        """Link ``m.relpath`` to ``m.target``, unless something failed at ``m.target`` in this batch.

        A sender links the other names of a file to the name it has just put; when that put failed here (a full
        disk, a spoiled digest) the name still holds its older data, which may well have the same size and mtime
        (an in-place rewrite within one clock tick), so the size and mtime check alone would let the link through
        to data the new name never had. Refused with ESTALE, as a failed check: the sender sends the data instead.
        """
        if m.target in self._failed:
            self._error(ap.PathError(m.relpath, errno_mod.errorcode[errno_mod.ESTALE],
                                     f"not linked: {display_path(m.target)} failed in this batch"))
            return
        expect = None if m.size is None or m.mtime_ns is None else (m.size, m.mtime_ns)
        self._forced(m.relpath, lambda: self.receiver.hardlink(m.relpath, m.target, expect=expect))

    def _call(self, path: bytes, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (ReceiverError, OSError) as e:
            self._fail(path, e)

    def _delete(self, path: bytes) -> None:
        """Delete ``path``; already done when an ancestor is missing or is no longer a directory.

        A batch replaces a tree by a file (``rm -rf d; echo > d``) with a put of ``d`` (which removes the directory
        in the way) before the deletes of what was under it, so those find ``d`` to be a file: nothing can be
        there, which is what the delete asked for. A symlink in the path (ELOOP) is still refused.
        """
        try:
            self.receiver.delete(path)
        except ReceiverError as e:
            if e.errno not in (errno_mod.ENOENT, errno_mod.ENOTDIR):
                raise

    def _forced(self, path: bytes, fn: Callable[[], object]) -> None:
        """Run ``fn``; if an entry of the other type is in the way, remove it and run ``fn`` again."""
        try:
            fn()
            return
        except ReceiverError as e:
            if e.errno not in (errno_mod.EISDIR, errno_mod.EEXIST, errno_mod.ENOTDIR):
                self._fail(path, e)
                return
        try:
            self.receiver.delete(path)
            fn()
        except (ReceiverError, OSError) as e:
            self._fail(path, e)

    # ---- manifests and signatures ---------------------------------------------------------------------------------

    def _manifest(self, m: ap.ManifestRequest) -> None:
        root = self.receiver.root
        prefix = b"" if not m.relpath else m.relpath + b"/"
        entries: list[ap.Entry] = []
        try:
            # the scan opens relpath and everything below it beneath the root, following no symlink
            man = scan(root, checksum=m.hashes, sub=m.relpath or b"")
        except OSError:
            man = None
        inodes = _inode_ids(man) if man is not None and "inodes" in self.conn.capabilities else {}
        if man is not None:
            for rel, e in man.entries.items():
                ident = inodes.get((e.dev, e.ino)) if e.nlink > 1 and e.kind is Kind.FILE else None
                if ident is None:
                    entries.append(ap.Entry(_KIND[e.kind], prefix + rel, e.size, e.mtime_ns, e.mode, e.uid, e.gid,
                                            e.target, e.digest))
                else:  # the first name's attributes for every name: one inode, one answer (see _inode_ids)
                    link, first, nlink = ident
                    entries.append(ap.Entry(_KIND[e.kind], prefix + rel, first.size, first.mtime_ns, first.mode,
                                            first.uid, first.gid, None, first.digest, nlink, link))
                if len(entries) >= MANIFEST_CHUNK:
                    self._emit(ap.ManifestEntries(m.id, tuple(entries), False))
                    entries = []
        self._emit(ap.ManifestEntries(m.id, tuple(entries), True))

    def _signature(self, m: ap.SigRequest) -> None:
        from kwatch.replicate.delta import BLOCK_LIMIT, block_size_for, signature

        f = self._open_basis(m.relpath)
        if f is None:
            self._emit(ap.Signature(m.id, m.block_size or 1024, 0, 0, b"", b"", True))
            self._sigs[m.id] = m.block_size or 1024
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            # never more than MAX_SIG_BLOCKS blocks, whatever was asked: a huge file gets larger blocks
            bs = max(m.block_size or block_size_for(size), -(-size // ap.MAX_SIG_BLOCKS), 1)
            sig = signature(f, min(bs, BLOCK_LIMIT))
        self._sigs[m.id] = sig.block_size
        weak, strong = sig.weak_bytes(), sig.strong
        n = sig.count
        if n == 0:
            self._emit(ap.Signature(m.id, sig.block_size, sig.file_size, sig.seed, b"", b"", True))
            return
        for i in range(0, n, SIG_CHUNK):
            j = min(n, i + SIG_CHUNK)
            self._emit(ap.Signature(m.id, sig.block_size, sig.file_size, sig.seed, weak[4 * i : 4 * j],
                                    strong[16 * i : 16 * j], j == n))

    def _open_basis(self, rel: bytes) -> BinaryIO | None:
        try:
            fd = self.receiver.open_read(rel)
        except (ReceiverError, OSError):
            return None
        if fd is None:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    # ---- puts and deltas -----------------------------------------------------------------------------------------

    def _digest_ok(self, path: bytes, data: bytes | None, want: bytes | None, got: bytes | None = None) -> bool:
        """Whether content (``data``, or its digest ``got``) is what the sender hashed; a mismatch is a path error
        and nothing is put."""
        if want is None or (got if got is not None else xxhash.xxh3_128_digest(data or b"")) == want:
            return True
        self._error(ap.PathError(path, "digest-mismatch",
                                 "content does not match the sender's digest; nothing was put"))
        return False

    def _put_file(self, m: ap.PutFile) -> None:
        if not self._digest_ok(m.relpath, m.data, m.digest):
            return
        r = self.receiver

        def put() -> None:
            r.put(m.relpath, (m.data,), mode=m.mode, mtime_ns=m.mtime_ns)

        self._forced(m.relpath, put)

    def _put_files(self, m: ap.PutFiles) -> None:
        good: list[tuple[bytes, int, int | None, bytes]] = []
        for f in m.files:
            if self._digest_ok(f.relpath, f.data, f.digest):
                good.append((f.relpath, f.mode, f.mtime_ns, f.data))
        # the source has a file at each of these paths: a directory in the way goes (as _forced does for PutFile)
        for e in self.receiver.put_files(good, replace_dirs=True):
            self._fail(e.path, e)

    def _begin(self, path: bytes, mode: int, sig_id: int | None) -> None:
        self._abort_put()
        put = _Put(path, None, xxhash.xxh3_128())
        self._put = put
        if sig_id is not None:
            from kwatch.replicate.delta import Patcher

            put.basis = self._open_basis(path)
            # no basis (gone, or not a regular file): an empty one, on which every copy fails
            put.patcher = Patcher(put.basis, self._sigs.pop(sig_id, 0))
        try:
            put.handle = self.receiver.put_begin(path, mode=mode)
        except ReceiverError as e:
            if e.errno != errno_mod.EISDIR:
                self._fail(path, e)
                return
            try:  # a directory where the source now has a file
                self.receiver.delete(path)
                put.handle = self.receiver.put_begin(path, mode=mode)
            except (ReceiverError, OSError) as e2:
                self._fail(path, e2)

    def _write(self, data: bytes | memoryview) -> None:
        put = self._put
        if put is None or put.handle is None:
            return
        put.hasher.update(data)
        put.size += len(data)
        try:
            self.receiver.put_write(put.handle, data)
        except ReceiverError as e:  # the receiver aborted the put (ENOSPC...): nothing half-written remains
            put.handle = None
            self._fail(put.path, e)

    def _delta(self, ops: tuple[ap.DeltaOp, ...]) -> None:
        from kwatch.replicate.delta import PatchError

        put = self._put
        if put is None or put.handle is None or put.patcher is None:
            return
        try:
            for piece in put.patcher.apply(ops):
                self._write(piece)
                if put.handle is None:
                    return
        except PatchError as e:
            self._fail(put.path, ReceiverError(put.path, str(e)))
            self._abort_put(keep_error=True)

    def _end(self, digest: bytes | None) -> None:
        put, self._put = self._put, None
        if put is None:
            return
        if put.basis is not None:
            put.basis.close()
        if put.handle is None:
            return
        if not self._digest_ok(put.path, None, digest, put.hasher.digest()):
            self.receiver.put_abort(put.handle)
            return
        try:
            self.receiver.put_end(put.handle)
        except ReceiverError as e:
            self._fail(put.path, e)

    def _abort_put(self, keep_error: bool = False) -> None:
        put = self._put
        if put is None:
            return
        if put.handle is not None:
            self.receiver.put_abort(put.handle)
            put.handle = None
        if put.basis is not None:
            put.basis.close()
            put.basis = None
        if not keep_error:
            self._put = None

    def close(self) -> None:
        self._abort_put()
        self.receiver.close()


def _inode_ids(man: Manifest) -> dict[tuple[int, int], tuple[int, ScanEntry, int]]:
    """Per inode with several names in ``man``: (a link id, the entry of its first name, its nlink).

    A scan stats each name separately, so a file changed or linked meanwhile (by someone other than this agent,
    which does nothing else while it scans) could show two names of one inode with different attributes or more
    names than nlink; the sender would rightly call that a protocol error. One set of attributes per inode, and
    nlink at least the names listed, make the manifest consistent; the next reconcile sees any such change.
    """
    first: dict[tuple[int, int], ScanEntry] = {}
    count: dict[tuple[int, int], int] = {}
    for e in man.entries.values():
        if e.kind is Kind.FILE and e.nlink > 1:
            key = (e.dev, e.ino)
            first.setdefault(key, e)
            count[key] = count.get(key, 0) + 1
    return {key: (i, e, max(e.nlink, count[key])) for i, (key, e) in enumerate(first.items(), 1)}


def serve(root: bytes, inp: BinaryIO, out: BinaryIO, *, fsync: str = "none", preserve_owner: bool = False) -> int:
    """Run the agent on a byte stream until the sender closes it. Returns the process exit code."""
    receiver = Receiver(root, fsync=fsync, preserve_owner=preserve_owner)  # type: ignore[arg-type]
    server = AgentServer(receiver)
    rfd, wfd = inp.fileno(), out.fileno()
    for fd in (rfd, wfd):  # a local pipe, or sshd's pipes to us: fewer wake-ups with more room (see grow_pipe)
        grow_pipe(fd)
    try:
        _write_all(wfd, server.start())
        while not server.closed:
            # backpressure: with replies pending above OUT_HIGH, write them (blocking while the sender does not
            # read) before taking any more input
            data = None if server.backlog else os.read(rfd, 1 << 20)
            try:
                reply = server.pump() if data is None else server.feed(data)
            except ProtocolError as e:
                with contextlib.suppress(OSError):
                    _write_all(wfd, bytes(server._out))
                print(f"kwatch agent: {e}", file=sys.stderr)
                return 2
            if reply:
                _write_all(wfd, reply)
    except BrokenPipeError:
        return 1
    finally:
        server.close()
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

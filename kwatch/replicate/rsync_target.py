"""rsync:// targets (and ssh targets whose host has no kwatch): the same coalescer and batches as the agent, carried
by the native rsync client (:mod:`kwatch.replicate.rsync_transport`) as a :class:`~kwatch.replicate.transport
.Transport`.

A stock ``rsync --daemon`` has no rename or delete message: each batch becomes one rsync session that sends the
batch's paths (the dirty ones, both names of every rename, and the rescanned subtrees); a path that no longer exists
is deleted on the daemon (``--delete-missing-args``, or with ``fuzzy`` by listing its parent directory under
``--delete-after``). A renamed directory, or a file moved to another directory, is first moved by the daemon from
its own copy in a session of its own (``--link-dest`` to the old name: :mod:`kwatch.replicate.rsync_moves`), which
the batch's session then leaves alone; with ``fuzzy`` the daemon may use a similar file in the same directory as
the delta basis (``--fuzzy``), so a rename within a directory moves little data. A rescan of the whole tree is one
full push with ``--delete``. Either way the mirror ends identical, mtimes of directories and symlinks included (rsync_transport: ``-@-1``; the ``--delete-after`` pass runs before the
receiver's final directory-time touch-up, so ``fuzzy`` costs no accuracy).

Files open for writing (the batch's :attr:`~kwatch.replicate.coalesce.Batch.writing`: their opens seen in events,
or found in ``/proc`` at start and after a loss) are left out of every session's list, as the agent path's
reconcile leaves them: a full push or a directory sent whole does not carry them, and a protect rule keeps the
daemon's ``--delete`` from removing the copy it has. Each one left out is marked again, so it is sent once closed
(or once its hold is older than ``max_delay``). Unlike the agent path, a file read by a session is not checked
against the events that arrive meanwhile (the rsync protocol has no way to drop a file already sent): a writer that
opens a file after the batch was taken can still have its partial output sent, until the next batch after its close.

``bwlimit`` paces every byte written to the daemon (rsync_transport: as rsync's own ``--bwlimit``, so the file
list and the token stream count, not only file data as with the agent).

Hard links go as rsync's own (``-H``: the names of one inode in a session's file list are linked by the receiver,
the data sent at most once). A session links only the names its list carries, so a batch that touches one name of
a linked file also lists the inode's other names: :attr:`links` (a LinkIndex, filled from every session's list)
knows them, each checked against the source before use. Data written through one name then reaches every name
on the mirror, and a ``link(2)`` (both names are dirty) becomes a hard link there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

from kwatch.paths import below_any, is_under
from kwatch.protocols.errors import ProtocolError
from kwatch.protocols.rsync.flist import FileEntry
from kwatch.replicate.coalesce import CONTENT, EXIST, META, Batch
from kwatch.replicate.failure import classify
from kwatch.replicate.link import LinkError
from kwatch.replicate.linkindex import LinkIndex, is_inode
from kwatch.replicate.options import TargetOptions
from kwatch.replicate.rsync_ahead import InFlight, stale_dirs, tops
from kwatch.replicate.rsync_ahead import plan as plan_ahead
from kwatch.replicate.rsync_conns import Pool
from kwatch.replicate.rsync_moves import plan as plan_moves
from kwatch.replicate.rsync_split import split
from kwatch.replicate.rsync_transport import OnProgress, PushResult, parse_url, push, scan_paths
from kwatch.replicate.scan import Excluder
from kwatch.replicate.transport import BatchReport, Host

log = logging.getLogger("kwatch.replicate")

#: batches whose sessions may be in flight at once (see RsyncTransport.start_ahead)
MAX_AHEAD = 3


def rsync_down_reason(e: BaseException) -> tuple[str, bool]:
    """(down reason, permanent) for a failed rsync session (see kwatch.replicate.failure)."""
    text = str(e)
    shell = re.search(r"; exit status (\d+); remote stderr: (.*)", text, re.DOTALL)
    if shell is not None:  # rsync --server through ssh: its exit status and stderr say why
        down, permanent, _ = classify(int(shell.group(1)), shell.group(2).splitlines())
        if down != "error":
            return down, permanent
    if isinstance(e, ConnectionRefusedError):
        return "refused", False
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout", False
    if isinstance(e, socket.gaierror) or (isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH,
                                                                               errno.ENETUNREACH)):
        return "unreachable", False
    if "authentication failed" in text:
        return "auth", True
    if "unknown module" in text or "refused the module" in text:
        return "destination", True
    if "No space left" in text or "Disk quota" in text:
        return "disk_full", False
    return ("protocol" if isinstance(e, ProtocolError) else "error"), False


class RsyncTransport:
    """A stock ``rsync --daemon`` (``rsync://`` URL), or ``rsync --server`` through ``rsh`` (an ``ssh://`` URL and
    the ssh command line ending with the host: the fallback for a host without kwatch)."""

    def __init__(self, host: Host, url: str, opts: TargetOptions, *, rsh: list[str] | None = None,
                 remote_path: bytes | None = None, name: str | None = None) -> None:
        self.host = host
        self.name = name or url  # the target as the log names it
        self.src = host.src
        self.url = url
        self.opts = opts
        self.rsh = rsh
        self.remote_path = remote_path
        self.links = LinkIndex()  # names the mirror holds as one inode (see linkindex)
        self._seq = 0
        self._wire = 0
        # rsync://: connections opened ahead of the sessions (as many as the last batch used)
        u = parse_url(url)
        self._pool = Pool(u.host, u.port) if u.scheme == "rsync" and rsh is None else None
        self._want = 1
        #: (protocol, compat flags) the last session negotiated: the next sessions send their list at once
        self._expect: tuple[int, int] | None = None
        #: batches started ahead (start_ahead), in the order they started; their sessions run on _ahead_exec
        self._ahead: list[_Ahead] = []
        self._ahead_exec: ThreadPoolExecutor | None = None
        #: directories to list again once no batch is in flight, in a batch of its own (with --delete): those that
        #: sessions in flight at once listed with different attributes (the one to touch them up last wins, maybe
        #: the older), and those whose content went ahead without deletion
        self._relist: set[bytes] = set()
        #: those marked again and not yet sent: until a batch of its own lists them, no batch goes ahead
        self._relisting: set[bytes] = set()

    def connect(self) -> None:
        pass  # one session per batch, on a connection opened ahead; the first batch (a full rescan) proves the peer

    def disconnect(self) -> None:
        self._abandon_ahead()
        if self._pool is not None:
            self._pool.close()

    def close(self) -> None:
        self.disconnect()

    def _connection(self) -> socket.socket:
        """A connection for a session, and the next one started (kwatch.replicate.rsync_conns)."""
        assert self._pool is not None
        try:
            return self._pool.take(self.opts.timeout)
        finally:
            self._pool.fill(self._want)

    def cut(self) -> None:
        pass  # a session in flight ends with the process; the receiver keeps whole files only (temp + rename)

    def wire_bytes(self) -> int:
        return self._wire

    def _batch_paths(self, b: Batch) -> list[bytes] | None:
        """The paths a batch's session lists (None: the whole tree)."""
        if b"" in b.rescans:
            return None
        todo = set(b.dirty) | b.rescans
        for old, new in b.renames:
            todo.add(old)
            todo.add(new)
            self.links.rename(old, new)
        todo.discard(b"")
        seen: dict[bytes, bool] = {}  # directories already tested: a batch names many paths in each
        todo = {p for p in todo if not excluded_path(self.host.excluded, p, seen)}
        todo |= self._other_names(todo)
        return sorted(todo)

    def sync(self, b: Batch) -> BatchReport:
        rep = BatchReport()
        paths = self._batch_paths(b)
        if paths is None:
            self._relisting.clear()
        elif self._relisting:
            # listed, or under a name listed (the old name of a rename is among them too)
            listed = set(paths)
            self._relisting = {r for r in self._relisting if r not in listed and not below_any(r, listed)}
        if paths is not None and not paths:
            return rep
        moved: set[bytes] = set()
        if paths is not None and b.renames:
            moved = self._move(b, rep)
            if moved:
                # each moved tree goes as a plain directory (its attributes, its parents', and its place in a
                # listed parent that --delete would otherwise clear); what changed inside it went with the move
                paths = [p for p in paths if not any(p != m and is_under(p, m) for m in moved)]
        try:
            res = self._send(paths, b, moved)
        except (ProtocolError, OSError) as e:
            down, permanent = rsync_down_reason(e)
            raise LinkError(f"rsync push failed: {e}", down, permanent) from e
        self._report(paths, res, rep)
        return rep

    # ---- batches ahead of the ones in flight --------------------------------------------------------------------

    def ahead_full(self) -> bool:
        """Whether as many batches are in flight as may be: the replicator waits for one to end before the next."""
        return len(self._ahead) >= MAX_AHEAD

    def in_flight(self) -> int:
        return len(self._ahead)

    def start_ahead(self, b: Batch) -> bool:
        """Start batch ``b``'s session(s) without waiting for them to end, alongside those in flight: True when it
        went (its report comes from :meth:`finish_ahead`); False when it must go as a batch of its own
        (:meth:`sync`) once those in flight have ended.

        Only a batch that creates and changes goes ahead (no rename, deletion, rescan or file with several names, on
        a daemon's connections), without ``--delete``, and only the part of its list that cannot get in the way of
        the sessions in flight (kwatch.replicate.rsync_ahead); the rest is marked again for a later batch. Once none
        is in flight, the directories it listed go again in a batch of their own, with ``--delete``."""
        if (not self.opts.ahead or self._relisting or self._pool is None or b.renames or b.rescans or b.link_from
                or self.ahead_full()):
            return False
        paths = self._batch_paths(b)
        if not paths:
            return False
        entries, missing = scan_paths(self.src, paths, self.opts.delete, self.opts.fuzzy, self.host.excluded,
                                      _attributes_only(b, paths))
        names = {e.name for e in entries}
        if missing or not all(p in names for p in paths) or any(e.mode == 0 or e.inode is not None for e in entries):
            return False
        kept, again = plan_ahead(entries, InFlight(a.entries for a in self._ahead))
        if not kept:
            return False
        now = time.monotonic()
        for rel in again:
            self.host.coalescer.retry(self.host.coalescer.current_name(rel), now, CONTENT | EXIST)
        for other in self._ahead:
            self._relist.update(stale_dirs(other.entries, kept))
        if self.opts.delete:
            self._relist.update(e.name for e in kept if e.is_dir and e.content_dir)
        kept_names = {e.name for e in kept}
        a = _Ahead(b, [p for p in paths if p in kept_names], kept)
        if self._ahead_exec is None:
            self._ahead_exec = ThreadPoolExecutor(MAX_AHEAD, thread_name_prefix="rsync ahead")
        a.future = self._ahead_exec.submit(self._send_scanned, a.paths, b, kept, delete=False)
        self._ahead.append(a)
        log.debug("target %s: a batch went ahead: %d paths, %d held back; %d batches in flight", self.name,
                  len(a.paths), len(again), len(self._ahead))
        return True

    def finish_ahead(self, wait: bool) -> list[tuple[Batch, BatchReport]]:
        """The batches started ahead whose sessions have ended, with their reports, in the order they started (up to
        the first still in flight; with ``wait``, all of them). A failed one raises LinkError once every other has
        ended (what they applied is unknown: the replicator reconciles after its reconnect)."""
        out: list[tuple[Batch, BatchReport]] = []
        while self._ahead and (wait or self._ahead[0].future.done()):
            a = self._ahead[0]
            try:
                res = a.future.result()
            except (ProtocolError, OSError) as e:
                self._abandon_ahead()
                down, permanent = rsync_down_reason(e)
                raise LinkError(f"rsync push failed: {e}", down, permanent) from e
            self._ahead.pop(0)
            rep = BatchReport()
            self._report(a.paths, res, rep)
            if not self._ahead and self._relist:
                again = tops(self._relist)
                rep.resend.extend(again)
                self._relisting.update(again)
                self._relist.clear()
            out.append((a.batch, rep))
        return out

    def _abandon_ahead(self) -> None:
        """Wait for the sessions in flight to end (each ends at its timeout at the latest) and forget them."""
        wait_futures([a.future for a in self._ahead])
        for a in self._ahead:
            with contextlib.suppress(Exception):
                a.future.result()
        self._ahead.clear()
        self._relist.clear()  # the replicator reconciles the whole tree after a failure
        self._relisting.clear()

    def _report(self, paths: list[bytes] | None, res: PushResult, rep: BatchReport) -> None:
        """Add the result of a batch's own session(s) to its report, and log the batch's line."""
        rep.resend.extend(res.held)  # open for writing: sent after its close, as a live change
        if paths is None:
            self.links.discard_under(b"")
        else:
            rep.resend += self._unlisted_names(res.inodes)  # before the session's inodes join the index
        self._account(res, rep)
        # numbered per target like the agent's batch lines, so a reader of the log can wait for batch N
        self._seq += 1
        log.info("target %s: rsync batch %d: %s paths, %d files sent, %d deleted, %d held open for writing; %d "
                 "literal + %d matched bytes; %d moves", self.name, self._seq,
                 "all" if paths is None else len(paths), rep.puts, rep.deletes, len(rep.resend), rep.literal,
                 rep.matched, rep.renames)

    def _send(self, paths: list[bytes] | None, b: Batch, moved: set[bytes]) -> PushResult:
        """The batch's own session, or its parts at the same time (kwatch.replicate.rsync_split), each on a
        connection of its own; their results as one."""
        # a batch that reconciles a tree (the first sync, a rescan) shows its progress, its parts' summed
        tally = _PartsTally(self.host) if b.rescans else None
        if paths is None:
            return self._push(None, b, on_progress=tally and tally.part(0))
        entries, _ = scan_paths(self.src, paths, self.opts.delete, self.opts.fuzzy, self.host.excluded,
                                moved | _attributes_only(b, paths))
        return self._send_scanned(paths, b, entries, tally)

    def _send_scanned(self, paths: list[bytes], b: Batch, entries: list[FileEntry],
                      tally: _PartsTally | None = None, *, delete: bool | None = None) -> PushResult:
        parts = split(entries) if self._may_split(paths, b, entries) else [entries]
        self._want = max(len(parts), len(self._ahead) + 1)
        delete = self.opts.delete if delete is None else delete
        if len(parts) == 1:
            return self._push(paths, b, scanned=parts[0], on_progress=tally and tally.part(0), delete=delete)
        with ThreadPoolExecutor(len(parts), thread_name_prefix="rsync part") as pool:
            futures = [pool.submit(self._push, paths, b, scanned=part, on_progress=tally and tally.part(k),
                                   delete=delete) for k, part in enumerate(parts)]
            results = [f.result() for f in futures]
        log.debug("target %s: the batch went as %d sessions at once", self.name, len(parts))
        return _merged(results)

    def _may_split(self, paths: list[bytes], b: Batch, entries: list[FileEntry]) -> bool:
        """Whether the batch's list may go as parts at once: only a batch that creates and changes, with nothing
        deleted, renamed or rescanned and no file with several names (an untar, a copy). The fault matrix's churn
        (renames, deletes, links, rescans after a kill) left files missing on the mirror when such batches went as
        parts: not understood yet, so they go as one session."""
        if self.rsh is not None or b.renames or b.rescans:
            return False
        names = {e.name for e in entries}
        return all(p in names for p in paths) and not any(e.mode == 0 or e.inode is not None for e in entries)

    def _push(self, paths: list[bytes] | None, b: Batch, **kw: Any) -> PushResult:
        try:
            res = self._push_once(paths, b, **kw)
        except (ProtocolError, OSError):
            self._expect = None  # a daemon changed or restarted: the next session waits for its replies again
            raise
        if res.protocol:
            self._expect = (res.protocol, res.compat_flags)
        return res

    def _push_once(self, paths: list[bytes] | None, b: Batch, **kw: Any) -> PushResult:
        kw.setdefault("delete", self.opts.delete)
        return push(self.src, self.url, paths, password_file=self.opts.password_file,
                    fuzzy=self.opts.fuzzy, timeout=self.opts.timeout, bwlimit=self.opts.bwlimit, hard_links=True,
                    hold=b.writing, exclude=self.host.excluded, rsh=self.rsh, rsh_quote=self.rsh is not None,
                    remote_path=self.remote_path, connect=self._connection if self._pool is not None else None,
                    expect=self._expect, **kw)

    def _account(self, res: PushResult, rep: BatchReport, *, errors: bool = True) -> None:
        """Add a session's figures to the batch's; its per-path errors too unless ``errors`` is False (a move
        session's: what it failed to move, the batch's own session sends)."""
        for key, names in res.inodes.items():
            self.links.add(key, names)
        rep.puts += res.files
        rep.deletes += res.deleted
        rep.literal += res.literal_bytes
        rep.matched += res.matched_bytes
        self._wire += res.bytes_sent
        if errors:
            rep.messages.extend(res.errors)
        for err in res.errors:
            log.log(logging.WARNING if errors else logging.INFO, "target %s: %s", self.name, err)

    def _move(self, b: Batch, rep: BatchReport) -> set[bytes]:
        """Run the batch's move sessions (kwatch.replicate.rsync_moves) before its own session, while the old
        names are still on the daemon; the directories they brought up to date. A session that fails or reports
        an error moves nothing: the batch's session then sends that tree as it would have."""
        excluded = self.host.excluded

        def kind(rel: bytes) -> str | None:
            if rel in b.writing or excluded_path(excluded, rel):
                return None
            try:
                st = os.lstat(os.path.join(self.src, rel))
            except OSError:
                return None
            if stat.S_ISREG(st.st_mode):
                # a file with other names goes with the batch's session, which lists them all (-H links them);
                # a session of its own would list it alone and leave its other names separate copies
                return "file" if st.st_nlink == 1 else None
            return "dir" if stat.S_ISDIR(st.st_mode) else None

        moved: set[bytes] = set()
        for mv in plan_moves(b.renames, kind):
            try:
                res = self._push(list(mv.names) if mv.names is not None else None, b, subdir=mv.subdir,
                                 link_dest=(mv.basis,), fuzzy_alt=mv.fuzzy)
            except (ProtocolError, OSError) as e:
                down, permanent = rsync_down_reason(e)
                if not isinstance(e, ProtocolError) and down != "error":  # the daemon is not there
                    raise LinkError(f"rsync push failed: {e}", down, permanent) from e
                # refused by the daemon (an option it refuses or does not know, a destination it cannot make) or
                # the directory changed meanwhile
                log.info("target %s: moving %r from %r did not apply (%s); sent as new files", self.name,
                         mv.subdir, mv.basis, e)
                continue
            # names of the session's linked files that it did not list (outside the moved tree): sent again, so the
            # next session lists them with these and links them
            rep.resend += self._unlisted_names(res.inodes)
            self._account(res, rep, errors=False)
            rep.resend.extend(res.held)
            if res.errors:
                continue
            rep.renames += 1
            if mv.names is None:
                moved.add(mv.subdir)
        return moved

    def _other_names(self, paths: set[bytes]) -> set[bytes]:
        """The other names (in the source, by the index) of the regular files with several names among ``paths``,
        and of those below a directory of ``paths`` (a session sends a listed directory whole: a directory renamed
        is sent again under its new name, and a file in it linked to a name elsewhere would land as a copy)."""
        out: set[bytes] = set()
        keys: set[tuple[int, int]] = set()
        for rel in paths:
            try:
                st = os.lstat(os.path.join(self.src, rel))
            except OSError:
                self.links.discard_under(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                keys |= self.links.keys_under(rel)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                keys.add((st.st_dev, st.st_ino))
        for key in keys:
            out.update(p for p in self.links.names(key)
                       if p not in paths and not below_any(p, paths) and is_inode(self.src, p, key))
        return out


    def _unlisted_names(self, listed: dict[tuple[int, int], list[bytes]]) -> list[bytes]:
        """Names the index knows (and the source still has) of the inodes a session listed, that the session did not
        list: the receiver could not link them, so the mirror may hold them as copies. Sent again, a later session
        lists them with the names just sent, which the index then knows (a file moved into the tree from outside,
        linked to a name inside, is the case _other_names cannot see before the session)."""
        out: list[bytes] = []
        for key, names in listed.items():
            here = set(names)
            out.extend(p for p in self.links.names(key) if p not in here and is_inode(self.src, p, key))
        return out


@dataclass(eq=False)
class _Ahead:
    """A batch whose sessions went ahead (RsyncTransport.start_ahead)."""

    batch: Batch
    paths: list[bytes]  # the batch's paths that went
    entries: list[FileEntry]  # its list
    future: Future[PushResult] = field(default_factory=Future)


class _PartsTally:
    """The progress of a batch's sessions (its parts run at the same time), summed for the replicator."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.figures: dict[int, tuple[int, int, int, int]] = {}
        self.lock = threading.Lock()

    def part(self, k: int) -> OnProgress:
        def update(files: int, files_total: int, nbytes: int, bytes_total: int) -> None:
            with self.lock:
                self.figures[k] = (files, files_total, nbytes, bytes_total)
                f, ft, nb, bt = (sum(x) for x in zip(*self.figures.values(), strict=True))
                self.host.report_progress(f, ft, nb, bt)
        return update


def _attributes_only(b: Batch, paths: list[bytes]) -> set[bytes]:
    """The batch's paths whose own attributes changed, nothing else (META: a chmod or utimes, an entry made or
    removed inside): a directory among them is listed alone (``shallow``), not with its subtree. What changed inside
    it is in the batch under its own name (a deletion too: its parent is then listed whole for ``--delete-after``,
    or the name goes as a mode-0 entry); a loss makes a rescan, and renamed trees are listed whole. Not one below a
    path listed whole: scan_paths would leave its subtree out of that listing, and the names dirty inside it with it
    (they count as listed by the path above)."""
    renamed = {p for pair in b.renames for p in pair}
    meta = {p for p, flags in b.dirty.items() if flags == META and p not in renamed and p not in b.rescans}
    whole = set(paths) - meta
    return {p for p in meta if not below_any(p, whole)}


def _merged(results: list[PushResult]) -> PushResult:
    """The results of a batch's parts as one session's."""
    out = PushResult(protocol=results[0].protocol, checksum=results[0].checksum)
    for r in results:
        out.bytes_sent += r.bytes_sent
        out.bytes_received += r.bytes_received
        out.literal_bytes += r.literal_bytes
        out.matched_bytes += r.matched_bytes
        out.files += r.files
        out.deleted += r.deleted
        out.errors += r.errors
        out.held += r.held
        for key, names in r.inodes.items():
            out.inodes.setdefault(key, []).extend(names)
    return out


def excluded_path(excluded: Excluder, rel: bytes, seen: dict[bytes, bool] | None = None) -> bool:
    """Whether ``rel`` or one of its ancestors matches an exclude pattern (an excluded directory's contents are not
    replicated, as the scan does not descend it). ``seen``: the answers for ancestors, kept across calls."""
    if seen is None:
        seen = {}
    end = rel.find(b"/")
    start = 0
    while end >= 0:
        pre = rel[:end]
        hit = seen.get(pre)
        if hit is None:
            hit = seen[pre] = excluded(rel[start:end], pre)
        if hit:
            return True
        start = end + 1
        end = rel.find(b"/", start)
    return excluded(rel[start:], rel)

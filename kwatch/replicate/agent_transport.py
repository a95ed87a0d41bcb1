"""The kwatch agent as a transport: one batch becomes a plan (looking at the source now) sent over an
:class:`~kwatch.replicate.link.AgentLink`, answered by one Ack. See docs/replication.md.

A batch, in order: renames first (a moved file or tree is moved on the mirror, not re-sent), then mkdirs, puts (a
delta against the mirror's copy for large files: signatures are requested for the whole batch at once, pipelined
with the small puts), symlinks, hard links, attribute changes, deletes, and directory times last; one Commit.
Hard links are kept (:meth:`AgentTransport._plan_links`): a new name of a file becomes a link on the mirror, not a
copy, and new data written under one name of a linked file is sent once and every other name linked to it again.
A rescan reconciles a subtree: the mirror's manifest against a scan of the source (quick check or checksums).

A file read for the batch lands only if no writer may have had it open during the read: the agent lands a file on
receipt, so the check (:meth:`~kwatch.replicate.transport.Host.unlandable`) runs before its data is sent, once per
PutFiles frame and before the end frame of a large put or a delta; a dropped file ends with a spoiled digest
(:meth:`AgentTransport._drop_torn`) and is sent again in a later batch. What the Ack's errors mean is decided by
:func:`kwatch.replicate.ack.interpret_ack`; the replicator acts on the result.

The scratch state of one batch lives in a :class:`BatchContext`, made fresh for each batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import xxhash

from kwatch.fsutil import DirFds
from kwatch.paths import is_under, parent
from kwatch.protocols import agent as ap
from kwatch.replicate.ack import interpret_ack
from kwatch.replicate.coalesce import CONTENT, EXIST, LINKED, META, Batch
from kwatch.replicate.link import AgentLink, LinkError
from kwatch.replicate.linkindex import Key, LinkIndex, is_inode
from kwatch.replicate.linkplan import plan_group
from kwatch.replicate.options import TargetOptions
from kwatch.replicate.preload import preload_delta
from kwatch.replicate.scan import (
    DEFAULT_EXCLUDES,
    Delete,
    Entry,
    Hardlink,
    Kind,
    Manifest,
    Mkdir,
    Plan,
    Put,
    SetAttr,
    Symlink,
    diff,
    scan,
)
from kwatch.replicate.target import Target
from kwatch.replicate.transport import BatchReport, Host

if TYPE_CHECKING:
    from kwatch.replicate import delta as dl

log = logging.getLogger("kwatch.replicate")

CHUNK = 1 << 20
DELTA_OPS_PER_FRAME = 4096
#: ...or once its ops copy this many basis bytes (see _put_delta): delta.COPY_RUN_MAX, one copy run (a test holds
#: them equal; delta is imported when a delta is first made, not at start-up: it brings numpy)
DELTA_COPY_PER_FRAME = 8 << 20
SMALL_FILE = 256 << 10  # sent in one PutFile frame (content, mode, mtime) instead of begin/chunks/end/setattr
FILES_FRAME_BYTES = 1 << 20  # small files gathered into one PutFiles frame up to this much data...
FILES_PER_FRAME = 1024  # ...or this many files (the agent resolves each directory once per frame)


def _agent_entry(e: ap.Entry) -> Entry:
    """A mirror manifest entry as scan.diff wants it: the agent's link id stands for the inode number (the device
    is one per mirror, 0); a file with one name, or any file without the ``inodes`` capability, has ino 0."""
    return Entry(Kind(int(e.type)), e.mode, e.size, e.mtime_ns, e.uid, e.gid, e.nlink, e.link or 0, 0, e.target,
                 e.hash)


#: the most entries a mirror's manifest may have: this many, or MANIFEST_FACTOR times the source's entries
MANIFEST_MIN_CAP = 1 << 20
MANIFEST_FACTOR = 8


_Op = TypeVar("_Op", Delete, Mkdir, Put, Symlink, SetAttr)


class Seen(NamedTuple):
    """What the planner knows of one source path: its lstat, and a symlink's target."""

    st: os.stat_result
    target: bytes | None = None


def look(src: bytes, rel: bytes) -> Seen | None:
    """The source path ``rel`` now (None: not there): the one read of the source the planner's caller makes for it."""
    full = os.path.join(src, rel) if rel else src
    try:
        st = os.lstat(full)
        return Seen(st, os.readlink(full) if stat.S_ISLNK(st.st_mode) else None)
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class _Linked:
    """A dirty regular file with ``st_nlink > 1``, waiting for :meth:`AgentTransport._plan_links`."""

    rel: bytes
    flags: int
    st: os.stat_result


@dataclass
class BatchContext:
    """The scratch state of the batch being planned and sent; a fresh one per batch."""

    batch: Batch = field(default_factory=Batch)
    touched: set[bytes] = field(default_factory=set)  # directories whose mtime this batch restores (_touch_parent)
    torn: set[bytes] = field(default_factory=set)  # puts ended with a spoiled digest (see _drop_torn)
    groups: dict[Key, list[_Linked]] = field(default_factory=dict)  # dirty linked files by source inode
    link_sets: dict[Key, set[bytes]] = field(default_factory=dict)  # link groups, recorded in ``links`` after the ack
    #: linked files a rescan of this batch sends as data, by source inode: the name it puts (the names outside the
    #: subtree that are dirty in this batch are linked to it, see plan_links)
    rescan_puts: dict[Key, bytes] = field(default_factory=dict)
    link_leaders: dict[bytes, bytes] = field(default_factory=dict)  # hard links: path -> the name it links to
    checked: set[bytes] = field(default_factory=set)  # checked hard links (to a name gone from the source)
    #: puts that went out whole (not dropped): path -> the (size, mtime_ns) the mirror gets; what a link to that
    #: name in the same batch expects to find there
    sent: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    later: list[bytes] = field(default_factory=list)  # rescanned files left for later: open for writing
    seen: dict[bytes, Seen | None] = field(default_factory=dict)  # the source as the planner saw it (see look)
    files: DirFds | None = None  # opens the files sent, directory by directory (see AgentSender._open_source)
    streamed: set[bytes] = field(default_factory=set)  # mkdirs and small files sent during the scan (stream_scan)


class _Part:
    """What the planner and the sender of one transport share: the source, the options, the mirror's link index, and
    (per connection, per batch) the link and the batch context, read from the transport."""

    def __init__(self, t: AgentTransport) -> None:
        self.t = t
        self.host = t.host
        self.src = t.src
        self.opts = t.opts
        self.target = t.target
        self.coalescer = t.coalescer
        self.excluded = t.excluded
        self.links = t.links

    @property
    def link(self) -> AgentLink | None:
        return self.t.link

    @property
    def ctx(self) -> BatchContext:
        return self.t.ctx


class AgentPlanner(_Part):
    """Turns a batch into a :class:`~kwatch.replicate.scan.Plan` from what the source holds: the planner reads
    nothing itself. Each path's metadata comes through :meth:`seen` (``look``, once per path and batch, kept in the
    batch context: tests fill it by hand), a rescan's through the two manifests its caller fetched
    (:meth:`AgentTransport._reconcile_inputs`); the hard-link groups and the directory times to restore go into the
    batch context. (The hard-link checks against the source, ``is_inode`` and ``_origin``, still read it.)"""

    def seen(self, rel: bytes) -> Seen | None:
        """The source's ``rel`` as this batch sees it: looked at once (the transport's ``look``), then kept."""
        ctx = self.ctx
        if rel not in ctx.seen:
            ctx.seen[rel] = self.t.look(rel)
        return ctx.seen[rel]

    def plan_path(self, rel: bytes, flags: int, plan: Plan) -> None:
        name = rel.rpartition(b"/")[2]
        if rel and self.excluded(name, rel):
            return
        got = self.seen(rel)
        if got is None:
            if rel and self.host.renamed_away(rel, flags):
                return
            if rel and self.opts.delete:
                plan.deletes.append(Delete(rel, Kind.OTHER))
            return
        st = got.st
        mode = stat.S_IMODE(st.st_mode)
        uid, gid = (st.st_uid, st.st_gid) if self.opts.owner else (None, None)
        if not stat.S_ISREG(st.st_mode):
            self.links.discard(rel)
        if stat.S_ISDIR(st.st_mode):
            if not rel:
                return  # the mirror root's own attributes are the operator's
            if flags & EXIST:
                plan.mkdirs.append(Mkdir(rel, mode | 0o700, uid, gid))
            plan.dir_setattrs.append(SetAttr(rel, mode, st.st_mtime_ns, uid, gid))
        elif stat.S_ISLNK(st.st_mode):
            if flags & (EXIST | CONTENT):
                assert got.target is not None
                plan.symlinks.append(Symlink(rel, got.target, st.st_mtime_ns, uid, gid))
                self._touch_parent(rel, plan)
            elif flags & META:
                plan.setattrs.append(SetAttr(rel, None, st.st_mtime_ns, uid, gid))
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1 and flags & (CONTENT | LINKED | EXIST):
                self.ctx.groups.setdefault((st.st_dev, st.st_ino), []).append(_Linked(rel, flags, st))
                return
            self.links.discard(rel)
            if flags & (CONTENT | LINKED | EXIST) == LINKED | EXIST and self._plan_origin_link([(rel, st)], plan):
                return  # ``ln a b; rm a``: b is linked to the mirror's a, which is then deleted
            if flags & CONTENT or flags & (LINKED | EXIST) == LINKED | EXIST:  # new data, or a link whose
                # other name is gone already and was not on the mirror: there is no inode to link to for sure
                plan.puts.append(Put(rel, st.st_size, mode, st.st_mtime_ns, uid, gid, st.st_size >= self.opts.delta_min))
                self._touch_parent(rel, plan)
            else:
                plan.setattrs.append(SetAttr(rel, mode, st.st_mtime_ns, uid, gid))

    def _origin(self, rel: bytes) -> bytes | None:
        """The name ``rel`` was hard-linked from in this batch when that name is gone from the source but the mirror
        should still have it with this inode's data (see Batch.link_from); None otherwise."""
        origin = self.ctx.batch.link_from.get(rel)
        if origin is None or self.link is None or "linkcheck" not in self.link.conn.capabilities:
            return None
        if self.ctx.batch.dirty.get(origin, 0) & CONTENT or self.excluded(origin.rpartition(b"/")[2], origin):
            return None  # written through that name after the link, or never on the mirror
        try:
            os.lstat(os.path.join(self.src, origin))
        except FileNotFoundError:
            return origin
        except OSError:
            return None
        return None  # something is there again: the mirror's copy of it is not this inode's data

    def _plan_origin_link(self, names: list[tuple[bytes, os.stat_result]], plan: Plan) -> bool:
        """Link ``names`` (new names of one inode, no new data) to the name one of them was linked from in this batch
        and which is gone from the source since (``ln a b; rm a``): the mirror still has it (its delete runs after
        the links), so no data is sent. The link is checked by the agent against the inode's size and mtime: if the
        mirror's name holds something else, the agent refuses (ESTALE) and the data is sent next batch."""
        origin = next((o for o in (self._origin(rel) for rel, _ in names) if o is not None), None)
        if origin is None:
            return False
        st = names[0][1]
        uid, gid = (st.st_uid, st.st_gid) if self.opts.owner else (None, None)
        for rel, _ in names:
            plan.hardlinks.append(Hardlink(rel, origin, st.st_size, st.st_mtime_ns))
            self.ctx.link_leaders[rel] = origin
            self.ctx.checked.add(rel)
            self._touch_parent(rel, plan)
            plan.setattrs.append(SetAttr(rel, stat.S_IMODE(st.st_mode), st.st_mtime_ns, uid, gid))
        return True

    def _rescan_links(self, src: Manifest, pre: bytes) -> dict[Key, bytes]:
        """Take the hard-link groups of a rescanned subtree (``src``, paths below ``pre``) into the index.

        Returns, per inode, a name outside the subtree that the mirror has (checked against the source): a file of
        the subtree that must be sent (moved in from outside, say) is linked to it instead. The subtree's own names
        are recorded after the ack, with the batch's other groups.
        """
        self.links.discard_under(pre.rstrip(b"/"))
        outside: dict[Key, bytes] = {}
        for path, e in src.entries.items():
            if e.kind is not Kind.FILE or e.nlink < 2:
                continue
            key = (e.dev, e.ino)
            if key not in outside:
                there = sorted(p for p in self.links.sure(key) if is_inode(self.src, p, key))
                outside[key] = there[0] if there else b""
            self.ctx.link_sets.setdefault(key, set()).add(pre + path)
        return {k: v for k, v in outside.items() if v}

    def plan_links(self, plan: Plan) -> None:
        """Plan this batch's dirty files that have other names (``st_nlink > 1``), one inode at a time.

        The names of an inode are the dirty ones plus those :attr:`links` knows (or a rescan of this batch sends),
        each checked against the source (still that inode). With new data (a CONTENT mark on any name) the data goes
        once, under one name, and every other name is linked to it again: the agent lands data with rename(2) from a
        temporary, so the mirror's other names would keep the old inode and the old data. Without new data (``ln a
        b``: both names are marked LINKED) the new names are linked to a name the mirror already has; only when there
        is none (the file is new in this batch, its first name is outside the tree or excluded, or every name the
        mirror should have is in doubt: its last put or link failed) the data is sent.

        Every link is checked by the agent against the size and mtime its existing name must have (see
        :meth:`AgentSender.send_plan`): a name the mirror lacks, or holds with other data, is refused, and the data
        is sent under the link's name in the next batch instead (kwatch.replicate.ack), never a link to stale data.
        """
        for key, members in self.ctx.groups.items():
            dirty = {m.rel for m in members}
            # names the index has, and names a rescan in this batch brings (its puts and links run before ours)
            seen = self.links.names(key) | self.ctx.link_sets.get(key, set())
            known = sorted(p for p in seen if p not in dirty and is_inode(self.src, p, key))
            doubtful = [p for p in known if self.links.in_doubt(p)]
            # new data goes under a name the mirror has if there is one (a delta needs a basis)
            content = sorted((m for m in members if m.flags & CONTENT), key=lambda m: bool(m.flags & EXIST))
            # a dirty name without EXIST was there before this batch (renames already replayed): the mirror should
            # have it, unless its last put failed (in doubt)
            on_mirror = [m.rel for m in members if not m.flags & (CONTENT | EXIST) and not self.links.in_doubt(m.rel)]
            on_mirror += [p for p in known if p not in doubtful]
            if not content and not on_mirror and self._plan_origin_link([(m.rel, m.st) for m in members], plan):
                self.ctx.link_sets.setdefault(key, set()).update(m.rel for m in members)
                continue  # ``ln a b; ln a c; rm a``: b and c are linked to the mirror's a, which is then deleted
            st = (content or members)[0].st
            uid, gid = (st.st_uid, st.st_gid) if self.opts.owner else (None, None)
            names = [*(m.rel for m in members), *known]
            fresh = self.ctx.rescan_puts.get(key)
            if fresh is not None and not content:
                # a rescan of this batch sends this inode's data (its names outside the subtree were not known to
                # it): every other name is linked to that put, whatever the mirror held there
                ops = plan_group(names, [fresh])
            elif content or not on_mirror:
                ops = plan_group(names, basis=[(content or members)[0].rel])
                plan.puts.append(Put(ops.leader, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, uid, gid,
                                     st.st_size >= self.opts.delta_min))
                self._touch_parent(ops.leader, plan)
            else:
                # the names the mirror has (the in-doubt ones not among them) are kept: the others are linked
                ops = plan_group(names, on_mirror)
                plan.setattrs.append(SetAttr(ops.leader, stat.S_IMODE(st.st_mode), st.st_mtime_ns, uid, gid))
            leader, relink = ops.leader, ops.links
            for p in relink:
                plan.hardlinks.append(Hardlink(p, leader, st.st_size, st.st_mtime_ns))
                self.ctx.link_leaders[p] = leader
                self._touch_parent(p, plan)
            self.ctx.link_sets.setdefault(key, set()).update((leader, *relink, *on_mirror))

    def mkdir_parents(self, rel: bytes, b: Batch, made: set[bytes]) -> list[Mkdir]:
        """The directories of a rename destination that appeared in this batch, to create before the rename.

        Renames are replayed before the plan's mkdirs (so a moved tree is moved, not re-created); ``mkdir -p n;
        mv f n/f`` in one batch would otherwise find no ``n`` on the mirror, fail, and re-send ``f`` in full.
        Only directories the source has now are made (mkdir of an existing directory is harmless).
        """
        out: list[Mkdir] = []
        parts = rel.split(b"/")[:-1]
        for i in range(1, len(parts) + 1):
            a = b"/".join(parts[:i])
            if a in made or not b.dirty.get(a, 0) & EXIST:
                continue
            made.add(a)
            got = self.seen(a)
            if got is None or not stat.S_ISDIR(got.st.st_mode):
                break
            out.append(Mkdir(a, stat.S_IMODE(got.st.st_mode) | 0o700))
        return out

    def _touch_parent(self, rel: bytes, plan: Plan) -> None:
        """Restore the mtime of the directory of a put or symlink after the batch.

        The agent lands both with rename(2) from a temporary, which bumps the mirror directory's mtime even when the
        source's did not change (a file rewritten in place marks only CONTENT, so the coalescer does not mark its
        directory); without this the mirror's directory times drift from the source's (scan.diff does the same
        with its ``touched`` set).
        """
        par = parent(rel)
        if not par or par in self.ctx.touched:
            return  # the mirror root's own attributes are the operator's
        self.ctx.touched.add(par)
        got = self.seen(par)
        if got is not None and stat.S_ISDIR(got.st.st_mode):
            plan.dir_setattrs.append(SetAttr(par, None, got.st.st_mtime_ns))

    def plan_rescan(self, rel: bytes, plan: Plan, manifests: tuple[Manifest, Manifest] | None) -> None:
        """Reconcile the subtree ``rel``: ``manifests`` (the source's scan, the mirror's manifest) when ``rel`` is a
        directory in the source (see :meth:`AgentTransport._reconcile_inputs`), else None: then ``rel`` is planned
        as one path."""
        got = self.seen(rel)
        if manifests is None or got is None or not stat.S_ISDIR(got.st.st_mode):
            if rel in self.ctx.batch.writing:
                self.ctx.later.append(rel)
            else:
                self.plan_path(rel, CONTENT | EXIST | META, plan)
            return
        st = got.st
        src, dst = manifests
        sub = diff(src, dst, delete=self.opts.delete, checksum=self.opts.checksum, owner=self.opts.owner)
        pre = rel + b"/" if rel else b""
        if rel:
            plan.mkdirs.append(Mkdir(rel, stat.S_IMODE(st.st_mode) | 0o700))
            plan.dir_setattrs.append(SetAttr(rel, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
        # the ops of the root's rescan (a first sync: every path of the tree) keep their paths as they are
        at: Callable[[_Op], _Op] = (lambda op: op) if not pre else (lambda op: op._replace(path=pre + op.path))
        plan.deletes.extend(map(at, sub.deletes))
        plan.mkdirs.extend(map(at, sub.mkdirs))
        outside = self._rescan_links(src, pre)
        writing = self.ctx.batch.writing
        entries = src.entries
        puts = plan.puts
        for op in sub.puts:
            path = pre + op.path
            if writing and path in writing:
                self.ctx.later.append(path)  # open for writing: sent after its close, as a live change
                continue
            se = entries[op.path]
            if se.nlink == 1:
                puts.append(at(op))
                continue
            there = outside.get((se.dev, se.ino))
            if there:  # another name of this inode is on the mirror, outside the subtree: link, do not copy
                plan.hardlinks.append(Hardlink(path, there, se.size, se.mtime_ns))
                self.ctx.link_leaders[path] = there
            else:
                puts.append(at(op))
                self.ctx.rescan_puts.setdefault((se.dev, se.ino), path)
        plan.symlinks.extend(map(at, sub.symlinks))
        plan.hardlinks.extend(op._replace(path=pre + op.path, existing=pre + op.existing) for op in sub.hardlinks)
        plan.setattrs.extend(map(at, sub.setattrs))
        plan.dir_setattrs.extend(map(at, sub.dir_setattrs))


class AgentSender(_Part):
    """Sends a plan: whole files (small ones gathered in PutFiles frames), deltas against the mirror's copy, links,
    attributes and deletes; every read is checked against writers before it may land."""

    def many_files(self) -> _ManyFiles | None:
        """A PutFiles accumulator when the agent takes them; None under a bandwidth limit (paced per file, see
        _put_whole)."""
        assert self.link is not None
        return _ManyFiles() if "putfiles" in self.link.conn.capabilities and not self.opts.bwlimit else None

    def stream_planned(self, plan: Plan, rep: BatchReport, out: _Outgoing) -> None:
        """Send what :meth:`_plan_path` just planned if it can go before the rest of the plan: a Mkdir, or a small
        file that needs no delta (into the PutFiles frame being filled). Anything else stays in ``plan``."""
        link = self.link
        assert link is not None
        if plan.mkdirs:
            for op in plan.mkdirs:
                link.send(ap.Mkdir(op.path, op.mode))
            plan.mkdirs.clear()
        if plan.puts:
            p = plan.puts[-1]
            if p.basis and "delta" in link.conn.capabilities:
                return  # its signature is requested with the others in _send_plan
            plan.puts.pop()
            if not self._send_small(p, rep, out):
                plan.puts.append(p)

    def stream_scan(self, chunks: Iterable[list[tuple[bytes, Entry]]], rep: BatchReport,
                    out: _Outgoing) -> set[bytes]:
        """Send a first sync's directories and small files as the scan lists them (``chunks``: each directory's
        entries, parents first), into a mirror known to be empty; the paths sent (or to send again next batch).

        The agent creates and fills directories while the rest of the tree is scanned, instead of waiting for the
        whole scan, the diff and the plan (at 100,000 files a tenth of the sync; as long again for each tenfold). What
        this leaves (hard-linked files, symlinks, large files, files open for writing, directory attributes) goes
        with the plan made from the finished scan, as always: the caller leaves the paths sent out of that plan."""
        link = self.link
        assert link is not None
        streamed: set[bytes] = set()
        writing = self.ctx.batch.writing
        k_dir, k_file = Kind.DIR, Kind.FILE
        for chunk in chunks:
            for rel, e in chunk:
                if e.kind is k_dir:
                    link.send(ap.Mkdir(rel, e.mode | 0o700))  # its real mode comes with the directory attributes
                    streamed.add(rel)
                elif e.kind is k_file and e.nlink == 1 and e.size <= SMALL_FILE and rel not in writing:
                    out.total += 1
                    out.nbytes += e.size
                    if self._send_small(Put(rel, e.size, e.mode, e.mtime_ns), rep, out):
                        streamed.add(rel)
            link.write_now()  # the agent makes this directory's subdirectories now, not 4 MiB of frames later
        return streamed

    def _send_small(self, p: Put, rep: BatchReport, out: _Outgoing) -> bool:
        """Send ``p`` with other small files in a PutFiles frame; False when it must go another way."""
        many = out.many
        if many is None or p.size > SMALL_FILE or p.uid is not None or p.gid is not None:
            return False
        got = self._read_small(p, rep)
        if got is None:
            return False  # it grew past SMALL_FILE since the plan
        pf, moved = got
        if pf is not None and many.add(pf):
            self._send_files(rep, out)
        if moved:
            out.changed.append(p.path)
        self._report(rep, out)
        return True

    def _send_files(self, rep: BatchReport, out: _Outgoing) -> None:
        """Send the PutFiles frame being filled, without the files that must not land (see :meth:`_unlandable`:
        one capture barrier per frame, after its reads), which are sent again in a later batch."""
        assert self.link is not None and out.many is not None
        files = out.many.take()
        torn = self.host.unlandable([f.relpath for f in files])
        if torn:
            out.changed.extend(torn)
            dropped = [f for f in files if f.relpath in torn]
            rep.puts -= len(dropped)
            rep.literal -= sum(len(f.data) for f in dropped)
            files = tuple(f for f in files if f.relpath not in torn)
        if files:
            self.link.send(ap.PutFiles(files))
            self.link.write_now()  # a frame of files is work for the agent: handed over at once, without waiting
            self.ctx.sent.update((f.relpath, (len(f.data), f.mtime_ns)) for f in files if f.mtime_ns is not None)

    def send_plan(self, plan: Plan, rep: BatchReport, out: _Outgoing) -> list[bytes]:
        """Send every op of ``plan`` (after what :meth:`_stream_planned` sent already, with its PutFiles frame
        ``out``); returns paths whose source changed while being read (to send again)."""
        link = self.link
        assert link is not None
        # a type change on the mirror (a file where the source has a symlink...) is cleared before the create
        clearing, deletes = plan.clearing_deletes()
        for d in clearing:
            link.send(ap.Delete(d.path, recursive=True))
            rep.deletes += 1
        for op in plan.mkdirs:
            link.send(ap.Mkdir(op.path, op.mode))
        # signatures for every delta candidate first: the agent computes them while we stream the whole files
        delta_ok = "delta" in link.conn.capabilities
        sig_ids: dict[bytes, int] = {}
        wholes: list[Put] = []
        deltas: list[Put] = []
        for p in plan.puts:
            if p.basis and delta_ok and len(deltas) < ap.MAX_OPEN_SIGS:  # past the agent's bound: sent whole
                sig_ids[p.path] = sig_id = self.t.next_id()
                link.send(ap.SigRequest(sig_id, p.path))
                deltas.append(p)
            else:
                wholes.append(p)
        changed = out.changed
        out.total = max(out.total, rep.puts + len(wholes) + len(deltas))
        out.nbytes = max(out.nbytes, rep.literal + rep.matched + sum(p.size for p in plan.puts))
        self._report(rep, out)  # the totals before the first file
        many = out.many
        for p in wholes:
            if not self._send_small(p, rep, out):
                if self._put_whole(p, rep):
                    changed.append(p.path)
                self._report(rep, out)
        for p in deltas:
            sig = self._take_signature(sig_ids[p.path])
            if sig.file_size == 0 and self._send_small(p, rep, out):
                continue  # nothing on the mirror to diff against (a new file): it goes with the small ones
            if self._put_delta(p, sig, sig_ids[p.path], rep):
                changed.append(p.path)
            self._report(rep, out)
        if many is not None and many.files:
            self._send_files(rep, out)
        for s in plan.symlinks:
            link.send(ap.Symlink(s.path, s.target))
            link.send(ap.SetAttr(s.path, None, s.mtime_ns, s.uid, s.gid))
        self._send_links(plan, {p.path for p in plan.puts}, changed)
        for a in plan.setattrs:
            link.send(ap.SetAttr(a.path, a.mode, a.mtime_ns, a.uid, a.gid))
        # deletes after the puts (the mirror keeps serving old data until the new is there), children first
        for d in sorted(deletes, key=lambda d: -d.path.count(b"/")):
            link.send(ap.Delete(d.path, recursive=True))
            rep.deletes += 1
        for a in sorted(plan.dir_setattrs, key=lambda a: -a.path.count(b"/")):
            link.send(ap.SetAttr(a.path, a.mode, a.mtime_ns, a.uid, a.gid))
        return changed

    def _send_links(self, plan: Plan, put: set[bytes], changed: list[bytes]) -> None:
        """Send the plan's hard links, each checked by the agent against the size and mtime its existing name must
        have: what this batch sent there (``put``: the plan's puts), or what the planner believes the mirror holds.

        A link to a put of this batch that was not sent (dropped: changed while read, a writer had it open, gone) is
        not sent either: the mirror's name holds older data, or nothing. Its name goes to ``changed`` and its data is
        sent next batch instead, linked again to the other names then. Without ``linkcheck`` (an older agent) links
        go unchecked.
        """
        link = self.link
        assert link is not None
        checking = "linkcheck" in link.conn.capabilities
        for h in plan.hardlinks:
            if h.existing in put and h.existing not in self.ctx.sent:
                changed.append(h.path)
                continue
            size, mtime = self.ctx.sent.get(h.existing, (h.size, h.mtime_ns))
            if not checking or size is None or mtime is None:
                size = mtime = None
            link.send(ap.Hardlink(h.path, h.existing, size, mtime))

    def _report(self, rep: BatchReport, out: _Outgoing) -> None:
        """Progress, for a batch that reconciles a tree (see kwatch.replicate.progress)."""
        if self.ctx.batch.rescans:
            self.host.report_progress(rep.puts + rep.deltas, out.total, rep.literal + rep.matched, out.nbytes)

    def _open_source(self, rel: bytes) -> tuple[int, os.stat_result] | None:
        """The regular file ``rel`` beneath the source root and its fstat, which is what gets sent (size, mode,
        mtime, owner): a directory in the path swapped for a symlink since the plan is refused, not followed (the
        batch's directories are opened beneath the root once each: kwatch.fsutil.DirFds), and a FIFO or device
        found there is not opened for reading."""
        ctx = self.ctx
        try:
            if ctx.files is None:
                ctx.files = DirFds(self.src)
            return ctx.files.open_regular(rel)
        except OSError:
            # Vanished or replaced since the plan. The caller re-marks the path dirty (CONTENT): if it was renamed,
            # the rename event still queued moves that mark to the new name; otherwise the replayed rename would
            # carry the mirror's stale copy there and only its attributes would follow (stale data, fresh mtime,
            # which a quick-check rescan cannot see).
            return None

    def _changed(self, fd: int, before: os.stat_result) -> bool:
        after = os.fstat(fd)
        return (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            before.st_size, before.st_mtime_ns, before.st_ctime_ns)

    def _throttle(self, nbytes: int, started: float, sent: int) -> None:
        """Sleep until ``sent`` bytes of one file's data (first sent at ``started``) fit under ``bwlimit`` bytes/s.

        Called after every frame of file data (a PutFile, each PutChunk, each DeltaChunk with its literal bytes), so
        a file's end frame, which lands it on the mirror, waits for the pacing; time spent reading or computing a
        delta counts as elapsed. tests/e2e/test_replicate_bwlimit.py holds it to a lower bound on the transfer time.
        """
        if self.opts.bwlimit:
            ahead = sent / self.opts.bwlimit - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def _read_small(self, p: Put, rep: BatchReport) -> tuple[ap.PutFile | None, bool] | None:
        """Read a small file for a PutFiles frame: (the file or None if it is gone, whether to send it again next
        batch); None when it is no longer small (it grew since the plan), to be streamed by :meth:`_put_whole`.

        As with a single PutFile, the file is sent as read and a change during the read (size, mtime or ctime
        moved) sends it again next batch. One read of size + 1 bytes: a regular file's read is short only at EOF,
        and growth shows in that extra byte or in the fstat after. Whether a writer had it open is checked for the
        whole frame before it is sent (:meth:`_send_files`).
        """
        opened = self._open_source(p.path)
        if opened is None:
            return None, True  # gone or replaced since the plan: look again next batch (see _open_source)
        fd, st = opened
        try:
            if st.st_size > SMALL_FILE:
                return None
            data = os.read(fd, st.st_size + 1)
            if len(data) > st.st_size:
                return None
            moved = self._changed(fd, st)
        finally:
            os.close(fd)
        rep.puts += 1
        rep.literal += len(data)
        pf = ap.PutFile(p.path, stat.S_IMODE(st.st_mode), st.st_mtime_ns, data, xxhash.xxh3_128_digest(data))
        return pf, moved

    def _put_whole(self, p: Put, rep: BatchReport) -> bool:
        link = self.link
        assert link is not None
        opened = self._open_source(p.path)
        if opened is None:
            return True  # gone or replaced since the plan: look again next batch (see _open_source)
        fd, st = opened
        h = xxhash.xxh3_128()
        started, sent = time.monotonic(), 0
        try:
            if st.st_size <= SMALL_FILE:
                data = _read_upto(fd, SMALL_FILE + 1)
                if len(data) <= SMALL_FILE:  # else it grew since the stat: stream it below
                    if self.host.unlandable([p.path]):
                        return True
                    # Sent as read; a change during the read (size, mtime or ctime moved) sends it again next
                    # batch. A read racing a same-size in-place rewrite may land a mix for that short while.
                    link.send(ap.PutFile(p.path, stat.S_IMODE(st.st_mode), st.st_mtime_ns, data,
                                         xxhash.xxh3_128_digest(data)))
                    self.ctx.sent[p.path] = (len(data), st.st_mtime_ns)
                    if p.uid is not None or p.gid is not None:
                        # the mode again: setuid/setgid bits stay only once owner and group are set (agent rule)
                        link.send(ap.SetAttr(p.path, stat.S_IMODE(st.st_mode), None, *_owner(p, st)))
                    rep.puts += 1
                    rep.literal += len(data)
                    self._throttle(len(data), started, len(data))
                    return self._changed(fd, st)
                os.lseek(fd, 0, os.SEEK_SET)
            link.send(ap.PutBegin(p.path, st.st_size, stat.S_IMODE(st.st_mode)))
            # exactly the announced size goes on the wire (the protocol refuses more or less); a file that grew or
            # shrank meanwhile is caught by _changed below
            left = st.st_size
            while left > 0:
                data = os.read(fd, min(CHUNK, left))
                if not data:
                    break
                h.update(data)
                link.send(ap.PutChunk(data))
                sent += len(data)
                left -= len(data)
                self._throttle(len(data), started, sent)
            while left > 0:  # it shrank: keep the framing; the spoiled digest below makes the agent drop it
                pad = bytes(min(CHUNK, left))
                link.send(ap.PutChunk(pad))
                left -= len(pad)
            rep.puts += 1
            rep.literal += sent
            if self._changed(fd, st) or sent != st.st_size or self.host.unlandable([p.path]):
                self._drop_torn(p.path, delta=False, digest=h.digest())
                return True
            link.send(ap.PutEnd(h.digest()))
            link.send(ap.SetAttr(p.path, stat.S_IMODE(st.st_mode), st.st_mtime_ns, *_owner(p, st)))
            self.ctx.sent[p.path] = (st.st_size, st.st_mtime_ns)
            return False
        finally:
            os.close(fd)

    def _drop_torn(self, path: bytes, *, delta: bool, digest: bytes) -> None:
        """End a put or delta whose source changed while it was read so that the agent discards it.

        The bytes sent are a mix of two versions; landing them would show under the final name a file the source
        never had. A digest that cannot match (the real one inverted) makes the agent drop the temporary and report
        ``digest-mismatch``, which :meth:`_sync` expects for these paths; the path is sent again next batch.
        """
        assert self.link is not None
        spoiled = bytes(b ^ 0xFF for b in digest)
        self.ctx.torn.add(path)
        self.link.send(ap.DeltaEnd(spoiled) if delta else ap.PutEnd(spoiled))

    def _take_signature(self, sig_id: int) -> dl.Signature:
        from kwatch.replicate import delta as dl  # numpy: imported once a delta is wanted, not at start-up

        assert self.link is not None
        weak, strong = bytearray(), bytearray()
        while True:
            msg = self.link.take(ap.Signature, "a block signature")
            assert isinstance(msg, ap.Signature)
            if msg.id != sig_id:
                raise LinkError(f"signature {msg.id} arrived while waiting for {sig_id}")
            weak += msg.weak
            strong += msg.strong
            if msg.done:
                return dl.Signature.from_wire(msg.block_size, msg.file_size, bytes(weak), bytes(strong), msg.seed)

    def _put_delta(self, p: Put, sig: dl.Signature, sig_id: int, rep: BatchReport) -> bool:
        from kwatch.replicate import delta as dl

        link = self.link
        assert link is not None
        opened = self._open_source(p.path)
        if opened is None:
            # the agent still expects nothing for this signature; look at the path again next batch
            return True
        fd, st = opened
        if sig.file_size == 0:
            os.close(fd)
            return self._put_whole(p, rep)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                link.send(ap.DeltaBegin(p.path, sig_id, st.st_size, stat.S_IMODE(st.st_mode)))
                stream = dl.delta(sig, f)
                ops: list[dl.Copy | dl.Literal] = []
                pending = 0
                copying = 0  # basis bytes the ops gathered so far make the agent copy
                started = time.monotonic()
                sent = 0
                for op in stream:
                    ops.append(op)
                    if isinstance(op, dl.Literal):
                        pending += len(op.data)
                        sent += len(op.data)
                    else:
                        copying += op.count * sig.block_size
                    if pending >= CHUNK or len(ops) >= DELTA_OPS_PER_FRAME or copying >= DELTA_COPY_PER_FRAME:
                        link.send(ap.DeltaChunk(tuple(ops)))
                        # Hand it over now, not when 4 MiB have queued: a few small edits to a large file are a
                        # handful of tiny frames, and the agent's copying of the unchanged blocks (as long as this
                        # scan) should run beside the scan, not after it (bigfile benchmark: 1 GiB, 0.4 s).
                        link.write_now()
                        ops, pending, copying = [], 0, 0
                        self._throttle(0, started, sent)
                if ops:
                    link.send(ap.DeltaChunk(tuple(ops)))
                    self._throttle(0, started, sent)  # the tail's literal bytes count too
                rep.deltas += 1
                rep.literal += stream.stats.literal_bytes
                rep.matched += stream.stats.copied_bytes
                if self._changed(fd, st) or self.host.unlandable([p.path]):
                    self._drop_torn(p.path, delta=True, digest=stream.stats.digest)
                    return True
                link.send(ap.DeltaEnd(stream.stats.digest))
            link.send(ap.SetAttr(p.path, stat.S_IMODE(st.st_mode), st.st_mtime_ns, *_owner(p, st)))
            self.ctx.sent[p.path] = (st.st_size, st.st_mtime_ns)
            return False
        finally:
            os.close(fd)





class AgentTransport:
    """The kwatch agent (``kwatch agent`` on a local pipe or over ssh) as a :class:`~kwatch.replicate.transport
    .Transport`."""

    def __init__(self, host: Host, target: Target, opts: TargetOptions) -> None:
        self.host = host
        self.src = host.src
        self.coalescer = host.coalescer
        self.excluded = host.excluded
        self.target = target
        self.opts = opts
        self.link: AgentLink | None = None
        self.links = LinkIndex()  # names the mirror holds as one inode (see linkindex)
        self.ctx = BatchContext()
        self._seq = 0
        self._ids = 0
        self._wire_done = 0  # bytes written by the links closed so far
        self._prescan: _Prescan | None = None  # the root's scan made while the agent starts (see connect)
        #: the planner's one window on the source (lstat and readlink; a table in tests)
        self.look: Callable[[bytes], Seen | None] = functools.partial(look, self.src)
        self.planner = AgentPlanner(self)
        self.sender = AgentSender(self)

    def next_id(self) -> int:
        """A request id (manifests, signatures) unique on this transport."""
        self._ids += 1
        return self._ids

    # ---- the connection ---------------------------------------------------------------------------------------------

    def connect(self) -> None:
        # a local pipe has no wire to save: compressing would only spend CPU on both ends
        compress = self.opts.compress and self.target.kind != "local"
        caps = ap.CAPABILITIES - {cap for cap, off in (("zstd", not compress), ("oneshot", not self.host.once)) if off}
        # The batch after a connect reconciles the whole tree (a start, a reconnect): the source is scanned while
        # the agent starts (a Python start, and an ssh handshake: a third of a small first sync), not after.
        self._prescan = _Prescan(self.src, self._excludes(), self.opts.checksum, self.coalescer.changes) \
            if self.coalescer.root_rescan_pending() else None
        self.link = AgentLink(self.target.agent_argv(self.opts), timeout=self.opts.timeout, capabilities=caps)
        if not self.host.once:  # a one-shot run imports the delta engine where a file first needs it, if ever
            preload_delta()
        self.link.on_wait = self.host.fold_queued
        if self.host.on_agent is not None:
            self.host.on_agent(self.link.pid)
        log.info("target %s: agent up (pid %d, capabilities %s)", self.target.spec, self.link.pid,
                 ",".join(sorted(self.link.conn.capabilities)))

    def _excludes(self) -> tuple[bytes, ...]:
        return (*DEFAULT_EXCLUDES, *self.opts.excludes)

    def disconnect(self) -> None:
        self._prescan = None
        if self.link is not None:
            self._wire_done += self.link.bytes_out
            self.link.kill()
            self.link = None

    def close(self) -> None:
        if self.link is not None:
            self._wire_done += self.link.bytes_out
            self.link.close()
            self.link = None

    def wire_bytes(self) -> int:
        return self._wire_done + (self.link.bytes_out if self.link is not None else 0)

    def cut(self) -> None:
        """Cut a batch in flight from another thread (a stop past its grace): the agent is killed, so the thread
        sending the batch sees the link end and leaves; what landed landed whole (rename), the rest is not there."""
        link = self.link
        if link is not None and link.proc.poll() is None:
            link.proc.kill()

    # ---- one batch -------------------------------------------------------------------------------------------------

    def _reconcile_inputs(self, rel: bytes, out: _Outgoing | None = None,
                          rep: BatchReport | None = None) -> tuple[Manifest, Manifest] | None:
        """What the planner compares to reconcile the subtree ``rel``: a scan of the source and the mirror's manifest,
        fetched side by side (the agent scans while we do); None when ``rel`` is not a directory in the source.

        The first sync into an empty mirror (the root's rescan, the mirror's manifest empty, the scan made while the
        agent started still valid) does not wait for the whole scan: with ``out`` and ``rep`` its directories and
        small files are sent as the scan lists them (:meth:`AgentSender.stream_scan`), and the paths sent are kept in
        :attr:`BatchContext.streamed` for the plan to leave out."""
        link = self.link
        assert link is not None
        got = self.planner.seen(rel)
        if got is None or not stat.S_ISDIR(got.st.st_mode):
            return None
        link.send(ap.ManifestRequest(self.next_id(), rel or None, self.opts.checksum))
        prescan, self._prescan = self._prescan, None
        # the scan made while the agent started, if nothing changed since it began: a change folded in meanwhile
        # (which the root's rescan covers without a mark of its own) may be missing from it
        if prescan is not None and not (rel == b"" and prescan.valid(self.coalescer.changes)):
            prescan = None
        dst = Manifest(checksum=self.opts.checksum, identities="inodes" in link.conn.capabilities)
        prefix_len = len(rel) + 1 if rel else 0
        msg = link.take(ap.ManifestEntries, "the mirror's manifest")
        assert isinstance(msg, ap.ManifestEntries)
        if (prescan is not None and out is not None and rep is not None and msg.done and not msg.entries
                and out.many is not None and not self.opts.owner):
            self.ctx.streamed = self.sender.stream_scan(prescan.chunks(), rep, out)
        src = prescan.result() if prescan is not None else None
        if src is None:
            # rel is opened beneath the source root (a directory of it swapped for a symlink is not followed)
            src = scan(self.src, self._excludes(), checksum=self.opts.checksum, sub=rel)
        for err in src.errors:
            log.warning("target %s: scan: %s: %s", self.target.spec, os.fsdecode(err.path), err.reason)
        if self.ctx.streamed:
            # the plan is for what was not sent yet: diffing and planning a million files already sent took seconds
            # during which the agent had nothing left to do (directories stay: their attributes come last)
            sent, k_dir = self.ctx.streamed, Kind.DIR
            src = Manifest({p: e for p, e in src.entries.items() if e.kind is k_dir or p not in sent}, src.errors,
                           src.checksum, src.identities)
        # a hostile or broken agent could stream entries forever: the mirror may hold more than the source (what
        # --delete removes), but not without bound
        cap = max(MANIFEST_MIN_CAP, MANIFEST_FACTOR * len(src.entries))
        while True:
            for e in msg.entries:
                dst.entries[e.relpath[prefix_len:]] = _agent_entry(e)
            if msg.done:
                break
            if len(dst.entries) > cap:
                raise LinkError(f"the mirror's manifest of {os.fsdecode(rel) or 'the root'} passed {cap} entries "
                                f"({len(src.entries)} in the source): refused", down="protocol")
            msg = link.take(ap.ManifestEntries, "the mirror's manifest")
            assert isinstance(msg, ap.ManifestEntries)
        return src, dst

    def sync(self, b: Batch) -> BatchReport:
        try:
            return self._sync(b)
        finally:
            if self.ctx.files is not None:
                self.ctx.files.close()
                self.ctx.files = None

    def _sync(self, b: Batch) -> BatchReport:
        if self.link is None:
            raise LinkError("not connected")
        link = self.link
        rep = BatchReport()
        plan = Plan()
        self.ctx = ctx = BatchContext(batch=b)
        renames = list(b.renames)
        made: set[bytes] = set()
        for old, new in renames:
            for op in self.planner.mkdir_parents(new, b, made):
                link.send(ap.Mkdir(op.path, op.mode))
            link.send(ap.Rename(old, new))
            self.links.rename(old, new)
        rep.renames = len(renames)
        out = _Outgoing(self.sender.many_files(), len(b.dirty))
        for rel in sorted(b.rescans, key=len):
            self.planner.plan_rescan(rel, plan, self._reconcile_inputs(rel, out, rep))
        if ctx.streamed:  # sent while the source was scanned (a first sync): the rest of the plan goes as always
            sent = ctx.streamed
            plan.mkdirs = [op for op in plan.mkdirs if op.path not in sent]
            plan.puts = [op for op in plan.puts if op.path not in sent]
        # Without rescans, mkdirs and small whole files go out while the batch is planned: the agent works on them
        # while we look at the rest (planning 13,000 paths first kept it idle for 0.1-0.25 s per batch of an untar).
        # Paths come parents first (by depth), so a directory's Mkdir precedes the files put into it; what has
        # to wait for the whole plan (deltas, big files, links, attributes, deletes) still goes in _send_plan.
        streaming = not b.rescans and out.many is not None
        for rel, flags in sorted(b.dirty.items(), key=lambda kv: (kv[0].count(b"/"), kv[0])):
            if not any(is_under(rel, r) for r in b.rescans):
                self.planner.plan_path(rel, flags, plan)
                if streaming:
                    self.sender.stream_planned(plan, rep, out)
        self.planner.plan_links(plan)
        for d in plan.deletes:
            self.links.discard_under(d.path)
        changed = self.sender.send_plan(plan, rep, out)
        self._seq += 1
        link.send(ap.Commit(self._seq))
        ack = link.take(ap.Ack, f"the ack of batch {self._seq}")
        assert isinstance(ack, ap.Ack)
        res = interpret_ack(ack.errors, renames=renames, torn=ctx.torn, checked=ctx.checked | ctx.link_leaders.keys(),
                            link_leaders=ctx.link_leaders, changed=changed)
        for err in res.reported:
            log.warning("target %s: %s: %s (%s)", self.target.spec, os.fsdecode(err.relpath), err.message, err.code)
        rep.errors = res.reported
        rep.rescan, rep.missing, rep.transient = res.rescan, res.missing, res.transient
        rep.failed = {e.relpath for e in ack.errors}
        rep.resend = [*changed, *res.resend, *ctx.later]
        # Every name of a group is recorded, landed or not: when the data is next sent (a retry, a resend) each
        # name must be linked to it again. One that failed or was dropped is in doubt: linked, never linked to.
        unsure = rep.failed.union(rep.resend)
        for key, names in ctx.link_sets.items():
            self.links.add(key, names)
        self.links.trust(ctx.sent.keys() | ctx.link_leaders.keys())
        self.links.doubt(unsure)
        log.info(
            "target %s: batch %d: %d puts, %d deltas, %d renames, %d deletes, %d rescans; %d literal + %d matched "
            "bytes; %d errors", self.target.spec, self._seq, rep.puts, rep.deltas, rep.renames, rep.deletes,
            len(b.rescans), rep.literal, rep.matched, len(rep.errors))
        return rep


class _Prescan:
    """A scan of the whole source in a thread of its own, made while the agent starts; ``changes`` is the
    coalescer's count of changes when it began (see :meth:`valid`)."""

    def __init__(self, src: bytes, excludes: tuple[bytes, ...], checksum: bool, changes: int) -> None:
        self.changes = changes
        self._result: Manifest | None = None
        # each directory's entries as the scan lists them, then None (see chunks)
        self._listed: queue.SimpleQueue[list[tuple[bytes, Entry]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(src, excludes, checksum), name="prescan", daemon=True)
        self._thread.start()

    def _run(self, src: bytes, excludes: tuple[bytes, ...], checksum: bool) -> None:
        # an error of the scan (the root gone) leaves no result: the batch then scans as it always did, and fails
        # or not as it would have
        try:
            with contextlib.suppress(OSError):
                self._result = scan(src, excludes, checksum=checksum, on_dir=self._listed.put)
        finally:
            self._listed.put(None)

    def chunks(self) -> Iterator[list[tuple[bytes, Entry]]]:
        """The entries of each directory, parents first, as the scan lists them (once: they are consumed)."""
        while (chunk := self._listed.get()) is not None:
            yield chunk

    def valid(self, changes: int) -> bool:
        """Whether the scan saw every change the coalescer knows of: none was folded in since it began."""
        return changes == self.changes

    def result(self) -> Manifest | None:
        self._thread.join()
        return self._result


@dataclass
class _Outgoing:
    """What one batch's sending shares between :meth:`AgentTransport._stream_planned` and ``_send_plan``."""

    many: _ManyFiles | None  # the PutFiles frame being filled (None: small files go one by one)
    total: int  # files in the batch, for progress (an estimate while it is being planned)
    nbytes: int = 0  # their bytes, for progress (known once the plan is whole)
    changed: list[bytes] = field(default_factory=list)  # paths to send again next batch


class _ManyFiles:
    """Small files gathered into one PutFiles frame (up to FILES_FRAME_BYTES of data or FILES_PER_FRAME files)."""

    def __init__(self) -> None:
        self.files: list[ap.PutFile] = []
        self.nbytes = 0

    def add(self, f: ap.PutFile) -> bool:
        """Add ``f``; True when the frame is full and should be sent."""
        self.files.append(f)
        self.nbytes += len(f.data)
        return self.nbytes >= FILES_FRAME_BYTES or len(self.files) >= FILES_PER_FRAME

    def take(self) -> tuple[ap.PutFile, ...]:
        out = tuple(self.files)
        self.files, self.nbytes = [], 0
        return out


def _owner(p: Put, st: os.stat_result) -> tuple[int | None, int | None]:
    """The owner to send for ``p``: the opened file's (its fstat), when owners are sent at all."""
    if p.uid is None and p.gid is None:
        return None, None
    return st.st_uid, st.st_gid


def _read_upto(fd: int, limit: int) -> bytes:
    """Read from ``fd`` until EOF or ``limit`` bytes."""
    parts: list[bytes] = []
    got = 0
    while got < limit:
        data = os.read(fd, limit - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


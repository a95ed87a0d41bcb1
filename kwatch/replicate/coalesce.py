"""The coalescer: folds a stream of FileEvents under one source root into batches of "what is dirty".

Pure code: no I/O, the clock is passed in. A batch does not replay operations; it names paths whose current state
must be carried to the mirror (the planner looks at the source when the batch is flushed), plus the renames to
replay first so that moved data is moved, not re-sent. So create + write + chmod + rename of one file collapse into
"rename (if the mirror has the old one), then bring the new path up to date", and a tar extraction of 20,000 files
is a handful of batches of dirty paths.

Timing: a batch is due when no event arrived for ``settle`` seconds, or ``max_delay`` after its first event,
whichever is first. Files still open for writing are held back until closed, so a file is sent once, finished: a
write(2) is not atomic for a reader (the size grows folio by folio while mtime and ctime were set at its start, so
a writer descheduled mid-write shows a stable, partial file). The opens come from events, and at start or after a
loss from a scan of ``/proc`` (:meth:`Coalescer.seed_writers`, see ``kwatch.replicate.writers``). fanotify and
inotify report no open for writing of an existing file: a MODIFY of a file not held begins its hold there (their
only sign of a rewrite in progress), ended by its CLOSE_WRITE; a truncate(2) by name, MODIFY too, is held until
``max_delay``. A file that has been open for writing for ``max_delay`` is sent anyway (a log written forever must
still reach the mirror): the mirror then shows a state the source had, possibly mid-write, until the next change is
sent. The delay counts per file from the start of its hold; a batch that is overdue does not make a file opened a
moment ago overdue too.

Bounded memory: past ``max_paths`` dirty paths the batch collapses into a rescan of the whole root.

Losses: a loss marker that names a directory inside the tree (inotify: a directory it could not watch) is a rescan
of that directory only. A loss of unknown place (a full ring buffer, a queue overflow: the marker names ``/``) or a
path the kernel could not resolve whole (a suffix: where it lies is unknown) is a rescan of the whole tree, at most
once per ``full_rescan_every`` seconds: anyone who can write in a watched tree can cause losses, and must not be able
to make both ends walk the whole tree again and again. A full rescan asked for sooner is deferred to the end of that
interval (:meth:`Coalescer.due_in` counts it, so the target is not "synced" meanwhile); live events keep flowing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kwatch.events import RENAME_EXCHANGE, FileEvent, Op
from kwatch.paths import is_under, parent, rebase

CONTENT = 1  # data may differ: compare and send (whole or delta)
META = 2  # mode / owner / mtime may differ
EXIST = 4  # may have appeared, vanished or changed type
LINKED = 8  # a name of an inode that got a new hard link (link(2)); the data did not change because of it

_CONTENT_OPS = {Op.CREATE, Op.OPEN_WRITE, Op.MODIFY, Op.TRUNCATE, Op.CLOSE_WRITE}
_META_OPS = {Op.CHMOD, Op.CHOWN, Op.UTIMES, Op.XATTR, Op.ATTRIB}
_OPENERS = {Op.CREATE, Op.OPEN_WRITE}
#: seconds between two full rescans caused by losses or cut paths (see the module docstring)
FULL_RESCAN_EVERY = 30.0


def relative(root: bytes, path: bytes) -> bytes | None:
    """``path`` relative to ``root`` (``b""`` for the root itself), None when outside."""
    if root == b"/":
        return path[1:]
    if path == root:
        return b""
    if path.startswith(root) and path[len(root) : len(root) + 1] == b"/":
        return path[len(root) + 1 :]
    return None


@dataclass
class Batch:
    """What a flush must carry to the mirror. Paths are relative to the source root."""

    renames: list[tuple[bytes, bytes]] = field(default_factory=list)
    dirty: dict[bytes, int] = field(default_factory=dict)
    rescans: set[bytes] = field(default_factory=set)
    events: int = 0
    first_at: float = 0.0  # clock time of the first event folded in
    held: set[bytes] = field(default_factory=set)  # dirty paths held back: still open for writing when taken
    #: every path open for writing, held back at take time (dirty or not): a rescan in this batch must not send
    #: their content either (the engine leaves them to a later batch, see Coalescer.retry)
    writing: set[bytes] = field(default_factory=set)
    #: new name -> the name it was hard-linked from (``link(2)`` in this batch), when that name was on the mirror
    #: with its data unchanged at the time: ``ln a b; rm a`` makes ``b`` a link to the mirror's ``a`` (then ``a`` is
    #: deleted) instead of a copy. Rebased by renames like dirty paths; the planner still checks the source.
    link_from: dict[bytes, bytes] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.renames or self.dirty or self.rescans)


class Coalescer:
    def __init__(
        self, root: bytes, *, settle: float = 0.05, max_delay: float = 1.0, max_paths: int = 200_000,
        full_rescan_every: float = FULL_RESCAN_EVERY,
    ) -> None:
        self.root = root
        self.settle = settle
        self.max_delay = max_delay
        self.max_paths = max_paths
        self.full_rescan_every = full_rescan_every
        #: clock time of the last take that carried a full rescan; when a deferred full rescan is due (None: none)
        self._last_full: float | None = None
        self._full_due: float | None = None
        self._batch = Batch()
        self._last_at = 0.0
        #: how many changes (events, retries, seeded writers, rescans) were folded in so far: a scan of the source made
        #: while this stayed the same saw every change the coalescer knows of (see root_rescan_pending)
        self.changes = 0
        #: path -> (descriptors open for writing seen without a close, clock time the hold began)
        self._writing: dict[bytes, tuple[int, float]] = {}
        #: directories made since the last take (their events may not say they are directories)
        self._new_dirs: set[bytes] = set()
        #: paths opened for writing by an event folded since the last take, by the name the event gave (not rebased
        #: by renames: the engine asks for a batch's name and its current one, see opened_since_take)
        self._opened: set[bytes] = set()

    # ---- folding events ----------------------------------------------------------------------------------------

    def _arrived(self, now: float) -> Batch:
        """Count one change arriving at ``now`` (an event, a retry); the batch it goes into."""
        self.changes += 1
        b = self._batch
        if b.events == 0:
            b.first_at = now
        b.events += 1
        self._last_at = now
        return b

    def add(self, ev: FileEvent, now: float) -> None:
        b = self._arrived(now)
        if ev.op is Op.LOSS or ev.truncated:
            self._lost(ev, now)
            return
        if b"" in b.rescans:
            return  # the whole tree will be reconciled anyway
        rel = relative(self.root, ev.path)
        if ev.op is Op.RENAME or (ev.op is Op.LINK and ev.new_path is not None):
            new = relative(self.root, ev.new_path) if ev.new_path is not None else None
            if ev.op is Op.LINK:
                # Both names: the planner makes the new one a hard link of the old one on the mirror (which has
                # the old one unless it is new in this batch too) rather than a copy; see engine._plan_links.
                if rel is not None and new is not None:
                    origin = b.link_from.get(rel)
                    if origin is None and not b.dirty.get(rel, 0) & (CONTENT | EXIST):
                        origin = rel  # there before this batch and not written in it: the mirror has it
                    if origin is not None and origin != new:
                        b.link_from[new] = origin
                    else:
                        b.link_from.pop(new, None)
                elif new is not None:
                    b.link_from.pop(new, None)
                if new is not None:
                    self._mark(new, LINKED | EXIST)
                if rel is not None and new is not None:
                    self._mark(rel, LINKED)
            else:
                self._rename(rel, new, exchange=bool(ev.flags & RENAME_EXCHANGE))
            return
        if rel is None:
            return
        op = ev.op
        if op in _CONTENT_OPS:
            # A MODIFY of a directory is no rewrite (a utimensat(2) setting only mtime is MODIFY on fanotify, and
            # tar does that to every directory it made): holding it would leave its children without a parent.
            is_dir = ev.is_dir or rel in self._new_dirs
            if op in _OPENERS or (op is Op.MODIFY and rel not in self._writing and not is_dir):
                n, since = self._writing.get(rel, (0, now))
                self._writing[rel] = (n + 1, since)
                self._opened.add(rel)
            elif op is Op.CLOSE_WRITE:
                n, since = self._writing.get(rel, (0, now))
                if n > 1:
                    self._writing[rel] = (n - 1, since)
                else:
                    self._writing.pop(rel, None)
            self._mark(rel, CONTENT | (EXIST if op is Op.CREATE else 0))
        elif op in _META_OPS:
            self._mark(rel, META)
        elif op in (Op.MKDIR, Op.SYMLINK, Op.UNLINK, Op.RMDIR):
            if op in (Op.UNLINK, Op.RMDIR):
                self._writing.pop(rel, None)
                self._new_dirs.discard(rel)
            elif op is Op.MKDIR:
                self._new_dirs.add(rel)
            self._mark(rel, EXIST | META)

    def _lost(self, ev: FileEvent, now: float) -> None:
        """Events were lost, or ``ev``'s path is cut: rescan what may be affected (see the module docstring)."""
        if ev.op is Op.LOSS and ev.path and not ev.truncated:
            rel = relative(self.root, ev.path)
            if rel:
                self.rescan(rel)  # a loss below one directory of the tree
                return
            if rel is None and not is_under(self.root, ev.path):
                return  # a loss in another tree (neither inside this one nor above it)
        if self._last_full is None or now - self._last_full >= self.full_rescan_every:
            self.rescan(b"")
        elif self._full_due is None:
            self._full_due = self._last_full + self.full_rescan_every

    def seed_writers(self, found: dict[bytes, int], now: float) -> None:
        """Take ``found`` (path relative to the root -> descriptors open for writing, from a scan of ``/proc``) as
        what is open for writing now, replacing what events said: at start no open made before capture attached was
        seen, and after a loss opens and closes may have been missed. A path already held keeps the time its hold
        began; a path found with no hold begins one now.

        An open that the scan saw but whose event is folded only after this call is counted twice; its hold then
        ends by age (``max_delay``), not at its close.
        """
        self.changes += 1
        self._writing = {rel: (n, self._writing.get(rel, (0, now))[1]) for rel, n in found.items() if n > 0}

    def retry(self, rel: bytes, now: float, flags: int = CONTENT) -> None:
        """Look at ``rel``'s content again in a later batch (it changed while it was read, or a rescan left it out
        because it was open for writing). Unlike a synthesized CLOSE_WRITE this keeps its hold: a file that changed
        while read is likely still being written."""
        self._arrived(now)
        self._mark(rel, flags)

    def is_writing(self, rel: bytes, now: float) -> bool:
        """Whether ``rel`` is open for writing by the events folded so far (or by the last /proc seeding) with a
        hold younger than ``max_delay``: what :meth:`take` would hold back now (a file open longer is sent anyway)."""
        held = self._writing.get(rel)
        return held is not None and now - held[1] < self.max_delay

    def opened_since_take(self, rel: bytes) -> bool:
        """Whether an open for writing of ``rel`` (by that name) was folded in since the last :meth:`take`: a read of
        this batch's file may have seen that writer's partial output even if it has closed the file since."""
        return rel in self._opened

    def rescan(self, rel: bytes) -> None:
        """Reconcile the subtree ``rel`` by scanning (after a loss, an overflow, a tree moved in from outside)."""
        self.changes += 1
        b = self._batch
        if any(is_under(rel, r) for r in b.rescans):
            return
        b.rescans = {r for r in b.rescans if not is_under(r, rel)}
        b.rescans.add(rel)
        if rel == b"":
            b.dirty.clear()
            b.renames.clear()
            b.link_from.clear()

    def _mark(self, rel: bytes, flags: int) -> None:
        b = self._batch
        if b"" in b.rescans:
            return
        b.dirty[rel] = b.dirty.get(rel, 0) | flags
        if flags & EXIST and rel:
            # an entry appeared or vanished: its directory's mtime changed too
            p = parent(rel)
            b.dirty[p] = b.dirty.get(p, 0) | META
        if len(b.dirty) > self.max_paths:
            self.rescan(b"")

    def _rename(self, old: bytes | None, new: bytes | None, *, exchange: bool) -> None:
        if old is None and new is None:
            return
        if new is None:  # moved out of the tree: it is gone from the mirror's point of view
            assert old is not None
            self._forget(old)
            self._mark(old, EXIST)
            return
        if old is None:  # moved in from outside: a whole tree may have arrived
            self._drop_links(new)
            self.rescan(new)
            self._mark(new, EXIST)
            return
        if exchange:
            self._drop_links(old)
            self._drop_links(new)
            self.rescan(old)
            self.rescan(new)
            return
        b = self._batch
        b.renames.append((old, new))
        # what was at the new name is gone; what was below the old name is below the new one
        self._drop_links(new)
        b.link_from = {(rebase(k, old, new) if is_under(k, old) else k): (rebase(v, old, new) if is_under(v, old) else v)
                       for k, v in b.link_from.items()}
        # pending state follows the object to its new name
        moved = {k: v for k, v in b.dirty.items() if is_under(k, old) and k != b""}
        for k in moved:
            del b.dirty[k]
        for k, v in moved.items():
            b.dirty[rebase(k, old, new)] = v
        for k in [k for k in self._writing if is_under(k, old)]:
            self._writing[rebase(k, old, new)] = self._writing.pop(k)
        self._new_dirs = {rebase(k, old, new) if is_under(k, old) else k for k in self._new_dirs}
        b.rescans = {rebase(r, old, new) if is_under(r, old) and r else r for r in b.rescans}
        # both directories changed; the new name must exist on the mirror afterwards
        self._mark(old, EXIST)
        self._mark(new, EXIST)

    def _drop_links(self, rel: bytes) -> None:
        """Forget link origins at or below ``rel``, as new names or as the names linked from."""
        b = self._batch
        if b.link_from:
            b.link_from = {k: v for k, v in b.link_from.items() if not is_under(k, rel) and not is_under(v, rel)}

    def _forget(self, rel: bytes) -> None:
        b = self._batch
        self._drop_links(rel)
        for k in [k for k in b.dirty if is_under(k, rel) and k != rel]:
            del b.dirty[k]
        for k in [k for k in self._writing if is_under(k, rel)]:
            del self._writing[k]
        self._new_dirs = {k for k in self._new_dirs if not is_under(k, rel)}

    def current_name(self, rel: bytes) -> bytes:
        """Where ``rel`` is now, after the renames folded in since the last :meth:`take`.

        For marks that belong before those renames: what a batch's ack re-queues (a file changed while it was
        read, a rename the mirror could not replay) is about the names of that batch, while events that came during
        it may have been folded in already; a rename among them must carry the mark along, as it would have had
        the mark come first (the mirror's copy moves with the rename, stale, and only its attributes would follow).
        """
        for old, new in self._batch.renames:
            if is_under(rel, old) and old:
                rel = rebase(rel, old, new)
        return rel

    # ---- flushing ------------------------------------------------------------------------------------------------

    def root_rescan_pending(self) -> bool:
        """Whether the next batch reconciles the whole tree (a start, a reconnect, a loss)."""
        return b"" in self._batch.rescans

    def pending(self) -> bool:
        """Whether the current batch holds anything (a deferred full rescan does not count: :meth:`due_in` does)."""
        return not self._batch.empty()

    def pending_paths(self) -> int:
        """Dirty paths waiting in the current batch (a metric; rescans count as one each)."""
        return len(self._batch.dirty) + len(self._batch.rescans)

    def due_in(self, now: float) -> float | None:
        """Seconds until the batch should be flushed (0: now); None when nothing is pending."""
        b = self._batch
        if b.empty():
            return None if self._full_due is None else max(0.0, self._full_due - now)
        due = min(self._last_at + self.settle, b.first_at + self.max_delay)
        if self._full_due is not None:
            due = min(due, self._full_due)
        return max(0.0, due - now)

    def writing(self, now: float) -> set[bytes]:
        """Paths open for writing whose hold has lasted less than ``max_delay``: their content waits."""
        return {k for k, (_n, since) in self._writing.items() if now - since < self.max_delay}

    def take(self, now: float) -> Batch:
        """Hand over the current batch. Paths still open for writing stay behind for the next batch until they have
        been open for ``max_delay`` (a file written forever must still reach the mirror); the batch lists them all
        in :attr:`Batch.writing` so that a rescan leaves them out too."""
        if self._full_due is not None and now >= self._full_due:
            self._full_due = None
            self.rescan(b"")
        b = self._batch
        if b"" in b.rescans:
            self._last_full = now
            self._full_due = None  # this one covers every loss folded so far
        self._batch = Batch()
        self._opened = set()
        self._new_dirs = set()  # made in the batch handed over: on the mirror before anything the next one sends
        if self._writing:
            b.writing = self.writing(now)
            held = {k: b.dirty.pop(k) for k in b.writing if k in b.dirty}
            if held:
                b.held = set(held)
                nb = self._batch
                nb.dirty.update(held)
                # polled again after ``settle`` (or at the next event): each held path has its own deadline
                nb.first_at = now
                nb.events = 1
                self._last_at = now
        return b

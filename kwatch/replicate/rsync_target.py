"""rsync:// targets: the same coalescer and batches as the agent, carried by the native rsync client.

A stock ``rsync --daemon`` has no rename or delete message: each batch becomes one rsync session that sends the
batch's paths (the dirty ones, both names of every rename, and the rescanned subtrees); a path that no longer exists
is deleted on the daemon (``--delete-missing-args``, or with ``fuzzy`` by listing its parent directory under
``--delete-after``), a renamed file is sent again under its new name, and with ``fuzzy`` the daemon may use a
similar file in the same directory as the delta basis (``--fuzzy``), so a rename within a directory moves little
data. A rescan of the whole tree is one full push with ``--delete``. Either way the mirror ends identical, mtimes of
directories and symlinks included (rsync_transport: ``-@-1``; the ``--delete-after`` pass runs before the
receiver's final directory-time touch-up, so ``fuzzy`` costs no accuracy).

``bwlimit`` paces every byte written to the daemon (rsync_transport: as rsync's own ``--bwlimit``, so the file
list and the token stream count, not only file data as with the agent).

Not carried to an rsync daemon: hard links (the native client does not send rsync's ``-H`` hard-link data, so the
names of a linked file arrive as separate copies with the same content; a ``link(2)`` marks both names, and both
are simply sent).
"""

from __future__ import annotations

import logging

from kwatch.protocols.errors import ProtocolError
from kwatch.replicate.coalesce import Batch
from kwatch.replicate.engine import BatchReport, Replicator
from kwatch.replicate.link import LinkError
from kwatch.replicate.rsync_transport import push

log = logging.getLogger("kwatch.replicate")


class RsyncReplicator(Replicator):
    def _connect(self) -> None:
        # one session per batch: nothing to hold open; the first batch (a full rescan) proves the daemon is there
        self.stats.connected = True

    def _disconnect(self) -> None:
        self.stats.connected = False

    def _sync(self, b: Batch) -> BatchReport:
        rep = BatchReport()
        if b"" in b.rescans:
            paths = None
        else:
            todo = set(b.dirty) | b.rescans
            for old, new in b.renames:
                todo.add(old)
                todo.add(new)
            todo.discard(b"")
            paths = sorted(todo)
            if not paths:
                return rep
        try:
            res = push(self.src, self.target.spec, paths, delete=self.opts.delete,
                       password_file=self.opts.password_file, fuzzy=self.opts.fuzzy, timeout=self.opts.timeout,
                       bwlimit=self.opts.bwlimit)
        except (ProtocolError, OSError) as e:
            raise LinkError(f"rsync push failed: {e}") from e
        rep.puts = res.files
        rep.deletes = res.deleted
        rep.literal = res.literal_bytes
        rep.matched = res.matched_bytes
        st = self.stats
        st.batches += 1
        st.files += res.files
        st.deletes += res.deleted
        st.bytes_literal += res.literal_bytes
        st.bytes_matched += res.matched_bytes
        st.bytes_wire += res.bytes_sent
        st.errors += len(res.errors)
        if b.rescans:
            st.rescans += len(b.rescans)
        for err in res.errors:
            log.warning("target %s: %s", self.target.spec, err)
        log.info("target %s: rsync batch: %s paths, %d files sent, %d deleted; %d literal + %d matched bytes",
                 self.target.spec, "all" if paths is None else len(paths), res.files, res.deleted,
                 res.literal_bytes, res.matched_bytes)
        return rep

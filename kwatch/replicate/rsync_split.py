"""One batch's file list for an rsync daemon cut into parts that can be sent at the same time, each in a session
of its own on a connection of its own.

Why: a session is one TCP connection (the daemon protocol allows one session per connection), so every session
starts in TCP slow start and pays the connection's and the greeting's round trips. On a link with a long round
trip a batch of a few MB spends most of its time there; several connections in parallel grow their windows
together and pay those round trips once for all of them (docs/replication.md, "rsync:// on a slow link").

Parts must not get in each other's way on the receiver:

- a directory listed as a content directory (the receiver deletes inside it what the list does not name: a dirty
  or rescanned directory, a parent listed for ``--delete-after``) goes to one part with all its direct children
  (its subdirectories as plain directories there when their own content went to another part): its deletion can
  then remove nothing another part lists, nor another part's temporaries, which are in other directories;
- the names of one inode go to one part (``-H`` links only the names of one list);
- a directory is listed as a plain (non-content) directory by every other part that has something below it, with
  the same attributes (one scan): each part's receiver sets its mtime again after its own last change inside it
  (generator.c touch_up_dirs), so the last part to end leaves it right whichever ends last;
- the transfer root is such a content directory in a whole-tree push (``.``): its part has every top-level name,
  the others list none of it but their top-level directories, which its part creates too before it sets the
  root's mtime (a ``mkdir`` that finds the directory made by another part is no error: generator.c
  recv_generator).

Pure: entries in, lists of entries out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kwatch.protocols.rsync.flist import FileEntry

#: parts of a batch at most (connections to the daemon at once)
MAX_PARTS = 6
#: bytes of file data (plus :data:`ENTRY_COST` per entry) a part should carry at least: below this a session of its
#: own costs more (a connection, a daemon process, the greeting) than the parallel windows save
MIN_PART = 384 << 10
ENTRY_COST = 512


def _ancestors(name: bytes) -> list[bytes]:
    out = []
    i = name.find(b"/")
    while i > 0:
        out.append(name[:i])
        i = name.find(b"/", i + 1)
    return out


def split(entries: Sequence[FileEntry], max_parts: int = MAX_PARTS, min_part: int = MIN_PART) -> list[list[FileEntry]]:
    """``entries`` (one batch's list, every name's ancestors in it) as parts to send at the same time (see the
    module docstring); one part when the list is small or cannot be cut. Each part keeps the order of ``entries``."""
    weight = sum(ENTRY_COST + (e.size if e.is_reg else 0) for e in entries)
    want = min(max_parts, weight // max(1, min_part))
    if want < 2:
        return [list(entries)]
    index = {e.name: i for i, e in enumerate(entries)}
    # a unit: a directory's entries that must go together (by the directory's name, b"." the root's): a content
    # directory itself and its direct children, or the direct children of a plain directory
    units: dict[bytes, list[int]] = {}
    parent: dict[bytes, bytes] = {}  # union-find over units (the names of one inode)

    def find(u: bytes) -> bytes:
        while parent.get(u, u) != u:
            u = parent[u] = parent.get(parent[u], parent[u])
        return u

    by_inode: dict[tuple[int, int], bytes] = {}
    for i, e in enumerate(entries):
        up = e.name.rpartition(b"/")[0] or b"."
        if e.name != b".":
            units.setdefault(up, []).append(i)
        if e.is_dir and e.content_dir:
            units.setdefault(e.name, []).append(i)
        if e.inode is not None:
            other = by_inode.setdefault(e.inode, up)
            if find(other) != find(up):
                parent[find(up)] = find(other)
    merged: dict[bytes, set[int]] = {}
    keys: dict[bytes, list[bytes]] = {}  # the units merged into each
    for u, members in units.items():
        merged.setdefault(find(u), set()).update(members)
        keys.setdefault(find(u), []).append(u)
    if len(merged) < 2:
        return [list(entries)]
    weights = {u: sum(ENTRY_COST + (entries[i].size if entries[i].is_reg else 0) for i in m)
               for u, m in merged.items()}
    n = min(want, len(merged))
    loads = [0] * n
    own: list[set[int]] = [set() for _ in range(n)]  # the entries of the part's units
    roots: list[set[bytes]] = [set() for _ in range(n)]  # the part's units
    for u in sorted(weights, key=lambda k: (-weights[k], k)):  # largest first, to the lightest part
        k = min(range(n), key=loads.__getitem__)
        loads[k] += weights[u]
        own[k].update(merged[u])
        roots[k].add(u)
    # a unit's entries are its directory and that directory's children: their ancestors are the directory's
    dir_of = {u: [index[a] for a in (*_ancestors(u), u) if a in index] for u in units}
    parts: list[list[FileEntry]] = []
    for k in range(n):
        if not own[k]:
            continue
        # a content directory is sent as such by the part that has it as a unit; elsewhere (a child of another
        # unit's content directory, an ancestor) as a plain directory, which deletes nothing
        need = set(own[k])
        for root in roots[k]:
            for u in keys[root]:
                need.update(dir_of[u])
        part = []
        for i in sorted(need):
            e = entries[i]
            if e.is_dir and e.content_dir and find(e.name) not in roots[k]:
                e = dataclasses.replace(e, content_dir=False)
            part.append(e)
        parts.append(part)
    return _without_idle(parts)


def _without_idle(parts: list[list[FileEntry]]) -> list[list[FileEntry]]:
    """``parts`` without those that list only plain directories another part lists too (the units of a plain
    directory's subdirectories, say): such a session would set only what the others set."""
    kept = list(range(len(parts)))
    names = [{e.name for e in p} for p in parts]
    for k in range(len(parts)):
        others = [j for j in kept if j != k]
        if all(e.is_dir and not e.content_dir and any(e.name in names[j] for j in others) for e in parts[k]):
            kept.remove(k)
    return [parts[k] for k in kept]

"""Renames on an rsync daemon without sending the data again: the sessions that let a stock daemon build a renamed
tree from the copy it already has.

The rsync protocol has no rename, but a receiver looks for a file missing at its destination in ``--link-dest``
dirs (named relative to the destination, ``..`` allowed up to the module's top) and hard-links it from there when
size, mtime and mode match (else copies it locally, else uses it as the delta basis: generator.c try_dests_reg).
The lookup is ``basis/<name in the list>``, so a renamed directory is sent in a session of its own whose
destination is the new name and whose basis is the old one: every file is linked, none is sent, and the batch's
own session then deletes the old name. A file moved to another directory goes in a session for its new directory
with the old directory as the basis; a different base name is found by the fuzzy search in that basis
(``--fuzzy --fuzzy``), as a delta basis. A rename within one directory needs none of this: the batch's session
already lets ``--fuzzy`` find the old file there.

Pure: where the source has what comes in as a callable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kwatch.paths import is_under, rebase

#: A batch's move sessions at most: each costs a connection and a few round trips, so a batch of thousands of
#: renames (one directory at a time) sends its last ones as new files instead.
MAX_SESSIONS = 16


@dataclass(frozen=True, slots=True)
class Move:
    """One session: ``subdir``'s tree (``names`` None) or those names in it, with ``basis`` (relative to
    ``subdir``) as the ``--link-dest`` dir. All paths are relative to the transfer root."""

    subdir: bytes
    names: tuple[bytes, ...] | None
    basis: bytes
    fuzzy: bool  # a name differs from its old one: the fuzzy search must look in the basis too


def origins(renames: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """For each name a batch's renames (in order) moved something to, where that is on the mirror (which has
    none of them yet). A name moved again is followed; what is below a moved directory moves with it."""
    moves: dict[bytes, bytes] = {}

    def origin(p: bytes) -> bytes:
        best = max((k for k in moves if is_under(p, k)), key=len, default=None)
        return p if best is None else rebase(p, best, moves[best])

    for old, new in renames:
        if not old or not new or old == new:
            continue
        o = origin(old)
        kept: dict[bytes, bytes] = {}
        for k, v in moves.items():
            if is_under(k, old):
                if k != old:
                    kept[rebase(k, old, new)] = v  # moved along, deeper than ``new``: still the better origin
            elif not is_under(k, new):
                kept[k] = v  # what was at or below ``new`` is gone
        kept[new] = o
        moves = kept
    return {k: v for k, v in moves.items() if k != v}


def _parent(p: bytes) -> bytes:
    return p.rpartition(b"/")[0]


def _depth(m: Move) -> int:
    """Components of the deepest path the session moves."""
    d = m.subdir.count(b"/") + 1 if m.subdir else 0
    return d if m.names is None else d + 1


def _rel(target: bytes, start: bytes) -> bytes:
    """``target`` relative to the directory ``start`` (both relative to the transfer root, b"" for it)."""
    return os.path.relpath(target or b".", start or b".")


def plan(renames: Iterable[tuple[bytes, bytes]], kind: Callable[[bytes], str | None],
         max_sessions: int = MAX_SESSIONS) -> list[Move]:
    """The move sessions for a batch's renames, deepest first (a tree moved into a moved tree is in place before
    the outer session, which then skips it). ``kind(path)``: ``"dir"``, ``"file"`` (regular) or None (gone,
    or something a session need not move) in the source now."""
    dirs: list[Move] = []
    files: dict[tuple[bytes, bytes], list[tuple[bytes, bytes]]] = {}
    for new, old in origins(renames).items():
        if is_under(new, old) or is_under(old, new):
            continue
        k = kind(new)
        if k == "dir":
            dirs.append(Move(new, None, _rel(old, new), True))
        elif k == "file" and _parent(new) != _parent(old):
            files.setdefault((_parent(new), _parent(old)), []).append((new, old))
    moves = dirs + [
        Move(nd, tuple(sorted(n for n, _ in pairs)), _rel(od, nd),
             any(n.rpartition(b"/")[2] != o.rpartition(b"/")[2] for n, o in pairs))
        for (nd, od), pairs in files.items()
    ]
    moves.sort(key=lambda m: (-_depth(m), m.subdir))
    return moves[:max_sessions]

"""Which part of a batch's rsync file list may go while earlier batches' sessions are still in flight.

Why: on a link with a long round trip a session spends most of its time in round trips and TCP slow start, and a
batch taken during a burst (an untar) would otherwise wait for the one before it to end, leaving the link idle
while the burst's data piles up (docs/replication.md, "rsync:// on a slow link").

Only batches that create and change go ahead, and their sessions delete nothing (no ``--delete``): a content
directory's deletion removes what its own list does not name, which could be what another session in flight just
landed there. Whatever deletion such a batch would have made is left to a session of its own once none is in
flight (the caller lists its content directories again then). What is left to keep the sessions out of each other's
way on the receiver is the names both lists carry:

- a file, symlink or directory listed by a session in flight with the same type and attributes (size, mtime, mode,
  target) is being sent already: left out;
- any other name in both could land in the wrong order (the older content last): held back, and so is everything
  below it (its parent may not be on the mirror yet); the caller marks it for a later batch;
- a directory in both gets its attributes from the session that touches it up last (generator.c touch_up_dirs),
  which may be the older: when the lists carry different attributes the caller sends it again once no session is
  in flight (:func:`stale_dirs`).

Pure: entries in, entries and names out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kwatch.paths import below_any
from kwatch.protocols.rsync.flist import FileEntry


def _attrs(e: FileEntry) -> tuple[int, int, int, int, bytes | None]:
    return e.mode, e.size, e.mtime, e.mtime_nsec, e.link_target


class InFlight:
    """The entries of the sessions in flight, by name."""

    def __init__(self, lists: Iterable[Sequence[FileEntry]] = ()) -> None:
        self.by_name: dict[bytes, FileEntry] = {}
        for entries in lists:
            for e in entries:
                self.by_name[e.name] = e


def plan(entries: Sequence[FileEntry], inflight: InFlight) -> tuple[list[FileEntry], list[bytes]]:
    """(the entries that may go now, in their order; the names held back for the caller to mark again, the topmost
    of each subtree held back: a later batch lists a marked directory whole)."""
    held: set[bytes] = set()
    kept: list[FileEntry] = []
    again: list[bytes] = []
    for e in entries:
        name = e.name
        if below_any(name, held):
            held.add(name)  # marked with its held ancestor, which a later batch lists whole
            continue
        other = inflight.by_name.get(name)
        if other is None or (other.is_dir and e.is_dir):
            kept.append(e)
        elif _attrs(other) != _attrs(e):
            held.add(name)
            again.append(name)
        # else: on its way already
    return kept, again


def stale_dirs(older: Sequence[FileEntry], newer: Sequence[FileEntry]) -> list[bytes]:
    """The directories of both lists with different attributes: the mirror may end with ``older``'s if its session
    touches them up last."""
    mine = {e.name: _attrs(e) for e in older if e.is_dir}
    return sorted(e.name for e in newer if e.is_dir and mine.get(e.name, _attrs(e)) != _attrs(e))


def tops(dirs: Iterable[bytes]) -> list[bytes]:
    """``dirs`` without those below another of them."""
    every = set(dirs)
    return sorted(d for d in every if not below_any(d, every))

"""What the agent's Ack of a batch means for the sender. Pure: a table of the agent's per-path errors, in, and what
to do about each, out (tests/unit/test_ack.py lists the cases).

Most errors are real (counted, logged, and the path repaired or retried by the replicator), but some are the
expected consequence of what this batch did on purpose:

- a rename whose old name the mirror never had (created and renamed within one batch: ENOENT/ENOTDIR on the old
  name) becomes a rescan of the new name, and an attribute change of that new name failing with ENOENT is part of it;
- a put or delta dropped with a spoiled digest because the file changed while it was read (``digest-mismatch`` on
  a path of ``torn``) is sent again anyway;
- a hard link to such a dropped put (ENOENT, its leader among ``changed``) follows its group;
- a checked hard link to a name the mirror did not hold as expected (ESTALE/ENOENT on a path of ``checked``): the
  data is sent next batch instead.

Of the rest only a path's first error decides the repair (the others, its attributes after its put failed, say,
follow from it): ENOENT -> ``missing`` (its directory is rescanned), a transient error -> ``transient`` (retried
with backoff).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from kwatch.paths import is_under
from kwatch.protocols.agent import PathError

#: Per-path errors of the mirror that may pass by themselves (space freed, quota raised, a read-only remount undone,
#: a busy file): the path is sent again later with a doubling wait. Other errors (EACCES, ENAMETOOLONG...) wait for
#: the path's next change.
TRANSIENT = frozenset({"ENOSPC", "EDQUOT", "EIO", "EROFS", "ENOMEM", "EAGAIN", "EBUSY", "ETXTBSY", "EMFILE", "ENFILE"})

_GONE = ("ENOENT", "ENOTDIR")


@dataclass
class AckOutcome:
    reported: list[PathError] = field(default_factory=list)  # real errors: counted and logged
    rescan: list[bytes] = field(default_factory=list)  # new names of renames the mirror could not replay
    resend: list[bytes] = field(default_factory=list)  # send the data of these again next batch
    missing: list[bytes] = field(default_factory=list)  # first error ENOENT: the mirror lacks a directory
    transient: list[bytes] = field(default_factory=list)  # first error transient: retry with backoff


def interpret_ack(
    errors: Iterable[PathError],
    *,
    renames: Iterable[tuple[bytes, bytes]] = (),
    torn: Collection[bytes] = (),
    checked: Collection[bytes] = (),
    link_leaders: Mapping[bytes, bytes] | None = None,
    changed: Collection[bytes] = (),
) -> AckOutcome:
    """Sort a batch's per-path ``errors`` (see the module docstring). ``renames`` are the batch's (old, new);
    ``torn`` the paths dropped on purpose with a spoiled digest; ``checked`` the hard links checked against the
    mirror's inode; ``link_leaders`` path -> the name it was linked to; ``changed`` the paths sent again anyway."""
    errors = list(errors)
    leaders = link_leaders or {}
    sources = dict(renames)
    out = AckOutcome()
    moved = [sources[e.relpath] for e in errors if e.relpath in sources and e.code in _GONE]
    first: set[bytes] = set()
    for err in errors:
        if err.code == "digest-mismatch" and err.relpath in torn:
            continue
        if err.relpath in sources and err.code in _GONE:
            out.rescan.append(sources[err.relpath])
            continue
        if err.code == "ENOENT" and any(is_under(err.relpath, n) for n in moved):
            continue
        leader = leaders.get(err.relpath)
        if leader is not None and err.code == "ENOENT" and (leader in changed or leader in out.resend):
            continue
        if err.relpath in checked and err.code in ("ESTALE", "ENOENT"):
            out.resend.append(err.relpath)
            continue
        out.reported.append(err)
        if err.relpath in first:
            continue
        first.add(err.relpath)
        if err.code == "ENOENT":
            out.missing.append(err.relpath)
        elif err.code in TRANSIENT:
            out.transient.append(err.relpath)
    return out

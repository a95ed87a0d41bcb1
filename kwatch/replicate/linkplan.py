"""One hard-link planner: the operations for the names of one source inode, whichever way they were found. Pure.

Both planners of replication decide hard links one inode at a time: the reconcile (kwatch.replicate.scan, from a
source and a mirror manifest) and the live planner (kwatch.replicate.agent_transport, from a batch's events and the
link index). They differ in how they learn which names the mirror already holds as one inode with the right data,
and which name is the best one to send data under; given that, what to send is decided here:

- when the mirror keeps an inode with the data (``kept``: its names, best first), nothing is sent: its first name
  leads and every other name of the group is linked to it;
- otherwise the data is sent once, under the first ``basis`` name (a name the mirror has a file at: a delta needs a
  basis) or else the first name, and every other name is linked to it.

The agent lands data with rename(2) from a temporary, so a name that is not relinked after a put keeps the old
inode: every name but the leader (and the kept ones, already that inode) gets a link.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple


class GroupOps(NamedTuple):
    """What to do for one inode: send ``leader``'s data (``put``) or keep the mirror's, then link ``links`` to it."""

    leader: bytes
    put: bool
    links: list[bytes]


def plan_group(names: Iterable[bytes], kept: Sequence[bytes] = (), basis: Sequence[bytes] = ()) -> GroupOps:
    """The operations for the ``names`` (in order) one source inode should have on the mirror.

    ``kept``: names the mirror holds as one inode with this data, best first (they need no link; the first may be
    outside ``names``); ``basis``: names to prefer for sending the data when nothing is kept. Links keep the order
    of ``names``."""
    if kept:
        keep = set(kept)
        return GroupOps(kept[0], False, [p for p in names if p not in keep])
    names = list(names)
    if not names:
        raise ValueError("a link group without names")
    leader = basis[0] if basis else names[0]
    return GroupOps(leader, True, [p for p in names if p != leader])

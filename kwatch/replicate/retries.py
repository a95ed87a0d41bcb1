"""When a path that failed on the mirror with an error that may pass (a full disk, a busy file: ``TRANSIENT`` in
:mod:`kwatch.replicate.ack`) is sent again. Pure: the clock is passed in.

The first retry waits RETRY_FIRST seconds, each failure of the retry itself twice its last wait, up to RETRY_MAX;
a path that lands starts over. A path that fails again while its retry is still waiting (another batch sent it: a
rescan, a rename, a new change) keeps its wait: the wait grows with the time the mirror has been failing, not with
the number of batches that touched the path meanwhile (a full disk of a few seconds, during which a busy path fails
in a dozen batches, would otherwise put its next try a minute away). The earliest due time is kept so the
replicator's loop looks at the table only when something is due.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from kwatch.paths import is_under, rebase

RETRY_FIRST = 2.0
RETRY_MAX = 60.0


class PathRetries:
    def __init__(self, first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> None:
        self.first = first
        self.cap = cap
        self.at: dict[bytes, float] = {}  # path -> when it is sent again
        self.wait: dict[bytes, float] = {}  # path -> its last wait (doubles while it fails)
        self.next = float("inf")  # the earliest of ``at`` (inf: none)

    def landed(self, sent: Collection[bytes], failed: Collection[bytes]) -> None:
        """Paths of a batch (``sent``) that did not fail again landed: their next failure waits ``first`` again."""
        for rel in [r for r in self.wait if r in sent and r not in failed]:
            del self.wait[rel]

    def schedule(self, paths: Iterable[bytes], now: float) -> list[tuple[bytes, float]]:
        """Retry ``paths`` (they failed again); returns each with its wait."""
        out = []
        for rel in paths:
            if rel in self.at:  # its retry is still waiting: this failure came from another batch
                out.append((rel, self.at[rel] - now))
                continue
            wait = min(self.wait.get(rel, self.first / 2) * 2, self.cap)
            self.wait[rel] = wait
            self.at[rel] = now + wait
            self.next = min(self.next, now + wait)
            out.append((rel, wait))
        return out

    def due(self, now: float) -> list[bytes]:
        """The paths whose retry is due at ``now``, taken off the table."""
        if now < self.next:
            return []
        due = [r for r, at in self.at.items() if at <= now]
        for rel in due:
            del self.at[rel]
        self.next = min(self.at.values(), default=float("inf"))
        return due

    def rename(self, old: bytes, new: bytes) -> None:
        """``old`` (a file, or a directory and what is below it) is now ``new``: its retries follow it."""
        for table in (self.at, self.wait):
            for rel in [r for r in table if is_under(r, old)]:
                table[rebase(rel, old, new)] = table.pop(rel)

    def __len__(self) -> int:
        return len(self.at)

"""When a failed target is tried again: exponential backoff with jitter and a cap. Pure (the random source is
passed in).

Each failure doubles the wait up to ``cap``; the wait actually used is drawn from its upper half ("equal jitter"),
so targets that failed together (one mirror host behind several, a network cut) do not all reconnect in the same
instant, and a target never retries sooner than half its nominal wait. A success resets it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

FIRST = 0.5
CAP = 30.0


class Backoff:
    def __init__(self, first: float = FIRST, cap: float = CAP, rand: Callable[[], float] = random.random) -> None:
        self.first = first
        self.cap = cap
        self._rand = rand
        self._nominal = first

    def next(self) -> float:
        """The wait before the next attempt (after a failure); the one after it is twice as long, up to the cap."""
        nominal = self._nominal
        self._nominal = min(nominal * 2, self.cap)
        return nominal / 2 + self._rand() * nominal / 2

    def reset(self) -> None:
        """The target is up again: the next failure waits ``first`` again."""
        self._nominal = self.first

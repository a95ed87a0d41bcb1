"""When actions may start: per-file debounce and coalescing, batches, and the concurrency caps. Pure: the time is
passed in by the caller (the runner), so every rule here is tested without clocks or processes.

- **Coalescing**: matches of one action for one file (same ``_FILE_``/``_OLD_FILE_``/``_NEW_FILE_``) that arrive
  while an earlier one still waits collapse into one job, carrying the latest event. A burst of writes gives one run.
- **Debounce**: a job is due ``debounce`` seconds after the *last* match for it, but no later than ``debounce_max``
  (default 10 x debounce) after the first, so a file written without pause still gets its action.
- **One run per file at a time**: a job whose file's previous run is still going waits for it to end (and keeps
  collecting matches meanwhile): a run never sees a file that another run of the same action is rewriting.
- **Batches**: an action with ``batch`` set collects files (each once, first-seen order) for ``batch_window``
  seconds after the first, or until ``batch_max`` files; then the batch becomes one job, which ``split`` may cut
  into several (the runner keeps each command under ARG_MAX).
- **Caps**: at most ``max_concurrency`` jobs run at once overall, and ``rule.concurrency`` per rule. Due jobs start
  in the order they became due; one blocked by its rule's cap does not hold back other rules.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kwatch.rules.match import Match
from kwatch.rules.model import Action, BatchMode, Rule

JobKey = tuple[object, ...]


@dataclass(eq=False)
class Job:
    """Work for one command: a single match (the latest of a coalesced burst), or a batch of them."""

    rule: Rule
    action: Action
    key: JobKey
    matches: list[Match]
    first: float
    due: float
    seq: int
    coalesced: int = 1  # matches that went into this job
    seen: set[bytes] = field(default_factory=set)  # batch: files already in it

    @property
    def batch(self) -> bool:
        return self.action.options.batch is not BatchMode.OFF

    @property
    def files(self) -> tuple[bytes, ...]:
        return tuple(m.file for m in self.matches)


def _no_split(job: Job) -> list[Job]:
    return [job]


class Scheduler:
    def __init__(self, max_concurrency: int = 8, split: Callable[[Job], list[Job]] = _no_split) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self.split = split
        self._seq = itertools.count()
        self._pending: dict[JobKey, Job] = {}  # still collecting matches
        self._closed: list[Job] = []  # full batches and split chunks: due, waiting only for a free slot
        self._running_keys: Counter[JobKey] = Counter()
        self._running_rules: Counter[int] = Counter()
        self.running = 0

    def next_seq(self) -> int:
        return next(self._seq)

    def add(self, m: Match, now: float) -> None:
        opts = m.action.options
        if opts.batch is not BatchMode.OFF:
            self._add_batch(m, now)
            return
        key: JobKey = ("file", id(m.action), m.file, m.old_file, m.new_file)
        job = self._pending.get(key)
        longest = opts.debounce_max if opts.debounce_max is not None else 10 * opts.debounce
        if job is None:
            self._pending[key] = Job(m.rule, m.action, key, [m], now, now + opts.debounce, self.next_seq())
            return
        job.matches = [m]
        job.coalesced += 1
        job.due = min(job.first + longest, now + opts.debounce)

    def _add_batch(self, m: Match, now: float) -> None:
        opts = m.action.options
        key: JobKey = ("batch", id(m.action))
        job = self._pending.get(key)
        if job is None:
            job = Job(m.rule, m.action, key, [], now, now + opts.batch_window, self.next_seq(), coalesced=0)
            self._pending[key] = job
        job.coalesced += 1
        if m.file in job.seen:
            return
        job.seen.add(m.file)
        job.matches.append(m)
        if len(job.matches) >= opts.batch_max:
            del self._pending[key]
            job.due = now
            self._closed.extend(self.split(job))

    def flush(self, now: float) -> None:
        """Make every waiting job due now (shutdown, tests, ``kwatch run --once``)."""
        for job in self._pending.values():
            job.due = min(job.due, now)

    def ready(self, now: float) -> list[Job]:
        """Jobs to start now; they count as running until :meth:`finished`."""
        for key, job in list(self._pending.items()):
            if job.due <= now and job.batch:
                del self._pending[key]
                self._closed.extend(self.split(job))
        candidates = self._closed + [j for j in self._pending.values() if j.due <= now]
        candidates.sort(key=lambda j: (j.due, j.seq))
        started: list[Job] = []
        for job in candidates:
            if self.running >= self.max_concurrency:
                break
            if self._running_rules[id(job.rule)] >= job.rule.concurrency:
                continue
            if not job.batch and self._running_keys[job.key]:
                continue
            if job.batch:
                self._closed.remove(job)
            else:
                del self._pending[job.key]
            self._running_keys[job.key] += 1
            self._running_rules[id(job.rule)] += 1
            self.running += 1
            started.append(job)
        return started

    def finished(self, job: Job) -> None:
        self._running_keys[job.key] -= 1
        if not self._running_keys[job.key]:
            del self._running_keys[job.key]
        self._running_rules[id(job.rule)] -= 1
        if not self._running_rules[id(job.rule)]:
            del self._running_rules[id(job.rule)]
        self.running -= 1

    def next_due(self, now: float) -> float | None:
        """The earliest time after ``now`` at which a waiting job becomes due (None: nothing waits for a time).

        Jobs already due but blocked by a cap or by their file's running job wait for a run to finish instead.
        """
        later = [j.due for j in self._pending.values() if j.due > now]
        return min(later) if later else None

    @property
    def waiting(self) -> int:
        return len(self._pending) + len(self._closed)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._closed and self.running == 0

"""The Source interface every capture backend implements, and the filter it is configured with.

A Source yields batches of :class:`kwatch.events.FileEvent`. Backends push what filtering they can into the kernel
(BPF: op mask, watched trees, excluded pids); :meth:`CaptureFilter.accepts` is the exact userspace check that every
backend applies last, so the kernel side may only over-approximate, never drop a matching event.
"""

from __future__ import annotations

import os
import select
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, Self

from kwatch.events import FileEvent, Op, normalize


class CaptureError(RuntimeError):
    """A backend cannot start here; the message says why and what to do."""


_ALL_OPS = frozenset(Op)


@dataclass(frozen=True)
class CaptureFilter:
    """What to capture. Empty ``roots`` means the whole system.

    ``exclude_pids``: processes whose operations are not reported. The BPF backend also drops their descendants
    (the kernel keeps the exclusion across fork); fanotify and inotify know only the pid of an event.
    """

    roots: tuple[bytes, ...] = ()
    ops: frozenset[Op] = frozenset(Op)
    exclude_pids: frozenset[int] = frozenset()
    _prefixes: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())
    _exact: frozenset[bytes] = field(init=False, repr=False, compare=False, default=frozenset())

    @classmethod
    def make(
        cls,
        roots: Iterable[os.PathLike[str] | str | bytes] = (),
        ops: Iterable[Op] | None = None,
        exclude_pids: Iterable[int] = (),
    ) -> CaptureFilter:
        norm = tuple(sorted({normalize(os.fsencode(r)) for r in roots}))
        return cls(norm, frozenset(ops) if ops is not None else frozenset(Op), frozenset(exclude_pids))

    def __post_init__(self) -> None:
        # is_under() for every root at once, as two C-level checks: equal to a root, or starts with "root/"
        object.__setattr__(self, "_prefixes", tuple(r.rstrip(b"/") + b"/" for r in self.roots))
        object.__setattr__(self, "_exact", frozenset(self.roots))

    def select(self, events: list[FileEvent]) -> list[FileEvent]:
        """The events :meth:`accepts` keeps, in order: most go through one inline check, the rest through accepts.

        An event under a root (by string prefix), of a wanted op and not of an excluded pid is kept without a call;
        anything else (another op, a root itself, a rename into a root, a cut path, a loss marker) is decided by
        :meth:`accepts`. The op test is skipped when every op is wanted: hashing an enum member is a Python call.
        """
        accepts = self.accepts
        excl = self.exclude_pids
        if not self.roots:
            if self.ops >= _ALL_OPS:
                return [ev for ev in events if ev.pid not in excl or accepts(ev)] if excl else list(events)
            return [ev for ev in events if accepts(ev)]
        prefixes = self._prefixes
        if self.ops >= _ALL_OPS:
            return [ev for ev in events if (ev.path.startswith(prefixes) and ev.pid not in excl) or accepts(ev)]
        ops = self.ops
        return [
            ev for ev in events if (ev.path.startswith(prefixes) and ev.op in ops and ev.pid not in excl) or accepts(ev)
        ]

    def accepts(self, ev: FileEvent) -> bool:
        if ev.op is Op.LOSS:
            return True
        if ev.op not in self.ops:
            return False
        if ev.pid is not None and ev.pid in self.exclude_pids:
            return False
        if not self.roots or ev.truncated:
            # a cut path cannot be placed: deliver it, flagged, rather than drop what may be inside a root
            return True
        prefixes, exact = self._prefixes, self._exact
        p = ev.path
        if p.startswith(prefixes) or p in exact:
            return True
        q = ev.new_path
        return q is not None and (q.startswith(prefixes) or q in exact)


@dataclass
class SourceStats:
    events: int = 0  # delivered to the consumer
    lost: int = 0  # known lost (kernel ring buffer full, fanotify/inotify queue overflow)
    overflows: int = 0  # loss markers emitted
    filtered: int = 0  # dropped by the userspace filter
    by_op: dict[str, int] = field(default_factory=dict)


class Source(Protocol):
    """A running capture backend."""

    name: str
    #: FileEvent fields this backend fills (the others stay None).
    fields: frozenset[str]

    def fileno(self) -> int:
        """A descriptor that becomes readable when events are waiting (for select/epoll)."""
        ...

    def poll_within(self) -> float | None:
        """The longest wait on :meth:`fileno` before :meth:`read` must be called anyway (None: no limit).

        A backend that batches its wake-ups under load (the BPF ring buffer) asks its caller to poll meanwhile.
        """
        ...

    def read(self, timeout: float | None = None) -> list[FileEvent]:
        """Wait up to ``timeout`` seconds (None: forever) and return every event available, maybe none."""
        ...

    def stats(self) -> SourceStats: ...

    def close(self) -> None: ...


def check_watched_root(backend: str, root: bytes) -> None:
    """Raise :class:`CaptureError` unless ``root`` (a tree to watch) is a directory."""
    try:
        st = os.stat(root)
    except OSError as e:
        raise CaptureError(f"{backend}: cannot watch {root!r}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise CaptureError(f"{backend}: watched root {root!r} is not a directory")


class FdSource:
    """What a backend read from one kernel queue fd (fanotify, inotify) does with it: hand it out for select/epoll
    (readable whenever an event is queued), wait for it to be readable, close it once (also as a context manager)."""

    name: str
    _fd: int = -1

    def fileno(self) -> int:
        return self._fd

    def poll_within(self) -> float | None:
        return None  # the descriptor is readable whenever an event is queued

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poll(self, timeout: float | None) -> bool:
        """Whether the queue became readable within ``timeout`` seconds (None: wait forever). The wait is rounded up
        to the next millisecond, so a short one does not become a busy loop; a closed source raises."""
        if self._fd < 0:
            raise CaptureError(f"{self.name} source is closed")
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

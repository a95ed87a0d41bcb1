"""The progress of a batch that reconciles a tree (the first sync, any rescan): files and bytes done against the
plan's totals, the rate so far and the time left, and its two renderings (a live terminal line, a ``key=value`` log
line). Pure: the clock is passed in; the replicator (:mod:`kwatch.replicate.engine`) feeds it and decides when to
show it, ``kwatch status`` shows the fields the replicator copies into its :class:`~kwatch.metrics.stats.TargetStats`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """Files and bytes sent by one batch, against what its plan holds (``*_total``)."""

    files_total: int
    bytes_total: int
    started: float  # monotonic
    files_done: int = 0
    bytes_done: int = 0
    now: float = 0.0  # the time of the last advance

    def __post_init__(self) -> None:
        self.now = max(self.now, self.started)

    def advance(self, files_done: int, bytes_done: int, now: float) -> None:
        """The batch has sent ``files_done`` files, ``bytes_done`` bytes of their data; never goes backwards (a file
        dropped after its read and sent again later does not make the count shrink)."""
        self.files_done = max(self.files_done, files_done)
        self.bytes_done = max(self.bytes_done, bytes_done)
        # the plan is an estimate of what is sent: a file that grew since the scan raises the total, not past 100%
        self.files_total = max(self.files_total, self.files_done)
        self.bytes_total = max(self.bytes_total, self.bytes_done)
        self.now = max(self.now, now)

    @property
    def elapsed(self) -> float:
        return self.now - self.started

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def files_per_s(self) -> float:
        return self.files_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far: bytes when the batch has data to send, else files; None before any."""
        if self.files_done >= self.files_total and self.bytes_done >= self.bytes_total:
            return 0.0
        if self.bytes_total and self.bytes_done:
            return (self.bytes_total - self.bytes_done) / self.bytes_per_s if self.bytes_per_s else None
        if self.files_done and self.files_per_s:
            return (self.files_total - self.files_done) / self.files_per_s
        return None

    def fields(self) -> dict[str, int | float | None]:
        """The figures, by the names the log line and ``kwatch status`` use."""
        eta = self.eta
        return {
            "files": self.files_done, "files_total": self.files_total,
            "bytes": self.bytes_done, "bytes_total": self.bytes_total,
            "bytes_per_s": round(self.bytes_per_s), "files_per_s": round(self.files_per_s, 1),
            "elapsed_s": round(self.elapsed, 2), "eta_s": None if eta is None else round(eta, 1),
        }


def log_line(target: str, p: Progress, *, done: bool = False) -> str:
    """``progress target=... files=... files_total=... bytes=... bytes_total=... bytes_per_s=... files_per_s=...
    elapsed_s=... eta_s=... done=0|1``: one line, a value never has a space (the target is quoted if it has one)."""
    name = target if " " not in target and '"' not in target else '"' + target.replace('"', '\\"') + '"'
    parts = [f"target={name}"] + [f"{k}={'-' if v is None else v}" for k, v in p.fields().items()]
    return "progress " + " ".join([*parts, f"done={int(done)}"])


def live_line(target: str, p: Progress) -> str:
    """One terminal line: ``target: 1,234/5,479 files, 12.3/126.0 MB, 45.6 MB/s, 3s left``."""
    eta = p.eta
    left = "?" if eta is None else _duration(eta)
    return (f"{target}: {p.files_done:,}/{p.files_total:,} files, {p.bytes_done / 1e6:.1f}/{p.bytes_total / 1e6:.1f} MB, "
            f"{p.bytes_per_s / 1e6:.1f} MB/s, {left} left")


def _duration(s: float) -> str:
    s = int(s + 0.5)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Pacer:
    """When to show progress: at most once per ``interval`` seconds, and always the first and the last time."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None

    def due(self, now: float, *, final: bool = False) -> bool:
        if final or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False

"""Choosing a backend: BPF, else fanotify, else inotify — or exactly the one asked for."""

from __future__ import annotations

from collections.abc import Callable

from kwatch.capture.base import CaptureError, CaptureFilter, Source

BACKENDS = ("bpf", "fanotify", "inotify")


def _open(name: str, filt: CaptureFilter) -> Source:
    if name == "bpf":
        from kwatch.capture.bpf import BpfSource

        return BpfSource(filt)
    if name == "fanotify":
        from kwatch.capture.fanotify import FanotifySource

        return FanotifySource(filt)
    if name == "inotify":
        from kwatch.capture.inotify import InotifySource

        return InotifySource(filt)
    raise CaptureError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} or auto")


def open_source(filt: CaptureFilter, backend: str = "auto", warn: Callable[[str], None] | None = None) -> Source:
    """Open ``backend``; with ``auto`` try each in order and tell ``warn`` why a better one was not taken."""
    if backend != "auto":
        return _open(backend, filt)
    reasons: list[str] = []
    for name in BACKENDS:
        try:
            src = _open(name, filt)
        except (CaptureError, OSError, ImportError) as e:
            reasons.append(f"{name}: {e}")
            continue
        if reasons and warn is not None:
            warn(f"using the {name} backend; not available: " + "; ".join(r.splitlines()[0] for r in reasons))
        return src
    raise CaptureError("no capture backend works here:\n  " + "\n  ".join(reasons))

"""Choosing a backend: BPF, else fanotify, else inotify — or exactly the one asked for."""

from __future__ import annotations

from collections.abc import Callable

from kwatch.capture.base import CaptureError, CaptureFilter, Source

BACKENDS = ("bpf", "fanotify", "inotify")

#: What each backend cannot see, in plain words (docs/capture.md "Blind spots" explains each). `--backend auto` logs
#: the chosen backend's list and `kwatch doctor` prints it.
BLIND_SPOTS: dict[str, list[str]] = {
    "bpf": [
        "which files io_uring operations touch: the syscall tracepoints never see them; each batch of io_uring "
        "writes, opens, renames, unlinks, mkdirs... by a process not excluded (anywhere on the system) becomes a "
        "LOSS marker instead (replication rescans the whole tree), where the io_uring tracepoints exist",
        "the kernel's own resolution of a name: a name through a symlinked directory (`rm /link/f` with "
        "/link -> watched/) is placed by resolving its directory when kwatch reads the event, so a link changed "
        "in between places it where the link points then; `..` after a symlink is resolved as text",
        "the true name when another thread rewrites the path buffer between the kernel's use and syscall exit",
        "the last close of a file: CLOSE_WRITE comes once per descriptor closed (a shell redirection gives two)",
    ],
    "fanotify": [
        "which process did it beyond the pid (no ppid, uid, comm)",
        "the order of events merged by the kernel for one object",
        "a hard link as such (reported as a new file) and which attribute changed (chmod, chown, xattr, utimes)",
        "changes on other filesystems than the roots' (one mark per filesystem)",
    ],
    "inotify": [
        "which process did it (no pid at all)",
        "writes into a new directory before its watch is added (the scan after reports the entries only)",
        "the whole system (`/` is refused)",
    ],
}


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
        if warn is not None:
            if reasons:
                warn(f"using the {name} backend; not available: " + "; ".join(r.splitlines()[0] for r in reasons))
            warn(f"the {name} backend cannot see: " + "; ".join(BLIND_SPOTS[name]) + " (kwatch doctor tells more)")
        return src
    raise CaptureError("no capture backend works here:\n  " + "\n  ".join(reasons))

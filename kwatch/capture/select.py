"""Choosing a backend: BPF, else fanotify, else inotify — or exactly the one asked for."""

from __future__ import annotations

from collections.abc import Callable

from kwatch.capture.base import CaptureError, CaptureFilter, Source

BACKENDS = ("bpf", "fanotify", "inotify")

#: What each backend cannot see, in plain words (docs/capture.md "Blind spots" explains each). `--backend auto` logs
#: the chosen backend's list and `kwatch doctor` prints it. The BPF backend's list depends on the program the kernel
#: took: "bpf" for the syscall tracepoints, "bpf-vfs" for the VFS hooks (:func:`blind_spots_key`).
_OTHER_MNTNS = (
    "the host path of a change made in another mount namespace (a container, unshare -m): under watched roots it "
    "becomes a LOSS marker naming the namespace (replication rescans); watching everything, the event comes with "
    "its path inside that namespace and mntns set"
)

BLIND_SPOTS: dict[str, list[str]] = {
    # the VFS hooks close four of the tracepoints' blind spots: io_uring's operations are events, names are the
    # dentries the kernel resolved (symlinked directories, ".." after a symlink), nothing is read from user memory
    # after the kernel used it, and CLOSE_WRITE comes once, at the last close
    "bpf-vfs": [
        "operations by kernel code that skips the LSM path hooks: nfsd serving NFS clients, overlayfs writing its "
        "upper layer (the change through the overlay itself is seen)",
        "opens on filesystems that open the file while looking it up (atomic_open: an NFS or CIFS client, some "
        "FUSE filesystems): no CREATE/OPEN_WRITE there; CLOSE_WRITE and the other ops are seen",
        "whether an open had O_TRUNC (the kernel clears the flag before the hook sees the file)",
        _OTHER_MNTNS,
    ],
    "bpf": [
        "which files io_uring operations touch: the syscall tracepoints never see them; each batch of io_uring "
        "writes, opens, renames, unlinks, mkdirs... by a process not excluded (anywhere on the system) becomes a "
        "LOSS marker instead (replication rescans the whole tree), where the io_uring tracepoints exist",
        "the kernel's own resolution of a name: a name through a symlinked directory (`rm /link/f` with "
        "/link -> watched/) is placed by resolving its directory when kwatch reads the event, so a link changed "
        "in between places it where the link points then; `..` after a symlink is resolved as text",
        "the true name when another thread rewrites the path buffer between the kernel's use and syscall exit",
        "a change made through a /proc/PID/fd/N link (glibc's fchmodat with AT_SYMLINK_NOFOLLOW, which tar uses for "
        "directory modes: chmod(\"/proc/self/fd/3\")): lost",
        "the last close of a file: CLOSE_WRITE comes once per descriptor closed (a shell redirection gives two)",
        _OTHER_MNTNS,
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


def blind_spots_key(src: Source) -> str:
    """The :data:`BLIND_SPOTS` key of an open source: its name, or "bpf-vfs" for the BPF backend on VFS hooks."""
    return "bpf-vfs" if getattr(src, "hooks", None) == "vfs" else src.name


def hooks_label(src: Source) -> str | None:
    """What the BPF backend's program hooks, in words ("VFS hooks: fentry/fexit", "syscall tracepoints"); None for
    the other backends."""
    return {"vfs": "VFS hooks: fentry/fexit", "tracepoints": "syscall tracepoints"}.get(getattr(src, "hooks", ""))


def describe(src: Source) -> str:
    """The source's name, with the hooks the BPF backend runs on: what the log, status and doctor say."""
    label = hooks_label(src)
    return f"{src.name} ({label})" if label else src.name


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
                warn(f"using the {describe(src)} backend; not available: "
                     + "; ".join(r.splitlines()[0] for r in reasons))
            elif getattr(src, "hooks", None) == "tracepoints":
                # the kernel refused the VFS hooks: say so, with the kernel's words
                refused = getattr(src, "refused", [])
                if refused:
                    warn(f"using the {describe(src)} backend; the VFS hooks were refused: "
                         + refused[0][1].splitlines()[0])
            warn(f"the {describe(src)} backend cannot see: " + "; ".join(BLIND_SPOTS[blind_spots_key(src)])
                 + " (kwatch doctor tells more)")
        return src
    raise CaptureError("no capture backend works here:\n  " + "\n  ".join(reasons))

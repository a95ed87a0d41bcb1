"""The ``replicate`` command: argument parsing and wiring of capture -> replicators (the mirror end's ``agent``
command is :mod:`kwatch.mirror.command`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from types import FrameType

from kwatch.capture.barrier import CaptureBarrier, pump
from kwatch.capture.base import CaptureError, CaptureFilter, Source
from kwatch.events import FileEvent
from kwatch.replicate import options
from kwatch.replicate.engine import make_replicator, wait_synced
from kwatch.replicate.progress import Progress, live_line
from kwatch.replicate.target import Target


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("replicate", help="keep mirrors identical to a source tree, in real time")
    r.add_argument("source", help="the tree to replicate")
    r.add_argument("targets", nargs="+", help="/local/path, [user@]host:/path, or rsync://[user@]host[:port]/module/path")
    r.add_argument("--once", action="store_true", help="reconcile once and exit (no live capture)")
    options.add_arguments(r)
    r.add_argument("--backend", default="auto", choices=["auto", "bpf", "fanotify", "inotify"])
    r.add_argument("--progress-interval", type=float, metavar="SECONDS",
                   help="seconds between the progress lines of a first sync or rescan when stderr is not a terminal "
                   "(default 5; a terminal gets a live line)")
    r.set_defaults(func=cmd_replicate)


#: seconds `kwatch replicate` gives its targets to send what is pending when it is told to stop
STOP_GRACE = 0.8

class _Stop(BaseException):  # not an Exception: an `except Exception` on the way must not take it for an error
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _live_progress(target: str, p: Progress, final: bool) -> None:
    """The progress of a reconcile as one terminal line, rewritten in place; the last one stays."""
    sys.stderr.write("\r\x1b[K" + live_line(target, p) + ("\n" if final else ""))
    sys.stderr.flush()


def _check_password_file(path: str) -> None:
    from kwatch.filesafety import unsafe_file

    try:
        problem = unsafe_file(path, secret=True)
    except OSError as e:
        problem = f"cannot read {path}: {e.strerror or e}"
    if problem is not None:
        raise SystemExit(f"kwatch replicate: --password-file: {problem}")


def _open_capture(src: bytes, backend: str) -> Source:
    from kwatch.capture.select import open_source

    try:
        return open_source(CaptureFilter.make(roots=[src], exclude_pids=[os.getpid()]), backend,
                           warn=lambda m: print(f"kwatch: {m}", file=sys.stderr))
    except CaptureError as e:
        raise SystemExit(f"kwatch replicate: {e}") from e


def cmd_replicate(args: argparse.Namespace) -> int:
    # on a terminal a log line first clears the live progress line it would otherwise be appended to
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    logging.basicConfig(level=logging.INFO, format=clear + "kwatch: %(message)s", stream=sys.stderr)
    src = os.fsencode(os.path.abspath(args.source))
    if not os.path.isdir(src):
        raise SystemExit(f"kwatch replicate: {args.source} is not a directory")
    if args.password_file is not None:
        _check_password_file(args.password_file)
    opts = options.from_args(args)
    try:
        targets = [Target.parse(t) for t in args.targets]
    except ValueError as e:
        raise SystemExit(f"kwatch replicate: {e}") from e
    source = None if args.once else _open_capture(src, args.backend)
    exclude = getattr(source, "exclude_pid", None)
    barrier = CaptureBarrier(source) if source is not None else None
    reps = [make_replicator(src, t, opts, on_agent=exclude) for t in targets]
    for r in reps:
        r.barrier = barrier.wait if barrier is not None else None
        r.once = args.once
    for r in reps:
        if sys.stderr.isatty():
            r.on_progress = _live_progress
        if args.progress_interval is not None:
            r.progress_interval = args.progress_interval
    for r in reps:
        r.start()
    old = signal.signal(signal.SIGTERM, _stop)
    try:
        if args.once:
            ok = wait_synced(reps, timeout=24 * 3600)
            for r in reps:
                if r.gave_up is not None:
                    print(f"kwatch replicate: {r.target.spec}: {r.gave_up}", file=sys.stderr)
            return 0 if ok and not any(r.stats.errors for r in reps) else 1
        assert source is not None and barrier is not None
        print(f"kwatch: replicating {args.source} to {', '.join(args.targets)} with the {source.name} backend; "
              "Ctrl-C to stop", file=sys.stderr)

        def feed(batch: list[FileEvent]) -> None:
            for r in reps:
                r.feed(batch)

        pump(source, feed, barrier)  # until a signal; serves the replicators' barrier waits
        return 0
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        if barrier is not None:
            barrier.close()  # capture has stopped: the replicators decide by what they got
        # every target at once, within about a second in all: a target that is down stops waiting for its retry,
        # a batch in flight finishes or is cut (whole files only land, see Replicator.stop)
        for r in reps:
            r.request_stop()
        t0 = time.monotonic()
        for r in reps:
            r.stop(timeout=max(0.0, STOP_GRACE - (time.monotonic() - t0)))
        if source is not None:
            source.close()

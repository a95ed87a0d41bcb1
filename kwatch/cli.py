"""The ``kwatch`` command line. It wires capture, rules, actions and replication together; nothing imports it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kwatch.capture.base import CaptureError, CaptureFilter
from kwatch.events import OP_BY_LABEL, Op


def _parse_ops(names: Sequence[str]) -> set[Op]:
    ops: set[Op] = set()
    for name in names:
        for part in name.split(","):
            key = part.strip().lower()
            if key not in OP_BY_LABEL:
                raise SystemExit(f"kwatch: unknown op {part!r}; known: {', '.join(sorted(OP_BY_LABEL))}")
            ops.add(OP_BY_LABEL[key])
    return ops


def _warn(msg: str) -> None:
    print(f"kwatch: {msg}", file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    from kwatch.capture.select import open_source
    from kwatch.trace import TraceMatcher, compile_path_regex, run_trace

    roots = [os.path.abspath(p) for p in args.paths]
    for r in roots:
        if not os.path.isdir(r):
            raise SystemExit(f"kwatch trace: {r} is not a directory")
    ops = _parse_ops(args.op) if args.op else None
    try:
        match = TraceMatcher(
            rules=[compile_path_regex(r) for r in args.rule],
            ignores=[compile_path_regex(r) for r in args.ignore],
            pids=frozenset(args.pid),
            uids=frozenset(args.uid),
            comms=frozenset(c.encode() for c in args.comm),
        )
    except Exception as e:  # re.error
        raise SystemExit(f"kwatch trace: bad regex: {e}") from e
    filt = CaptureFilter.make(roots=roots, ops=ops, exclude_pids=[os.getpid()])
    try:
        src = open_source(filt, args.backend, warn=_warn)
    except CaptureError as e:
        raise SystemExit(f"kwatch trace: {e}") from e
    # the ready line (stderr, so JSON output stays clean): capture is attached, events from now on are seen
    where = ", ".join(roots) if roots else "the whole system"
    _warn(f"tracing {where} with the {src.name} backend; Ctrl-C to stop")
    try:
        return run_trace(src, match, json_lines=args.json, count=args.count, duration=args.duration)
    finally:
        src.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kwatch", description="Kernel-level file change capture, rules and replication")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("trace", help="live stream of file operations")
    t.add_argument("paths", nargs="*", help="trees to watch (default: the whole system)")
    t.add_argument("--rule", action="append", default=[], metavar="REGEX", help="show only paths matching")
    t.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="hide paths matching")
    t.add_argument("--op", action="append", default=[], help="operations to show (repeat or comma-separate)")
    t.add_argument("--pid", action="append", type=int, default=[])
    t.add_argument("--uid", action="append", type=int, default=[])
    t.add_argument("--comm", action="append", default=[])
    t.add_argument("--json", action="store_true", help="JSON lines")
    t.add_argument("--backend", default="auto", choices=["auto", "bpf", "fanotify", "inotify"])
    t.add_argument("--count", type=int, help="stop after this many events")
    t.add_argument("--duration", type=float, help="stop after this many seconds")
    t.set_defaults(func=cmd_trace)

    # Each further command registers its own parser: add_commands(subparsers) in its module.
    from kwatch import daemon

    daemon.add_commands(sub)
    from kwatch.replicate import command as replicate_command

    replicate_command.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())

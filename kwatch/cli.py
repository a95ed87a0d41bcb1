"""The ``kwatch`` command line. It wires capture, rules, actions and replication together; nothing imports it."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kwatch.capture.base import CaptureError, CaptureFilter
from kwatch.events import OP_BY_LABEL, Op

if TYPE_CHECKING:
    from kwatch.context import Resolver
    from kwatch.outputs.sink import Outputs


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
    from kwatch.capture.select import hooks_label, open_source
    from kwatch.context import ContextFilter, Resolver
    from kwatch.trace import TraceMatcher, compile_path_regex, run_trace

    roots = [os.path.abspath(p) for p in args.paths]
    for r in roots:
        if not os.path.isdir(r):
            raise SystemExit(f"kwatch trace: {r} is not a directory")
    ops = _parse_ops(args.op) if args.op else None
    resolver = Resolver()
    try:
        match = TraceMatcher(
            rules=[compile_path_regex(r) for r in args.rule],
            ignores=[compile_path_regex(r) for r in args.ignore],
            pids=frozenset(args.pid),
            uids=frozenset(args.uid),
            comms=frozenset(c.encode() for c in args.comm),
            context=ContextFilter(
                exes=tuple(compile_path_regex(r) for r in args.exe),
                auids=frozenset(args.auid),
                users=frozenset(args.user),
                containers=tuple(args.container),
                cgroups=tuple(re.compile(r) for r in args.cgroup),
            ),
            resolve=resolver,
        )
    except Exception as e:  # re.error
        raise SystemExit(f"kwatch trace: bad regex: {e}") from e
    outputs = _open_outputs(args.output, resolver)
    filt = CaptureFilter.make(roots=roots, ops=ops, exclude_pids=[os.getpid()])
    try:
        src = open_source(filt, args.backend, warn=_warn)
    except CaptureError as e:
        if outputs is not None:
            outputs.close()
        raise SystemExit(f"kwatch trace: {e}") from e
    # the ready line (stderr, so JSON output stays clean): capture is attached, events from now on are seen
    where = ", ".join(roots) if roots else "the whole system"
    label = hooks_label(src)
    _warn(f"tracing {where} with the {src.name} backend{f' ({label})' if label else ''}; Ctrl-C to stop")
    try:
        return run_trace(src, match, json_lines=args.json, count=args.count, duration=args.duration,
                         sink=outputs.feed if outputs is not None else None, quiet=args.quiet,
                         resolve=None if args.no_context else resolver)
    finally:
        src.close()
        if outputs is not None:
            outputs.close()  # sends what it can first (the NATS spool: for up to its close timeout)
            for st in outputs.stats.values():
                backlog = st.backlog() if st.backlog is not None else 0
                _warn(f"output {st.name} ({st.kind}): {st.records} records, {st.lost} lost, {backlog} not sent yet"
                      + (" (kept in the spool)" if backlog else ""))


def _open_outputs(options: Sequence[str], resolver: Resolver | None = None) -> Outputs | None:
    """The durable outputs of ``--output`` options (None: none given); bad options exit with every problem."""
    if not options:
        return None
    from kwatch.outputs.config import parse_output_option
    from kwatch.outputs.sink import Outputs

    specs, problems = [], []
    for text in options:
        spec, errs = parse_output_option(text)
        problems += [f"--output {text}: {e}" for e in errs]
        if spec is not None:
            specs.append(spec)
    if problems:
        raise SystemExit("kwatch trace: " + "\n".join(problems))
    try:
        return Outputs(specs, resolver=resolver)
    except (OSError, ImportError) as e:
        raise SystemExit(f"kwatch trace: cannot open an output: {type(e).__name__}: {e}") from e


def cmd_collect(args: argparse.Namespace) -> int:
    from kwatch.outputs.collect import run_collect

    write: Callable[[list[bytes]], None]
    archive = None
    if args.archive:
        from kwatch.metrics.stats import OutputStats
        from kwatch.outputs.config import parse_output_option
        from kwatch.outputs.jsonl import JsonlWriter
        from kwatch.outputs.record import output_loss_record

        spec, errs = parse_output_option(f"file:{args.archive}" + "".join(f",{o}" for o in args.archive_option))
        if spec is None:
            raise SystemExit("kwatch collect: " + "; ".join(errs))
        archive = JsonlWriter(spec, OutputStats(spec.name, "file"), loss_marker=lambda n, why: output_loss_record(
            spec.name, n, why, time.time_ns(), "collect"))
        write = archive.write_lines
    else:
        out = sys.stdout.buffer

        def write(lines: list[bytes]) -> None:
            out.write(b"".join(lines))
            out.flush()

    try:
        run_collect(args.server, args.stream, args.durable, write, subject_prefix=args.subject_prefix,
                    create_stream=args.create_stream, replicas=args.replicas, count=args.count,
                    duration=args.duration)
    except ImportError as e:
        raise SystemExit(f"kwatch collect: {e} (pip install nats-py)") from e
    finally:
        if archive is not None:
            archive.close()
    return 0


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
    t.add_argument("--exe", action="append", default=[], metavar="REGEX", help="executable path matching")
    t.add_argument("--auid", action="append", type=int, default=[], help="login uid (audit auid)")
    t.add_argument("--user", action="append", default=[], help="user name")
    t.add_argument("--container", action="append", default=[], metavar="ID|RUNTIME",
                   help="container id (or a prefix of it) or runtime (docker, containerd, crio, podman, lxc)")
    t.add_argument("--cgroup", action="append", default=[], metavar="REGEX", help="cgroup path matching")
    t.add_argument("--no-context", action="store_true",
                   help="print only what the capture recorded (no exe, login uid, names, container)")
    t.add_argument("--json", action="store_true", help="JSON lines")
    t.add_argument("--backend", default="auto", choices=["auto", "bpf", "fanotify", "inotify"])
    t.add_argument("--count", type=int, help="stop after this many events")
    t.add_argument("--duration", type=float, help="stop after this many seconds")
    t.add_argument("--output", action="append", default=[], metavar="SPEC",
                   help="also write records to a durable output: file:PATH[,max_bytes=100M,keep=10,fsync=interval], "
                   "journal[:SOCKET], nats:URL,spool=DIR[,stream=KWATCH] (repeatable)")
    t.add_argument("-q", "--quiet", action="store_true", help="print no events (with --output)")
    t.set_defaults(func=cmd_trace)

    c = sub.add_parser("collect", help="read a fleet's records from NATS JetStream; print or archive them",
                       description="A durable JetStream consumer: prints the records of every host (JSON lines, "
                       "each host in order) or appends them to an archive file; goes on where it stopped.")
    c.add_argument("--server", action="append", required=True, metavar="URL", help="nats://host:port (repeatable)")
    c.add_argument("--stream", default="KWATCH")
    c.add_argument("--subject-prefix", default="kwatch")
    c.add_argument("--durable", default="kwatch-collect", help="the consumer's name on the server")
    c.add_argument("--create-stream", action="store_true", help="create the stream when it is missing")
    c.add_argument("--replicas", type=int, default=1, help="replicas of a stream created here")
    c.add_argument("--archive", metavar="PATH", help="append to this JSON-lines file instead of printing")
    c.add_argument("--archive-option", action="append", default=[], metavar="KEY=VALUE",
                   help="max_bytes=, keep=, fsync= for the archive (as a file output's)")
    c.add_argument("--count", type=int, help="stop after at least this many records")
    c.add_argument("--duration", type=float, help="stop after this many seconds")
    c.set_defaults(func=cmd_collect)

    # Each further command registers its own parser: add_commands(subparsers) in its module.
    from kwatch import daemon

    daemon.add_commands(sub)
    from kwatch.replicate import command as replicate_command

    replicate_command.add_commands(sub)
    from kwatch.mirror import command as mirror_command

    mirror_command.add_commands(sub)
    from kwatch import doctor

    doctor.add_commands(sub)
    return p


#: commands whose parser is all their module needs: ``kwatch agent`` starts once per connection and ``kwatch
#: replicate --once`` is a first sync a person waits for, so neither imports the packages of the other commands
#: (rules, actions, the daemon: a third of a first sync's CPU on a small tree)
_LEAN = {"agent": "kwatch.mirror.command", "replicate": "kwatch.replicate.command"}


def _lean_parser(command: str) -> argparse.ArgumentParser:
    """A parser that knows ``command`` alone (see :data:`_LEAN`)."""
    module = importlib.import_module(_LEAN[command])
    p = argparse.ArgumentParser(prog="kwatch")
    module.add_commands(p.add_subparsers(dest="cmd", required=True))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _lean_parser(argv[0]) if argv and argv[0] in _LEAN else build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())

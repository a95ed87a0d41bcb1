"""The ``kwatch run`` and ``kwatch check-config`` commands: argument parsing and wiring; the loop is in ``core``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from kwatch.capture.base import CaptureError
from kwatch.context import Resolver
from kwatch.daemon.core import Daemon, EventSink
from kwatch.daemon.logs import LEVELS, LogHandler, StructLog
from kwatch.daemon.roots import capture_roots, wanted_roots
from kwatch.daemon.status import NOT_RUNNING, default_socket
from kwatch.metrics.stats import DaemonStats
from kwatch.rules import Config, ConfigErrors, check_config, load_config, load_default_config

if TYPE_CHECKING:
    from kwatch.daemon.status import StatusServer

DEFAULT_METRICS = "127.0.0.1:9465"
DEMO_DIR = "/tmp/kwatch-demo"  # what the embedded default config watches (kwatch/rules/default.conf)
DEMO_HINT = (
    f"default config: every change under {DEMO_DIR} is printed. Try in another shell: "
    f"echo hi > {DEMO_DIR}/a && mv {DEMO_DIR}/a {DEMO_DIR}/b && rm {DEMO_DIR}/b"
)


def make_sinks(config: Config, log: StructLog, stats: DaemonStats, resolver: Resolver | None = None) -> list[EventSink]:
    """Event sinks for this config: the durable outputs ([[output]]), one ReplicationSink for replication targets.

    ``resolver``: the process-context cache the daemon's rule filters use too (one lookup of /proc per process)."""
    sinks: list[EventSink] = []
    if config.outputs:
        from kwatch.outputs.sink import Outputs

        for o in config.outputs:
            log.info("output", name=o.name, kind=o.kind, records=o.records)
        sinks.append(Outputs(config.outputs, stats.outputs, resolver=resolver))
    if not config.replicate:
        return sinks
    from kwatch.daemon.replication import ReplicationSink

    for t in config.replicate:
        log.info("replicate", source=str(t.options["source"]), target=t.target, where=str(t.where))
    sinks.append(ReplicationSink(config.replicate, stats))
    return sinks


def _setup_logging(log: StructLog) -> None:
    """Send the kwatch loggers (runner, backends) into the structured stream; the runner's per-run chatter is ours."""
    root = logging.getLogger("kwatch")
    root.handlers[:] = [LogHandler(log)]
    root.setLevel(log.level)
    root.propagate = False
    # the daemon logs every action start/end itself; keep only the runner's warnings (timeouts, kills)
    logging.getLogger("kwatch.actions").setLevel(max(log.level, logging.WARNING))


def cmd_run(args: argparse.Namespace) -> int:
    log = StructLog(json_lines=args.log_json, level=args.log_level)
    _setup_logging(log)
    if args.config is None:
        config = load_default_config()
        os.makedirs(DEMO_DIR, exist_ok=True)
    else:
        try:
            config = load_config(args.config)
        except ConfigErrors as e:
            for err in e.errors:
                print(err, file=sys.stderr)
            log.error("config_invalid", config=args.config, errors=len(e.errors))
            return 1
    for w in config.warnings:
        log.warning("config_warning", where=f"{w.file}:{w.line}", reason=w.reason)
    stats = DaemonStats()
    resolver = Resolver()
    try:
        sinks = make_sinks(config, log, stats, resolver)
    except (OSError, ImportError) as e:  # an output's file or spool cannot be opened
        log.error("output_error", msg=f"{type(e).__name__}: {e}")
        return 2
    daemon = Daemon(
        config,
        log=log,
        stats=stats,
        config_path=args.config,
        backend=args.backend,
        dry_run=args.dry_run,
        grace=args.grace,
        sinks=sinks,
        resolver=resolver,
    )
    daemon.install_signals()  # before anything slow: a SIGHUP/SIGTERM sent during start-up must not kill us
    if not args.no_metrics:
        from kwatch.metrics.exporter import serve

        try:
            serve(stats, args.metrics)
        except (OSError, ValueError) as e:
            log.error("metrics_error", address=args.metrics, msg=str(e))
            daemon.restore_signals()
            return 2
        log.info("metrics", url=f"http://{args.metrics}/metrics")
    try:
        daemon.start()
    except CaptureError as e:
        log.error("capture_error", msg=str(e))
        daemon.restore_signals()
        return 2
    server = None if args.no_status else _serve_status(daemon, args, log)
    if args.config is None:
        log.info("hint", msg=DEMO_HINT)
    try:
        return daemon.run()
    finally:
        if server is not None:
            server.close()


def _serve_status(daemon: Daemon, args: argparse.Namespace, log: StructLog) -> StatusServer | None:
    """The status socket of ``kwatch status``; a daemon that cannot serve it still runs (and says why)."""
    from kwatch.capture.select import BLIND_SPOTS, blind_spots_key, describe
    from kwatch.daemon.status import StatusServer, snapshot

    src = daemon.source
    info = {
        "pid": os.getpid(),
        "config": args.config or "<default>",
        "backend": src.name if src is not None else None,
        # with the BPF backend's hooks: "bpf (VFS hooks: fentry/fexit)" or "bpf (syscall tracepoints)"
        "capture": describe(src) if src is not None else None,
        "blind_spots": list(BLIND_SPOTS.get(blind_spots_key(src), ())) if src is not None else [],
        "started": time.time(),
    }
    path = args.status_socket or default_socket()
    try:
        server = StatusServer(path, lambda: snapshot(daemon.stats, info))
    except OSError as e:
        log.warning("status_error", socket=path, msg=str(e))
        return None
    log.info("status", socket=path)
    return server


def _summary(config: Config) -> str:
    rules = [r for rs in config.rulesets for r in rs.rules]
    actions = sum(len(r.actions) for r in rules)
    want = wanted_roots(config)
    where = (
        "the whole system" if want is None else ", ".join(r.decode("utf-8", "backslashreplace") for r in want)
    )
    if want is not None:
        now = capture_roots(want, os.path.isdir)
        if now != want:
            where += " (today: " + (", ".join(r.decode() for r in now) or "/") + ")"
    ops = ",".join(sorted(op.label for op in config.ops)) or "none"
    return (
        f"{len(config.rulesets)} rule set(s), {len(rules)} rule(s), {actions} action(s), "
        f"{len(config.warnings)} warning(s), {len(config.replicate)} replication target(s); "
        f"captures {ops} under {where}"
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.file is None:
        config = load_default_config()
        print(f"<kwatch>/default.conf: ok: {_summary(config)}")
        return 0
    problems = check_config(args.file)
    for p in problems:
        print(p, file=sys.stderr)
    errors = sum(1 for p in problems if p.severity == "error")
    if errors:
        print(f"{args.file}: {errors} error(s), {len(problems) - errors} warning(s)", file=sys.stderr)
        return 1
    try:
        config = load_config(args.file)
    except ConfigErrors as e:  # the file changed between the two reads
        for err in e.errors:
            print(err, file=sys.stderr)
        return 1
    print(f"{args.file}: ok: {_summary(config)}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``run`` and ``check-config`` on the ``kwatch`` command line."""
    r = sub.add_parser(
        "run",
        help="run capture + rules + actions (the daemon)",
        description="Capture file operations and run the actions of the config's rules. SIGHUP reloads the "
        "config, SIGTERM/SIGINT drain and exit.",
    )
    r.add_argument("-c", "--config", metavar="FILE", help="config file (default: the embedded demo config)")
    r.add_argument("--backend", default="auto", choices=["auto", "bpf", "fanotify", "inotify"])
    r.add_argument("--dry-run", action="store_true", help="print the commands that would run; run nothing")
    r.add_argument(
        "--metrics",
        default=DEFAULT_METRICS,
        metavar="ADDR",
        help=f"Prometheus endpoint (default {DEFAULT_METRICS})",
    )
    r.add_argument("--no-metrics", action="store_true", help="no Prometheus endpoint")
    r.add_argument("--status-socket", metavar="PATH",
                   help=f"where kwatch status reads this daemon's state (default {default_socket()})")
    r.add_argument("--no-status", action="store_true", help="serve no status socket")
    r.add_argument("--log-json", action="store_true", help="log JSON objects instead of key=value lines")
    r.add_argument(
        "--log-level", default="info", choices=list(LEVELS), help="least level logged (debug: every match)"
    )
    r.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running actions may finish",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "check-config",
        help="check a config file: every error and warning as file:line: reason",
        description="Exit status 1 when the config has an error, 0 otherwise (warnings are printed too).",
    )
    c.add_argument(
        "file", nargs="?", metavar="FILE", help="config file (default: the embedded default config)"
    )
    c.set_defaults(func=cmd_check_config)

    s = sub.add_parser(
        "status",
        help="what the running daemon is doing: capture, events, losses, rules, outputs, replication targets",
        description="Read the state of a running kwatch run from its status socket. Exit status 3 when none runs.",
    )
    s.add_argument("--socket", metavar="PATH", help=f"the daemon's status socket (default {default_socket()})")
    s.add_argument("--json", action="store_true", help="the daemon's JSON object as is")
    s.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from kwatch.daemon.status import fetch, format_status

    path = args.socket or default_socket()
    try:
        st = fetch(path)
    except (OSError, ValueError) as e:
        print(f"kwatch status: no running kwatch answers on {path}: {e}", file=sys.stderr)
        return NOT_RUNNING
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        format_status(st, sys.stdout)
    return 0

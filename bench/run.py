"""Entry point of the benchmarks: ``python -m bench.run [--all | --quick] [capture] [replicate] [options]``.

Owns argument parsing, which suites run in which mode, and where results go (``bench/out/<suite>.{md,json,png}``;
``--write-readme`` also updates the README section of a suite). ``--quick`` is CI's run: one run of tiny workloads,
checks that each suite works, then the guard rails on speed (bench/guards.py: coarse bounds on ratios measured in
the run, so a 2x regression fails). A suite whose module does not exist yet (``replicate``) is
reported as not available; asking for it alone is an error, ``--all`` just says so and goes on.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import OUT, BenchError

SUITES = ("capture", "replicate", "rsync", "startup", "firstsync", "audit", "execost")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_capture(args: argparse.Namespace, out: Path) -> int:
    from bench import report
    from bench.capture import Params, run_suite

    only = tuple(x for part in args.observers for x in part.split(",") if x)
    p = Params.for_mode(
        args.quick, runs=args.runs, fs=args.fs, time_limit=args.time_limit, only=only,
        throughput=not args.no_throughput, untar_repeat=args.untar_repeat, churn_iterations=args.churn_iterations,
    )
    res = run_suite(p, log=_log)
    written = report.write_capture(res, out)
    for k, v in written.items():
        _log(f"capture: {k}: {v}")
    if args.write_readme:
        _log("capture: " + report.update_readme(res))
        chart = out / "capture.png"
        if chart.exists():  # the README links the committed copy
            docs = Path(__file__).resolve().parent.parent / "docs" / "bench"
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(chart, docs / "capture.png")
    print(report.capture_markdown(res))
    failed = [r for r in res["summary"] if not r["runs"]]
    if res["out_of_time"]:
        _log(f"capture: stopped early at the time limit ({p.time_limit:.0f} s); the results are partial")
    if args.quick and (failed or res["out_of_time"]):
        _log("capture: smoke test FAILED: " + ", ".join(r["observer"] for r in failed))
        return 1
    return 0


def run_replicate(args: argparse.Namespace, out: Path) -> int:
    if importlib.util.find_spec("bench.replicate") is None:
        raise BenchError("the replicate suite (bench/replicate.py) does not exist yet")
    from bench import replicate  # type: ignore[attr-defined]

    rc: int = replicate.main(args, out)
    data = out / "replicate.json"
    if data.exists() and not args.quick:
        from bench import report

        res = json.loads(data.read_text())
        why = report.replicate_chart(res, out / "replicate.png")
        _log("replicate: chart: " + (why or str(out / "replicate.png")))
        if why is None and args.write_readme:
            docs = Path(__file__).resolve().parent.parent / "docs" / "bench"
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "replicate.png", docs / "replicate.png")
    return rc


def run_rsync(args: argparse.Namespace, out: Path) -> int:
    from bench import rsync_push

    return rsync_push.main(args, out)


def run_startup(args: argparse.Namespace, out: Path) -> int:
    from bench import startup

    return startup.main(args, out)


def run_firstsync(args: argparse.Namespace, out: Path) -> int:
    from bench import firstsync

    return firstsync.main(args, out)


def run_audit(args: argparse.Namespace, out: Path) -> int:
    from bench import audit

    return audit.main(args, out)


def run_execost(args: argparse.Namespace, out: Path) -> int:
    from bench import execost

    return execost.suite(args, out)


RUNNERS = {"capture": run_capture, "replicate": run_replicate, "rsync": run_rsync, "startup": run_startup,
           "firstsync": run_firstsync, "audit": run_audit, "execost": run_execost}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description="kwatch benchmarks")
    ap.add_argument("suites", nargs="*", help=f"suites to run: {', '.join(SUITES)} (default with --all/--quick: all)")
    ap.add_argument("--all", action="store_true", help="every suite, full size")
    ap.add_argument("--quick", action="store_true", help="smoke test: one run of tiny workloads")
    ap.add_argument("--runs", type=int, help="runs per configuration (default 3, --quick 1)")
    ap.add_argument("--fs", choices=["tmpfs", "disk"], default="tmpfs", help="where the workloads write")
    ap.add_argument("--time-limit", type=float, help="seconds; stop scheduling runs after it (results partial)")
    ap.add_argument("--observers", action="append", default=[], help="capture: observer names to run (repeat or "
                    "comma-separate); 'none' always runs; audit: the outputs to run (file, nats)")
    ap.add_argument("--untar-repeat", type=int, help="capture: untars per timed run")
    ap.add_argument("--churn-iterations", type=int, help="capture: churn iterations per timed run")
    ap.add_argument("--no-throughput", action="store_true", help="capture: skip the decode and end-to-end figures")
    ap.add_argument("--small-files", type=int, nargs="?", const=1_000_000, default=0, metavar="N",
                    help="firstsync: also a tree of N small files (alone: 1,000,000; minutes per run, one run each "
                    "unless --runs)")
    ap.add_argument("--no-untar", action="store_true", help="firstsync: leave out the untar tree")
    ap.add_argument("--audit-rate", type=float, default=120_000.0,
                    help="audit: the churn's paced rate in events/s (default 120000)")
    ap.add_argument("--audit-records", type=int, help="audit: events per run (default 1000000, --quick 60000)")
    ap.add_argument("--audit-only", choices=["output", "pipeline"],
                    help="audit: only the output alone, or only the whole pipeline (default both)")
    ap.add_argument("--write-readme", action="store_true", help="update the suite's section of README.md")
    ap.add_argument("--out", type=Path, default=OUT, help="output directory (default bench/out)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suites = list(dict.fromkeys(args.suites)) or list(SUITES)
    if not args.suites and not (args.all or args.quick):
        build_parser().error("name a suite, or give --all or --quick")
    for name in suites:
        if name not in SUITES:
            build_parser().error(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    if os.geteuid() != 0:
        _log("bench: needs root (BPF, fanotify, tmpfs mounts, auditd)")
        return 2
    explicit = bool(args.suites)
    _compile_kwatch()
    rc = 0
    for name in suites:
        t0 = time.monotonic()
        if args.quick:  # the guards read this run's results, never an older run's
            (args.out / f"{name}.json").unlink(missing_ok=True)
        try:
            r = RUNNERS[name](args, args.out)
        except BenchError as e:
            _log(f"bench: {name}: not run: {e}")
            r = 1 if explicit else 0
        except KeyboardInterrupt:
            _log(f"bench: {name}: interrupted; cleaned up")
            return 130
        _log(f"bench: {name}: done in {time.monotonic() - t0:.0f} s (rc {r})")
        rc = rc or r
    if args.quick:
        rc = rc or check_guards(suites, args.out)
    return rc


def _compile_kwatch() -> None:
    """kwatch's bytecode, as an installed package has it (pip compiles at install): a checkout run with
    PYTHONDONTWRITEBYTECODE=1 in the environment has none and compiles every module at every start, which was 0.25
    s of each `kwatch replicate --once` and more than a third of a small first sync on this machine."""
    if not compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "kwatch"), quiet=1):
        _log("bench: could not compile kwatch's bytecode; start-up figures include compiling it")


def check_guards(suites: list[str], out: Path) -> int:
    """The guard rails of the suites that ran (their JSON results in ``out``); 1 if any failed or is missing."""
    from bench.guards import GUARDS, check_all

    results = {}
    for name in suites:
        path = out / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    guards = tuple(g for g in GUARDS if g.suite in suites)
    ok, lines = check_all(results, guards)
    for line in lines:
        _log(f"bench: guard: {line}")
    if not ok:
        _log("bench: guard rails FAILED (bounds and how they were chosen: bench/guards.py)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

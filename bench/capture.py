"""The capture overhead suite: file-heavy workloads timed with no observer and under each observer, alternating.

Owns the schedule and the per-run procedure; the observers are in ``bench.observers``, the workloads in
``bench.workloads``, the output in ``bench.report``.

One run of (workload, observer): empty the watched directory, start the observer and wait until it is ready (not
timed), run the workload (timed: its wall time and its own CPU time, where in-kernel capture work such as the BPF
programs and audit record building is charged), let the observer catch up (its CPU stops growing, bounded), stop it
and collect what it counted and its CPU. Configurations alternate within each workload (A B C ... A B C ...), medians
over ``runs``; ratios are median wall time over the median with no observer.

Workloads: ``untar`` (the fixed kernel-source subset extracted ``repeat`` times into fresh directories) and ``churn``
(``bench/churn.c`` flat out). Everything happens on a tmpfs mounted for the suite (``--fs disk``: a temp directory on
/var/tmp), so other activity on the root file system does not add disk noise; the tmpfs is unmounted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Cleanup,
    Runner,
    alternate,
    empty_dir,
    machine,
    median,
    ratio,
    scratch_dir,
    tmpfs,
)
from bench.hookcost import hook_cost
from bench.observers import Observer, RunCtx, all_observers
from bench.throughput import decode_bench, e2e_bench
from bench.workloads import ChurnWorkload, TarWorkload, run_churn, subset_tar, untar_argv

WORKLOAD_TIMEOUT = 600.0
#: the observers whose churn figures the capture-overhead guard compares (bench/guards.py)
GUARDED_PAIR = ("none", "kwatch-bpf-count")
SETTLE_TIMEOUT = 120.0


@dataclass
class Params:
    quick: bool = False
    runs: int = 3
    untar_repeat: int = 3
    churn_iterations: int = 200_000
    fs: str = "tmpfs"
    time_limit: float = 3600.0
    only: tuple[str, ...] = ()  # observer names to keep (plus "none"); empty: all
    throughput: bool = True
    e2e_paced_events: float = 200_000.0
    e2e_paced_seconds: float = 10.0
    e2e_iterations: int | None = None  # the end-to-end runs' churn iterations (None: churn_iterations)
    # runs of the guarded pair (no observer, the BPF consumer) on the churn, alternating, when more than ``runs``:
    # the guard rails (bench/guards.py) read the best of them
    guard_runs: int = 0
    e2e_repeat: int = 1  # runs of the single flat-out producer, whose best consumer share the guard reads

    @classmethod
    def for_mode(cls, quick: bool, **kw: Any) -> Params:
        if quick:
            # churn and the end-to-end runs large enough that the guard rails (bench/guards.py) measure per-event
            # costs, not start-up; the time limit leaves room for the slow observers' start on a loaded machine
            # (fatrace and bpftrace took 20-30 s each there, and 150 s ran out before the throughput part)
            # (one run of each on CI's machine read 1.54 and 0.342 against 1.04 and 0.236 here, idle, same code:
            # hence several runs of the guarded figures, best of them)
            base = dict(quick=True, runs=1, untar_repeat=1, churn_iterations=20_000, time_limit=600.0,
                        e2e_paced_seconds=0.5, e2e_iterations=60_000, guard_runs=5, e2e_repeat=3)
        else:
            base = {}
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class Run:
    workload: str
    observer: str
    run: int
    wall_s: float | None = None
    workload_cpu_s: float | None = None
    events: int | None = None
    lost: int | None = None
    observer_cpu_s: float | None = None
    observer_rss_kib: int | None = None
    settle_s: float | None = None
    error: str | None = None
    extra: dict[str, Any] | None = None


def _untar(tar: TarWorkload, repeat: int) -> Callable[[Runner, Path], tuple[float, float]]:
    def go(runner: Runner, watch: Path) -> tuple[float, float]:
        wall = cpu = 0.0
        for k in range(repeat):
            dest = watch / f"r{k}"
            dest.mkdir()
            res = runner.run(untar_argv(tar, dest), timeout=WORKLOAD_TIMEOUT)
            if res.rc != 0:
                raise BenchError(f"tar failed (rc {res.rc}): {res.stderr.strip()[-300:]}")
            wall += res.wall
            cpu += res.cpu
        return wall, cpu

    return go


def _churn(wl: ChurnWorkload) -> Callable[[Runner, Path], tuple[float, float]]:
    def go(runner: Runner, watch: Path) -> tuple[float, float]:
        res, loop_s = run_churn(runner, wl, watch, WORKLOAD_TIMEOUT)
        return loop_s, res.cpu

    return go


def one_run(
    runner: Runner, obs: Observer, workload: Callable[[Runner, Path], tuple[float, float]], watch: Path, tmp: Path,
    run: Run,
) -> None:
    empty_dir(watch)
    # the last run's deletes and writeback (ext4 with discard) must not land inside this run's timing
    os.sync()
    ctx = RunCtx(runner, watch, tmp, f"{run.workload}-{run.run}")
    obs.start(ctx)
    try:
        run.wall_s, run.workload_cpu_s = workload(runner, watch)
        run.settle_s = obs.settle(SETTLE_TIMEOUT)
        res = obs.stop()
    except BaseException:
        obs.abort()
        raise
    run.events, run.lost, run.observer_cpu_s, run.observer_rss_kib = res.events, res.lost, res.cpu_s, res.rss_kib
    run.extra = res.extra or None


def summarize(runs: list[Run], observers: list[Observer]) -> list[dict[str, Any]]:
    rows = []
    labels = {o.name: o for o in observers}
    for wl in dict.fromkeys(r.workload for r in runs):
        base = median([r.wall_s for r in runs if r.workload == wl and r.observer == "none" and r.wall_s is not None])
        base_cpu = median([r.workload_cpu_s for r in runs
                           if r.workload == wl and r.observer == "none" and r.workload_cpu_s is not None])
        for name in dict.fromkeys(r.observer for r in runs if r.workload == wl):
            mine = [r for r in runs if r.workload == wl and r.observer == name]
            ok = [r for r in mine if r.error is None and r.wall_s is not None]
            errors = [r.error for r in mine if r.error]
            o = labels[name]
            wall = median([r.wall_s for r in ok if r.wall_s is not None])
            wcpu = median([r.workload_cpu_s for r in ok if r.workload_cpu_s is not None])
            losts = [r.lost for r in ok]
            rows.append({
                "workload": wl,
                "observer": name,
                "label": o.label,
                "scope": o.scope,
                "note": o.note,
                "runs": len(ok),
                "wall_s": wall,
                "walls": [round(r.wall_s, 4) for r in ok if r.wall_s is not None],
                "ratio": ratio(wall, base),
                "workload_cpu_s": wcpu,
                "cpu_ratio": ratio(wcpu, base_cpu),
                "events": median([r.events for r in ok if r.events is not None]),
                "lost": None if not ok or any(x is None for x in losts) else max(x for x in losts if x is not None),
                "observer_cpu_s": median([r.observer_cpu_s for r in ok if r.observer_cpu_s is not None]),
                "observer_rss_kib": median([r.observer_rss_kib for r in ok if r.observer_rss_kib is not None]),
                "errors": errors,
            })
    return rows


def run_suite(p: Params, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.monotonic()
    mach = machine()
    deadline = t_start + p.time_limit
    tar = subset_tar(quick=p.quick)
    churn = ChurnWorkload(p.churn_iterations)
    observers = all_observers()
    if p.only:
        observers = [o for o in observers if o.name == "none" or o.name in p.only]
    skipped: dict[str, str] = {}
    usable = []
    for o in observers:
        why = o.unavailable()
        if why:
            skipped[o.name] = why
            log(f"capture: {o.name}: not measured: {why}")
        else:
            usable.append(o)
    runs: list[Run] = []
    throughput: dict[str, Any] = {}
    out_of_time = False
    with Cleanup() as stack:
        runner = Runner()
        stack.callback(runner.close)
        if p.fs == "tmpfs":
            base = stack.enter_context(tmpfs())
        else:
            base = stack.enter_context(scratch_dir(Path("/var/tmp")))
        watch = base / "watched"
        watch.mkdir()
        tmp = base / "observer-files"
        tmp.mkdir()
        workloads = {
            "untar": _untar(tar, p.untar_repeat),
            "churn": _churn(churn),
        }
        failed: dict[str, str] = {}
        for wl_name, wl in workloads.items():
            by_name = {x.name: x for x in usable}
            schedule = list(alternate(list(by_name), p.runs))
            guarded = [n for n in GUARDED_PAIR if n in by_name]
            if wl_name == "churn" and len(guarded) == len(GUARDED_PAIR):
                schedule += [(p.runs + i, n) for i, n in alternate(guarded, p.guard_runs - p.runs)]
            for i, oname in schedule:
                obs = by_name[oname]
                if time.monotonic() > deadline:
                    out_of_time = True
                    break
                run = Run(wl_name, oname, i)
                runs.append(run)
                if oname in failed:
                    run.error = "skipped after an earlier failure"
                    continue
                t0 = time.monotonic()
                try:
                    one_run(runner, obs, wl, watch, tmp, run)
                except BenchError as e:
                    run.error = str(e)
                    failed[oname] = str(e)
                    log(f"capture: {wl_name} {oname} run {i}: FAILED: {e}")
                    continue
                log(f"capture: {wl_name:5} {oname:22} run {i}: {run.wall_s:7.3f} s  events {run.events}  "
                    f"lost {run.lost}  observer cpu {run.observer_cpu_s or 0:.2f} s  "
                    f"({time.monotonic() - t0:.1f} s with set-up)")
        with contextlib.suppress(OSError):
            empty_dir(watch)
        if p.throughput and not out_of_time:
            log("capture: decode micro-benchmark")
            throughput["decode"] = decode_bench(50_000 if p.quick else 500_000, 7 if p.quick else 5)
            log(f"capture: decode {throughput['decode']}")
            log("capture: hook cost micro-benchmark")
            try:
                throughput["hooks"] = hook_cost(runner, tmp, n=20_000 if p.quick else 200_000,
                                                runs=1 if p.quick else 5)
            except BenchError as e:
                throughput["hooks"] = {"error": str(e)}
            log(f"capture: hooks {throughput['hooks']}")
            if not any(o.name == "kwatch-bpf-count" for o in usable):
                throughput["e2e"] = {"error": skipped.get("kwatch-bpf-count", "BPF consumer not selected")}
            else:
                log("capture: BpfSource end to end under churn")
                try:
                    throughput["e2e"] = e2e_bench(
                        runner, watch, tmp, iterations=p.e2e_iterations or p.churn_iterations,
                        paced_rate_events=p.e2e_paced_events, paced_seconds=p.e2e_paced_seconds,
                        repeat_first=p.e2e_repeat,
                    )
                except BenchError as e:
                    throughput["e2e"] = {"error": str(e)}
                log(f"capture: e2e {throughput['e2e']}")
    return {
        "suite": "capture",
        "machine": mach,
        "params": asdict(p),
        "fs": p.fs,
        "workloads": {"untar": {**tar.describe(), "repeat": p.untar_repeat}, "churn": churn.describe()},
        "not_measured": skipped,
        "out_of_time": out_of_time,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summarize(runs, observers),
        "runs": [asdict(r) for r in runs],
        "throughput": throughput,
        "targets": {
            "bpf_untar_overhead": "<= 5% over no observer",
            "losses_at_200k_events_per_s": "zero",
            "decode_records_per_s": ">= 1,000,000",
        },
    }

"""Where the executable path of a record is cheaper to get: kept per process in the kernel, or resolved once per
process in userspace (what kwatch does: ``kwatch/context.py``'s Resolver reads ``/proc/PID/exe``).

``python -m bench.execost [--runs N]`` measures, in one run and alternating:

- **per exec**: ``bench/execloop`` (static: fork, exec of itself, exit, wait) with no program, with the exec and exit
  programs of ``bench/execost.bpf.c`` (walk the new executable's path into a hash map by tgid; delete it when the
  process ends) and with the fork program too (a forked child inherits its parent's entry). The wall-clock difference
  is the honest figure but small against an exec on this VM; the exec program also times itself
  (``bpf_ktime_get_ns`` around the walk and the map update), which gives the kernel's share per exec precisely;
- **per record**: ``bench/hookloop``'s fchmod loop with a program writing a 24-byte ring record, and with one writing
  the same record plus the process's exe looked up in that map and copied after it (no program: the floor);
- **userspace**, with ``time.process_time``: the Resolver's whole lookup of a new process (the exe and the rest it
  reads), the exe's own share (one ``readlink`` of ``/proc/PID/exe``), a record answered from its cache, and what a
  consumer would pay per record to take a kernel-supplied exe out of a record and find its JSON fragment.

Prints the medians as JSON (``--json FILE`` also writes them) and a short table. ``python -m bench.run execost``
runs the same (7 runs; ``--quick``: one of tiny loops) into ``bench/out/execost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, BenchError, Cleanup, Runner, alternate, machine, scratch_dir
from bench.hookcost import attached, bpf_object, hookloop
from bench.workloads import built, c_program

EXEC_SETS = {
    "none": (),
    "exec+exit": ("exe_exec", "exe_exit"),
    "exec+exit+fork": ("exe_exec", "exe_exit", "exe_fork"),
}
RECORD_SETS = {
    "none": (),
    "record": ("rec_plain",),
    "record+exe": ("exe_exec", "exe_exit", "exe_fork", "rec_exe"),
}
# exe_stats keys (bench/execost.bpf.c ST_*)
ST_EXECS, ST_EXEC_NS, ST_MISSES, ST_LOST, ST_TRUNC, ST_PLAIN_NS, ST_PLAIN_N, ST_EXE_NS, ST_EXE_N, ST_FORK_NS, ST_FORK_N, ST_EXIT_NS, ST_EXIT_N = (
    range(13))
RECORD_HEADER = 24  # struct exe_record up to its exe


def _stats(obj: Any) -> list[int]:
    m = obj.map("exe_stats")
    return [int.from_bytes(m.lookup(k.to_bytes(4, "little"), 8) or bytes(8), "little") for k in range(13)]


def _execloop(runner: Runner, exe: Path, n: int, rounds: int) -> tuple[float, float]:
    """(wall ns per exec of the fastest round, CPU ns per exec over all rounds). The CPU time is the loop's and its
    waited-for children's (wait4): it holds every program's run (exec and exit run in the child, fork in the parent)
    and, unlike the wall time, not the time spent waiting for a CPU on a loaded machine."""
    res = runner.run([str(exe), str(n), str(rounds)], timeout=600)
    if res.rc != 0:
        raise BenchError(f"execloop failed (rc {res.rc}): {res.stderr.strip()}")
    return float(res.stdout), res.cpu / (n * rounds) * 1e9


def _per_call_us(fn: Any, n: int) -> float:
    """CPU microseconds per call of ``fn(i)`` over ``n`` calls (time.process_time: this process only), less the
    loop's and the call's own cost (the same loop calling a function that does nothing)."""

    def timed(f: Any) -> float:
        t0 = time.process_time()
        for i in range(n):
            f(i)
        return time.process_time() - t0

    return max(timed(fn) - timed(lambda i: None), 0.0) / n * 1e6


def userspace_costs(pid: int, n_new: int = 2000, n_hit: int = 200_000) -> dict[str, float]:
    """The Resolver's costs for the live process ``pid`` (not this one: another process's /proc entry)."""
    from kwatch.context import Resolver, cgroup2_root
    from kwatch.events import FileEvent, Op

    cg_line = next((ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ln.startswith("0::")), "")
    root = cgroup2_root()
    cgroup_id = os.stat(root + cg_line[3:]).st_ino if root and cg_line else None
    stat = os.stat(f"/proc/{pid}")

    def event(comm: bytes) -> FileEvent:
        return FileEvent(Op.CHMOD, b"/x", pid=pid, tid=pid, ppid=os.getpid(), uid=stat.st_uid, gid=stat.st_gid,
                         comm=comm, cgroup_id=cgroup_id)

    resolver = Resolver()
    resolver(event(b"warm-up"))  # the first lookup scans the cgroup tree and fills the name caches
    # a new (pid, comm) each call: every call is a whole lookup, as for a process seen for the first time
    news = [event(b"new-%d" % i) for i in range(n_new)]
    new_us = _per_call_us(lambda i: resolver(news[i]), n_new)
    if resolver.lookups != n_new + 1:
        raise BenchError(f"resolver: {resolver.lookups} lookups for {n_new + 1} new processes")
    link = f"/proc/{pid}/exe".encode()
    readlink_us = _per_call_us(lambda i: os.readlink(link), n_new)
    same = event(b"same")
    hit_us = _per_call_us(lambda i: resolver(same), n_hit)  # a run of records of one process (the untar)
    pair = (event(b"one"), event(b"two"))
    lru_us = _per_call_us(lambda i: resolver(pair[i & 1]), n_hit)  # two processes interleaved: the LRU path
    # the kernel-exe design's consumer side: cut the exe out of the record, find its JSON fragment by its bytes
    exe = os.readlink(link)
    rec = struct.pack("<QII H6x", 1, pid, 1, len(exe)) + exe
    fragments = {exe: "," + json.dumps({"exe": exe.decode("utf-8", "surrogateescape")})[1:-1]}
    mv = memoryview(rec)

    def decode(i: int) -> None:
        (n,) = struct.unpack_from("<H", mv, 16)
        fragments.get(bytes(mv[RECORD_HEADER:RECORD_HEADER + n]))

    decode_us = _per_call_us(decode, n_hit)
    return {"new_process_us": new_us, "readlink_exe_us": readlink_us, "hit_same_us": hit_us,
            "hit_lru_us": lru_us, "kernel_exe_decode_us": decode_us}


def execloop_binary() -> Path:
    """``bench/cache/execloop``, built static from ``bench/execloop.c``."""
    cc = shutil.which("cc") or shutil.which("gcc") or "clang"
    src = BENCH_DIR / "execloop.c"
    return built(src, "execloop", lambda out: [cc, "-O2", "-Wall", "-static", "-o", str(out), str(src)])


def check_walk(runner: Runner, obj_path: Path, exe: Path) -> bytes:
    """The path the exec program stores for a process running ``exe`` (exec program only: the entry outlives the
    process); a BenchError unless it is the path the kernel shows in /proc, so the costs are those of a right walk."""
    obj = attached(obj_path, "exe_exec")
    try:
        child = runner.start([str(exe)])  # execloop without arguments exits at once
        child.reap(60)
        value = obj.map("exe_by_tgid").lookup(child.pid.to_bytes(4, "little"), 8 + 256)
    finally:
        obj.close()
    want = bytes(exe.resolve())
    got = value[8:8 + int.from_bytes(value[:2], "little")] if value else None
    if got != want:
        raise BenchError(f"the exec program stored {got!r} for {want!r}")
    return got


def exe_cost(runner: Runner, scratch: Path, runs: int = 5, execs: int = 300, records: int = 100_000,
             log: Any = print) -> dict[str, Any]:
    """Medians of every measurement above over ``runs`` alternated rounds."""
    execloop = execloop_binary()
    hook = c_program(BENCH_DIR / "hookloop.c", "hookloop")
    obj_path = bpf_object("execost")
    target = scratch / "hookloop.file"
    check_walk(runner, obj_path, execloop)
    configs = [("exec", k) for k in EXEC_SETS] + [("record", k) for k in RECORD_SETS] + [("user", "resolver")]
    exec_ns: dict[str, list[float]] = {k: [] for k in EXEC_SETS}
    exec_cpu: dict[str, list[float]] = {k: [] for k in EXEC_SETS}
    rec_cpu: dict[str, list[float]] = {k: [] for k in RECORD_SETS}
    prog_ns: list[float] = []
    fork_ns: list[float] = []
    exit_ns: list[float] = []
    rec_ns: dict[str, list[float]] = {k: [] for k in RECORD_SETS}
    rec_self: dict[str, list[float]] = {k: [] for k in RECORD_SETS if k != "none"}
    user: dict[str, list[float]] = {}
    sleeper = runner.start(["sleep", "3600"])
    loads = [os.getloadavg()[0]]
    for i, (kind, name) in alternate(configs, runs):
        progs = EXEC_SETS[name] if kind == "exec" else RECORD_SETS.get(name, ())
        obj = attached(obj_path, *progs) if progs else None
        try:
            if kind == "exec":
                wall, cpu = _execloop(runner, execloop, execs, 3)
                exec_ns[name].append(wall)
                exec_cpu[name].append(cpu)
                if obj is not None:
                    st = _stats(obj)
                    if st[ST_EXECS] < execs * 3 or st[ST_TRUNC]:
                        raise BenchError(f"exec program: {st[ST_EXECS]} runs, {st[ST_TRUNC]} cut paths")
                    prog_ns.append(st[ST_EXEC_NS] / st[ST_EXECS])
                    exit_ns.append(st[ST_EXIT_NS] / max(st[ST_EXIT_N], 1))
                    if st[ST_FORK_N]:
                        fork_ns.append(st[ST_FORK_NS] / st[ST_FORK_N])
            elif kind == "record":
                chmod_ns, _, cpu_s = hookloop(runner, hook, target, records)
                rec_ns[name].append(chmod_ns)
                rec_cpu[name].append(cpu_s / (records * 3) * 1e9)  # per fchmod (the pwrite loops cancel out)
                if obj is not None:
                    st = _stats(obj)
                    ns, cnt = (ST_EXE_NS, ST_EXE_N) if name == "record+exe" else (ST_PLAIN_NS, ST_PLAIN_N)
                    rec_self[name].append(st[ns] / max(st[cnt], 1))
                    # other processes' fchmods count too: hookloop's own must all have found its exe
                    found = st[ST_EXE_N] - st[ST_MISSES]  # counted as misses only: the found path is the timed one
                    if st[ST_LOST] or (name == "record+exe" and found < records * 3):
                        raise BenchError(f"record program: {st[ST_LOST]} lost, {found} exe found for "
                                         f"{records * 3} records")
            else:
                for k, v in userspace_costs(sleeper.pid).items():
                    user.setdefault(k, []).append(v)
        finally:
            if obj is not None:
                obj.close()
        log(f"execost: run {i + 1}/{runs} {kind} {name} done (load {os.getloadavg()[0]:.1f})")
        loads.append(os.getloadavg()[0])
    target.unlink(missing_ok=True)
    sleeper.stop()

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 1)

    exe_len = len(str(hook.resolve()).encode())  # what the walk gives for hookloop (no symlink on the way)
    ring = lambda size: (size + 8 + 7) // 8 * 8  # noqa: E731 - ring records have an 8-byte header, 8-aligned
    ex = {k: med(v) for k, v in exec_ns.items()}
    exc = {k: med(v) for k, v in exec_cpu.items()}
    rc = {k: med(v) for k, v in rec_ns.items()}
    rcc = {k: med(v) for k, v in rec_cpu.items()}
    return {
        "machine": machine(),
        "runs": runs,
        "load_average_1min": {"min": round(min(loads), 1), "median": round(statistics.median(loads), 1),
                              "max": round(max(loads), 1)},
        "exec": {
            "execs_per_run": execs * 3,
            "exe_path_bytes": len(str(execloop.resolve()).encode()),
            "exe_path_components": len(execloop.resolve().parts) - 1,
            "ns_per_exec": ex,
            "added_ns_per_exec": {k: round(ex[k] - ex["none"], 1) for k in EXEC_SETS if k != "none"},
            "cpu_ns_per_exec": exc,
            "added_cpu_ns_per_exec": {k: round(exc[k] - exc["none"], 1) for k in EXEC_SETS if k != "none"},
            "samples_wall_ns": exec_ns,
            "samples_cpu_ns": exec_cpu,
            "samples_program_self_ns": prog_ns,
            "exec_program_self_ns": med(prog_ns),
            "fork_program_self_ns": med(fork_ns),
            "exit_program_self_ns": med(exit_ns),
        },
        "record": {
            "records_per_run": records * 3,
            "ns_per_fchmod": rc,
            "record_ns": round(rc["record"] - rc["none"], 1),
            "exe_added_ns": round(rc["record+exe"] - rc["record"], 1),
            "cpu_ns_per_fchmod": rcc,
            "record_cpu_ns": round(rcc["record"] - rcc["none"], 1),
            "exe_added_cpu_ns": round(rcc["record+exe"] - rcc["record"], 1),
            "program_self_ns": {k: med(v) for k, v in rec_self.items()},
            "samples_wall_ns": rec_ns,
            "samples_cpu_ns": rec_cpu,
            "samples_program_self_ns": rec_self,
            "exe_added_self_ns": round(statistics.median(rec_self["record+exe"])
                                       - statistics.median(rec_self["record"]), 1),
            "exe_bytes": exe_len,
            "ring_bytes_added": ring(RECORD_HEADER + exe_len) - ring(RECORD_HEADER),
        },
        "userspace_us": {k: round(statistics.median(v), 3) for k, v in user.items()},
    }


def markdown(res: dict[str, Any]) -> str:
    e, r, u = res["exec"], res["record"], res["userspace_us"]
    rows = [
        "| what | figure |",
        "|---|---:|",
        f"| fork+exec+exit+wait, no program | {e['ns_per_exec']['none'] / 1000:.1f} us |",
        f"| fork+exec+exit+wait, no program: CPU | {e['cpu_ns_per_exec']['none'] / 1000:.1f} us |",
        f"| added per exec: exec+exit programs, wall / CPU | {e['added_ns_per_exec']['exec+exit'] / 1000:.1f} / "
        f"{e['added_cpu_ns_per_exec']['exec+exit'] / 1000:.1f} us |",
        f"| added per exec: exec+exit+fork programs, wall / CPU | {e['added_ns_per_exec']['exec+exit+fork'] / 1000:.1f} / "
        f"{e['added_cpu_ns_per_exec']['exec+exit+fork'] / 1000:.1f} us |",
        f"| exec program's own time (walk + map update, self-timed) | {e['exec_program_self_ns'] / 1000:.2f} us |",
        f"| fork / exit program's own time (self-timed) | {e['fork_program_self_ns']:.0f} / "
        f"{e['exit_program_self_ns']:.0f} ns |",
        f"| fchmod, no program | {r['ns_per_fchmod']['none']:.0f} ns |",
        f"| per record: the 24-byte record, wall / CPU | {r['record_ns']:.0f} / {r['record_cpu_ns']:.0f} ns |",
        f"| per record: the exe looked up and copied ({r['exe_bytes']} bytes, {r['ring_bytes_added']} in the ring), "
        f"wall / CPU | {r['exe_added_ns']:.0f} / {r['exe_added_cpu_ns']:.0f} ns |",
        f"| record program's own time, without / with the exe (self-timed) | {r['program_self_ns']['record']:.0f} / "
        f"{r['program_self_ns']['record+exe']:.0f} ns |",
        f"| userspace: Resolver lookup of a new process (all fields) | {u['new_process_us']:.1f} us |",
        f"| userspace: of which readlink /proc/PID/exe | {u['readlink_exe_us']:.1f} us |",
        f"| userspace: a record of the last process (cache hit) | {u['hit_same_us'] * 1000:.0f} ns |",
        f"| userspace: a record of two interleaved processes (LRU hit) | {u['hit_lru_us'] * 1000:.0f} ns |",
        f"| userspace: taking a kernel exe out of a record + its fragment | {u['kernel_exe_decode_us'] * 1000:.0f} ns |",
    ]
    m = res["machine"]
    head = (f"{m['date']}, kwatch {m['kwatch_commit']}, {m['nproc']} CPUs, Linux {m['kernel']}; "
            f"load average (1 min) {res['load_average_1min']['min']}-{res['load_average_1min']['max']}, "
            f"median {res['load_average_1min']['median']}; {res['runs']} alternated runs, medians; exe path of "
            f"{e['exe_path_bytes']} bytes, {e['exe_path_components']} components")
    return head + "\n\n" + "\n".join(rows) + "\n"


def _measure(runs: int, execs: int, records: int) -> dict[str, Any]:
    runner = Runner()
    with Cleanup() as stack, scratch_dir() as tmp:
        stack.callback(runner.close)
        return exe_cost(runner, tmp, runs=runs, execs=execs, records=records,
                        log=lambda s: print(s, file=sys.stderr, flush=True))


def suite(args: argparse.Namespace, out: Path) -> int:
    """``python -m bench.run execost``: bench/out/execost.{json,md} (``--quick``: one run of tiny loops)."""
    quick = bool(args.quick)
    res = _measure(args.runs or (1 if quick else 7), 20 if quick else 300, 5_000 if quick else 100_000)
    out.mkdir(parents=True, exist_ok=True)
    (out / "execost.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "execost.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.execost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--execs", type=int, default=300, help="fork+execs per round (3 rounds per run)")
    ap.add_argument("--records", type=int, default=100_000, help="fchmods per round (3 rounds per run)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("execost: needs root (BPF)", file=sys.stderr)
        return 2
    try:
        res = _measure(args.runs, args.execs, args.records)
    except BenchError as e:
        print(f"execost: {e}", file=sys.stderr)
        return 1
    text = json.dumps(res, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

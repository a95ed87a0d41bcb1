"""What a BPF program costs per syscall before it does anything: the floor under kwatch's capture overhead.

Owns :func:`hook_cost`: the empty programs of ``bench/hookcost.bpf.c`` (a syscall exit tracepoint, the kind kwatch
uses; the raw ``sys_exit`` tracepoint; the same with BTF arguments) attached one at a time, alternating with no
program, while ``bench/hookloop`` times a fchmod(2) loop and a pwrite(2) loop; and the exit tracepoint writing the
least possible record (a clock read in a 16-byte ring record). The figures are nanoseconds per call
over no program: for fchmod, what one watched call pays for its hook; for pwrite, what the hook costs every syscall
that is not watched (attaching any syscall hook sends every syscall of every task through the slow path, and a raw
tracepoint runs its program for all of them).

Together with the untar's calls per file (five watched: openat, fchown, fchmod, utimensat, close) this bounds from
below what any tracepoint-based capture that writes one record per operation costs on that workload.
"""

from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, REPO, BenchError, Runner, alternate
from bench.workloads import built, c_program

HOOKS = {
    "tp": "hook_tp",  # tp/syscalls/sys_exit_fchmod
    "raw_tp": "hook_raw",  # raw_tp/sys_exit
    "tp_btf": "hook_btf",  # tp_btf/sys_exit
    "tp_record": "hook_tp_record",  # tp/syscalls/sys_exit_fchmod writing a clock read into a 16-byte ring record
}


_ARCH = {"x86_64": "x86", "aarch64": "arm64"}  # uname -m -> libbpf's __TARGET_ARCH_ names (bpf_tracing.h)


def bpf_object(name: str = "hookcost") -> Path:
    """``bench/cache/NAME.bpf.o`` built from ``bench/NAME.bpf.c`` (which may include kwatch's ``bpf/`` headers)."""
    src = BENCH_DIR / f"{name}.bpf.c"
    include = REPO / "build"
    if not (include / "vmlinux.h").exists():
        raise BenchError("build/vmlinux.h is missing: run `make bpf` first")
    return built(src, f"{name}.bpf.o",
                 lambda out: ["clang", "-O2", "-g", "-Wall", "-target", "bpf", f"-D__TARGET_ARCH_{_ARCH.get(platform.machine(), platform.machine())}", f"-I{include}",
                              f"-I{REPO / 'bpf'}", "-c", str(src), "-o", str(out)])


def hookloop(runner: Runner, exe: Path, target: Path, n: int) -> tuple[float, float, float]:
    """Run ``bench/hookloop``: (ns per fchmod, ns per pwrite), the fastest of its three rounds, and its CPU seconds
    (user + system, all rounds of both loops)."""
    res = runner.run([str(exe), str(target), str(n)], timeout=120)
    if res.rc != 0:
        raise BenchError(f"hookloop failed (rc {res.rc}): {res.stderr.strip()}")
    chmod_ns, write_ns = res.stdout.split()
    return float(chmod_ns), float(write_ns), res.cpu


def attached(obj_path: Path, *prog_names: str) -> Any:
    """The object at ``obj_path`` loaded with only ``prog_names`` (attached); the caller closes it."""
    from kwatch.capture.libbpf import BpfObject

    obj = BpfObject(str(obj_path))
    try:
        for prog in obj.programs():
            prog.set_autoload(prog.name in prog_names)
        obj.load()
        for prog in obj.programs():
            if prog.name in prog_names:
                obj.attach(prog)
    except BaseException:
        obj.close()
        raise
    return obj


def hook_cost(runner: Runner, scratch: Path, n: int = 200_000, runs: int = 5) -> dict[str, Any]:
    """Median ns per fchmod and per pwrite with each hook and with none, and each hook's cost over none."""
    exe = c_program(BENCH_DIR / "hookloop.c", "hookloop")
    obj_path = bpf_object()
    target = scratch / "hookloop.file"
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ("none", *HOOKS)}
    for _, name in alternate(list(samples), runs):
        if name == "none":
            samples[name].append(hookloop(runner, exe, target, n))
            continue
        obj = attached(obj_path, HOOKS[name])
        try:
            samples[name].append(hookloop(runner, exe, target, n))
            lost = obj.map("hook_lost").lookup(bytes(4), 8)
            if lost and int.from_bytes(lost, "little"):
                raise BenchError(f"hook cost: {int.from_bytes(lost, 'little')} records did not fit the ring")
        finally:
            obj.close()
    target.unlink(missing_ok=True)
    med = {name: (statistics.median(x[0] for x in s), statistics.median(x[1] for x in s))
           for name, s in samples.items()}
    base_chmod, base_write = med["none"]
    return {
        "calls_per_run": n,
        "runs": runs,
        "ns_per_call": {name: {"fchmod": round(c, 1), "pwrite": round(w, 1)} for name, (c, w) in med.items()},
        "over_none_ns": {
            name: {"watched_call": round(med[name][0] - base_chmod, 1),
                   "other_call": round(med[name][1] - base_write, 1)}
            for name in HOOKS
        },
    }

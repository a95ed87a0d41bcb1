"""The first-sync suite (``python -m bench.run firstsync``): ``kwatch replicate --once`` into an empty mirror against
``rsync -a`` doing the same, over the same transport, alternating, on the untar tree (issue 19's first target).

Transports: a local directory (kwatch's agent on a pipe; rsync's own local copy) and ssh to a loopback sshd
(``tests/support/sshd.py``; kwatch's agent over ssh; rsync over the same ``-e``). The rsync:// first sync (kwatch's
native client against ``rsync -a`` to one daemon) is the ``rsync`` suite's "whole tree" row, on a synthetic tree.

Figures per (transport, tool): wall seconds (median and best: load only ever adds time, so the best of several runs
is the steadiest figure on a busy machine) and the CPU seconds of the tool's process tree as this process sees it
(its reaped children: for a local target both ends; over ssh the client's side only, sshd's sessions are not ours).
Every run ends with a check that the mirror is identical (``rsync -ani``); a run that is not is an error.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import alternate, machine, median, tmpfs
from bench.report import machine_line, publish
from bench.workloads import subset_tar, untar_argv

REPO = Path(__file__).resolve().parent.parent
KWATCH = [sys.executable, "-m", "kwatch"]
TOOLS = ("kwatch", "rsync -a")


def _argv(tool: str, transport: str, src: Path, dst: Path, ssh: str, target: str) -> list[str]:
    if tool == "kwatch":
        extra = ["-e", ssh, "--agent-command", " ".join(KWATCH)] if transport == "ssh" else []
        return [*KWATCH, "replicate", "--once", *extra, str(src), target if transport == "ssh" else str(dst)]
    extra = ["-e", ssh] if transport == "ssh" else []
    return ["rsync", "-a", *extra, f"{src}/", (target if transport == "ssh" else str(dst)) + "/"]


def _identical(src: Path, dst: Path) -> bool:
    p = subprocess.run(["rsync", "-ani", "--delete", f"{src}/", f"{dst}/"], capture_output=True, text=True,
                       timeout=600)
    # the root's own line: kwatch leaves the mirror root's attributes to the operator
    return p.returncode == 0 and not [ln for ln in p.stdout.splitlines() if not ln.endswith(" ./")]


def _one(argv: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd="/")
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{argv[:4]} failed ({p.returncode}): {p.stderr[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(args: argparse.Namespace, out: Path) -> int:
    sys.path.insert(0, str(REPO / "tests" / "support"))
    from sshd import Sshd

    tar = subset_tar(quick=args.quick)
    runs = args.runs or (3 if args.quick else 5)
    transports = ("local", "ssh")
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    errors: list[str] = []
    with tmpfs("8g") as base:
        src, dst = base / "src", base / "mirror"
        src.mkdir()
        subprocess.run(untar_argv(tar, src), check=True)
        with Sshd(base / "sshd") as sshd:
            for _, (transport, tool) in alternate([(t, k) for t in transports for k in TOOLS], runs):
                shutil.rmtree(dst, ignore_errors=True)  # an empty mirror: the last component is created
                subprocess.run(["sync"], check=False)
                wall, cpu = _one(_argv(tool, transport, src, dst, sshd.ssh_command, sshd.target(dst)))
                if not _identical(src, dst):
                    errors.append(f"{transport} {tool}: the mirror differs")
                rows.setdefault((transport, tool), []).append((wall, cpu))
                print(f"bench: firstsync: {transport:5} {tool:8} {wall:7.3f} s wall {cpu:6.3f} s cpu", file=sys.stderr)
    mach = machine()
    lines = [
        f"First sync into an empty mirror, `kwatch replicate --once` vs `rsync -a`, the untar tree ({tar.files:,} "
        f"files, {tar.dirs:,} dirs, {tar.bytes / 1e6:.0f} MB, tmpfs); {runs} runs each, alternating; CPU: the tool's "
        f"reaped process tree (over ssh the client side only); {machine_line(mach)}.",
        "",
        "| transport | tool | seconds (median) | best | best x rsync | CPU s (best) | CPU x rsync |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    result: dict[str, Any] = {"tree": tar.describe(), "runs": runs, "rows": [], "errors": errors, "machine": mach}
    for transport in transports:
        theirs = rows[(transport, "rsync -a")]
        for tool in TOOLS:
            rs = rows[(transport, tool)]
            best, cpu = min(r[0] for r in rs), min(r[1] for r in rs)
            x = best / min(r[0] for r in theirs)
            xc = cpu / min(r[1] for r in theirs)
            lines.append(f"| {transport} | {tool} | {median([r[0] for r in rs]):.3f} | {best:.3f} | {x:.2f} | "
                         f"{cpu:.3f} | {xc:.2f} |")
            result["rows"].append({"transport": transport, "tool": tool, "seconds": median([r[0] for r in rs]),
                                   "best_seconds": best, "best_cpu_seconds": cpu, "best_vs_rsync": x})
    lines += ["", "Issue 19's target: at most 1.2x `rsync -a` (local agent and over ssh)."]
    if errors:
        lines += ["", "ERRORS: " + "; ".join(errors)]
    md = "\n".join(lines) + "\n"
    done = publish("firstsync", md, result, out, write_doc=getattr(args, "write_readme", False) and not args.quick)
    if done:
        print(done, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":  # pragma: no cover - run through bench.run
    raise SystemExit("run it as: python -m bench.run firstsync")

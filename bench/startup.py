"""The start-up suite (``python -m bench.run startup``): time until watching, and peak memory, on a big tree.

A tree of 1,000,000 entries (1,000 directories of 999 empty files; ``--quick``: 20,000) on a tmpfs the suite
mounts. Each watcher is started, and the clock stops when it says it is watching: ``kwatch trace`` with each backend
(its "tracing ... backend" line), ``inotifywait -m -r`` ("Watches established."), and ``fatrace`` (no readiness
line; its first event after a probe file is created). Then one probe file is created and the watcher must report it,
so "watching" is checked, not assumed. Peak RSS (VmHWM) is read once it is watching.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine, median, proc_rss_peak_kib, tmpfs
from bench.report import machine_line, publish

REPO = Path(__file__).resolve().parent.parent
KWATCH = [sys.executable, "-m", "kwatch"]
READY_TIMEOUT = 600.0


def _build(root: Path, dirs: int, per_dir: int) -> int:
    n = 0
    for i in range(dirs):
        d = root / f"d{i:04d}"
        d.mkdir()
        n += 1
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for j in range(per_dir):
                os.close(os.open(f"f{j}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        finally:
            os.close(fd)
        n += per_dir
    return n


def _watchers(root: Path) -> dict[str, tuple[list[str], bytes]]:
    r = str(root)
    return {
        "kwatch bpf": ([*KWATCH, "trace", r, "--backend", "bpf"], b"with the bpf backend"),
        "kwatch fanotify": ([*KWATCH, "trace", r, "--backend", "fanotify"], b"with the fanotify backend"),
        "kwatch inotify": ([*KWATCH, "trace", r, "--backend", "inotify"], b"with the inotify backend"),
        "inotifywait -m -r": (["inotifywait", "-m", "-r", "-e", "create", r], b"Watches established"),
    }


def _one(argv: list[str], ready: bytes, root: Path, probe: str) -> tuple[float, int | None, bool]:
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    err = b""
    try:
        while ready not in err:
            if time.monotonic() - t0 > READY_TIMEOUT or p.poll() is not None:
                raise RuntimeError(f"{argv[0]} never became ready: {err[-300:]!r}")
            r, _, _ = select.select([p.stderr], [], [], 1.0)
            if r:
                err += os.read(p.stderr.fileno(), 65536)
        elapsed = time.monotonic() - t0
        rss = proc_rss_peak_kib(p.pid)
        (root / "d0000" / probe).write_bytes(b"x")
        seen = b""
        deadline = time.monotonic() + 30
        while probe.encode() not in seen and time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                seen += os.read(p.stdout.fileno(), 65536)
        return elapsed, rss, probe.encode() in seen
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(args: argparse.Namespace, out: Path) -> int:
    dirs, per_dir = (20, 999) if args.quick else (1000, 999)
    runs = args.runs or (1 if args.quick else 3)
    rows: dict[str, list[tuple[float, int | None, bool]]] = {}
    with tmpfs("8g") as base:
        root = base / "tree"
        root.mkdir()
        t = time.monotonic()
        entries = _build(root, dirs, per_dir)
        print(f"bench: startup: built {entries:,} entries in {time.monotonic() - t:.1f} s", file=sys.stderr)
        for k in range(runs):
            for name, (argv, ready) in _watchers(root).items():
                res = _one(argv, ready, root, f"probe-{name.replace(' ', '_')}-{k}")
                rows.setdefault(name, []).append(res)
                print(f"bench: startup: {name:18} {res[0]:8.2f} s  VmHWM {res[1]} KiB  probe seen {res[2]}",
                      file=sys.stderr)
    lines = [f"Time until watching a tree of {entries:,} entries (tmpfs) and peak RSS then; median of {runs}; "
             f"{machine_line(machine())}.", "",
             "| watcher | seconds to watching | peak RSS MiB | probe event seen |", "|---|---:|---:|---|"]
    result: dict[str, Any] = {"entries": entries, "rows": {}}
    for name, rs in rows.items():
        secs = median([r[0] for r in rs])
        rss = median([float(r[1]) for r in rs if r[1] is not None])
        seen = all(r[2] for r in rs)
        lines.append(f"| {name} | {secs:.2f} | {(rss or 0) / 1024:.0f} | {'yes' if seen else 'NO'} |")
        result["rows"][name] = {"seconds": secs, "rss_kib": rss, "probe_seen": seen}
    md = "\n".join(lines) + "\n"
    done = publish("startup", md, result, out, write_doc=getattr(args, "write_readme", False) and not args.quick)
    if done:
        print(done, file=sys.stderr)
    return 0 if all(r["probe_seen"] for r in result["rows"].values()) else 1

"""The untar overhead of the BPF backend's two programs, side by side in one guest of the kernel matrix.

    python vagrant/matrix.py run 6.12 -- python vagrant/bench_untar.py [--rounds N] [--tree DIR]

Inside the guest: a tar of DIR (a real source tree: Python's standard library by default) is extracted into a fresh
directory under /tmp, N rounds, each round once with no observer, once with the BPF backend on syscall tracepoints
and once on VFS hooks (the order rotates per round), each observer reading its ring buffer in a thread of this
process as kwatch does. It prints the median time of each and its ratio to no observer, and the events each
delivered. The guest is emulated (TCG): every absolute time is inflated many times over and means nothing; only
the ratios of one run compare, and they carry TCG's own distortions (a hook's instructions are emulated too).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kwatch.capture.base import CaptureFilter
from kwatch.capture.bpf import BpfSource
from kwatch.events import Op

WORK = Path("/tmp/kwatch-bench-untar")
MODES = ("none", "tracepoints", "vfs")


def make_tar(tree: Path, out: Path) -> int:
    """A tar of ``tree`` (regular files, directories, symlinks); the number of members."""
    n = 0
    with tarfile.open(out, "w") as tf:
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                p = Path(root) / name
                if p.is_symlink() or p.is_dir() or p.is_file():
                    tf.add(p, arcname=str(p.relative_to(tree.parent)), recursive=False)
                    n += 1
    return n


class Observer:
    """A BpfSource on ``root`` with a reader thread counting what it delivers (None: no observer)."""

    def __init__(self, hooks: str | None, root: Path) -> None:
        self.events = 0
        self.lost = 0
        self.by_op: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._src = BpfSource(CaptureFilter.make(roots=[os.fsencode(root)]), hooks=hooks) if hooks else None
        self._t = threading.Thread(target=self._read, daemon=True)
        if self._src is not None:
            self.object = self._src.object_path.name
            self._t.start()

    def _read(self) -> None:
        assert self._src is not None
        while not self._stop.is_set():
            for e in self._src.read(0.1):
                if e.op is Op.LOSS:
                    self.lost += e.lost or 0
                else:
                    self.events += 1
                    self.by_op[e.op.name] += 1

    def close(self) -> None:
        if self._src is None:
            return
        time.sleep(0.5)  # the last records: the reader polls every wake interval while they flow
        self._stop.set()
        self._t.join()
        self._src.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", default=f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    a = ap.parse_args(argv)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    tar = WORK.parent / "kwatch-bench-untar.tar"
    members = make_tar(Path(a.tree), tar)
    print(f"kernel {os.uname().release}; tar of {a.tree}: {members} members, {tar.stat().st_size >> 20} MiB; "
          f"{a.rounds} rounds", flush=True)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    events: dict[str, list[int]] = {m: [] for m in MODES}
    objects: dict[str, str] = {}
    by_op: dict[str, collections.Counter[str]] = {}
    for r in range(a.rounds):
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
        for mode in order:
            dest = WORK / f"{r}-{mode}"
            dest.mkdir()
            obs = Observer(None if mode == "none" else mode, WORK)
            try:
                subprocess.run(["sync"], check=True)
                t0 = time.perf_counter()
                subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
                took = time.perf_counter() - t0
            finally:
                obs.close()
            times[mode].append(took)
            events[mode].append(obs.events)
            if mode != "none":
                objects[mode] = obs.object
                by_op[mode] = obs.by_op
            print(f"round {r} {mode:12} {took:8.3f} s  events {obs.events} lost {obs.lost}", flush=True)
            shutil.rmtree(dest)
    base = statistics.median(times["none"])
    print("\nmedian untar time (emulated guest: only the ratios mean anything):")
    for mode in MODES:
        med = statistics.median(times[mode])
        what = f" ({objects[mode]})" if mode in objects else ""
        print(f"  {mode:12} {med:8.3f} s  x{med / base:.3f} of no observer  events per run {events[mode]}{what}")
    for mode, ops in by_op.items():
        print(f"  {mode} events by op (last run): " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

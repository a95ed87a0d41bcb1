"""The first-sync suite (``python -m bench.run firstsync``): ``kwatch replicate --once`` into an empty mirror against
``rsync -a`` doing the same, over the same transport, alternating (issue 19's first target).

Trees: the untar tree (the default), and with ``--small-files N`` (opt-in: a million files take minutes per run) a
tree of N small files made by :mod:`bench.smalltree` (``--small-files`` alone: 1,000,000). Both live on a tmpfs
(``--fs disk``: a directory under /var/tmp); the source and one mirror at a time.

Transports: a local directory (kwatch's agent on a pipe; rsync's own local copy); ssh to a loopback sshd
(``tests/support/sshd.py``; kwatch's agent over ssh; rsync over the same ``-e``); and an rsync daemon on loopback
(``tests/support/rsyncd.py``; kwatch's native rsync:// client against ``rsync -a`` to the same module). Over ssh both
tools get the same ``-e``, with the same cipher named (``-c aes128-gcm@openssh.com``: kwatch otherwise asks for
AES-GCM first and rsync gets OpenSSH's default, chacha20-poly1305, which costs more CPU per byte), and neither
compresses (``rsync -a`` has no ``-z``; kwatch gets ``--no-compress``). Neither fsyncs (kwatch's default ``--fsync
none``; rsync 3.2 fsyncs only with ``--fsync``).

Figures per (tree, transport, tool): wall seconds (median and best: load only ever adds time, so the best of several
runs is the steadiest figure on a busy machine) and the CPU seconds of the tool's process tree as this process sees
it (its reaped children: for a local target both ends; over ssh and rsync:// the client's side only, the sessions of
sshd and of the daemon are not ours). Every run ends with a check that the mirror is identical (``rsync -ani``); a
run that is not is an error. The load average is printed with every run (other work on the machine only adds time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import BenchError, alternate, machine, median, scratch_dir, tmpfs
from bench.report import machine_line, publish
from bench.smalltree import make_small_tree
from bench.workloads import subset_tar, untar_argv

REPO = Path(__file__).resolve().parent.parent
KWATCH = [sys.executable, "-m", "kwatch"]
TOOLS = ("kwatch", "rsync -a")
TRANSPORTS = ("local", "ssh", "rsync://")
CIPHER = "aes128-gcm@openssh.com"
SMALL_FILES = 1_000_000
#: tmpfs bytes a small file takes with its mirror's copy (a page each, inodes, dentries), to see it fits in memory
SMALL_FILE_COST = 11 << 10


class Ends:
    """Where a run writes, per transport: the local mirror path, or the target sshd/rsyncd are listening for."""

    def __init__(self, mirror: Path, ssh: Any, rsyncd: Any) -> None:
        self.mirror, self.ssh, self.rsyncd = mirror, ssh, rsyncd

    def dst(self, transport: str) -> Path:
        """The directory the mirror lands in (emptied before each run)."""
        return self.rsyncd.module_path("push") / "mirror" if transport == "rsync://" else self.mirror

    def argv(self, tool: str, transport: str, src: Path) -> list[str]:
        ssh = f"{self.ssh.ssh_command} -c {CIPHER}"
        if tool == "kwatch":
            if transport == "ssh":
                extra = ["-e", ssh, "--no-compress", "--agent-command", " ".join(KWATCH)]
                target = self.ssh.target(self.mirror)
            elif transport == "rsync://":
                extra, target = [], self.rsyncd.url("push", "mirror")
            else:
                extra, target = [], str(self.mirror)
            return [*KWATCH, "replicate", "--once", *extra, str(src), target]
        if transport == "ssh":
            return ["rsync", "-a", "-e", ssh, f"{src}/", self.ssh.target(self.mirror) + "/"]
        if transport == "rsync://":
            return ["rsync", "-a", f"{src}/", self.rsyncd.url("push", "mirror")]
        return ["rsync", "-a", f"{src}/", f"{self.mirror}/"]


def _identical(src: Path, dst: Path) -> bool:
    p = subprocess.run(["rsync", "-ani", "--delete", f"{src}/", f"{dst}/"], capture_output=True, text=True,
                       timeout=3600)
    # the root's own line: kwatch leaves the mirror root's attributes to the operator
    return p.returncode == 0 and not [ln for ln in p.stdout.splitlines() if not ln.endswith(" ./")]


def _one(argv: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=3600, cwd="/")
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{argv[:4]} failed ({p.returncode}): {p.stderr[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _clear(dst: Path) -> None:
    """An empty mirror: the last component is created by the tool. rm(1): a million names go faster than rmtree."""
    if dst.exists():
        subprocess.run(["rm", "-rf", "--", str(dst)], check=True, timeout=3600)


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


@contextlib.contextmanager
def _where(fs: str, need: int) -> Iterator[Path]:
    if fs == "tmpfs":
        if need > _mem_available():
            raise BenchError(f"the trees need about {need / 1e9:.1f} GB of tmpfs and {_mem_available() / 1e9:.1f} GB "
                             "of memory is available: give --fs disk")
        with tmpfs(f"{max(8 << 30, need + (2 << 30)) >> 20}m") as base:
            yield base
    else:
        with scratch_dir(Path("/var/tmp")) as base:
            yield base


def _trees(args: argparse.Namespace) -> list[tuple[str, Any]]:
    trees: list[tuple[str, Any]] = []
    if not getattr(args, "no_untar", False):
        trees.append(("untar", subset_tar(quick=args.quick)))
    small = getattr(args, "small_files", 0) or 0
    if small and not args.quick:
        trees.append(("small", small))
    return trees


def _describe(name: str, tree: Any) -> str:
    d = tree.describe()
    what = "the untar tree" if name == "untar" else "small files (bench/smalltree.py)"
    return f"{what}: {d['files']:,} files, {d['dirs']:,} dirs, {d['bytes'] / 1e6:.0f} MB"


def main(args: argparse.Namespace, out: Path) -> int:
    sys.path.insert(0, str(REPO / "tests" / "support"))
    from rsyncd import RsyncDaemon
    from sshd import Sshd

    trees = _trees(args)
    fs = getattr(args, "fs", "tmpfs")
    need = sum(n * SMALL_FILE_COST for name, n in trees if name == "small") + (2 << 30)
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    made: dict[str, Any] = {}
    runs_of: dict[str, int] = {}
    errors: list[str] = []
    with _where(fs, need) as base, Sshd(base / "sshd") as sshd, RsyncDaemon(base / "rsyncd") as rsyncd:
        ends = Ends(base / "mirror", sshd, rsyncd)
        for name, tree in trees:
            src = base / f"src-{name}"
            src.mkdir()
            if name == "untar":
                subprocess.run(untar_argv(tree, src), check=True)
                made[name] = tree
            else:
                t0 = time.monotonic()
                made[name] = make_small_tree(src, tree)
                print(f"bench: firstsync: made {tree:,} small files in {time.monotonic() - t0:.0f} s",
                      file=sys.stderr)
            # a million files take minutes per run: one run each unless asked for more
            runs = args.runs or (1 if name == "small" else 3 if args.quick else 5)
            runs_of[name] = runs
            for _, (transport, tool) in alternate([(t, k) for t in TRANSPORTS for k in TOOLS], runs):
                dst = ends.dst(transport)
                _clear(dst)
                subprocess.run(["sync"], check=False)
                load = os.getloadavg()[0]
                wall, cpu = _one(ends.argv(tool, transport, src))
                if not _identical(src, dst):
                    errors.append(f"{name} {transport} {tool}: the mirror differs")
                rows.setdefault((name, transport, tool), []).append((wall, cpu))
                print(f"bench: firstsync: {name:5} {transport:8} {tool:8} {wall:8.3f} s wall {cpu:7.3f} s cpu "
                      f"(load {load:.1f})", file=sys.stderr)
            _clear(ends.dst("local"))
            _clear(ends.dst("rsync://"))
            _clear(src)
    mach = machine()
    where = "tmpfs" if fs == "tmpfs" else "disk, /var/tmp"
    lines = [
        f"First sync into an empty mirror, `kwatch replicate --once` vs `rsync -a`, alternating; {where}; over ssh "
        f"both with `-c {CIPHER}` and no compression; CPU: the tool's reaped process tree (over ssh and rsync:// "
        f"the client side only); {machine_line(mach)}.",
        "",
    ]
    lines += [f"- {name}: {_describe(name, made[name])}; {runs_of[name]} run(s) each" for name, _ in trees]
    lines += [
        "",
        "| tree | transport | tool | seconds (median) | best | best x rsync | CPU s (best) | CPU x rsync |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    result: dict[str, Any] = {"trees": {n: made[n].describe() for n, _ in trees}, "runs": runs_of, "rows": [],
                              "errors": errors, "machine": mach, "fs": fs}
    for name, _ in trees:
        for transport in TRANSPORTS:
            theirs = rows[(name, transport, "rsync -a")]
            for tool in TOOLS:
                rs = rows[(name, transport, tool)]
                best, cpu = min(r[0] for r in rs), min(r[1] for r in rs)
                x = best / min(r[0] for r in theirs)
                xc = cpu / min(r[1] for r in theirs)
                lines.append(f"| {name} | {transport} | {tool} | {median([r[0] for r in rs]):.3f} | {best:.3f} | "
                             f"{x:.2f} | {cpu:.3f} | {xc:.2f} |")
                result["rows"].append({"tree": name, "transport": transport, "tool": tool,
                                       "seconds": median([r[0] for r in rs]), "best_seconds": best,
                                       "best_cpu_seconds": cpu, "best_vs_rsync": x})
    lines += ["", "Issue 19's targets: at most 1.2x `rsync -a` (local agent and over ssh), 1.5x over rsync://."]
    if errors:
        lines += ["", "ERRORS: " + "; ".join(errors)]
    md = "\n".join(lines) + "\n"
    done = publish("firstsync", md, result, out, write_doc=getattr(args, "write_readme", False) and not args.quick)
    if done:
        print(done, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":  # pragma: no cover - run through bench.run
    raise SystemExit("run it as: python -m bench.run firstsync")

"""The replication suite (``make bench-replicate``): kwatch against lsyncd, one rsync exec per event, and a one-shot
``rsync -a --delete``, on the same bursts, alternating, medians and ratios.

Owns the tools (how each is started, known ready, measured and stopped), the workloads of this suite, the per-run
procedure, the summary with the issue's targets, and the output (``bench/out/replicate.{md,json}``, the section of
docs/benchmarks.md between ``<!-- bench:replicate:start -->`` and ``<!-- bench:replicate:end -->``).

One run of (workload, tool), everything on one tmpfs:

1. set-up (not timed): a fresh source and an identical mirror (empty for the untar and the churn; the big file or the
   directory of small files copied to both with ``cp -a``); the mirror lives inside the ``push`` module of a loopback
   ``rsync --daemon`` (``tests/support/rsyncd.py``) so every transport reaches the same directory;
2. start the tool and wait until it is ready (its own marker: kwatch's first batch, lsyncd's "Startup ... finished",
   inotifywait's "Watches established") and the mirror is identical; snapshot the counters;
3. the burst (timed as ``burst s``); the one-shot rsync runs once right after it;
4. from the burst's end, poll ``rsync -ani --delete SRC/ DST/`` (size, mtime, mode, owner, type, symlink target,
   extra or missing names; the root directory's own line is ignored: kwatch leaves the mirror root's attributes to
   the operator) until it prints nothing: ``to identical s`` is the end of the first clean poll (an upper bound; the
   poll interval grows with the wait, about 10% of it). Then, untimed, a checksum pass (``-c``) confirms the
   content; a run whose content differs is reported as an error;
5. the tool's CPU (user+system of its process tree, from ``/proc``: live processes plus what they reaped) from the
   burst's start until its CPU stops growing after the mirror is identical; the mirror side's CPU (rsync daemon and
   sshd trees, their sessions and agents; kwatch's local agent) over the same window; the peak RSS (VmHWM) of the
   largest process of the tool, sampled while polling; the comparisons run in the benchmark's own process tree and
   are not charged to anybody.

Bytes on the wire: every networked tool reaches the daemons through ``bench.netcount`` (a counting TCP proxy on
loopback): ``sent`` is client-to-mirror payload, ``recv`` the way back. The local-pipe agent has no wire: its column
shows kwatch's own count of file data sent (literal bytes) instead, marked ``†``.

Tools (see :data:`TOOLS`): kwatch with a local pipe agent, with its agent over ssh, with its native rsync client to
the rsync daemon; lsyncd ``default.rsync`` to the daemon and ``default.rsyncssh`` over sshd, each with its default
delay (15 s) and with ``delay = 0``; ``inotifywait -m -r`` piped into one ``rsync`` per event; one ``rsync -a
--delete`` after the burst. Every rsync-based anchor uses ``-a`` (lsyncd: ``archive = true``: without it modes are
not copied and the mirror is never identical); no tool compresses except kwatch's agent link (zstd by default).

Not measured here: kwatch's in-kernel capture cost (charged to the workload, see the capture suite).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    CLK_TCK,
    OUT,
    REPO,
    BenchError,
    Child,
    Cleanup,
    Runner,
    alternate,
    machine,
    median,
    ratio,
    rotated,
    tmpfs,
    wait_until,
)
from bench.netcount import CountingProxy
from bench.workloads import ChurnWorkload, TarWorkload, run_churn, subset_tar, untar_argv

README_START = "<!-- bench:replicate:start -->"
README_END = "<!-- bench:replicate:end -->"
KWATCH = str(REPO / ".venv" / "bin" / "kwatch")
RSYNC = shutil.which("rsync") or "/usr/bin/rsync"
BIG_MTIME_NS = 1_600_000_000_123_456_789
EDIT = 4096
EDITS = 10
APPEND = 1 << 20
RENAMED_FILE_SIZE = 4096

_BATCH_RE = re.compile(r"(?<!rsync )batch \d+: .*?; (\d+) literal \+ (\d+) matched bytes")  # the agent's lines only
_RSYNC_BATCH_RE = re.compile(r"rsync batch \d+: .*?; (\d+) literal \+ (\d+) matched bytes")
_AGENT_RE = re.compile(r"agent up \(pid (\d+)")


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- parameters ------------------------------------------------------------------------------------------------------


@dataclass
class Params:
    quick: bool = False
    runs: int = 3
    time_limit: float = 3600.0
    big_size: int = 1 << 30
    rename_files: int = 10_000
    churn_iterations: int = 20_000
    settle_timeout: float = 90.0  # per run: seconds after the burst before the tool is declared too slow
    ready_timeout: float = 120.0
    tools: tuple[str, ...] = ()  # names to keep (env BENCH_REPLICATE_TOOLS); empty: all for the mode
    workloads: tuple[str, ...] = ()  # env BENCH_REPLICATE_WORKLOADS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Params:
        def env(name: str) -> tuple[str, ...]:
            return tuple(x for x in os.environ.get(name, "").split(",") if x)

        if args.quick:
            p = cls(quick=True, runs=1, time_limit=200.0, big_size=32 << 20, rename_files=1000,
                    churn_iterations=300, settle_timeout=20.0, ready_timeout=30.0)
        else:
            p = cls()
        if args.runs:
            p.runs = args.runs
        if args.time_limit:
            p.time_limit = args.time_limit
        p.tools = env("BENCH_REPLICATE_TOOLS")
        p.workloads = env("BENCH_REPLICATE_WORKLOADS")
        return p


# ---- process trees ---------------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f is not None:
                kids.setdefault(int(f[1]), []).append(int(d))
    return kids


def tree_pids(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    kids = kids if kids is not None else _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def tree_cpu(root: int, kids: dict[int, list[int]] | None = None, skip: int | None = None) -> float:
    """CPU seconds of the live tree under ``root``: each process's own time plus what it reaped (cutime/cstime).

    ``skip``: a subtree left out (kwatch's local agent is the mirror side, counted there).
    """
    kids = kids if kids is not None else _children_map()
    ticks = 0
    todo = [root]
    while todo:
        p = todo.pop()
        if p == skip:
            continue
        f = _stat_fields(p)
        if f is None:
            continue
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo.extend(kids.get(p, ()))
    return ticks / CLK_TCK


def tree_rss_peak_kib(root: int, kids: dict[int, list[int]] | None = None) -> int:
    best = 0
    for p in tree_pids(root, kids):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
    return best


# ---- comparison ------------------------------------------------------------------------------------------------------


def differences(src: Path, dst: Path, checksum: bool = False, timeout: float = 600.0) -> list[str]:
    """What ``rsync -ani --delete`` would change to make ``dst`` like ``src`` (the root's own line ignored)."""
    argv = [RSYNC, "-ani", "--delete", *(["-c"] if checksum else []), f"{src}/", f"{dst}/"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
    if r.returncode not in (0, 23, 24):
        return [f"comparison failed (rc {r.returncode}): {r.stderr.strip()[:200]}"]
    return [line for line in r.stdout.splitlines() if line and not line.endswith(" ./")]


# ---- the environment: daemons and proxies ----------------------------------------------------------------------------


@dataclass
class Env:
    runner: Runner
    base: Path
    rsyncd: Any  # tests.rsyncd.RsyncDaemon
    sshd: Any  # tests.sshd.Sshd
    rsync_proxy: CountingProxy
    ssh_proxy: CountingProxy
    seq: int = 0

    @property
    def ssh_command(self) -> str:
        return shlex.join([
            "ssh", "-p", str(self.ssh_proxy.port), "-i", str(self.sshd.client_key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
        ])

    def rsync_url(self, name: str) -> str:
        return f"rsync://127.0.0.1:{self.rsync_proxy.port}/push/{name}/"

    def mirror_cpu(self) -> float:
        kids = _children_map()
        return tree_cpu(self.rsyncd.proc.pid, kids) + tree_cpu(self.sshd.proc.pid, kids)

    def wire(self) -> tuple[int, int]:
        a, b = self.rsync_proxy.snapshot(), self.ssh_proxy.snapshot()
        return a[0] + b[0], a[1] + b[1]


@dataclass
class RunCtx:
    env: Env
    src: Path
    dst: Path  # inside the rsync daemon's push module
    name: str  # the mirror's name inside the module
    logdir: Path


# ---- tools -----------------------------------------------------------------------------------------------------------


@dataclass
class Handle:
    child: Child
    log: Path
    ready: Callable[[], bool]
    agent_pid: int | None = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass(frozen=True)
class Tool:
    name: str
    label: str
    kind: str  # kwatch | lsyncd | inotify | oneshot
    transport: str = ""  # local | ssh | rsyncd
    delay: float | None = None  # lsyncd: None = its default (15 s)
    full_only: bool = False  # left out of --quick (lsyncd's default delay alone is 15 s per run)

    def start(self, ctx: RunCtx) -> Handle:
        if self.kind == "kwatch":
            return self._start_kwatch(ctx)
        if self.kind == "lsyncd":
            return self._start_lsyncd(ctx)
        if self.kind == "inotify":
            return self._start_inotify(ctx)
        raise AssertionError(self.kind)

    def _spawn(self, ctx: RunCtx, argv: list[str], log: Path) -> Child:
        with log.open("ab") as f:
            return ctx.env.runner.start(argv, stdout=f, stderr=f)

    def _start_kwatch(self, ctx: RunCtx) -> Handle:
        log = ctx.logdir / f"{ctx.name}-{self.name}.log"
        if self.transport == "local":
            target, extra = str(ctx.dst), []
        elif self.transport == "ssh":
            target = f"root@127.0.0.1:{ctx.dst}"
            extra = ["-e", ctx.env.ssh_command, "--agent-command", KWATCH]
        else:
            target, extra = ctx.env.rsync_url(ctx.name), []
        child = self._spawn(ctx, [KWATCH, "replicate", str(ctx.src), target, *extra], log)
        h = Handle(child, log, lambda: False)

        def ready() -> bool:
            text = h.log_text()
            done = "Ctrl-C to stop" in text and (_BATCH_RE.search(text) or _RSYNC_BATCH_RE.search(text))
            if done and h.agent_pid is None and (m := _AGENT_RE.search(text)):
                h.agent_pid = int(m.group(1))
            return bool(done)

        h.ready = ready
        return h

    def _start_lsyncd(self, ctx: RunCtx) -> Handle:
        log = ctx.logdir / f"{ctx.name}-{self.name}.log"
        conf = ctx.logdir / f"{ctx.name}-{self.name}.lua"
        delay = "" if self.delay is None else f"  delay = {self.delay:g},\n"
        if self.transport == "rsyncd":
            body = (f"  default.rsync,\n  source = {json.dumps(str(ctx.src))},\n"
                    f"  target = {json.dumps(ctx.env.rsync_url(ctx.name))},\n")
        else:
            key = str(ctx.env.sshd.client_key)
            body = (f"  default.rsyncssh,\n  source = {json.dumps(str(ctx.src))},\n  host = \"root@127.0.0.1\",\n"
                    f"  targetdir = {json.dumps(str(ctx.dst))},\n"
                    f"  ssh = {{ port = {ctx.env.ssh_proxy.port}, identityFile = {json.dumps(key)},\n"
                    "    options = { StrictHostKeyChecking = \"no\", UserKnownHostsFile = \"/dev/null\", "
                    "LogLevel = \"ERROR\" } },\n")
        conf.write_text(
            f"settings {{\n  logfile = {json.dumps(str(log))},\n  nodaemon = true,\n  insist = false,\n}}\n"
            f"sync {{\n{body}{delay}  rsync = {{ archive = true }},\n}}\n"
        )
        child = self._spawn(ctx, ["lsyncd", str(conf)], log.with_suffix(".out"))
        h = Handle(child, log, lambda: False)
        h.ready = lambda: bool(re.search(r"Startup of .* finished", h.log_text()))
        return h

    def _start_inotify(self, ctx: RunCtx) -> Handle:
        log = ctx.logdir / f"{ctx.name}-{self.name}.log"
        src = str(ctx.src)
        # the naive way: every event runs one rsync of that path (-R keeps it relative to SRC/./; a path that is
        # gone is deleted on the mirror by --delete-missing-args; a directory is sent with its subtree)
        script = (
            f"inotifywait -m -r -e close_write,create,delete,move,attrib --format '%w%f' {shlex.quote(src)} | "
            "while IFS= read -r p; do "
            f"rsync -a --delete --delete-missing-args -R {shlex.quote(src)}/./\"${{p#{src}/}}\" "
            f"{shlex.quote(ctx.env.rsync_url(ctx.name))}; done"
        )
        child = self._spawn(ctx, ["sh", "-c", script], log)
        h = Handle(child, log, lambda: False)
        h.ready = lambda: "Watches established" in h.log_text()
        return h


TOOLS: tuple[Tool, ...] = (
    Tool("kwatch-pipe", "kwatch, local pipe agent", "kwatch", "local"),
    Tool("kwatch-ssh", "kwatch, agent over ssh", "kwatch", "ssh"),
    Tool("kwatch-rsyncd", "kwatch, rsync:// native client", "kwatch", "rsyncd"),
    Tool("lsyncd-rsync", "lsyncd default.rsync to rsyncd (delay 15 s)", "lsyncd", "rsyncd", None, True),
    Tool("lsyncd-rsync-d0", "lsyncd default.rsync to rsyncd, delay 0", "lsyncd", "rsyncd", 0.0),
    Tool("lsyncd-rsyncssh", "lsyncd default.rsyncssh (delay 15 s)", "lsyncd", "ssh", None, True),
    Tool("lsyncd-rsyncssh-d0", "lsyncd default.rsyncssh, delay 0", "lsyncd", "ssh", 0.0),
    Tool("inotify-exec", "inotifywait + one rsync per event", "inotify", "rsyncd"),
    Tool("oneshot", "one-shot `rsync -a --delete` after the burst", "oneshot", "rsyncd"),
)


def tool_unavailable(t: Tool) -> str | None:
    need = {"lsyncd": "lsyncd", "inotify": "inotifywait"}.get(t.kind)
    if need and shutil.which(need) is None:
        return f"{need} is not installed (apt-get install {'inotify-tools' if need == 'inotifywait' else need})"
    if t.kind == "kwatch" and not os.access(KWATCH, os.X_OK):
        return f"{KWATCH} missing: run `make venv`"
    return None


# ---- workloads -------------------------------------------------------------------------------------------------------


class Workload:
    name = ""

    def prepare(self, pristine: Path) -> None:
        """Once per suite (not timed)."""

    def setup(self, src: Path, dst: Path) -> None:
        """Per run (not timed): source and mirror identical."""

    def burst(self, runner: Runner, src: Path, timeout: float) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


class Untar(Workload):
    name = "untar"

    def __init__(self, tar: TarWorkload) -> None:
        self.tar = tar

    def burst(self, runner: Runner, src: Path, timeout: float) -> None:
        res = runner.run(untar_argv(self.tar, src), timeout=timeout)
        if res.rc != 0:
            raise BenchError(f"tar failed (rc {res.rc}): {res.stderr.strip()[-300:]}")

    def describe(self) -> dict[str, Any]:
        return self.tar.describe()


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True, capture_output=True, timeout=600)


class BigFile(Workload):
    """One big file; the burst: 10 scattered 4 KiB overwrites and a 1 MiB append, by one writer, one close."""

    name = "bigfile"

    def __init__(self, size: int) -> None:
        self.size = size
        self.pristine: Path | None = None

    def prepare(self, pristine: Path) -> None:
        import numpy as np

        self.pristine = pristine / "big.bin"
        rng = np.random.default_rng(20240601)
        with self.pristine.open("wb") as f:
            left = self.size
            while left:
                n = min(left, 64 << 20)
                f.write(rng.bytes(n))
                left -= n
        os.utime(self.pristine, ns=(BIG_MTIME_NS, BIG_MTIME_NS))

    def setup(self, src: Path, dst: Path) -> None:
        assert self.pristine is not None
        _copy(self.pristine, src / "big.bin")
        _copy(self.pristine, dst / "big.bin")

    def burst(self, runner: Runner, src: Path, timeout: float) -> None:
        rnd = random.Random(7)
        fd = os.open(src / "big.bin", os.O_WRONLY)
        try:
            for off in sorted(rnd.randrange(0, self.size - EDIT) for _ in range(EDITS)):
                os.pwrite(fd, rnd.randbytes(EDIT), off)
            os.pwrite(fd, rnd.randbytes(APPEND), self.size)
        finally:
            os.close(fd)

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "edits": f"{EDITS} x {EDIT} B at random offsets", "append": APPEND}


class Rename(Workload):
    """A directory of N files of 4 KiB, renamed (one rename(2))."""

    name = "rename"

    def __init__(self, files: int) -> None:
        self.files = files
        self.pristine: Path | None = None

    def prepare(self, pristine: Path) -> None:
        import numpy as np

        d = pristine / "ren" / "dir"
        d.mkdir(parents=True)
        data = np.random.default_rng(99).bytes(self.files * RENAMED_FILE_SIZE)
        for i in range(self.files):
            p = d / f"f{i:05d}.dat"
            p.write_bytes(data[i * RENAMED_FILE_SIZE : (i + 1) * RENAMED_FILE_SIZE])
            os.utime(p, ns=(BIG_MTIME_NS, BIG_MTIME_NS))
        self.pristine = d

    def setup(self, src: Path, dst: Path) -> None:
        assert self.pristine is not None
        _copy(self.pristine, src / "dir")
        _copy(self.pristine, dst / "dir")

    def burst(self, runner: Runner, src: Path, timeout: float) -> None:
        os.rename(src / "dir", src / "dir-renamed")

    def describe(self) -> dict[str, Any]:
        return {"files": self.files, "file_size": RENAMED_FILE_SIZE, "op": "rename(dir, dir-renamed)"}


class Churn(Workload):
    name = "churn"

    def __init__(self, iterations: int) -> None:
        self.wl = ChurnWorkload(iterations)

    def burst(self, runner: Runner, src: Path, timeout: float) -> None:
        run_churn(runner, self.wl, src, timeout)

    def describe(self) -> dict[str, Any]:
        return self.wl.describe()


# ---- one run ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    workload: str
    tool: str
    run: int
    burst_s: float | None = None
    identical_s: float | None = None  # from the burst's end to the end of the first clean comparison
    timed_out: bool = False
    sent: int | None = None  # wire bytes client -> mirror (proxy)
    recv: int | None = None
    literal: int | None = None  # kwatch's own count of file data sent
    matched: int | None = None
    tool_cpu_s: float | None = None
    mirror_cpu_s: float | None = None
    rss_kib: int | None = None
    polls: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _kwatch_bytes(text: str) -> tuple[int, int]:
    lit = mat = 0
    for m in (*_BATCH_RE.finditer(text), *_RSYNC_BATCH_RE.finditer(text)):
        lit += int(m.group(1))
        mat += int(m.group(2))
    return lit, mat


def one_run(env: Env, tool: Tool, wl: Workload, p: Params, run: Run, log: Callable[[str], None]) -> None:
    env.seq += 1
    name = f"m{env.seq}"
    src = env.base / "src" / f"s{env.seq}"
    dst = env.rsyncd.module_path("push") / name
    logdir = env.base / "logs"
    src.mkdir(parents=True)
    dst.mkdir(parents=True)
    ctx = RunCtx(env, src, dst, name, logdir)
    h: Handle | None = None
    try:
        wl.setup(src, dst)
        if tool.kind != "oneshot":
            t_ready = time.monotonic()
            h = tool.start(ctx)
            hh = h
            ok = wait_until(lambda: hh.ready() or not hh.child.alive(), p.ready_timeout, 0.05)
            if not ok or not h.child.alive():
                raise BenchError(f"{tool.name} not ready after {p.ready_timeout:.0f} s: {h.log_text()[-400:]}")
            if not wait_until(lambda: not differences(src, dst), p.ready_timeout, 0.1):
                raise BenchError(f"{tool.name}: mirror not identical before the burst: {differences(src, dst)[:3]}")
            lit0, mat0 = _kwatch_bytes(h.log_text())
            run.extra["ready_s"] = round(time.monotonic() - t_ready, 2)
        wire0 = env.wire()
        mcpu0 = env.mirror_cpu()
        kids = _children_map()
        tcpu0 = tree_cpu(h.child.pid, kids, h.agent_pid) if h else 0.0
        acpu0 = tree_cpu(h.agent_pid, kids) if h and h.agent_pid and tool.transport == "local" else 0.0
        t0 = time.monotonic()
        wl.burst(env.runner, src, p.settle_timeout * 2)
        t_end = time.monotonic()
        run.burst_s = t_end - t0
        rss = 0
        if tool.kind == "oneshot":
            # started and sampled here rather than Runner.run: wait4's ru_maxrss would include the pages the forked
            # child shared with this (big) Python process before its execve, while VmHWM starts afresh at execve
            with (logdir / f"{name}-oneshot.log").open("wb") as f:
                c = env.runner.start([RSYNC, "-a", "--delete", f"{src}/", env.rsync_url(name)], stdout=f, stderr=f)
            while (fin := c.reap(0.02)) is None:
                rss = max(rss, tree_rss_peak_kib(c.pid))
                if time.monotonic() > t_end + p.settle_timeout:
                    c.stop()
                    raise BenchError(f"one-shot rsync still running after {p.settle_timeout:.0f} s")
            env.runner.children.remove(c)
            if fin.rc != 0:
                raise BenchError(f"rsync failed (rc {fin.rc}): {(logdir / f'{name}-oneshot.log').read_text()[-300:]}")
            run.tool_cpu_s = fin.cpu
        deadline = t_end + p.settle_timeout
        while True:
            if h is not None:
                if not h.child.alive():
                    raise BenchError(f"{tool.name} exited (rc {h.child.popen.returncode}): {h.log_text()[-400:]}")
                rss = max(rss, tree_rss_peak_kib(h.child.pid))
            diff = differences(src, dst)
            now = time.monotonic()
            run.polls += 1
            if not diff:
                run.identical_s = now - t_end
                break
            if now > deadline:
                run.timed_out = True
                run.extra["left"] = len(diff)
                run.extra["left_sample"] = diff[:5]
                break
            time.sleep(min(1.0, 0.02 + 0.1 * (now - t_end)))
        if h is not None:
            # let the tool finish what the burst caused (its CPU stops growing), bounded
            # (quiet: under 4% of a core over half a second; the clock tick is 10 ms)
            quiet_until = time.monotonic() + (10.0 if run.identical_s is not None else 0.0)
            samples = [(time.monotonic(), tree_cpu(h.child.pid))]
            while time.monotonic() < quiet_until:
                time.sleep(0.1)
                samples.append((time.monotonic(), tree_cpu(h.child.pid)))
                old = [s for s in samples if s[0] <= samples[-1][0] - 0.5]
                if old and samples[-1][1] - old[-1][1] <= 0.02:
                    break
            run.extra["quiet_wait_s"] = round(samples[-1][0] - samples[0][0], 2)
            kids = _children_map()
            rss = max(rss, tree_rss_peak_kib(h.child.pid, kids))
            run.tool_cpu_s = tree_cpu(h.child.pid, kids, h.agent_pid) - tcpu0
            acpu = tree_cpu(h.agent_pid, kids) - acpu0 if h.agent_pid and tool.transport == "local" else 0.0
        else:
            acpu = 0.0
        wire1 = env.wire()
        run.mirror_cpu_s = env.mirror_cpu() - mcpu0 + acpu
        run.sent, run.recv = wire1[0] - wire0[0], wire1[1] - wire0[1]
        run.rss_kib = rss or None
        if h is not None:
            t_stop = time.monotonic()
            h.child.stop(grace=10.0)
            run.extra["stop_s"] = round(time.monotonic() - t_stop, 2)
            if tool.kind == "kwatch":
                lit1, mat1 = _kwatch_bytes(h.log_text())
                run.literal, run.matched = lit1 - lit0, mat1 - mat0
                if tool.transport == "local":
                    run.sent = run.recv = None  # no wire: the literal column says what was sent
        if run.identical_s is not None:
            bad = differences(src, dst, checksum=True)
            if bad:
                run.error = f"content differs after the quick check said identical: {bad[:3]}"
                run.identical_s = None
    finally:
        if h is not None:
            h.child.stop(grace=5.0)
            with contextlib.suppress(ValueError):
                env.runner.children.remove(h.child)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


# ---- summary ---------------------------------------------------------------------------------------------------------


def summarize(runs: list[Run], tools: list[Tool]) -> list[dict[str, Any]]:
    rows = []
    label = {t.name: t for t in tools}
    for wl in dict.fromkeys(r.workload for r in runs):
        base = median([r.identical_s for r in runs if r.workload == wl and r.tool == "oneshot"
                       and r.identical_s is not None])
        for name in dict.fromkeys(r.tool for r in runs if r.workload == wl):
            mine = [r for r in runs if r.workload == wl and r.tool == name]
            ok = [r for r in mine if r.error is None and r.identical_s is not None]
            t = label[name]

            def med(attr: str, rs: list[Run] = ok) -> float | None:
                return median([v for r in rs if (v := getattr(r, attr)) is not None])

            timeouts = [r for r in mine if r.timed_out]
            ident = med("identical_s")
            rows.append({
                "workload": wl, "tool": name, "label": t.label, "runs": len(ok),
                "identical_s": ident, "identicals": [round(r.identical_s, 3) for r in ok if r.identical_s is not None],
                "timed_out": len(timeouts),
                "timeout_s": max((r.extra.get("timeout_s", 0) for r in timeouts), default=None),
                "ratio_oneshot": ratio(ident, base),
                "burst_s": med("burst_s", mine),
                "sent": med("sent"), "recv": med("recv"), "literal": med("literal"), "matched": med("matched"),
                "tool_cpu_s": med("tool_cpu_s"), "mirror_cpu_s": med("mirror_cpu_s"), "rss_kib": med("rss_kib"),
                "errors": [r.error for r in mine if r.error],
                "timeout_sent": med("sent", timeouts), "timeout_left": med_extra(timeouts, "left"),
            })
    return rows


def med_extra(rs: list[Run], key: str) -> float | None:
    return median([r.extra[key] for r in rs if key in r.extra])


def check_targets(rows: list[dict[str, Any]], res_wl: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged from the medians (per kwatch transport)."""
    by = {(r["workload"], r["tool"]): r for r in rows}
    out: list[dict[str, Any]] = []
    kw = [t.name for t in TOOLS if t.kind == "kwatch"]

    def add(target: str, tool: str, ok: bool | None, detail: str) -> None:
        out.append({"target": target, "tool": tool, "met": ok, "detail": detail})

    for k in kw:
        r = by.get(("untar", k))
        if r is None:
            continue
        mine = r["identical_s"]
        ex = by.get(("untar", "inotify-exec"))
        if ex is not None:
            if ex["identical_s"] is not None and mine:
                x = ex["identical_s"] / mine
                add(">= 10x faster than one exec per event (untar)", k, x >= 10, f"{x:.1f}x")
            elif ex["timed_out"] and mine:
                lb = (ex["timeout_s"] or 0) / mine
                add(">= 10x faster than one exec per event (untar)", k, True if lb >= 10 else None,
                    f"exec per event not identical after {ex['timeout_s']:.0f} s: >= {lb:.0f}x")
        ls = [by[("untar", t.name)] for t in TOOLS if t.kind == "lsyncd" and ("untar", t.name) in by]
        ls_ok = [x for x in ls if x["identical_s"] is not None]
        if ls_ok and mine is not None:
            best = min(ls_ok, key=lambda x: x["identical_s"])
            add("faster than lsyncd at its best setting (untar)", k, mine < best["identical_s"],
                f"{mine:.2f} s vs {best['identical_s']:.2f} s ({best['tool']})")
        one = by.get(("untar", "oneshot"))
        if one and one["identical_s"] and mine is not None:
            x = mine / one["identical_s"]
            add("within 1.5x of a one-shot rsync (untar)", k, x <= 1.5, f"{x:.2f}x ({mine:.2f} s vs "
                f"{one['identical_s']:.2f} s)")
        r = by.get(("rename", k))
        if r is not None:
            nfiles = res_wl.get("rename", {}).get("files", 0)
            data = nfiles * RENAMED_FILE_SIZE
            sent = r["literal"] if r["literal"] is not None else None
            ok = r["identical_s"] is not None and r["identical_s"] < 1.0 and sent == 0
            add(f"rename of {nfiles:,} files: < 1 s, no file data sent", k, ok,
                f"{_f(r['identical_s'])} s, {_n(sent)} B of file data (kwatch log), {_n(r['sent'])} B on the wire "
                f"(tree: {data:,} B)")
        r = by.get(("bigfile", k))
        if r is not None:
            size = res_wl.get("bigfile", {}).get("size", 0)
            sent = r["sent"] if r["sent"] is not None else r["literal"]
            if sent is not None and size:
                add("4 KiB edits send < 0.5% of the file", k, sent < 0.005 * size,
                    f"{int(sent):,} B = {100 * sent / size:.2f}% of {size:,} B"
                    + (" (file data, kwatch log)" if r["sent"] is None else " (wire)"))
    return out


# ---- output ----------------------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _n(x: float | int | None) -> str:
    return "-" if x is None else f"{int(x):,}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.3f}" if x < 1e7 else f"{x / 1e6:.1f}"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    wl = res["workloads"]
    p = res["params"]
    lines = [
        f"Measured {m['date']}; {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
        f"kwatch {m['kwatch_commit']}. Command: `{res['command']}`. Median of up to {p['runs']} alternating run(s) "
        "(the runs column says how many finished); "
        "everything on one tmpfs, daemons on 127.0.0.1.",
        "",
        "Workloads: "
        + (f"**untar** = `tar -xf` of the fixed subset of {wl['untar']['package']} ({_n(wl['untar']['files'])} "
           f"files, {_n(wl['untar']['dirs'])} dirs, {wl['untar']['bytes'] / 1e6:.0f} MB) into an empty mirrored "
           "tree; " if "untar" in wl else "")
        + (f"**bigfile** = a {wl['bigfile']['size'] / (1 << 20):,.0f} MiB file (already mirrored), "
           f"{EDITS} scattered 4 KiB overwrites and a 1 MiB append by one writer; " if "bigfile" in wl else "")
        + (f"**rename** = `rename(2)` of a mirrored directory of {_n(wl['rename']['files'])} files of 4 KiB; "
           if "rename" in wl else "")
        + (f"**churn** = {_n(wl['churn']['iterations'])} x (create, write 64 B, close, unlink) over 64 names."
           if "churn" in wl else ""),
        "",
        "| workload | tool | to identical s | x one-shot | burst s | sent MB | recv MB | tool CPU s | mirror CPU s "
        "| peak RSS MiB | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["summary"]:
        if r["runs"] == 0:
            if r["timed_out"]:
                why = (f"not identical after {r['timeout_s']:.0f} s ({_n(r['timeout_left'])} differences left, "
                       f"{_mb(r['timeout_sent'])} MB sent by then)")
            else:
                why = "failed: " + ((r["errors"] or ["no run"])[0].splitlines()[0][:90]).replace("|", "/")
            lines.append(f"| {r['workload']} | {r['label']} | {why} | | {_f(r['burst_s'], '{:.2f}')} | | | | | | 0 |")
            continue
        sent = _mb(r["sent"]) if r["sent"] is not None else (_mb(r["literal"]) + " †")
        lines.append(
            f"| {r['workload']} | {r['label']} | {_f(r['identical_s'])} | {_f(r['ratio_oneshot'], '{:.2f}')} | "
            f"{_f(r['burst_s'], '{:.2f}')} | {sent} | {_mb(r['recv'])} | {_f(r['tool_cpu_s'], '{:.2f}')} | "
            f"{_f(r['mirror_cpu_s'], '{:.2f}')} | {_f(r['rss_kib'] and r['rss_kib'] / 1024, '{:.0f}')} | "
            f"{r['runs']}{' (+' + str(r['timed_out']) + ' timed out)' if r['timed_out'] else ''} |"
        )
    lines += [
        "",
        "to identical s: from the end of the burst to the end of the first `rsync -ani --delete SRC/ DST/` that finds "
        "nothing to do (size, mtime, mode, owner, type, links, extra/missing names; then confirmed with checksums); "
        "x one-shot: over the one-shot rsync's median. burst s: the workload's own wall time. sent / recv MB: "
        "payload bytes through a counting TCP proxy in front of the rsync daemon and sshd (the same method for "
        "every tool; ssh counts include encryption overhead), to the mirror / back; † local pipe, no wire: "
        "kwatch's own count of file data sent. tool CPU: user+system seconds of the tool's process tree (incl. "
        "ssh and rsync children, excluding kwatch's local agent) from the burst's start until its CPU goes quiet; "
        "mirror CPU: the rsync daemon's and sshd's trees (sessions, remote agents, receivers) and kwatch's local "
        "agent over the same window. peak RSS: the largest VmHWM among the tool's processes. kwatch's in-kernel "
        "capture cost is charged to the workload, not here. kwatch sends small files plain and compresses large-file chunks and deltas with zstd over ssh (nothing on the local pipe); the rsync "
        "anchors run without -z.",
    ]
    if res["targets"]:
        lines += ["", "| target | tool | met | measured |", "|---|---|---|---|"]
        for t in res["targets"]:
            met = {True: "yes", False: "**no**", None: "?"}[t["met"]]
            lines.append(f"| {t['target']} | {t['tool']} | {met} | {t['detail']} |")
    if res.get("not_measured"):
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in res["not_measured"].items()) + "."]
    for note in res.get("notes", []):
        lines += ["", note]
    if res.get("out_of_time"):
        lines += ["", f"Stopped at the time limit ({p['time_limit']:.0f} s): the results are partial."]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out: Path = OUT) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicate.md").write_text("# kwatch replication benchmark\n\n" + markdown(res))
    (out / "replicate.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return {"markdown": str(out / "replicate.md"), "json": str(out / "replicate.json")}


def update_readme(res: dict[str, Any]) -> str:
    """Put the table into docs/benchmarks.md between the replicate markers (atomically); returns what happened."""
    from bench.report import update_section

    return update_section(markdown(res), README_START, README_END)


# ---- the suite -------------------------------------------------------------------------------------------------------


def run_suite(p: Params, log: Callable[[str], None] = _log_default) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "support"))
    from rsyncd import RsyncDaemon  # tests/support/rsyncd.py, a real rsync daemon on 127.0.0.1
    from sshd import Sshd  # tests/support/sshd.py, a real sshd on 127.0.0.1

    t_start = time.monotonic()
    mach = machine()
    deadline = t_start + p.time_limit
    workloads: list[Workload] = [
        Untar(subset_tar(quick=p.quick)), BigFile(p.big_size), Rename(p.rename_files), Churn(p.churn_iterations),
    ]
    if p.workloads:
        workloads = [w for w in workloads if w.name in p.workloads]
    tools = [t for t in TOOLS if (not p.quick or not t.full_only) and (not p.tools or t.name in p.tools)]
    skipped: dict[str, str] = {}
    if p.quick:
        for t in TOOLS:
            if t.full_only:
                skipped[t.name] = "left out of --quick (its 15 s delay alone would take most of the time budget)"
    usable = []
    for t in tools:
        why = tool_unavailable(t)
        if why:
            skipped[t.name] = why
            log(f"replicate: {t.name}: not measured: {why}")
        else:
            usable.append(t)
    runs: list[Run] = []
    out_of_time = False
    size = max(4 << 30, 3 * p.big_size + (2 << 30))
    with Cleanup() as stack:
        runner = Runner()
        stack.callback(runner.close)
        base = stack.enter_context(tmpfs(size=f"{size >> 20}m", prefix="kwatch-bench-repl-"))
        (base / "logs").mkdir()
        (base / "src").mkdir()
        pristine = base / "pristine"
        pristine.mkdir()
        rsyncd = stack.enter_context(RsyncDaemon(base / "rsyncd"))
        sshd = stack.enter_context(Sshd(base / "sshd"))
        rproxy = stack.enter_context(CountingProxy(rsyncd.port, "rsyncd"))
        sproxy = stack.enter_context(CountingProxy(sshd.port, "sshd"))
        env = Env(runner, base, rsyncd, sshd, rproxy, sproxy)
        for w in workloads:
            t0 = time.monotonic()
            w.prepare(pristine)
            log(f"replicate: {w.name}: prepared in {time.monotonic() - t0:.1f} s")
        given_up: dict[tuple[str, str], str] = {}
        # run i of every workload before run i+1 of any: a time limit leaves fewer runs, not missing workloads
        for i, w in alternate(workloads, p.runs):
            for tname in rotated([t.name for t in usable], i):
                tool = next(t for t in usable if t.name == tname)
                if time.monotonic() > deadline:
                    out_of_time = True
                    break
                run = Run(w.name, tname, i)
                runs.append(run)
                if (w.name, tname) in given_up:
                    run.error = given_up[(w.name, tname)]
                    continue
                t0 = time.monotonic()
                try:
                    one_run(env, tool, w, p, run, log)
                except (BenchError, subprocess.SubprocessError, OSError) as e:
                    run.error = str(e)[:2000]
                    given_up[(w.name, tname)] = f"skipped after a failure in run {i}"
                    log(f"replicate: {w.name} {tname} run {i}: FAILED: {e}")
                    continue
                if run.timed_out:
                    run.extra["timeout_s"] = p.settle_timeout
                    given_up[(w.name, tname)] = f"not repeated: run {i} was not identical after {p.settle_timeout} s"
                kw = f" literal {run.literal} matched {run.matched}" if run.literal is not None else ""
                log(f"replicate: {w.name:7} {tname:18} run {i}: identical "
                    f"{'TIMEOUT' if run.timed_out else _f(run.identical_s)} s (burst {_f(run.burst_s, '{:.2f}')} s, "
                    f"{run.polls} polls) sent {_n(run.sent)} recv {_n(run.recv)}{kw} cpu {_f(run.tool_cpu_s, '{:.2f}')}"
                    f" mirror cpu {_f(run.mirror_cpu_s, '{:.2f}')} rss {_n(run.rss_kib)} KiB"
                    f"{' ERROR ' + run.error if run.error else ''} ({time.monotonic() - t0:.1f} s with set-up; "
                    f"ready {run.extra.get('ready_s')} s, stop {run.extra.get('stop_s')} s)")
            if out_of_time:
                break
    wl_desc = {w.name: w.describe() for w in workloads}
    summary = summarize(runs, list(TOOLS))
    return {
        "suite": "replicate",
        "command": "python -m bench.run " + ("--quick " if p.quick else "") + "replicate",
        "machine": mach,
        "params": asdict(p),
        "workloads": wl_desc,
        "not_measured": skipped,
        "out_of_time": out_of_time,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summary,
        "targets": check_targets(summary, wl_desc),
        "runs": [asdict(r) for r in runs],
    }


def main(args: argparse.Namespace, out: Path) -> int:
    """Called by ``bench.run`` with its parsed arguments."""
    p = Params.from_args(args)
    res = run_suite(p)
    for k, v in write(res, out).items():
        _log_default(f"replicate: {k}: {v}")
    if args.write_readme:
        _log_default("replicate: " + update_readme(res))
    print(markdown(res))
    if p.quick:
        failed = [r for r in res["summary"] if r["runs"] == 0 and not r["timed_out"]]
        if failed or res["out_of_time"]:
            _log_default("replicate: smoke test FAILED: " + ", ".join(f"{r['workload']}/{r['tool']}" for r in failed))
            return 1
    return 0

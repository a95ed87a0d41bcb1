"""Timing and process helpers shared by the benchmark suites.

Owns: the alternating schedule (ABCABC...), medians and ratios, per-process CPU seconds and peak RSS read from
``/proc/<pid>/stat``/``status`` (no psutil), a bounded process runner that starts every child in its own process group
and only ever signals those groups, a cleanup stack that also runs on SIGINT/SIGTERM, tmpfs mounts made for a run,
and the description of the machine a result was measured on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / "cache"
OUT = BENCH_DIR / "out"


class BenchError(RuntimeError):
    """A benchmark cannot run here; the message says why and what to do."""


# ---- statistics ------------------------------------------------------------------------------------------------


def rotated(configs: Sequence[T], i: int) -> list[T]:
    """``configs`` started at position ``i`` (mod its length): round ``i``'s order."""
    k = i % len(configs) if configs else 0
    return [*configs[k:], *configs[:k]]


def alternate(configs: Sequence[T], runs: int) -> Iterator[tuple[int, T]]:
    """(run index, config) in the order A B C, B C A, C A B, ...: drift of the machine spreads over every config
    alike, and no config is always the first of a round (the first run after another tool's clean-up was measured
    to pay for cold memory: the bigfile replication's first tool, whichever it was)."""
    for i in range(runs):
        for c in rotated(configs, i):
            yield i, c


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(x: float | None, base: float | None) -> float | None:
    if x is None or not base:
        return None
    return x / base


# ---- /proc readers -----------------------------------------------------------------------------------------------


def proc_cpu(pid: int, children: bool = False) -> float | None:
    """User+system CPU seconds of ``pid`` (plus its waited-for children if asked); None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the comm field may hold spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_rss_peak_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of ``pid`` in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pids_by_comm(comm: str) -> list[int]:
    """Pids whose comm is exactly ``comm`` (used only to *read* kernel threads' CPU time, never to signal)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == comm:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def fd_targets(pid: int) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def fdinfo_text(pid: int) -> str:
    parts = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError):
                parts.append(Path(f"/proc/{pid}/fdinfo/{fd}").read_text())
    return "\n".join(parts)


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def wait_quiet(pids: Sequence[int], timeout: float, quiet: float = 0.3, step: float = 0.1) -> float:
    """Wait until the CPU time of ``pids`` stops growing for ``quiet`` seconds (the observer caught up).

    Returns the seconds waited. Bounded by ``timeout``.
    """
    t0 = time.monotonic()
    last = -1.0
    still_since = time.monotonic()
    while time.monotonic() - t0 < timeout:
        cur = sum(c for p in pids if (c := proc_cpu(p)) is not None)
        if cur != last:
            last = cur
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
        time.sleep(step)
    return time.monotonic() - t0


# ---- processes -----------------------------------------------------------------------------------------------------


@dataclass
class Finished:
    rc: int | None  # None: killed after the deadline
    wall: float
    cpu_user: float
    cpu_sys: float
    maxrss_kib: int
    stdout: str = ""
    stderr: str = ""

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys


@dataclass
class Child:
    """A process this benchmark started, in its own process group (so stopping it stops what it forked)."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    finished: Finished | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        # reap through wait4 (not Popen.poll, which would throw the rusage away)
        return self.reap(0) is None

    def signal_group(self, sig: int) -> None:
        # only our own group: the child was started with start_new_session, so its pgid is its pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap(self, timeout: float) -> Finished | None:
        """Wait up to ``timeout`` for the child to exit; collect its rusage (wait4). None if still running."""
        if self.finished is not None:
            return self.finished
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                # reaped by someone else (Popen.poll): no rusage left to read
                self.finished = Finished(self.popen.returncode, time.monotonic() - self.started, 0.0, 0.0, 0)
                return self.finished
            if pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.finished = Finished(
                    self.popen.returncode, time.monotonic() - self.started, ru.ru_utime, ru.ru_stime, ru.ru_maxrss
                )
                return self.finished
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> Finished:
        """Signal our group, wait ``grace`` seconds, then SIGKILL the group. Always returns the rusage."""
        if self.finished is None and self.popen.returncode is None:
            self.signal_group(sig)
            if self.reap(grace) is None:
                self.signal_group(signal.SIGKILL)
                self.reap(10.0)
        # anything the child forked into its group and left behind
        self.signal_group(signal.SIGKILL)
        assert self.finished is not None
        return self.finished


class Runner:
    """Starts children (each in its own process group) and guarantees they are all gone at :meth:`close`."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        p = subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env, start_new_session=True
        )
        c = Child(list(argv), p)
        self.children.append(c)
        return c

    def run(self, argv: Sequence[str], timeout: float, cwd: str | Path | None = None) -> Finished:
        """Run to completion with stdout/stderr captured; killed (rc None) after ``timeout`` seconds.

        The wait is a blocking wait4 (no polling granularity in the wall time); a timer kills the group on timeout.
        """
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            c = self.start(argv, stdout=out, stderr=err, cwd=cwd)
            timer = threading.Timer(timeout, c.signal_group, (signal.SIGKILL,))
            timer.start()
            try:
                _, status, ru = os.wait4(c.pid, 0)
                wall = time.monotonic() - t0
            finally:
                timer.cancel()
            killed = wall >= timeout
            c.popen.returncode = os.waitstatus_to_exitcode(status)
            res = Finished(None if killed else c.popen.returncode, wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss)
            c.finished = res
            c.signal_group(signal.SIGKILL)  # anything it left in its group
            out.seek(0)
            err.seek(0)
            res.stdout = out.read().decode(errors="replace")
            res.stderr = err.read().decode(errors="replace")
        self.children.remove(c)
        return res

    def close(self) -> None:
        for c in self.children:
            if c.alive():
                c.stop(signal.SIGTERM, grace=3.0)
            else:
                c.reap(0)
                c.signal_group(signal.SIGKILL)
        self.children.clear()


def check_output(argv: Sequence[str], timeout: float = 60.0) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, timeout=timeout, text=True).stdout


# ---- cleanup -------------------------------------------------------------------------------------------------------


class Cleanup(contextlib.ExitStack):
    """An ExitStack that also unwinds on SIGTERM/SIGINT/SIGHUP (turned into KeyboardInterrupt)."""

    def __enter__(self) -> Cleanup:
        super().__enter__()
        self._old: dict[int, Any] = {}

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, interrupt)
        return self

    def __exit__(self, *exc: Any) -> bool:
        try:
            return bool(super().__exit__(*exc))
        finally:
            for sig, h in self._old.items():
                signal.signal(sig, h)


@contextlib.contextmanager
def tmpfs(size: str = "4g", prefix: str = "kwatch-bench-") -> Iterator[Path]:
    """A tmpfs mounted on a fresh temp directory; unmounted and removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "kwatch-bench", str(where)],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        where.rmdir()
        raise BenchError(f"cannot mount a tmpfs on {where}: {e}") from e
    try:
        yield where
    finally:
        for _ in range(50):
            r = subprocess.run(["umount", str(where)], capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        with contextlib.suppress(OSError):
            where.rmdir()


@contextlib.contextmanager
def scratch_dir(base: Path | None = None, prefix: str = "kwatch-bench-") -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` (not ``path`` itself)."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# ---- machine ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = check_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], timeout=10).strip()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "kwatch_commit": commit,
    }

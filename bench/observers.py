"""The observers of the capture suite: how each is started, known to be ready, stopped, and what it counted.

Every observer is started fresh for each run (its start-up is not timed), watches the benchmark's directory (or the
whole system, for the tools that cannot do otherwise: fatrace, the bpftrace one-liner), and after the workload is
given time to catch up (its CPU time stops growing) before it is stopped. A printing observer's stdout goes to
``bench.linecount`` instead of a terminal; that counter's CPU is added to the observer's.

Results per run: ``events`` (what the tool says it saw: kwatch events, output lines, audit records), ``lost`` (what
the tool says it lost; None when it cannot say), ``cpu_s`` (user+system seconds of the observer's processes, from
wait4 rusage; for auditd plus the ``kauditd`` kernel thread), ``rss_kib`` (peak RSS of the main process).

auditd is handled with care: it is measured only when no audit daemon runs already; it gets its own config
directory and log file under the run's temp dir; its rule is removed, the daemon stopped and the kernel's audit
``enabled`` flag set back to what it was, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    BenchError,
    Child,
    Runner,
    check_output,
    fd_targets,
    fdinfo_text,
    pids_by_comm,
    proc_cpu,
    proc_rss_peak_kib,
    wait_quiet,
    wait_until,
)

READY_TIMEOUT = 30.0
BPFTRACE_MARKER = "KWATCH-BENCH-READY"
AUDIT_KEY = "kwatch-bench"


@dataclass
class ObsResult:
    events: int | None = None
    lost: int | None = None
    cpu_s: float = 0.0
    rss_kib: int | None = None
    settle_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunCtx:
    runner: Runner
    watch: Path  # the directory observed (the workload writes below it)
    tmp: Path  # for the observer's own files (outside ``watch``)
    run_id: str


class Observer:
    """Base: no observer at all."""

    name = "none"
    label = "no observer"
    scope = ""
    note = ""

    def unavailable(self) -> str | None:
        """Why this observer cannot run here (None: it can)."""
        return None

    def start(self, ctx: RunCtx) -> None:
        self.ctx = ctx

    def pids(self) -> list[int]:
        return []

    def settle(self, timeout: float) -> float:
        pids = self.pids()
        return wait_quiet(pids, timeout) if pids else 0.0

    def stop(self) -> ObsResult:
        return ObsResult()

    def abort(self) -> None:
        """Stop whatever was started, ignoring errors (used on failures)."""


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _is_bpf_ready(pid: int) -> bool:
    # BpfSource creates the ring buffer's epoll instance after every program is attached
    return "anon_inode:[eventpoll]" in fd_targets(pid)


def _is_fanotify_ready(pid: int) -> bool:
    # a mark shows in fdinfo as "fanotify ino:..." (inode), "fanotify mnt_id:..." or "fanotify sdev:..." (filesystem)
    return re.search(r"^fanotify (ino|mnt_id|sdev|fsid)", fdinfo_text(pid), re.M) is not None


def _wait_ready(child: Child, pred: Any, what: str) -> None:
    ok = wait_until(lambda: not child.alive() or pred(), READY_TIMEOUT)
    if not child.alive():
        raise BenchError(f"{what} exited before it was ready (rc {child.popen.returncode})")
    if not ok:
        raise BenchError(f"{what} not ready after {READY_TIMEOUT:.0f} s")


class _Procs(Observer):
    """An observer made of processes we start; CPU from their rusage at exit."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def pids(self) -> list[int]:
        return [c.pid for c in self.children if c.alive()]

    def _baseline(self) -> None:
        """Called once ready: CPU spent so far (interpreter start, BPF verifier, marking mounts) is not counted."""
        self.cpu0 = sum(proc_cpu(c.pid) or 0.0 for c in self.children)

    def _finish(self, sig: int = signal.SIGTERM) -> tuple[float, int | None]:
        rss = proc_rss_peak_kib(self.children[0].pid) if self.children else None
        cpu = 0.0
        for i, c in enumerate(self.children):
            # the tool first; its line counter then reads the rest of the pipe and exits at EOF by itself (a signal
            # would lose its count), and is only signalled if it has not done so in time
            if i:
                c.reap(60.0)
            cpu += c.stop(sig, grace=15.0).cpu
        return max(0.0, cpu - getattr(self, "cpu0", 0.0)), rss

    def abort(self) -> None:
        for c in self.children:
            c.stop(signal.SIGKILL, grace=2.0)


class KwatchTrace(_Procs):
    """``kwatch trace DIR --json --backend B > /dev/null``: the user-facing command, JSON formatting included
    (with the process context: exe, login uid, names, cgroup; ``context=False``: ``--no-context``)."""

    def __init__(self, backend: str, context: bool = True) -> None:
        super().__init__()
        self.backend = backend
        self.context = context
        self.name = f"kwatch-{backend}-trace" + ("" if context else "-nocontext")
        self.label = f"kwatch trace --json ({backend})" + ("" if context else " --no-context")
        self.scope = "tree"

    def unavailable(self) -> str | None:
        return _backend_unavailable(self.backend)

    def start(self, ctx: RunCtx) -> None:
        self.ctx = ctx
        self.children = []
        self.err = ctx.tmp / f"{self.name}-{ctx.run_id}.err"
        with self.err.open("wb") as err:
            c = ctx.runner.start(
                [_python(), "-m", "kwatch.cli", "trace", str(ctx.watch), "--json", "--backend", self.backend,
                 *([] if self.context else ["--no-context"])],
                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
            )
        self.children.append(c)
        pred = _is_bpf_ready if self.backend == "bpf" else _is_fanotify_ready
        _wait_ready(c, lambda: pred(c.pid), self.label)
        self._baseline()

    def stop(self) -> ObsResult:
        cpu, rss = self._finish(signal.SIGTERM)
        text = self.err.read_text(errors="replace")
        m = re.search(r"(\d+) events shown, (\d+) captured, (\d+) lost", text)
        if not m:
            raise BenchError(f"{self.label}: no summary line on stderr: {text.strip()[-300:]}")
        return ObsResult(events=int(m[1]), lost=int(m[3]), cpu_s=cpu, rss_kib=rss,
                         extra={"captured": int(m[2])})


class KwatchAudit(_Procs):
    """``kwatch trace DIR -q --backend bpf --output KIND``: the audit pipeline, every record (with its process
    context) written to a JSON-lines file (fsync each second), to a journald of its own, or to a NATS JetStream
    server of its own through the spool. Its server's CPU counts as the observer's. ``lost`` is the capture's loss
    plus the output's; ``events`` the records the output took (records still spooled at the stop are in the
    run's ``unsent_at_stop``)."""

    def __init__(self, kind: str, options: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.options = options  # appended to the --output string: ",key=value..."
        self.name = f"kwatch-bpf-audit-{kind}"
        self.label = {"file": "kwatch trace -q --output file (bpf)", "journal": "kwatch trace -q --output journal (bpf)",
                      "nats": "kwatch trace -q --output nats (bpf)"}[kind]
        self.scope = "tree"
        self.note = "records written by the output; CPU = kwatch + its server (journald, nats-server)"

    def unavailable(self) -> str | None:
        if self.kind == "nats" and not shutil.which("nats-server"):
            return "nats-server not installed (apt-get install nats-server)"
        if self.kind == "journal" and not Path(JOURNALD).exists():
            return f"{JOURNALD} not installed"
        return _backend_unavailable("bpf")

    def _server(self, ctx: RunCtx) -> str:
        """Start this run's server; the --output option that writes to it."""
        if self.kind == "file":
            self.path = ctx.tmp / f"audit-{ctx.run_id}.jsonl"
            return f"file:{self.path},fsync=interval"
        if self.kind == "journal":
            ns = f"kwbench{ctx.run_id.replace('-', '')}"[:60]
            sock = Path(f"/run/systemd/journal.{ns}/socket")
            self.journal_ns = ns
            with (ctx.tmp / f"journald-{ctx.run_id}.err").open("wb") as err:
                srv = ctx.runner.start([JOURNALD, ns], stdout=subprocess.DEVNULL, stderr=err)
            self.children.append(srv)
            _wait_ready(srv, sock.exists, "systemd-journald")
            return f"journal:{sock}"
        port = _free_port()
        store = ctx.tmp / f"nats-{ctx.run_id}"
        store.mkdir()
        with (ctx.tmp / f"nats-{ctx.run_id}.err").open("wb") as err:
            srv = ctx.runner.start(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
                                   stdout=subprocess.DEVNULL, stderr=err)
        self.children.append(srv)
        _wait_ready(srv, lambda: _connects(port), "nats-server")
        self.nats_url = f"nats://127.0.0.1:{port}"
        return f"nats:{self.nats_url},spool={ctx.tmp / f'spool-{ctx.run_id}'}"

    def start(self, ctx: RunCtx) -> None:
        self.ctx = ctx
        self.children = []
        try:
            output = self._server(ctx) + self.options
            self.err = ctx.tmp / f"{self.name}-{ctx.run_id}.err"
            with self.err.open("wb") as err:
                c = ctx.runner.start(
                    [_python(), "-m", "kwatch.cli", "trace", str(ctx.watch), "-q", "--backend", "bpf",
                     "--output", output], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
            # kwatch first: _finish stops it before its server, which must take the last records
            self.children.insert(0, c)
            # its ready line (an epoll descriptor is no sign here: the NATS client's event loop has one before BPF
            # is attached)
            _wait_ready(c, lambda: b"with the bpf backend" in self.err.read_bytes(), self.label)
        except BaseException:
            self.abort()
            raise
        self._baseline()

    def _finish(self, sig: int = signal.SIGTERM) -> tuple[float, int | None]:
        rss = proc_rss_peak_kib(self.children[0].pid) if self.children else None
        cpu = 0.0
        for c in self.children:  # kwatch (it sends what is left), then its server
            cpu += c.stop(sig, grace=30.0).cpu
        return max(0.0, cpu - getattr(self, "cpu0", 0.0)), rss

    def stop(self) -> ObsResult:
        cpu, rss = self._finish(signal.SIGTERM)
        text = self.err.read_text(errors="replace")
        m = re.search(r"(\d+) events shown, (\d+) captured, (\d+) lost", text)
        o = re.search(r"output \S+ \(\w+\): (\d+) records, (\d+) lost, (\d+) not sent", text)
        if not m or not o:
            raise BenchError(f"{self.label}: no summary lines on stderr: {text.strip()[-300:]}")
        shown, records = int(m[1]), int(o[1])
        lost = int(m[3]) + int(o[2])
        if self.kind == "file":  # the file and its rotated generations (max_bytes 100M by default)
            lines = sum(sum(1 for _ in p.open("rb")) for p in self.path.parent.glob(self.path.name + "*"))
            if lines != records:
                raise BenchError(f"{self.label}: the file holds {lines} lines, the output says {records}")
        if self.kind == "journal":
            with contextlib.suppress(OSError):
                shutil.rmtree(next(Path("/var/log/journal").glob(f"*.{self.journal_ns}")), ignore_errors=True)
        # records still in the NATS spool when kwatch stopped (its close sends for 5 s) are not lost: the next start
        # sends them; they say the publisher was behind
        return ObsResult(events=records, lost=lost, cpu_s=cpu, rss_kib=rss,
                         extra={"captured": int(m[2]), "shown": shown, "unsent_at_stop": int(o[3])})


JOURNALD = "/lib/systemd/systemd-journald"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connects(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class KwatchCount(_Procs):
    """``python -m bench.consumer``: the backend read in a loop and counted; capture cost without printing."""

    def __init__(self, backend: str, ringbuf_mib: int = 0, *, attached_only: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.ringbuf_mib = ringbuf_mib
        #: the floor of the tracepoint design: every program attached, every syscall dropped at entry (op mask 0)
        self.attached_only = attached_only
        self.name = f"kwatch-{backend}-attached" if attached_only else f"kwatch-{backend}-count"
        self.label = (f"kwatch {backend} programs attached, nothing recorded" if attached_only
                      else f"kwatch counting consumer ({backend})")
        self.scope = "tree"

    def unavailable(self) -> str | None:
        return _backend_unavailable(self.backend)

    def start(self, ctx: RunCtx) -> None:
        self.ctx = ctx
        self.children = []
        self.ready = ctx.tmp / f"{self.name}-{ctx.run_id}.ready"
        self.out = ctx.tmp / f"{self.name}-{ctx.run_id}.json"
        self.err = ctx.tmp / f"{self.name}-{ctx.run_id}.err"
        argv = [_python(), "-m", "bench.consumer", "--backend", self.backend, "--ready", str(self.ready),
                "--out", str(self.out), str(ctx.watch)]
        if self.ringbuf_mib:
            argv[3:3] = ["--ringbuf-mib", str(self.ringbuf_mib)]
        if self.attached_only:
            argv[3:3] = ["--no-ops"]
        with self.err.open("wb") as err:
            c = ctx.runner.start(argv, stderr=err, cwd=REPO)
        self.children.append(c)
        _wait_ready(c, self.ready.exists, self.label)
        self._baseline()

    def stop(self) -> ObsResult:
        cpu, rss = self._finish(signal.SIGTERM)
        if not self.out.exists():
            raise BenchError(f"{self.label}: no counts written: {self.err.read_text(errors='replace')[-300:]}")
        d = json.loads(self.out.read_text())
        return ObsResult(events=d["events"], lost=d["lost"], cpu_s=cpu, rss_kib=rss,
                         extra={"by_op": d["by_op"], "loss_markers": d["loss_markers"], "open_s": d["open_s"]})


def _backend_unavailable(backend: str) -> str | None:
    try:
        if backend == "bpf":
            from kwatch.capture import bpf

            if not bpf.DEFAULT_OBJECT.exists():
                return f"{bpf.DEFAULT_OBJECT} missing (make bpf)"
        elif backend == "fanotify":
            import kwatch.capture.fanotify  # noqa: F401
    except Exception as e:  # an import error of a module still being written
        return f"kwatch.capture.{backend} does not import: {type(e).__name__}: {e}"
    return None


class _Printing(_Procs):
    """A tool whose stdout (one line per event) is piped into ``bench.linecount``."""

    tool = ""
    marker = ""

    def unavailable(self) -> str | None:
        return None if shutil.which(self.tool) else f"{self.tool} not installed (apt-get install {self.tool})"

    def argv(self, ctx: RunCtx) -> list[str]:
        raise NotImplementedError

    def start(self, ctx: RunCtx) -> None:
        self.ctx = ctx
        self.children = []
        self.out = ctx.tmp / f"{self.name}-{ctx.run_id}.json"
        self.ready = ctx.tmp / f"{self.name}-{ctx.run_id}.ready"
        self.err = ctx.tmp / f"{self.name}-{ctx.run_id}.err"
        with self.err.open("wb") as err:
            tool = ctx.runner.start(self.argv(ctx), stdout=subprocess.PIPE, stderr=err)
        assert tool.popen.stdout is not None
        count_argv = [_python(), "-m", "bench.linecount", "--out", str(self.out)]
        if self.marker:
            count_argv += ["--marker", self.marker, "--ready", str(self.ready)]
        counter = ctx.runner.start(count_argv, stdin=tool.popen.stdout, cwd=REPO)
        tool.popen.stdout.close()  # the counter holds the only read end: the tool gets SIGPIPE if it dies
        self.children = [tool, counter]
        _wait_ready(tool, lambda: self.is_ready(tool), self.label)
        self._baseline()

    def is_ready(self, tool: Child) -> bool:
        return self.ready.exists()

    def lines(self) -> dict[str, Any]:
        return json.loads(self.out.read_text()) if self.out.exists() else {"lines": None}

    def stop(self) -> ObsResult:
        cpu, rss = self._finish(signal.SIGTERM)
        return ObsResult(events=self.lines()["lines"], lost=None, cpu_s=cpu, rss_kib=rss)


class Inotifywait(_Printing):
    name = "inotifywait"
    label = "inotifywait -m -r"
    tool = "inotifywait"
    scope = "tree"
    note = "lines (stdio buffer of the last < 4 KiB is lost at SIGTERM); overflow not reported"

    def argv(self, ctx: RunCtx) -> list[str]:
        return ["inotifywait", "-m", "-r", str(ctx.watch)]

    def is_ready(self, tool: Child) -> bool:
        return "Watches established" in self.err.read_text(errors="replace")


class Fatrace(_Printing):
    name = "fatrace"
    label = "fatrace (whole system)"
    tool = "fatrace"
    scope = "system"
    note = "whole system: lines include every process's file activity, not only the workload's"

    def argv(self, ctx: RunCtx) -> list[str]:
        return ["fatrace"]

    def is_ready(self, tool: Child) -> bool:
        if not _is_fanotify_ready(tool.pid):
            return False
        time.sleep(0.5)  # it marks every mount one by one: give it time to finish
        return True


class Bpftrace(_Printing):
    name = "bpftrace"
    label = "bpftrace openat/unlinkat printf"
    tool = "bpftrace"
    scope = "system"
    marker = BPFTRACE_MARKER
    note = "whole system, every openat/unlinkat entry printed (not filtered to the tree)"
    PROGRAM = (
        'BEGIN { printf("' + BPFTRACE_MARKER + '\\n"); } '
        'tracepoint:syscalls:sys_enter_openat { printf("open %d %s %s\\n", pid, comm, str(args->filename)); } '
        'tracepoint:syscalls:sys_enter_unlinkat { printf("unlink %d %s %s\\n", pid, comm, str(args->pathname)); }'
    )

    def argv(self, ctx: RunCtx) -> list[str]:
        return ["bpftrace", "-e", self.PROGRAM]

    def stop(self) -> ObsResult:
        res = super().stop()
        lost = 0
        for m in re.finditer(r"Lost (\d+) events", self.err.read_text(errors="replace")):
            lost += int(m[1])
        if res.events is not None:
            res.events -= 1  # "Attaching N probes..."
        res.lost = lost
        return res


class Auditd(Observer):
    """auditd with ``-w DIR -p wa``; its own config and log in the run's temp dir; the machine restored after."""

    name = "auditd"
    label = "auditd -w DIR -p wa"
    scope = "tree"
    note = "records = SYSCALL records with the rule's key; CPU = auditd + kauditd thread"

    def unavailable(self) -> str | None:
        if not (shutil.which("auditd") and shutil.which("auditctl")):
            return "auditd not installed (apt-get install auditd)"
        st = self._status()
        if st is None:
            return "auditctl -s fails (no audit support in this kernel?)"
        if st.get("pid", 0) != 0:
            return f"an audit daemon (pid {st['pid']}) already runs; not touching it"
        return None

    @staticmethod
    def _status() -> dict[str, int] | None:
        try:
            text = check_output(["auditctl", "-s"], timeout=10)
        except (subprocess.SubprocessError, OSError):
            return None
        out = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
        return out

    def start(self, ctx: RunCtx) -> None:
        self.ctx = ctx
        self.child: Child | None = None
        self.rule_added = False
        st = self._status() or {}
        self.prev_enabled = st.get("enabled", 0)
        self.lost0 = st.get("lost", 0)
        conf = ctx.tmp / f"audit-{ctx.run_id}"
        conf.mkdir(mode=0o750)
        self.log = ctx.tmp / f"audit-{ctx.run_id}.log"
        base = Path("/etc/audit/auditd.conf").read_text()
        text = re.sub(r"^log_file\s*=.*$", f"log_file = {self.log}", base, flags=re.M)
        # one log, never rotated (the default rotates at 8 MB: records would move to .1, .2 ... and be lost)
        text = re.sub(r"^max_log_file_action\s*=.*$", "max_log_file_action = IGNORE", text, flags=re.M)
        cf = conf / "auditd.conf"
        cf.write_text(text)
        cf.chmod(0o640)
        try:
            with (ctx.tmp / f"audit-{ctx.run_id}.err").open("wb") as err:
                self.child = ctx.runner.start(["auditd", "-n", "-c", str(conf)], stderr=err)
            child = self.child
            _wait_ready(child, lambda: (self._status() or {}).get("pid") == child.pid, "auditd")
            check_output(["auditctl", "-w", str(ctx.watch), "-p", "wa", "-k", AUDIT_KEY])
            self.rule_added = True
            self.cpu0 = proc_cpu(child.pid) or 0.0
            self.kauditd = pids_by_comm("kauditd")
            self.kaudit_cpu0 = sum(proc_cpu(p) or 0.0 for p in self.kauditd)
        except BaseException:
            self.abort()
            raise

    def pids(self) -> list[int]:
        return ([self.child.pid] if self.child and self.child.alive() else []) + getattr(self, "kauditd", [])

    def _restore(self) -> None:
        if self.rule_added:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                check_output(["auditctl", "-W", str(self.ctx.watch), "-p", "wa", "-k", AUDIT_KEY])
            self.rule_added = False
        if self.child is not None:
            self.child.stop(signal.SIGTERM, grace=15.0)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            check_output(["auditctl", "-e", str(self.prev_enabled)])

    def abort(self) -> None:
        self._restore()

    def stop(self) -> ObsResult:
        assert self.child is not None
        rss = proc_rss_peak_kib(self.child.pid)
        st = self._status() or {}
        lost = max(0, st.get("lost", 0) - self.lost0)
        kaudit = sum(proc_cpu(p) or 0.0 for p in self.kauditd) - self.kaudit_cpu0
        self._restore()
        fin = self.child.finished
        records = syscalls = 0
        key = f'key="{AUDIT_KEY}"'.encode()
        for log in sorted(self.log.parent.glob(self.log.name + "*")):  # rotated ones too, should any exist
            with log.open("rb") as f:
                for line in f:
                    records += 1
                    if b"type=SYSCALL" in line and key in line:
                        syscalls += 1
        cpu = max(0.0, (fin.cpu if fin else 0.0) - self.cpu0) + kaudit
        return ObsResult(events=syscalls, lost=lost, cpu_s=cpu, rss_kib=rss,
                         extra={"log_records": records, "kauditd_cpu_s": round(kaudit, 3)})


def all_observers(fanotify: bool = True) -> list[Observer]:
    obs: list[Observer] = [Observer(), KwatchCount("bpf", attached_only=True), KwatchCount("bpf"), KwatchTrace("bpf"),
                           KwatchTrace("bpf", context=False), KwatchAudit("file"), KwatchAudit("journal"),
                           KwatchAudit("nats")]
    if fanotify:
        obs += [KwatchCount("fanotify"), KwatchTrace("fanotify")]
    obs += [Inotifywait(), Fatrace(), Auditd(), Bpftrace()]
    return obs

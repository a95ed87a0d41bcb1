"""The daemon loop: capture -> rules -> actions, with reload, drain, self-feedback suppression and counters.

One thread, one ``epoll``: the capture Source's descriptor, the action Runner's (a pidfd per running action), and a
self-pipe that ``signal.set_wakeup_fd`` writes signal numbers into. Each turn reads every waiting event, matches it
against the current config, hands matches to the runner, and lets the runner reap and start processes.

- **No feedback loops.** ``on_start`` (called by the runner right after the fork, before the loop reads events
  again) registers the action's pid with the source: the BPF backend then drops that process tree in the kernel
  (``exclude_pid``). The daemon also drops, in userspace, events whose pid or ppid is an action's (and, for backends
  without kernel exclusion, whose session is an action's: every action runs in a session of its own). A rule that
  sets ``retrigger = true`` opts out. A finished action's pid stays excluded for ``linger`` seconds (events it made
  may still be queued), then ``include_pid`` lets the number be used again. Event sinks see what capture delivers,
  so files written by actions are not seen by them either (docs/design.md, "Self-feedback").
- **Capture scope** comes from the rules (:mod:`kwatch.daemon.roots`) and ``Config.ops``, plus what event sinks ask
  for; a root that does not exist yet is watched through its nearest existing ancestor and narrowed when it appears.
- **SIGHUP** reloads the config file. A broken file is logged (every error, with file and line), counted, and the
  old config stays. A good one replaces the rules; the runner keeps its running and waiting jobs (they finish with
  the actions they were started for) and takes the new concurrency cap and shell; the source gets the new filter
  with ``set_filter`` and is never closed, so no event is lost across a reload.
- **SIGTERM/SIGINT** stop reading after one last read of what was already captured; waiting jobs are made due and
  running actions may finish for ``grace`` seconds (a second signal cuts that short); what is left is killed. Then the
  sinks, the source and the runner are closed, and ``run`` returns 0.
- **Event sinks** (:class:`EventSink`: ``feed(events)``, ``close()``) receive every captured batch, LOSS markers
  included; replication plugs in here. A sink may declare ``capture_roots`` (directories as bytes, or None for the
  whole system) and ``capture_ops`` (a set of Op) to widen what is captured. A sink with a ``barrier`` attribute
  gets the capture barrier's ``wait`` there before its ``start`` (:mod:`kwatch.capture.barrier`: a replicator
  waits until every event made before its call was fed to it); the loop polls the barrier's eventfd and serves a
  wait with an immediate read. After the last read at shutdown the barrier is stopped (waits return at once).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO, Protocol, runtime_checkable

from kwatch.actions.runner import Result, Runner, Started
from kwatch.capture.barrier import CaptureBarrier
from kwatch.capture.base import CaptureFilter, Source
from kwatch.capture.select import open_source
from kwatch.context import Resolver
from kwatch.daemon.logs import StructLog
from kwatch.daemon.roots import capture_roots, minimal, wanted_roots
from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import DaemonStats
from kwatch.rules import ConfigErrors, load_config, load_default_config
from kwatch.rules.match import config_alerts, match_config
from kwatch.rules.model import Action, Config, Rule
from kwatch.rules.procfs import ProcFS
from kwatch.rules.shell import ExecSpec, shell_quote

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HOUSEKEEPING = 1.0  # seconds between checks of lingering pids and not-yet-existing roots


class EventSink(Protocol):
    """Something that consumes every captured batch (replication). ``feed`` must not block for long."""

    def feed(self, events: list[FileEvent]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class _ExcludesPids(Protocol):
    def exclude_pid(self, pid: int) -> None: ...

    def include_pid(self, pid: int) -> None: ...


@runtime_checkable
class _Refilters(Protocol):
    def set_filter(self, filt: CaptureFilter) -> None: ...


def _session_of(pid: int) -> int | None:
    """The session id of a live process (``/proc/PID/stat`` field 6), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[3])
    except (OSError, ValueError, IndexError):
        return None


class _ActionPids:
    """The pids of actions whose events are dropped (their own writes must not trigger them again): each from its
    start until ``linger`` seconds after it ended. A source that can exclude pids in the kernel is told too."""

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self._pids: dict[int, float | None] = {}  # pid -> None while running, else when it ended (monotonic)

    def __len__(self) -> int:
        return len(self._pids)

    def started(self, pid: int, source: object) -> None:
        self._pids[pid] = None
        if isinstance(source, _ExcludesPids):
            source.exclude_pid(pid)

    def ended(self, pid: int | None, now: float) -> None:
        if pid is not None and pid in self._pids:
            self._pids[pid] = now

    def expire(self, now: float, source: object) -> None:
        """Forget the pids that ended ``linger`` seconds ago or more."""
        for pid, ended in list(self._pids.items()):
            if ended is not None and now - ended >= self.linger:
                del self._pids[pid]
                if isinstance(source, _ExcludesPids):
                    source.include_pid(pid)

    def caused(self, ev: FileEvent, source: object) -> bool:
        """Whether an action made ``ev``: its pid, its parent or (where the source cannot drop an action's
        descendants in the kernel) its session is one of them."""
        pids = self._pids
        if ev.pid is None:
            return False
        if ev.pid in pids or (ev.ppid is not None and ev.ppid in pids):
            return True
        if isinstance(source, _ExcludesPids):
            return False  # the kernel already dropped the deeper descendants
        sid = _session_of(ev.pid)
        return sid is not None and sid in pids


def _done_fields(res: Result, result: str) -> dict[str, object]:
    """The fields of an action's ``action_done`` log line."""
    return {
        "rule": res.rule.name,
        "action": action_label(res.action),
        "result": result,
        "pid": res.pid,
        "rc": res.returncode,
        "files": len(res.files),
        "file": res.files[0] if res.files else None,
        "coalesced": res.coalesced if res.coalesced != len(res.files) else None,
        "seconds": round(res.ended - res.started, 3) if not res.dry_run else None,
        "error": res.error,
        "stderr": res.stderr[-400:].strip() or None,
    }


def action_label(action: Action) -> str:
    return "/".join(action.triggers)


def format_dry_run(res: Result) -> bytes:
    """Two lines for ``--dry-run``: what the config says, and the exact command as a shell line one can paste."""
    spec: ExecSpec = res.spec
    script = spec.argv[2] if len(spec.argv) > 2 else b""
    env = [
        k + b"=" + shell_quote(v)
        for k, v in sorted(spec.env.items())
        if k.startswith(b"KWATCH_") and v and k in script
    ]
    line = b" ".join([*env, *(shell_quote(a) for a in spec.argv)])
    if spec.stdin is not None:
        line += b" < (%d NUL-terminated paths on stdin)" % len(spec.files)
    head = (
        f"dry-run: rule={res.rule.name} action={action_label(res.action)} files={len(res.files)} "
        f"command={res.action.command.source}"
    )
    return head.encode("utf-8", "surrogateescape") + b"\n  " + line + b"\n"


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        log: StructLog,
        stats: DaemonStats | None = None,
        config_path: str | None = None,
        backend: str = "auto",
        dry_run: bool = False,
        grace: float = 30.0,
        linger: float = 2.0,
        sinks: Sequence[EventSink] = (),
        out: IO[bytes] | None = None,
        source_factory: Callable[..., Source] = open_source,
        exists: Callable[[bytes], bool] = os.path.isdir,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.stats = stats if stats is not None else DaemonStats()
        self.config_path = config_path
        self.backend = backend
        self.dry_run = dry_run
        self.grace = grace
        self.linger = linger
        self.sinks = list(sinks)
        self.out = out if out is not None else sys.stdout.buffer
        self.source_factory = source_factory
        self.exists = exists
        self.procs = ProcFS(resolver=resolver)
        self.source: Source | None = None
        self.barrier: CaptureBarrier | None = None
        self.runner = Runner.from_config(
            config, on_start=self._on_start, on_result=self._on_result, dry_run=dry_run, stdout="inherit"
        )
        self.filter = CaptureFilter()
        self._action_pids = _ActionPids(linger)
        # (id(action), file) -> CLOCK_MONOTONIC ns of the first event waiting for that action on that file
        self._pending_ts: dict[tuple[int, bytes], int] = {}
        self._wake_r = -1
        self._wake_w = -1
        self._old_handlers: dict[int, object] = {}
        self._stopping = False
        self._stop_now = False
        self._next_housekeeping = 0.0
        self.self_events = 0  # events dropped because an action of ours caused them
        self.stats.queues.update(
            {
                "actions_waiting": lambda: self.runner.scheduler.waiting,
                "actions_running": lambda: self.runner.running,
                "excluded_pids": lambda: len(self._action_pids),
            }
        )

    # -- set-up ----------------------------------------------------------------------------------------------------

    def _wanted_filter(self) -> CaptureFilter:
        want = wanted_roots(self.config)
        ops = set(self.config.ops)
        extra: list[bytes] = []
        for sink in self.sinks:
            ops |= set(getattr(sink, "capture_ops", frozenset()))
            if hasattr(sink, "capture_roots"):
                sink_roots: Sequence[bytes] | None = sink.capture_roots
                if sink_roots is None:  # the sink wants the whole system
                    want = None
                else:
                    extra.extend(sink_roots)
        roots = () if want is None else capture_roots(minimal([*want, *extra]), self.exists)
        # Not exclude_pids=[own pid]: the BPF backend would drop the daemon's descendants with it, i.e. every
        # action, retrigger or not. The backends leave out the daemon's own operations (BPF: self_tgid), and
        # handle() drops any that still arrive.
        return CaptureFilter.make(roots=roots, ops=ops)

    def install_signals(self) -> None:
        """Route SIGHUP/SIGTERM/SIGINT into the loop (call from the main thread, before anything slow)."""
        if self._wake_r >= 0:
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, *STOP_SIGNALS):
            # the handler does nothing: the C-level handler has written the signal number into the pipe already
            self._old_handlers[sig] = signal.signal(sig, self._noop)

    @staticmethod
    def _noop(signum: int, frame: FrameType | None) -> None:
        return None

    def start(self) -> None:
        """Install signal routing and open the capture source (raises CaptureError)."""
        self.install_signals()
        self.filter = self._wanted_filter()
        self.source = self.source_factory(
            self.filter, self.backend, warn=lambda m: self.log.warning("backend", msg=m)
        )
        src = self.source
        self.barrier = CaptureBarrier(src, self.stats.barrier)
        for sink in self.sinks:
            if hasattr(sink, "barrier"):
                sink.barrier = self.barrier.wait
            starter = getattr(sink, "start", None)
            if callable(starter):  # sinks that need the running source (replication: exclude its agents' pids)
                starter(src)
        self.log.info(
            "start",
            backend=src.name,
            config=self.config_path or "<default>",
            rules=sum(len(rs.rules) for rs in self.config.rulesets),
            roots=",".join(r.decode("utf-8", "backslashreplace") for r in self.filter.roots) or "/",
            ops=",".join(sorted(op.label for op in self.filter.ops)),
            dry_run=self.dry_run or None,
            pid=os.getpid(),
        )

    # -- the loop --------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status (0)."""
        if self.source is None:
            self.start()
        assert self.source is not None and self.barrier is not None
        ep = select.epoll()
        try:
            ep.register(self._wake_r, select.EPOLLIN)
            ep.register(self.source.fileno(), select.EPOLLIN)
            ep.register(self.barrier.fileno(), select.EPOLLIN)
            ep.register(self.runner.fileno(), select.EPOLLIN)
            self.log.info("ready", pid=os.getpid())
            while not self._stopping:
                ep.poll(self._timeout())
                self._signals()
                if self._stopping:
                    break
                self._read()
                self.runner.poll()
                self._housekeeping()
        finally:
            ep.close()
        return self._drain()

    def _timeout(self) -> float:
        t = max(0.0, self._next_housekeeping - time.monotonic())
        rt = self.runner.timeout()
        if rt is not None:
            t = min(t, rt)
        for within in (self.source.poll_within() if self.source is not None else None,
                       self.barrier.poll_within() if self.barrier is not None else None):
            if within is not None:
                t = min(t, within)
        return t

    def _signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGHUP and not self._stopping:
                self.reload()
            elif signum in STOP_SIGNALS:
                if self._stopping:
                    self._stop_now = True
                    self.log.warning("stop_now", signal=signal.Signals(signum).name)
                else:
                    self._stopping = True
                    self.log.info("stopping", signal=signal.Signals(signum).name, grace=self.grace)

    def _read(self) -> None:
        assert self.source is not None
        rnd = self.barrier.begin() if self.barrier is not None else 0
        events = self.source.read(0)
        if events:
            self.handle(events)
        if self.barrier is not None:
            self.barrier.served(rnd)  # handle() fed the sinks

    def handle(self, events: list[FileEvent]) -> None:
        """Count, match and submit one captured batch; then hand it to the sinks."""
        stats = self.stats
        config = self.config
        procs = self.procs
        submit = self.runner.submit
        pending = self._pending_ts
        now_ns = time.monotonic_ns()
        debug = self.log.enabled("debug")
        own = os.getpid()
        alerting = self.config.has_alerts
        for ev in events:
            stats.events[(ev.op.label, ev.backend)] += 1
            if ev.op is Op.LOSS:
                stats.lost[ev.backend] += ev.lost if ev.lost is not None else 0
                self.log.warning(
                    "loss",
                    backend=ev.backend,
                    lost="unknown" if ev.lost is None else ev.lost,
                    msg="the kernel or a queue dropped events; actions for them did not run",
                )
                continue
            if ev.pid == own or (self._action_pids and self._action_pids.caused(ev, self.source)):
                self.self_events += 1
                continue
            for m in match_config(config, ev, procs):
                stats.rule_matches[m.rule.name] += 1
                pending.setdefault((id(m.action), m.file), ev.ts_ns if ev.ts_ns is not None else now_ns)
                if debug:
                    self.log.debug(
                        "match",
                        rule=m.rule.name,
                        action=action_label(m.action),
                        op=ev.op.label,
                        file=m.file,
                        pid=ev.pid,
                        comm=ev.comm,
                    )
                submit(m)
            if alerting:
                self._alert(ev)
        for sink in self.sinks:
            try:
                sink.feed(events)
            except Exception as e:  # a broken sink must not stop the rules
                self.log.error("sink_error", sink=type(sink).__name__, msg=f"{type(e).__name__}: {e}")

    def _alert(self, ev: FileEvent) -> None:
        """A rule's alert: a warning in the log, and a record to every sink that takes alerts (the outputs)."""
        for a in config_alerts(self.config, ev, self.procs):
            self.stats.alerts[a.rule.name] += 1
            self.log.warning("alert", rule=a.rule.name, alert_level=a.level, message=a.message, op=ev.op.label,
                             file=a.file, pid=ev.pid, uid=ev.uid, comm=ev.comm)
            for sink in self.sinks:
                take = getattr(sink, "alert", None)
                if callable(take):
                    take(a)

    # -- the runner's callbacks ------------------------------------------------------------------------------------

    def _observe_start(self, rule: Rule, action: Action, files: Sequence[bytes]) -> None:
        first: int | None = None
        for f in files:
            ts = self._pending_ts.pop((id(action), f), None)
            if ts is not None and (first is None or ts < first):
                first = ts
        if first is not None:
            # one observation per command: the wait of the oldest event it handles
            self.stats.action_latency.observe(max(0.0, (time.monotonic_ns() - first) / 1e9))

    def _on_start(self, s: Started) -> None:
        self._observe_start(s.rule, s.action, s.files)
        self.stats.actions[(s.rule.name, "started")] += 1
        if not s.retrigger:
            self._action_pids.started(s.pid, self.source)
        self.log.info(
            "action_start",
            rule=s.rule.name,
            action=action_label(s.action),
            pid=s.pid,
            files=len(s.files),
            file=s.files[0] if s.files else None,
        )

    def _on_result(self, res: Result) -> None:
        if res.dry_run:
            self._observe_start(res.rule, res.action, res.files)
            result = "dry_run"
            try:
                self.out.write(format_dry_run(res))
                self.out.flush()
            except (OSError, ValueError):
                pass
        elif res.error is not None:
            self._observe_start(res.rule, res.action, res.files)
            result = "failed"
        elif res.timed_out:
            result = "timeout"
        else:
            result = "ok" if res.ok else "failed"
        self.stats.actions[(res.rule.name, result)] += 1
        self._action_pids.ended(res.pid, time.monotonic())
        level = "info" if res.ok else "warning"
        self.log.emit(level, "action_done", **_done_fields(res, result))

    # -- housekeeping, reload, drain -------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING
        self._action_pids.expire(now, self.source)
        want = self._wanted_filter()
        if want.roots != self.filter.roots or want.ops != self.filter.ops:
            self._apply_filter(want, "a watched directory appeared")

    def _apply_filter(self, want: CaptureFilter, why: str) -> None:
        src = self.source
        if src is None or want == self.filter:
            return
        if not isinstance(src, _Refilters):
            self.log.warning(
                "filter_unchanged",
                backend=src.name,
                msg=f"{why}, but this backend cannot change what it watches while running: restart kwatch",
            )
            self.filter = want  # rules still match in userspace; do not warn again
            return
        try:
            src.set_filter(want)
        except Exception as e:  # CaptureError, OSError: a root vanished between stat and set
            self.log.error("filter_error", msg=str(e))
            return
        self.filter = want
        self.log.info(
            "filter",
            why=why,
            roots=",".join(r.decode("utf-8", "backslashreplace") for r in want.roots) or "/",
            ops=",".join(sorted(op.label for op in want.ops)),
        )

    def reload(self) -> bool:
        """Load the config again (SIGHUP); keep the old one when the new one has errors."""
        where = self.config_path or "<default>"
        try:
            cfg = load_default_config() if self.config_path is None else load_config(self.config_path)
        except ConfigErrors as e:
            self.stats.reload_errors += 1
            for err in e.errors:
                self.log.error(
                    "config_error", where=f"{err.file}:{err.line}", severity=err.severity, reason=err.reason
                )
            self.log.error(
                "reload_failed", config=where, errors=len(e.errors), msg="keeping the running config"
            )
            return False
        for w in cfg.warnings:
            self.log.warning("config_warning", where=f"{w.file}:{w.line}", reason=w.reason)
        self.config = cfg
        self.runner.shell = cfg.shell.encode()
        self.runner.scheduler.max_concurrency = cfg.max_concurrency
        self.stats.reloads += 1
        self.log.info("reload", config=where, rules=sum(len(rs.rules) for rs in cfg.rulesets))
        self._apply_filter(self._wanted_filter(), "config reloaded")
        return True

    def _drain(self) -> int:
        # what was captured before the signal still counts; nothing after it is read
        if self.source is not None:
            with contextlib.suppress(Exception):
                self._read()
        if self.barrier is not None:
            self.barrier.stop()  # nothing more is read: the sinks decide by what they got
        deadline = time.monotonic() + self.grace
        self.runner.flush()
        self.runner.poll()
        while not self.runner.idle and not self._stop_now:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.runner.flush()
            self.runner.wait(min(left, 0.2))
            self._signals()
        killed = self.runner.close()
        for res in killed:
            self.stats.actions[(res.rule.name, "killed")] += 1
            self.log.warning("action_killed", rule=res.rule.name, pid=res.pid, files=len(res.files))
        waiting = self.runner.scheduler.waiting
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                self.log.error("sink_close", sink=type(sink).__name__, msg=str(e))
        if self.barrier is not None:
            self.barrier.close()
            self.barrier = None
        if self.source is not None:
            self.source.close()
            self.source = None
        self.log.info(
            "stopped",
            killed=len(killed),
            dropped=waiting or None,
            events=sum(self.stats.events.values()),
            self_events=self.self_events,
        )
        self.restore_signals()
        return 0

    def restore_signals(self) -> None:
        if self._wake_r < 0:
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

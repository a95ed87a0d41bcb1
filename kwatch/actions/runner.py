"""The action runner: starts the commands of matched rules as bounded, killable process groups. I/O lives here.

How the daemon drives it (single-threaded, next to the capture Source)::

    runner = Runner.from_config(config, on_start=lambda s: capture_exclude_tree(s.pid))
    while True:
        ready = select([source, runner], [], [], runner.timeout())
        for ev in source.read(0):
            for m in match_config(config, ev, procs):
                runner.submit(m)
        for result in runner.poll():
            ...                                   # already logged; metrics can count result.ok

- ``submit`` hands a match to the :class:`~kwatch.actions.schedule.Scheduler` (debounce, coalescing, batches, caps).
- ``poll`` reaps what exited, enforces timeouts, and starts what is due. It never blocks.
- ``fileno`` is an epoll descriptor holding a pidfd of every running action: readable when one exits, so the
  daemon sleeps until an event, a child exit, or ``timeout()`` (the next debounce or kill deadline).

Each action runs as ``/bin/sh -c SCRIPT kwatch [FILES...]`` (see :mod:`kwatch.rules.shell`) with an allowlist of
the daemon's environment (:func:`~kwatch.actions.privileges.action_environment`: never its secrets such as
``RSYNC_PASSWORD``) plus the KWATCH_* variables, as bytes, as the action's ``user``/``group`` if it has them
(set in the child before exec, with the user's groups, ``HOME``, ``USER`` and ``LOGNAME``), in a **new session**: its pid is also its process group and
session id, shared by all its descendants. A timeout sends SIGTERM to the whole group, then SIGKILL after
``kill_grace``; when a timed-out leader has exited, the rest of its group is killed before the leader is reaped
(the unreaped zombie keeps the group id from being reused, so the kill cannot hit a stranger). A leader that exits
on its own may leave background children on purpose (``nohup``); they are left alone. Every child is reaped: no
zombies. stderr (and stdout with ``stdout="capture"``) goes to an unlinked temporary file, so a chatty action can
never block on a full pipe; its tail is kept in the Result and logged.

Feedback loops: ``on_start`` is called with the pid right after the fork, before ``poll`` returns, so a daemon
that reads events after ``poll`` can already drop those of the new process tree (by pid, or by session id ==
pid) unless ``Started.retrigger`` is true.

``dry_run=True`` runs nothing: each job that would start yields a Result whose ``spec`` is the exact argv, env
and stdin; :meth:`Runner.plan` gives that ExecSpec for one match right away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import IO

from kwatch.actions.privileges import action_environment, popen_credentials, user_environment
from kwatch.actions.schedule import Job, Scheduler
from kwatch.events import display_path
from kwatch.rules.match import Match
from kwatch.rules.model import Action, BatchMode, Config, Rule
from kwatch.rules.runas import resolve_run_as
from kwatch.rules.shell import ExecSpec, chunk_args, exec_spec, nul_list, placeholder_env

log = logging.getLogger("kwatch.actions")

#: Bytes of stderr/stdout kept per run (the tail: where the error message usually is).
OUTPUT_TAIL = 16 * 1024


@dataclass(frozen=True)
class Started:
    """Reported through ``on_start`` for every action process, before anything else happens in the daemon loop."""

    pid: int  # also the process group id and session id of everything the action starts
    rule: Rule
    action: Action
    files: tuple[bytes, ...]
    retrigger: bool  # true: the rule asked that events of this process tree may trigger rules again


@dataclass(frozen=True)
class Result:
    rule: Rule
    action: Action
    spec: ExecSpec
    files: tuple[bytes, ...]
    coalesced: int  # matches this run stands for
    pid: int | None = None
    returncode: int | None = None  # negative: killed by that signal (subprocess convention)
    timed_out: bool = False
    stderr: bytes = b""
    stdout: bytes = b""
    started: float = 0.0
    ended: float = 0.0
    error: str | None = None  # the command could not be started at all
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.dry_run or (self.error is None and self.returncode == 0 and not self.timed_out)


@dataclass(eq=False)
class _Running:
    job: Job
    spec: ExecSpec
    proc: subprocess.Popen[bytes]
    pidfd: int
    started: float
    stderr: IO[bytes]
    stdout: IO[bytes] | None
    term_at: float | None = None  # when SIGTERM was sent
    killed: bool = False


def _tail(f: IO[bytes] | None) -> bytes:
    if f is None:
        return b""
    try:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - OUTPUT_TAIL))
        return f.read()
    finally:
        f.close()


def _killpg(pgid: int, sig: int) -> None:
    # ESRCH: the group is gone already; EPERM: a member changed credentials (setuid): nothing more we may do.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Runner:
    def __init__(
        self,
        *,
        max_concurrency: int = 8,
        shell: str | bytes = "/bin/sh",
        clock: Callable[[], float] = time.monotonic,
        on_start: Callable[[Started], None] | None = None,
        on_result: Callable[[Result], None] | None = None,
        dry_run: bool = False,
        env: Mapping[bytes, bytes] | None = None,
        arg_max: int | None = None,
        stdout: str = "inherit",
    ) -> None:
        if stdout not in ("inherit", "capture", "null"):
            raise ValueError(f"stdout must be inherit, capture or null, not {stdout!r}")
        self.shell = shell.encode() if isinstance(shell, str) else shell
        self.clock = clock
        self.on_start = on_start
        self.on_result = on_result
        self.dry_run = dry_run
        # env: the environment actions start from, as given; by default the allowlisted part of the daemon's own
        self.env: dict[bytes, bytes] = action_environment(os.environb) if env is None else dict(env)
        self.arg_max = arg_max if arg_max is not None else os.sysconf("SC_ARG_MAX")
        self.stdout = stdout
        self.scheduler = Scheduler(max_concurrency, split=self._split)
        self._running: dict[int, _Running] = {}  # by pidfd
        self._epoll = select.epoll()
        self.started_total = 0

    @classmethod
    def from_config(cls, config: Config, **kwargs: object) -> Runner:
        """A runner with the config's global cap and shell; other keyword arguments as for ``Runner``."""
        return cls(max_concurrency=config.max_concurrency, shell=config.shell, **kwargs)  # type: ignore[arg-type]

    # -- the plan: what exactly would run --------------------------------------------------------------------------

    def _batch_env(self, job: Job) -> dict[bytes, bytes]:
        ops = ",".join(sorted({m.op for m in job.matches}))
        return placeholder_env(b"", b"", b"", ops, None)

    def _split(self, job: Job) -> list[Job]:
        """Cut an argument batch so that each command stays under ARG_MAX (stdin batches need no cut)."""
        if job.action.options.batch is not BatchMode.ARGS or not job.matches:
            return [job]
        spec = exec_spec(job.action.command, self.env, self._batch_env(job), shell=self.shell)
        env = dict(spec.env)
        chunks = chunk_args(job.files, spec.argv, env, self.arg_max)
        if len(chunks) == 1:
            return [job]
        by_file = {m.file: m for m in job.matches}
        out = []
        for chunk in chunks:
            part = Job(
                job.rule,
                job.action,
                job.key,
                [by_file[f] for f in chunk],
                job.first,
                job.due,
                self.scheduler.next_seq(),
            )
            part.coalesced = len(chunk)
            out.append(part)
        out[0].coalesced += job.coalesced - len(job.matches)  # duplicates dropped from the batch count once
        return out

    def spec(self, job: Job) -> ExecSpec:
        """What ``job`` runs. Raises LookupError when its user or group no longer exists."""
        action = job.action
        run_as = resolve_run_as(action.options.user, action.options.group)
        env = user_environment(self.env, run_as)
        mode = action.options.batch
        if mode is BatchMode.OFF:
            m = job.matches[-1]
            kw = placeholder_env(m.file, m.old_file, m.new_file, m.op, m.event.pid)
            # $1 is the file too, so _FILES_ ("$@") means the same in single and batch actions.
            spec = exec_spec(action.command, env, kw, args=[m.file], shell=self.shell, files=[m.file])
        elif mode is BatchMode.ARGS:
            files = job.files
            spec = exec_spec(action.command, env, self._batch_env(job), args=files, shell=self.shell, files=files)
        else:
            files = job.files
            spec = exec_spec(
                action.command, env, self._batch_env(job), stdin=nul_list(files), shell=self.shell, files=files
            )
        if run_as is None:
            return spec
        return replace(spec, uid=run_as.uid, gid=run_as.gid, groups=run_as.groups)

    def plan(self, m: Match) -> ExecSpec:
        """The ExecSpec one match would run with if it were alone (``kwatch run --dry-run``)."""
        job = Job(m.rule, m.action, (), [m], 0.0, 0.0, 0)
        return self.spec(job)

    # -- the loop --------------------------------------------------------------------------------------------------

    def submit(self, m: Match) -> None:
        self.scheduler.add(m, self.clock())

    def submit_all(self, matches: Iterable[Match]) -> None:
        now = self.clock()
        for m in matches:
            self.scheduler.add(m, now)

    def flush(self) -> None:
        """Make every waiting job due now, ignoring the rest of its debounce or batch window."""
        self.scheduler.flush(self.clock())

    def fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def next_deadline(self) -> float | None:
        """The next clock time at which ``poll`` has work that no child exit will announce."""
        now = self.clock()
        times: list[float] = []
        due = self.scheduler.next_due(now)
        if due is not None:
            times.append(due)
        for r in self._running.values():
            opts = r.job.action.options
            if r.term_at is not None:
                if not r.killed:
                    times.append(r.term_at + opts.kill_grace)
            elif opts.timeout is not None:
                times.append(r.started + opts.timeout)
        return min(times) if times else None

    def timeout(self) -> float | None:
        """Seconds until :meth:`next_deadline` (for select/epoll); None: only an exit or an event can wake us."""
        d = self.next_deadline()
        return None if d is None else max(0.0, d - self.clock())

    def poll(self) -> list[Result]:
        """Reap exited actions, enforce timeouts, start due jobs. Never blocks."""
        results: list[Result] = []
        now = self.clock()
        for fd, r in list(self._running.items()):
            res = self._check(r, now)
            if res is not None:
                del self._running[fd]
                self._epoll.unregister(fd)
                os.close(fd)
                self.scheduler.finished(r.job)
                results.append(res)
        while True:
            jobs = self.scheduler.ready(now)
            freed = False
            for job in jobs:
                res = self._start(job, now)
                if res is not None:  # dry run or failed start: the slot is free again at once
                    self.scheduler.finished(job)
                    results.append(res)
                    freed = True
            if not freed:
                break
        for res in results:
            self._report(res)
        return results

    def wait(self, timeout: float | None = None) -> list[Result]:
        """Sleep until a child exits, the next deadline, or ``timeout`` seconds; then :meth:`poll`."""
        t = self.timeout()
        if timeout is not None:
            t = timeout if t is None else min(t, timeout)
        if self._running or t is None or t > 0:
            self._epoll.poll(-1 if t is None else t)
        return self.poll()

    def run_until_idle(self, step: float = 0.5) -> list[Result]:
        """Flush and run everything to the end (tests, one-shot use). Timeouts follow the runner's clock."""
        results: list[Result] = []
        while True:
            self.flush()
            results.extend(self.poll())
            if self.idle:
                return results
            results.extend(self.wait(step))

    def close(self) -> list[Result]:
        """Kill every running action's group, reap them all, drop waiting jobs."""
        results: list[Result] = []
        for r in self._running.values():
            _killpg(r.proc.pid, signal.SIGKILL)
            r.killed = True
        now = self.clock()
        for fd, r in list(self._running.items()):
            r.proc.wait()
            results.append(self._finish(r, now))
            self._epoll.unregister(fd)
            os.close(fd)
            self.scheduler.finished(r.job)
        self._running.clear()
        self._epoll.close()
        return results

    # -- one process -----------------------------------------------------------------------------------------------

    def _start(self, job: Job, now: float) -> Result | None:
        try:
            spec = self.spec(job)
        except LookupError as e:
            return Result(
                job.rule, job.action, ExecSpec((), {}), job.files, job.coalesced, started=now, ended=now,
                error=str(e.args[0]),
            )
        if self.dry_run:
            return Result(
                job.rule, job.action, spec, spec.files, job.coalesced, started=now, ended=now, dry_run=True
            )
        stdin: IO[bytes] | int = subprocess.DEVNULL
        stdin_file: IO[bytes] | None = None
        if spec.stdin is not None:
            # These files outlive this function (closed when the process is reaped), hence no "with".
            stdin_file = tempfile.TemporaryFile()  # noqa: SIM115
            stdin_file.write(spec.stdin)
            stdin_file.seek(0)
            stdin = stdin_file
        stderr = tempfile.TemporaryFile()  # noqa: SIM115
        stdout_file: IO[bytes] | None = None
        stdout: IO[bytes] | int | None = None
        if self.stdout == "capture":
            stdout_file = tempfile.TemporaryFile()  # noqa: SIM115
            stdout = stdout_file
        elif self.stdout == "null":
            stdout = subprocess.DEVNULL
        user, group, extra_groups = popen_credentials(spec.uid, spec.gid, spec.groups)
        try:
            proc = subprocess.Popen(
                list(spec.argv),
                env=dict(spec.env),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # setsid: pid == pgid == sid for the whole action tree
                close_fds=True,
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        except OSError as e:
            stderr.close()
            if stdout_file is not None:
                stdout_file.close()
            return Result(
                job.rule, job.action, spec, spec.files, job.coalesced, started=now, ended=now, error=str(e)
            )
        finally:
            if stdin_file is not None:
                stdin_file.close()  # the child has its own descriptor now
        pidfd = os.pidfd_open(proc.pid)
        self._epoll.register(pidfd, select.EPOLLIN)
        self._running[pidfd] = _Running(job, spec, proc, pidfd, now, stderr, stdout_file)
        self.started_total += 1
        if self.on_start is not None:
            self.on_start(Started(proc.pid, job.rule, job.action, spec.files, job.action.options.retrigger))
        return None

    def _check(self, r: _Running, now: float) -> Result | None:
        pid = r.proc.pid
        # WNOWAIT: learn that the leader exited without reaping it, so its pid still names the group below.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid == pid:
            if r.term_at is not None:
                _killpg(pid, signal.SIGKILL)  # timed out: leave nothing of the group behind
            r.proc.wait()
            return self._finish(r, now)
        opts = r.job.action.options
        if r.term_at is None:
            if opts.timeout is not None and now >= r.started + opts.timeout:
                log.warning(
                    "action %s (pid %d) timed out after %gs: SIGTERM to its group",
                    r.job.action.where,
                    pid,
                    opts.timeout,
                )
                _killpg(pid, signal.SIGTERM)
                r.term_at = now
        elif not r.killed and now >= r.term_at + opts.kill_grace:
            log.warning(
                "action %s (pid %d) still alive %gs after SIGTERM: SIGKILL",
                r.job.action.where,
                pid,
                opts.kill_grace,
            )
            _killpg(pid, signal.SIGKILL)
            r.killed = True
        return None

    def _finish(self, r: _Running, now: float) -> Result:
        return Result(
            r.job.rule,
            r.job.action,
            r.spec,
            r.spec.files,
            r.job.coalesced,
            pid=r.proc.pid,
            returncode=r.proc.returncode,
            timed_out=r.term_at is not None,
            stderr=_tail(r.stderr),
            stdout=_tail(r.stdout),
            started=r.started,
            ended=now,
        )

    def _report(self, res: Result) -> None:
        what = f"{res.action.where} [{'/'.join(res.action.triggers)}]"
        files = (
            display_path(res.files[0]) + (f" (+{len(res.files) - 1} more)" if len(res.files) > 1 else "")
            if res.files
            else ""
        )
        if res.dry_run:
            log.info("dry run: %s %s: %r", what, files, res.spec.argv)
        elif res.error is not None:
            log.error("action %s %s could not start: %s", what, files, res.error)
        elif res.ok:
            log.debug("action %s %s: ok (pid %s)", what, files, res.pid)
        else:
            tail = res.stderr.decode("utf-8", "backslashreplace").strip()
            how = "timed out" if res.timed_out else f"exit status {res.returncode}"
            log.warning("action %s %s: %s (pid %s)%s", what, files, how, res.pid, f": {tail}" if tail else "")
        if self.on_result is not None:
            self.on_result(res)

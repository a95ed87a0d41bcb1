"""Crash tests: ``kill -9`` of ``kwatch replicate`` and of its agent at varied points of a burst of thousands of
files, restarts, and convergence; during the whole burst no file under a final name in the mirror is partial.

Every version the workload writes is self-describing (``b"<id>:<version>:<size>:"`` then a pattern derived from
them), and the workload records each (id, version, size) and each id that ever lived at a path *before* writing
it, so a checker polling the mirror can tell a complete version from a torn or partial file. Files are written
with one write(2) each (a truncating rewrite can show an empty file for a moment, in the source too, so an empty
file is a valid state, but only under a name the workload opened with O_TRUNC or O_CREAT); temporaries (``.*.kwatch-tmp-*``) are not under final names and are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from faultlab import remote_agent_pids
from livereplicate import KWATCH, LiveReplicate, wait_identical
from sshd import Sshd

from kwatch.mirror.receiver import is_temp_name

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONVERGE = 90.0


def content(ident: int, ver: int, size: int) -> bytes:
    head = b"%d:%d:%d:" % (ident, ver, size)
    block = hashlib.blake2b(head).digest()
    body = head + block * ((size - len(head)) // len(block) + 1)
    return body[:size]


class Burst:
    """The workload: creates, truncating rewrites, same-size rewrites, renames and deletes under ``root``."""

    def __init__(self, root: Path, files: int, ops: int, seed: int) -> None:
        self.root = os.fsencode(root)
        self.files = files
        self.ops = ops
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.written: set[tuple[int, int, int]] = set()
        self.allowed: dict[bytes, set[int]] = {}
        self.live: dict[bytes, int] = {}  # path -> id of what is there now
        self.size: dict[int, int] = {}
        self.ver: dict[int, int] = {}
        self.next_id = 0
        self.done = 0  # operations done so far (the crash schedule keys on it)
        self.finished = threading.Event()
        self.gate = threading.Event()  # cleared while a killed daemon restarts (its start costs seconds under load)
        self.gate.set()
        self.error: BaseException | None = None
        self.checked = 0  # files verified by check_mirror, all polls together
        self.emptied: set[bytes] = set()  # names the source showed empty for a moment (created, or truncated)

    def _size(self) -> int:
        r = self.rnd.random()
        if r < 0.89:
            return self.rnd.randint(40, 8192)
        if r < 0.99:
            return self.rnd.randint(64 << 10, 200 << 10)  # rewrites of these go as deltas
        return self.rnd.randint(1 << 20, 2 << 20)

    def _write(self, rel: bytes, ident: int, *, truncate: bool = True) -> None:
        size = self.size[ident] if not truncate else self._size()
        ver = self.ver.get(ident, 0) + 1
        data = content(ident, ver, size)
        with self.lock:  # recorded before it can exist anywhere
            self.ver[ident] = ver
            self.size[ident] = size
            self.written.add((ident, ver, size))
            self.allowed.setdefault(rel, set()).add(ident)
            self.live[rel] = ident
            if truncate:
                self.emptied.add(rel)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        fd = os.open(self.root + b"/" + rel, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _new(self) -> None:
        ident = self.next_id
        self.next_id += 1
        rel = b"d%02d/f%05d" % (ident % 30, ident)
        self._write(rel, ident)

    def run(self) -> None:
        try:
            for d in range(30):
                os.makedirs(self.root + b"/d%02d" % d, exist_ok=True)
            for i in range(self.files):
                self.gate.wait()
                self._new()
                self.done += 1
                if i % 25 == 0:
                    time.sleep(0.03)
            for i in range(self.ops):
                self.gate.wait()
                paths = list(self.live)
                rel = self.rnd.choice(paths)
                ident = self.live[rel]
                r = self.rnd.random()
                if r < 0.45:
                    self._write(rel, ident)
                elif r < 0.60:
                    self._write(rel, ident, truncate=False)
                elif r < 0.80:
                    new = b"d%02d/r%05d-%d" % (self.rnd.randrange(30), ident, i)
                    with self.lock:
                        self.allowed.setdefault(new, set()).add(ident)
                        self.live[new] = self.live.pop(rel)
                    os.rename(self.root + b"/" + rel, self.root + b"/" + new)
                elif r < 0.90:
                    with self.lock:
                        del self.live[rel]
                    os.unlink(self.root + b"/" + rel)
                else:
                    self.gate.wait()
                self._new()
                self.done += 1
                if i % 10 == 0:  # paced so the mirror holds files while it is watched (on 2 loaded cores)
                    time.sleep(0.03)
        except BaseException as e:
            self.error = e
        finally:
            self.finished.set()

    def check_mirror(self, mirror: bytes) -> list[str]:
        """Every regular file under a final name holds a complete version written for that name."""
        bad: list[str] = []
        for dirpath, _dirs, names in os.walk(mirror):
            for name in names:
                if is_temp_name(name):
                    continue
                full = os.path.join(dirpath, name)
                rel = full[len(mirror) + 1:]
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                except (FileNotFoundError, OSError):
                    continue  # replaced or deleted meanwhile
                try:
                    st = os.fstat(fd)
                    head = os.pread(fd, 64, 0)
                    if st.st_size == 0:
                        with self.lock:
                            emptied = rel in self.emptied
                        if not emptied:  # only a create or a truncating rewrite shows an empty file in the source
                            bad.append(f"{rel!r}: empty, but the source never was under this name")
                        continue
                    parts = head.split(b":", 3)
                    try:
                        ident, ver, size = int(parts[0]), int(parts[1]), int(parts[2])
                    except (ValueError, IndexError):
                        bad.append(f"{rel!r}: not a version the workload wrote (head {head[:32]!r})")
                        continue
                    with self.lock:
                        known = (ident, ver, size) in self.written
                        here = ident in self.allowed.get(rel, ())
                    if not known or not here:
                        bad.append(f"{rel!r}: version {ident}:{ver}:{size} never written under this name")
                        continue
                    if st.st_size != size:
                        bad.append(f"{rel!r}: partial: {st.st_size} of {size} bytes ({ident}:{ver})")
                        continue
                    # the whole file, big ones too: a torn block anywhere in a 2 MiB file must show
                    if os.pread(fd, size + 1, 0) != content(ident, ver, size):
                        bad.append(f"{rel!r}: content of {ident}:{ver}:{size} is torn")
                    self.checked += 1
                finally:
                    os.close(fd)
        return bad


def _kill_agent(live: LiveReplicate, mirror: Path, timeout: float = 60.0) -> str:
    """Kill the agent of ``mirror``; fails if none runs within ``timeout`` (a kill that found no agent proves nothing).

    After a daemon restart the agent may not be up yet: it is waited for, by the process list, not by the log.
    """
    deadline = time.monotonic() + timeout
    while not (pids := remote_agent_pids(mirror)):
        assert time.monotonic() < deadline, f"no agent for {mirror} within {timeout}s:\n{live.log_text()[-3000:]}"
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return f"agent {pids}"


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_kill9_during_a_burst_converges_without_partial_files(kind: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    extra: list[str] = []
    target = str(mirror)
    d: Sshd | None = None
    if kind == "ssh":
        d = Sshd(tmp_path / "sshd").start()
        request.addfinalizer(d.stop)
        target, extra = d.target(mirror), ["-e", d.ssh_command, "--agent-command", KWATCH]
    burst = Burst(src, files=3000, ops=2500, seed=11 if kind == "local" else 12)
    live = LiveReplicate(src, [target], tmp_path / "replicate.log", extra)
    # (operations done, what to kill): agent and daemon, early, mid-creation, during rewrites and renames
    schedule = [(400, "agent"), (1200, "daemon"), (2000, "agent"), (2900, "daemon-down"), (3600, "agent"),
                (4500, "daemon")]
    events: list[str] = []
    polls = 0
    violations: list[str] = []
    def checker() -> None:
        nonlocal polls, violations
        while not burst.finished.is_set():
            violations += burst.check_mirror(os.fsencode(mirror))
            polls += 1

    with live:
        writer = threading.Thread(target=burst.run, name="burst")
        writer.start()
        check = threading.Thread(target=checker, name="checker")
        check.start()
        deadline = time.monotonic() + 300
        while not burst.finished.is_set() and time.monotonic() < deadline:
            if schedule and burst.done >= schedule[0][0]:
                _at, what = schedule.pop(0)
                if what == "agent":
                    events.append(f"{burst.done}: kill -9 {_kill_agent(live, mirror)}")
                else:
                    pid = live.pid
                    events.append(f"{burst.done}: kill -9 daemon {pid}")
                    # the workload waits while the killed daemon's BPF programs are torn down and capture attaches
                    # again (seconds under load): otherwise most of the burst would happen unwatched
                    burst.gate.clear()
                    try:
                        live.kill9()
                        if what == "daemon-down":
                            burst.gate.set()
                            time.sleep(1.0)  # the burst goes on with nobody watching
                            burst.gate.clear()
                        live.start(wait_targets=False)
                    finally:
                        burst.gate.set()
                    events.append(f"{burst.done}: daemon restarted ({live.pid})")
            time.sleep(0.01)
        writer.join(60)
        check.join(60)
        assert burst.error is None, burst.error
        assert burst.finished.is_set(), "the burst did not finish in time"
        took = wait_identical(src, mirror, CONVERGE, what=f"after the burst and {len(events)} kills", live=live)
        violations += burst.check_mirror(os.fsencode(mirror))
        assert live.stop() == 0
    print(f"{kind}: {burst.done} operations, {polls} polls of the mirror ({burst.checked} files verified), kills: {events}; converged {took:.1f}s "
          "after the burst")
    assert not violations, f"{len(violations)} partial or unknown files seen under final names:\n" + "\n".join(
        violations[:30])
    assert polls >= 10 and burst.checked >= 3 * burst.files, "the mirror was hardly checked during the burst"
    assert len(events) >= 8, events
    if d is not None:
        assert not remote_agent_pids(mirror), "an agent outlived its session"

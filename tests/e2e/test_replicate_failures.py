"""How replication fails and recovers, found by trying kwatch as a new user would (issue 16): excludes on rsync://
targets, counters across reconnects, descriptors per failed reconnect, SIGTERM during a retry wait, ``--once`` to
a destination that does not exist yet or to a host without kwatch, a relative local target.

Real processes throughout: ``kwatch replicate`` as a child, a real sshd and ``rsync --daemon`` on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rsyncd import RsyncDaemon
from sshd import Sshd
from treecmp import tree_differences

from kwatch.replicate.coalesce import Batch
from kwatch.replicate.engine import Replicator, Target, TargetOptions
from kwatch.replicate.link import LinkError

KWATCH = [sys.executable, "-m", "kwatch"]
AGENT = " ".join(KWATCH)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with Sshd(tmp_path_factory.mktemp("sshd")) as d:
        yield d


def tree(src: Path) -> Path:
    src.mkdir()
    (src / "keep").write_bytes(b"k" * 3000)
    (src / "skip.tmp").write_bytes(b"s")
    (src / "d").mkdir()
    (src / "d/inner.tmp").write_bytes(b"i")
    (src / "d/f").write_bytes(b"f")
    (src / "cache.tmp").mkdir()
    (src / "cache.tmp/x").write_bytes(b"x")
    return src


def run(args: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``kwatch replicate ARGS``; a run that retries forever fails the test at ``timeout``."""
    return subprocess.run([*KWATCH, "replicate", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.root
def test_exclude_applies_to_rsync_targets(tmp_path: Path) -> None:
    """``--exclude`` is the same for every kind of target: to rsync:// it was ignored (skip.tmp copied)."""
    src = tree(tmp_path / "src")
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        res = run(["--once", "--exclude", "*.tmp", str(src), d.url("push")])
        assert res.returncode == 0, res.stderr
        mirror = d.module_path("push")
        assert sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*")) == ["d", "d/f", "keep"]


def test_bytes_wire_only_grows_across_reconnects(tmp_path: Path) -> None:
    """A Prometheus counter: the agent path set it to the link's count, which restarts at 0 with every link."""
    src = tree(tmp_path / "src")
    (src / "big").write_bytes(os.urandom(200_000))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    r = Replicator(os.fsencode(src), Target.parse(str(mirror)))
    try:
        full = Batch()
        full.rescans.add(b"")
        r.sync_now(full)
        first = r.stats.bytes_wire
        assert first > 200_000
        r._disconnect()  # as after a failure: the next batch reconnects
        (src / "keep").write_bytes(b"new")
        r.sync_now(Batch(dirty={b"keep": 0xFF}))
        assert r.stats.bytes_wire > first
    finally:
        r.stop()


def test_failed_connects_leak_no_descriptors(tmp_path: Path) -> None:
    """Each failed attempt left its epoll descriptor and pipes open (fd 11 -> 23 in ten minutes of a flapping
    mirror); a daemon whose mirror is down for a week must not run out of descriptors."""
    r = Replicator(b"/nonexistent", Target.parse("nohost:/x"), TargetOptions(ssh="/bin/false"))

    def fds() -> list[str]:
        return sorted(os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                      if os.path.exists(f"/proc/self/fd/{n}"))

    with pytest.raises(LinkError):
        r._connect()  # the first attempt may create lasting things (the logging machinery...)
    before = fds()
    for _ in range(8):
        with pytest.raises(LinkError):
            r._connect()
    assert fds() == before


@pytest.mark.root
def test_sigterm_stops_a_target_in_its_retry_wait(tmp_path: Path) -> None:
    """SIGTERM while a target waits to be retried: `kwatch replicate` exited only after 30 s (or a minute)."""
    src = tree(tmp_path / "src")
    proc = subprocess.Popen([*KWATCH, "replicate", str(src), "nohost:/x", "-e", "/bin/false"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        retries = 0
        for line in proc.stderr:
            retries += "retrying in" in line
            if retries == 2:
                break
        assert retries == 2
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(timeout=20)
        # generous for a loaded machine: it takes about 0.1 s; before, the stop waited out 30 s
        assert time.monotonic() - t0 < 10
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.root
@pytest.mark.parametrize("where", ["local", "ssh"])
def test_once_creates_the_last_component(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """As rsync: a destination whose parent exists is created. It retried forever ("is not a directory")."""
    src = tree(tmp_path / "src")
    mirror = tmp_path / "new"
    extra: list[str] = []
    target = str(mirror)
    if where == "ssh":
        d: Sshd = request.getfixturevalue("sshd")
        target, extra = d.target(mirror), ["-e", d.ssh_command, "--agent-command", AGENT]
    res = run(["--once", str(src), target, *extra])
    assert res.returncode == 0, res.stderr
    assert tree_differences(src, mirror) == []


@pytest.mark.root
def test_once_exits_on_a_destination_it_cannot_create(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    res = run(["--once", str(src), str(tmp_path / "no/such/dir")])
    assert res.returncode != 0
    assert "giving up" in res.stderr and "cannot create" in res.stderr, res.stderr


@pytest.mark.root
def test_once_to_a_host_without_kwatch_falls_back_to_rsync(tmp_path: Path, sshd: Sshd) -> None:
    """Exit status 127 of the remote command: it retried forever ("kwatch: command not found"). Now it says what to
    install and where, and replicates as rsync users expect: rsync --server over the same ssh, with a warning."""
    src = tree(tmp_path / "src")
    mirror = tmp_path / "m"
    res = run(["--once", str(src), sshd.target(mirror), "-e", sshd.ssh_command,
               "--agent-command", "/nonexistent/kwatch"])
    assert res.returncode == 0, res.stderr
    assert "install kwatch" in res.stderr and "--agent-command" in res.stderr, res.stderr
    assert "falling back to rsync" in res.stderr and "renames are sent as new files" in res.stderr, res.stderr
    assert tree_differences(src, mirror) == []


def test_relative_local_target(tmp_path: Path) -> None:
    """`kwatch replicate src mirror`, as rsync takes it: a path without a colon before its first slash is local."""
    tree(tmp_path / "src")
    res = run(["--once", "src", "mirror"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert tree_differences(tmp_path / "src", tmp_path / "mirror") == []


@pytest.mark.parametrize(("spec", "kind", "path"), [
    ("mirror", "local", "{cwd}/mirror"),
    ("./a:b", "local", "{cwd}/a:b"),
    ("sub/dir", "local", "{cwd}/sub/dir"),
    ("/abs", "local", "/abs"),
    ("host:dir", "ssh", "dir"),
    ("host:", "ssh", "."),
])
def test_target_parse_table(spec: str, kind: str, path: str) -> None:
    t = Target.parse(spec)
    assert (t.kind, os.fsdecode(t.path)) == (kind, path.format(cwd=os.getcwd()))


def wait_for(cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(("ssh", "down"), [
    ("ssh -p {port} -o ConnectTimeout=5 -o StrictHostKeyChecking=no", "refused"),  # nothing listens there
    ("sh -c 'exit 127'", "missing_command"),
])
def test_down_reason_is_exported(tmp_path: Path, ssh: str, down: str) -> None:
    """Why a target is down, as the metric says it (issue 17 item 3), and it keeps being retried meanwhile."""
    from sshd import free_port

    from kwatch.metrics.exporter import KwatchCollector
    from kwatch.metrics.stats import DaemonStats

    src = tree(tmp_path / "src")
    r = Replicator(os.fsencode(src), Target.parse("root@127.0.0.1:/x"),
                   TargetOptions(ssh=ssh.format(port=free_port())))
    stats = DaemonStats()
    stats.targets[r.target.spec] = r.stats
    r.start()
    try:
        assert wait_for(lambda: r.stats.reconnects >= 1 and r.stats.down == down), (r.stats, r.last_error)
        fam = next(f for f in KwatchCollector(stats).collect() if f.name == "kwatch_replication_down")
        assert {s.labels["reason"]: s.value for s in fam.samples}[down] == 1.0
        assert sum(s.value for s in fam.samples) == 1.0
    finally:
        r.stop(timeout=5)

"""Replication through a :mod:`netlab` test network under injected faults: the workload, the mirror checker, the
faults, and the setup around them. Used by tests/e2e/test_netfaults.py (the fault matrix) and tests/support/soak.py (``make
soak``).

- :class:`Churn` is a continuous, bounded workload on the source: an untar, then edits in place, appends, truncating
  rewrites, renames of files and of directories, deletes and hard links. Before each change it records the digest of
  every whole content a path may show, so :meth:`Churn.check_mirror` can tell, at any moment, a file under a final
  name whose content the source never had there (torn, partial, mixed, or someone else's).
- :class:`Rig` is one replication: a lab, the mirror host's daemon (sshd with the agent, or ``rsync --daemon``),
  ``kwatch replicate`` in the source host, and the faults of :data:`FAULTS` (each a start and an end).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from livereplicate import KWATCH, LiveReplicate
from netlab import NetLab
from rsyncd import RsyncDaemon
from sshd import Sshd
from treecmp import tree_differences

from kwatch.mirror.receiver import is_temp_name

_RSYNC_TEMP = re.compile(rb"^\..+\.[A-Za-z0-9]{6}$")  # rsync's receiver writes .<name>.<6 random> beside the file


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


EMPTY = _digest(b"")


def _body(rnd: random.Random, size: int) -> bytes:
    seed = rnd.getrandbits(64).to_bytes(8, "little")
    block = hashlib.blake2b(seed, digest_size=64).digest()
    return (block * (size // 64 + 1))[:size]


def build_untar_tree(root: Path, files: int, seed: int) -> None:
    """A tree of small files in nested directories with a few symlinks (small: the matrix runs it at 1 Mbit/s)."""
    rnd = random.Random(seed)
    dirs = [root]
    for i in range(max(4, files // 40)):
        d = rnd.choice(dirs) / f"dir{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
    for i in range(files):
        d = dirs[i % len(dirs)]
        size = rnd.choice((0, 30, 200, 900, 2000, 4096)) if i % 50 else rnd.randint(20_000, 60_000)
        (d / f"u{i:05d}.c").write_bytes(_body(rnd, size))
        if i % 60 == 0:
            (d / f"u{i:05d}.lnk").symlink_to(f"u{i:05d}.c")


class Churn:
    """The workload (see the module docstring); :meth:`run` in a thread, bounded by ``ops`` and ``seconds``."""

    def __init__(self, root: Path, tarball: Path, staging: Path, *, ops: int, seconds: float, seed: int,
                 pace: float = 0.01) -> None:
        self.root = os.fsencode(root)
        self.tarball = tarball
        self.staging = staging
        self.ops = ops
        self.seconds = seconds
        self.pace = pace
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.allowed: dict[bytes, set[bytes]] = {}  # path -> digests of every whole content it may show
        self.ever: set[bytes] = set()  # every whole content any path had (tells misplaced from torn)
        self.cur: dict[bytes, bytes] = {}  # path -> current content (regular files the workload may still change)
        self.frozen: set[bytes] = set()  # hard-linked: never written again (a write would show under both names)
        self.dirs: list[bytes] = []
        self.done = 0
        self.counts: dict[str, int] = {}
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.checked = 0

    # ---------------------------------------------------------------------------------------------- the workload

    def _allow(self, rel: bytes, data: bytes) -> None:
        d = _digest(data)
        self.allowed.setdefault(rel, set()).add(d)
        self.ever.add(d)

    def _untar(self) -> None:
        base = os.fsencode(self.staging)
        with self.lock:
            for dirpath, _dirs, names in os.walk(base):
                for name in names:
                    full = os.path.join(dirpath, name)
                    if os.path.islink(full):
                        continue
                    rel = b"tree" + full[len(base):]
                    with open(full, "rb") as f:
                        data = f.read()
                    self._allow(rel, b"")
                    self._allow(rel, data)
                    self.cur[rel] = data
        os.makedirs(self.root + b"/tree", exist_ok=True)
        subprocess.run(["tar", "xf", str(self.tarball), "-C", os.fsdecode(self.root + b"/tree")], check=True,
                       timeout=120)
        self.dirs = [b"w%02d" % i for i in range(8)]
        for d in self.dirs:
            os.makedirs(self.root + b"/" + d, exist_ok=True)

    def _write(self, rel: bytes, data: bytes, flags: int) -> None:
        with self.lock:  # recorded before it can exist anywhere
            if flags & os.O_TRUNC:
                self._allow(rel, b"")
            self._allow(rel, data)
            self.cur[rel] = data
        fd = os.open(self.root + b"/" + rel, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _pick(self) -> bytes | None:
        live = [p for p in self.cur if p not in self.frozen]
        return self.rnd.choice(live) if live else None

    def _step(self, i: int) -> str:
        rnd = self.rnd
        r = rnd.random()
        rel = self._pick()
        if r < 0.25 or rel is None:
            new = rnd.choice(self.dirs) + b"/n%05d" % i
            self._write(new, _body(rnd, rnd.choice((50, 700, 3000, 9000))), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            return "create"
        old = self.cur[rel]
        if r < 0.40:  # an edit in place: same size, a few bytes changed, no truncation
            pos = rnd.randrange(max(1, len(old)))
            data = old[:pos] + b"EDIT" + old[pos + 4:]
            data = data[:max(len(old), len(data))]
            self._write(rel, data, os.O_WRONLY)
            return "edit"
        if r < 0.55:  # an append: one write(2) at the end
            extra = _body(rnd, rnd.choice((10, 500, 4000)))
            with self.lock:
                self._allow(rel, old + extra)
                self.cur[rel] = old + extra
            fd = os.open(self.root + b"/" + rel, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, extra)
            finally:
                os.close(fd)
            return "append"
        if r < 0.65:
            self._write(rel, _body(rnd, rnd.choice((0, 100, 5000))), os.O_WRONLY | os.O_TRUNC)
            return "rewrite"
        if r < 0.77:
            new = rnd.choice(self.dirs) + b"/r%05d" % i
            with self.lock:
                self.allowed.setdefault(new, set()).update(self.allowed.get(rel, set()))
                self.cur[new] = self.cur.pop(rel)
            os.rename(self.root + b"/" + rel, self.root + b"/" + new)
            return "rename"
        if r < 0.82:  # a directory renamed, with whatever it holds
            d = rnd.choice(self.dirs)
            new_d = b"w%02d-%d" % (self.dirs.index(d), i)
            with self.lock:
                # every name the directory ever held moves, deleted and renamed-away ones too: the mirror may still
                # show such a file inside the directory when it applies the directory's rename, under its new name
                for p in [p for p in self.allowed if p.startswith(d + b"/")]:
                    q = new_d + p[len(d):]
                    self.allowed.setdefault(q, set()).update(self.allowed[p])
                for p in [p for p in self.cur if p.startswith(d + b"/")]:
                    q = new_d + p[len(d):]
                    self.cur[q] = self.cur.pop(p)
                    if p in self.frozen:
                        self.frozen.discard(p)
                        self.frozen.add(q)
                self.dirs[self.dirs.index(d)] = new_d
            os.rename(self.root + b"/" + d, self.root + b"/" + new_d)
            return "dir-rename"
        if r < 0.92:
            with self.lock:
                del self.cur[rel]
                self.frozen.discard(rel)
            os.unlink(self.root + b"/" + rel)
            return "delete"
        new = rnd.choice(self.dirs) + b"/h%05d" % i
        with self.lock:
            self.allowed.setdefault(new, set()).add(_digest(old))
            self.cur[new] = old
            self.frozen.update((rel, new))
        os.link(self.root + b"/" + rel, self.root + b"/" + new)
        return "hardlink"

    def run(self) -> None:
        """One stretch of work (the untar first, on the first call only); may be called again for another."""
        self.finished.clear()
        try:
            if not self.dirs:
                self._untar()
            deadline = time.monotonic() + self.seconds
            start = self.done
            for i in range(start, start + self.ops):
                if time.monotonic() > deadline:
                    break
                what = self._step(i)
                self.counts[what] = self.counts.get(what, 0) + 1
                self.done += 1
                time.sleep(self.pace)
        except BaseException as e:
            self.error = e
        finally:
            self.finished.set()

    # ---------------------------------------------------------------------------------------------- the checker

    def check_mirror(self, mirror: bytes) -> list[str]:
        """Every regular file under a final name holds a whole content the source had under that name."""
        bad: list[str] = []
        for dirpath, _dirs, names in os.walk(mirror):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = full[len(mirror) + 1:]
                with self.lock:
                    allowed = self.allowed.get(rel)
                if allowed is None and (is_temp_name(name) or _RSYNC_TEMP.match(name)):
                    continue
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue  # a symlink, or replaced or deleted meanwhile
                try:
                    st = os.fstat(fd)
                    if not os.path.stat.S_ISREG(st.st_mode):
                        continue
                    data = os.pread(fd, st.st_size + 1, 0)
                finally:
                    os.close(fd)
                d = _digest(data)
                with self.lock:  # taken again: the workload may have recorded this content since
                    allowed = self.allowed.get(rel, set())
                    if d not in allowed:
                        how = "another name's content" if d in self.ever else "a content no name ever had (torn?)"
                        bad.append(f"{rel!r}: {len(data)} bytes the source never had under this name: {how}")
                self.checked += 1
        return bad


def remote_agent_pids(mirror: Path) -> list[int]:
    """The agents serving ``mirror`` (found by their exact, test-unique --root argument)."""
    want = ["agent", "--root", str(mirror)]
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if any(argv[i:i + 3] == want for i in range(len(argv))) and "ssh" not in argv[0]:
            out.append(int(pid))
    return out


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (by /proc's parent links)."""
    parent: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{p}/stat") as f:
                parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        kids = [c for c, pp in parent.items() if pp == q]
        out += kids
        todo += kids
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Rig:
    """One replication through a lab: ``kind`` is ``ssh`` (the agent over sshd) or ``rsync`` (``rsync://``)."""

    kind: str
    base: Path
    mirror_fs_mib: int = 0  # >0: the mirror lives on a tmpfs of that size (for the disk-full fault)
    lab: NetLab = field(default_factory=NetLab)
    sshd: Sshd | None = None
    rsyncd: RsyncDaemon | None = None
    live: LiveReplicate | None = None
    mounted: list[Path] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.src = self.base / "src"
        self.src.mkdir(parents=True)

    @property
    def mirror(self) -> Path:
        if self.rsyncd is not None:
            return self.rsyncd.module_path("push")
        return self.base / "mfs" / "mirror"

    def start(self) -> Rig:
        self.lab.start()
        probe: Callable[[str, int], object] = lambda h, p: self.lab.connect("mirror", h, p, timeout=0.5)  # noqa: E731
        if self.kind == "ssh":
            self._mount(self.base / "mfs")
            self.mirror.mkdir()
            self.sshd = Sshd(self.base / "sshd", host=self.lab.mirror_ip, prefix=self.lab.argv("mirror"),
                             probe=probe)  # type: ignore[arg-type]
            self.sshd.start()
            target = self.sshd.target(self.mirror)
            # ServerAliveInterval: a connection cut by a partition is noticed in seconds, as a deployment would set
            extra = ["-e", self.sshd.ssh_command + " -o ServerAliveInterval=2 -o ServerAliveCountMax=3",
                     "--agent-command", KWATCH]
        else:
            self.rsyncd = RsyncDaemon(self.base / "rsyncd", host=self.lab.mirror_ip, prefix=self.lab.argv("mirror"),
                                      probe=probe)  # type: ignore[arg-type]
            self._mount(self.rsyncd.module_path("push").parent)  # before start(), which makes the modules there
            self.rsyncd.start()
            target, extra = self.rsyncd.url("push"), []
        self.live = LiveReplicate(self.src, [target], self.base / "replicate.log", extra, prefix=self.lab.argv("src"))
        self.live.start()
        return self

    def _mount(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        if self.mirror_fs_mib:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.mirror_fs_mib}m", "tmpfs", str(where)],
                           check=True, timeout=30)
            self.mounted.append(where)

    def close(self) -> None:
        if self.live is not None:
            self.live.kill_all()
        for d in (self.sshd, self.rsyncd):
            if d is not None:
                with contextlib.suppress(Exception):
                    for pid in children(d.proc.pid) if d.proc is not None else []:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    d.stop()
        for pid in remote_agent_pids(self.mirror):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.lab.close()
        for m in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(m)], timeout=30, check=False)
        self.mounted.clear()

    def __enter__(self) -> Rig:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------- faults

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic():.1f} {what}")

    def kill_daemon(self) -> None:
        """kill -9 of the mirror host's daemon (sshd's listener or rsync's) and of its sessions."""
        d = self.sshd or self.rsyncd
        assert d is not None and d.proc is not None
        pids = [d.proc.pid, *children(d.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        d.proc.wait(10)
        d.proc = None
        self.note(f"kill -9 mirror daemon and sessions {pids}")

    def start_daemon(self) -> None:
        d = self.sshd or self.rsyncd
        assert d is not None
        d.start()  # on the same port
        self.note(f"mirror daemon started again on port {d.port}")

    def kill_agent(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not (pids := remote_agent_pids(self.mirror)):
            assert time.monotonic() < deadline, "no agent to kill"
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.note(f"kill -9 agent {pids}")

    def kill_replicate(self) -> None:
        assert self.live is not None
        self.note(f"kill -9 kwatch replicate {self.live.pid}")
        self.live.kill9()
        self.live.start(wait_targets=False)
        self.note(f"kwatch replicate started again ({self.live.pid})")

    def refuse_key(self, refuse: bool) -> None:
        assert self.sshd is not None
        keys = self.sshd.base / "authorized_keys"
        held = keys.with_suffix(".held")
        if refuse:
            keys.rename(held)
            self.kill_agent()  # the open session would go on: its end makes the daemon log in again
        else:
            held.rename(keys)
        self.note("key refused" if refuse else "key accepted again")

    def fill_disk(self, full: bool) -> None:
        """Fill the mirror's file system (a filler file beside the mirror, same tmpfs), or free it."""
        filler = self.mirror.parent / "filler"
        if full:
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                chunk = b"\0" * (1 << 20)
                while True:
                    f.write(chunk)
            self.note("mirror disk full")
        else:
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()
            self.note("mirror disk freed")


def _fault_partition(rig: Rig, on: bool) -> None:
    (rig.lab.partition if on else rig.lab.heal)()
    rig.note("partition" if on else "healed")


def _fault_lossy(rig: Rig, on: bool) -> None:
    if on:
        rig.lab.set_shape(delay_ms=100, loss=0.01, seed=17)
    else:
        rig.lab.set_shape()
    rig.note("200 ms RTT, 1% loss" if on else "clean link")


def _fault_slow(rig: Rig, on: bool) -> None:
    rig.lab.set_rate(1000 if on else None)
    rig.note("1 Mbit/s" if on else "rate unlimited")


def _fault_kill_daemon(rig: Rig, on: bool) -> None:
    if on:
        rig.kill_daemon()
    else:
        rig.start_daemon()


def _fault_restart_sshd(rig: Rig, on: bool) -> None:
    assert rig.sshd is not None
    if on:
        rig.sshd.stop()  # SIGTERM: a clean restart, sessions live on
        rig.note("sshd stopped (SIGTERM)")
    else:
        rig.start_daemon()


def _fault_kill_agent(rig: Rig, on: bool) -> None:
    if on:
        rig.kill_agent()


def _fault_kill_replicate(rig: Rig, on: bool) -> None:
    if on:
        rig.kill_replicate()


def _fault_disk_full(rig: Rig, on: bool) -> None:
    rig.fill_disk(on)


def _fault_key_refused(rig: Rig, on: bool) -> None:
    rig.refuse_key(on)


def converge(rig: Rig, bound: float, what: str) -> float:
    """Seconds until the mirror equals the source: content, attributes, and which paths share an inode."""
    t0 = time.monotonic()
    diffs: list[str] = []
    while time.monotonic() - t0 < bound:
        try:
            diffs = tree_differences(rig.src, rig.mirror)
        except FileNotFoundError as e:
            diffs = [f"tree changed while compared: {e}"]
        if not diffs:
            return time.monotonic() - t0
        time.sleep(0.1)
    assert rig.live is not None
    raise AssertionError(f"{what}: mirror not identical after {bound}s ({len(diffs)} differences):\n  "
                         + "\n  ".join(diffs[:40]) + "\n---- log tail ----\n" + rig.live.log_text()[-4000:])


# name -> (the fault's start and end, the kinds it applies to, seconds it lasts in the matrix)
FAULTS: dict[str, tuple[Callable[[Rig, bool], None], tuple[str, ...], float]] = {
    "partition-5s": (_fault_partition, ("ssh", "rsync"), 5.0),
    "partition-60s": (_fault_partition, ("ssh", "rsync"), 60.0),
    "rtt200-loss1": (_fault_lossy, ("ssh", "rsync"), 0.0),  # 0: for the whole run
    "rate-1mbit": (_fault_slow, ("ssh", "rsync"), 0.0),
    "kill-agent": (_fault_kill_agent, ("ssh",), 0.5),
    "kill-replicate": (_fault_kill_replicate, ("ssh", "rsync"), 0.5),
    "kill-daemon": (_fault_kill_daemon, ("ssh", "rsync"), 3.0),
    "restart-sshd": (_fault_restart_sshd, ("ssh",), 1.0),
    "disk-full": (_fault_disk_full, ("ssh", "rsync"), 5.0),
    "key-refused": (_fault_key_refused, ("ssh",), 5.0),
}

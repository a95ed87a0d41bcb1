"""Who did it: the process context of an event beyond what the capture records (pid, ppid, uid, gid, comm, cgroup id).

For each event the :class:`Resolver` adds the executable, the login uid and session (the audit ``auid``/``ses``: a
``sudo`` keeps the person's), the parent's comm, the user and group names, the cgroup path and what it says about
a container (docker, containerd/CRI, podman, CRI-O, LXC) or a systemd unit, and the mount namespace.

It is resolved in userspace from ``/proc``, once per process: the kernel records stay as small as they are (the
capture's cost does not change) and a process that writes a thousand files is looked up once. The cache key is
(pid, comm): an ``execve`` changes the comm in nearly every case, so the exe is looked up again after one. The
price: a process that has exited before its first event is read has no ``/proc`` entry left, and its exe, auid,
ses and mount namespace stay empty; the cgroup path still comes from the cgroup id (a cgroup outlives its
processes), and the names from the uid and gid. Fields that cannot be known are left out, never guessed.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from kwatch.events import FileEvent, Op, json_path

NO_AUID = 4294967295  # (uid_t)-1: no login uid (a daemon started at boot)
CACHE_SIZE = 4096
CGROUP_RESCAN_EVERY = 1.0  # seconds: a cgroup id not in the map is looked for again at most this often

_HEX64 = r"([0-9a-f]{64})"
#: (runtime, pattern over one cgroup path component) — the first that matches names the container
CONTAINER_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("docker", re.compile(rf"^docker-{_HEX64}\.scope$")),
    ("containerd", re.compile(rf"^cri-containerd-{_HEX64}\.scope$")),
    ("crio", re.compile(rf"^crio-{_HEX64}\.scope$")),
    ("podman", re.compile(rf"^libpod-{_HEX64}\.scope$")),
    ("lxc", re.compile(r"^lxc\.payload\.(.+)$")),
)
#: a bare 64-hex component under a parent named after its runtime (cgroupfs driver: /docker/<id>, /kubepods/...)
PARENT_RUNTIMES = {"docker": "docker", "libpod_parent": "podman", "kubepods": "containerd", "lxc": "lxc"}
_BARE = re.compile(rf"^{_HEX64}$")


def container_of(cgroup: str) -> tuple[str, str] | None:
    """(runtime, container id) that a cgroup path names, or None. Pure."""
    parts = [p for p in cgroup.split("/") if p]
    for i, part in enumerate(parts):
        for runtime, pat in CONTAINER_PATTERNS:
            m = pat.match(part)
            if m:
                return runtime, m.group(1)
        if _BARE.match(part) and i > 0:
            for parent in parts[:i]:
                base = parent.split(".")[0].split("-")[0]
                if base in PARENT_RUNTIMES:
                    return PARENT_RUNTIMES[base], part
    return None


def unit_of(cgroup: str) -> str | None:
    """The systemd unit (service or scope) a cgroup path is in: its deepest ``.service``/``.scope`` component."""
    for part in reversed([p for p in cgroup.split("/") if p]):
        if part.endswith((".service", ".scope")):
            return part
    return None


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """The context of one process. ``fragment`` is its JSON members (``,"exe":...``), built once per process."""

    exe: bytes | None = None
    auid: int | None = None
    ses: int | None = None
    pcomm: bytes | None = None
    user: str | None = None
    group: str | None = None
    cgroup: str | None = None
    container: str | None = None
    runtime: str | None = None
    unit: str | None = None
    mntns: int | None = None
    foreign_mntns: bool = False  # another mount namespace than kwatch's: its paths may not be reachable from here
    fragment: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        f = self.fields()
        text = "," + json.dumps(f, ensure_ascii=True, separators=(",", ":"))[1:-1] if f else ""
        object.__setattr__(self, "fragment", text)  # frozen: set once, here

    def fields(self) -> dict[str, object]:
        """The members a record gains (only those known)."""
        d: dict[str, object] = {}
        if self.exe is not None:
            d["exe"] = json_path(self.exe)
        for name in ("auid", "ses"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        if self.pcomm is not None:
            d["pcomm"] = json_path(self.pcomm)
        for name in ("user", "group", "cgroup", "container", "runtime", "unit", "mntns"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        if self.foreign_mntns:
            d["foreign_mntns"] = True
        return d


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified`` on a hybrid
    system): the capture's cgroup id is an inode number of that hierarchy."""
    try:
        with open(mountinfo, "rb") as f:
            for line in f:
                left, _, right = line.partition(b" - ")
                if right.split(b" ", 1)[0] == b"cgroup2":
                    return left.split(b" ")[4].decode("utf-8", "surrogateescape").replace("\\040", " ")
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class ContextFilter:
    """Which processes' context passes: ``kwatch trace --exe/--auid/--user/--container/--cgroup`` and a rule set's
    ``[ruleset.process]`` ``exe``, ``exclude_exe``, ``auid``, ``user``, ``container``, ``cgroup``.

    Each include filter given must match (values of one are alternatives); an include filter needs the value, so a
    process whose context is unknown (exited before it was looked up, or a backend that records no process) does
    not pass it. ``exclude_exe`` drops only what it recognises.
    """

    exes: tuple[re.Pattern[bytes], ...] = ()
    exclude_exes: tuple[re.Pattern[bytes], ...] = ()
    auids: frozenset[int] = frozenset()
    users: frozenset[str] = frozenset()
    containers: tuple[str, ...] = ()  # a container id, a prefix of one, or a runtime name
    cgroups: tuple[re.Pattern[str], ...] = ()

    @property
    def empty(self) -> bool:
        # asked once per event (trace, rules): comparing with a new ContextFilter() was a fifth of ``kwatch trace
        # --output``'s main thread; a test checks that every field counts here
        return not (self.includes or self.exclude_exes)

    @property
    def includes(self) -> bool:
        return bool(self.exes or self.auids or self.users or self.containers or self.cgroups)

    def accepts(self, info: ProcInfo | None) -> bool:
        if info is None:
            return not self.includes
        exe = info.exe
        if self.exes and (exe is None or not any(r.search(exe) for r in self.exes)):
            return False
        if exe is not None and any(r.search(exe) for r in self.exclude_exes):
            return False
        if self.auids and info.auid not in self.auids:
            return False
        if self.users and info.user not in self.users:
            return False
        cid = info.container
        if self.containers and (cid is None or not any(cid.startswith(c) or info.runtime == c
                                                       for c in self.containers)):
            return False
        cg = info.cgroup
        return not (self.cgroups and (cg is None or not any(r.search(cg) for r in self.cgroups)))


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _int(data: bytes | None) -> int | None:
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class Resolver:
    """Process context for events, cached per (pid, comm); names per uid/gid; cgroup paths per cgroup id."""

    def __init__(self, proc: str = "/proc", cgroup_root: str | None = None, size: int = CACHE_SIZE) -> None:
        self.proc = proc
        self.cgroup_root = cgroup_root if cgroup_root is not None else cgroup2_root()
        self.size = size
        self._procs: OrderedDict[tuple[int, bytes | None], ProcInfo] = OrderedDict()
        self._users: dict[int, str | None] = {}
        self._groups: dict[int, str | None] = {}
        self._cgroups: dict[int, str] = {}
        self._cgroups_scanned = float("-inf")
        self._own_mntns = _ns_inode(f"{proc}/self/ns/mnt")
        self.lookups = 0  # /proc lookups made (cache misses), for tests and metrics
        self._last: tuple[tuple[int, bytes | None] | None, ProcInfo | None] = (None, None)

    def __call__(self, ev: FileEvent) -> ProcInfo | None:
        if ev.op is Op.LOSS or ev.pid is None:
            return None
        key = (ev.pid, ev.comm)
        if key == self._last[0]:  # events come in runs of one process: no LRU bookkeeping for those
            return self._last[1]
        info = self._procs.get(key)
        if info is not None:
            self._procs.move_to_end(key)
            self._last = (key, info)
            return info
        info = self._lookup(ev)
        self._last = (key, info)
        self._procs[key] = info
        if len(self._procs) > self.size:
            self._procs.popitem(last=False)
        return info

    def _lookup(self, ev: FileEvent) -> ProcInfo:
        self.lookups += 1
        base = f"{self.proc}/{ev.pid}"
        try:
            exe: bytes | None = os.readlink(f"{base}/exe".encode())
        except OSError:
            exe = None  # gone, or a kernel thread
        auid = _int(_read(f"{base}/loginuid"))
        if auid == NO_AUID:
            auid = None
        ses = _int(_read(f"{base}/sessionid"))
        if ses == NO_AUID:
            ses = None
        pcomm = None
        if ev.ppid is not None:
            c = _read(f"{self.proc}/{ev.ppid}/comm")
            pcomm = c.rstrip(b"\n") if c is not None else None
        cgroup = self._cgroup_path(ev.cgroup_id, base)
        runtime = container = None
        if cgroup is not None and (found := container_of(cgroup)) is not None:
            runtime, container = found
        mntns = _ns_inode(f"{base}/ns/mnt")
        return ProcInfo(
            exe=exe, auid=auid, ses=ses, pcomm=pcomm,
            user=self._name(self._users, ev.uid, lambda u: pwd.getpwuid(u).pw_name),
            group=self._name(self._groups, ev.gid, lambda g: grp.getgrgid(g).gr_name),
            cgroup=cgroup, container=container, runtime=runtime,
            unit=unit_of(cgroup) if cgroup is not None else None,
            mntns=mntns,
            foreign_mntns=mntns is not None and self._own_mntns is not None and mntns != self._own_mntns,
        )

    @staticmethod
    def _name(cache: dict[int, str | None], ident: int | None, look: Callable[[int], str]) -> str | None:
        if ident is None:
            return None
        if ident not in cache:
            try:
                cache[ident] = look(ident)
            except KeyError:
                cache[ident] = None  # no such user: the number says it all
        return cache[ident]

    def _cgroup_path(self, cgroup_id: int | None, base: str) -> str | None:
        """The cgroup v2 path of an id (the id is the cgroup directory's inode number), else /proc's ``0::`` line."""
        if cgroup_id:
            path = self._cgroups.get(cgroup_id)
            if path is None and time.monotonic() - self._cgroups_scanned >= CGROUP_RESCAN_EVERY:
                self._scan_cgroups()
                path = self._cgroups.get(cgroup_id)
            if path is not None:
                return path
        for line in (_read(f"{base}/cgroup") or b"").splitlines():
            if line.startswith(b"0::"):
                return line[3:].decode("utf-8", "surrogateescape")
        return None

    def _scan_cgroups(self) -> None:
        self._cgroups_scanned = time.monotonic()
        root = self.cgroup_root
        if root is None:
            return
        found: dict[int, str] = {}
        for dirpath, _dirs, _files in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            rel = dirpath[len(root):] or "/"
            found[ino] = rel
        self._cgroups = found

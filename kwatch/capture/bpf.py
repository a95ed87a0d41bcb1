"""The BPF backend: loads a capture program, configures its maps, reads its ring buffer.

Two programs give the same records (``bpf/kwatch.h``): ``kwatch-vfs.bpf.o`` on VFS functions (fentry/fexit: paths
the kernel resolved, io_uring seen, CLOSE_WRITE at the last close) where the kernel allows fentry, else
``kwatch.bpf.o`` on syscall tracepoints. Each comes in two builds (``bpf/kw_kread.h``). The kernel decides: the
first object it loads and attaches is kept; :attr:`BpfSource.hooks` says which kind that is.

In-kernel filtering (all over-approximations; :meth:`CaptureFilter.accepts` runs last and is exact):
- op mask: syscalls whose op is not wanted are not even recorded at entry;
- watched trees: the kernel drops an event when the inode walk of every resolved path passed no watched directory
  (a name that is absolute or holds ``..`` is left for userspace to decide);
- processes: kwatch's own, and any process registered with :meth:`BpfSource.exclude_pid` plus its descendants
  (those it has when registered, found in /proc, and every process forked from an excluded one afterwards, which
  the kernel adds itself at fork).

Losses: the kernel counts failed ring buffer reserves (and syscalls it could not track) per CPU; every read turns an
increase into one ``Op.LOSS`` marker event, so no loss is silent.
"""

from __future__ import annotations

import collections
import functools
import operator
import os
import time
from collections.abc import Iterable
from pathlib import Path

from kwatch import libc
from kwatch.capture import libbpf, record
from kwatch.capture.base import CaptureError, CaptureFilter, SourceStats
from kwatch.capture.record import (
    MAX_ROOT_PATHS,
    ROOT_PATH_MAX,
    KwConfig,
    KwInodeKey,
    KwRootPath,
    decode_batch,
)
from kwatch.capture.ringbuf import RingBuffer
from kwatch.events import FileEvent, Op

TRACEFS = Path("/sys/kernel/tracing")
BPFFS = Path("/sys/fs/bpf")
DEFAULT_OBJECT = Path(__file__).with_name("kwatch.bpf.o")
#: The same program built with -DKW_PROBE_READ (bpf/kw_kread.h): one helper call per kernel field instead of the
#: bpf_rdonly_cast() kfunc, which kernels before 6.2 lack. Tried when the kernel refuses DEFAULT_OBJECT.
PROBE_READ_OBJECT = Path(__file__).with_name("kwatch-probe-read.bpf.o")
#: The capture on VFS functions (bpf/kwatch_vfs.bpf.c), in the same two builds; tried first, where fentry attaches.
VFS_OBJECT = Path(__file__).with_name("kwatch-vfs.bpf.o")
VFS_PROBE_READ_OBJECT = Path(__file__).with_name("kwatch-vfs-probe-read.bpf.o")
#: The tiny programs that tell what the kernel allows (bpf/probes.bpf.c), also read by `kwatch doctor`.
PROBES_OBJECT = Path(__file__).with_name("kwatch-probes.bpf.o")
DEFAULT_RINGBUF = 64 << 20
#: Ring buffer wake-ups: at most one per WAKE_S while events flow (the consumer polls every WAKE_S meanwhile),
#: immediate after a quiet spell; and always once a quarter of the buffer is waiting.
WAKE_S = 0.01
#: A read that finds less than this waiting within WAKE_S of its last batch waits out the WAKE_S (or the kernel's
#: wake-up at a quarter of the buffer) before it drains: a consumer that kept up drained a few records per read
#: (14 on average under a flat-out churn, 3,700 reads a second), and the cost per read dominated its CPU.
HOLD_BYTES = 256 << 10
#: While records flow, the kernel's loss counters are read at most this often (and on every read that finds none).
LOSS_CHECK_S = 0.02
#: while no record flows, how often a caller should read anyway: io_uring operations write no record to wake the
#: consumer, only a counter, and their marker must not wait for the next ordinary event (it may never come)
IDLE_CHECK_S = 1.0

#: The ops the kernel program produces (the others come from other backends).
BPF_OPS = frozenset(Op) - {Op.LOSS, Op.MODIFY, Op.ATTRIB}

_OP_OF = operator.attrgetter("op")

_FIELDS = frozenset(
    {"pid", "tid", "ppid", "uid", "gid", "comm", "cgroup_id", "ts_ns", "ret", "flags", "mode", "owner", "ftype"}
)


def _ismount(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def ensure_mounts() -> None:
    """Mount tracefs (libbpf resolves tracepoint ids there) and bpffs when they are absent."""
    for fstype, where in (("tracefs", TRACEFS), ("bpf", BPFFS)):
        if not where.is_dir() or _ismount(where):
            continue
        try:
            libc.mount(fstype.encode(), os.fsencode(where), fstype.encode())
        except OSError as e:
            raise CaptureError(f"cannot mount {fstype} on {where}: {os.strerror(e.errno or 0)}") from e


def kernel_dev(st_dev: int) -> int:
    """The kernel's internal dev_t (MKDEV: major << 20 | minor) for a userspace st_dev, as d_sb->s_dev holds it."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


_WATCHED = b"\x01"  # KW_ROOT_WATCHED
_ANCESTOR = b"\x02"  # KW_ROOT_ANCESTOR


def _ancestors(path: bytes) -> list[bytes]:
    out = []
    while path != b"/":
        path = os.path.dirname(path)
        out.append(path)
    return out


def _descendants(pids: Iterable[int]) -> list[int]:
    """The processes below ``pids`` now, from the parent pids in /proc/*/stat (gone or unreadable ones skipped)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _attached_by_name(section: str) -> bool:
    """Programs libbpf attaches from their section name: tracepoints, BTF tracepoints, fentry and fexit (not
    tail-call targets)."""
    return section.startswith(("tp_btf/", "fentry/", "fexit/")) or _tracepoint_of(section) is not None


def probe_program(name: str) -> str | None:
    """Load and attach the one program ``name`` of :data:`PROBES_OBJECT`: None if the kernel took it, else why not
    (libbpf's words). A probe by trying, never a version test."""
    if not PROBES_OBJECT.exists():
        return f"{PROBES_OBJECT} is missing: build it with `make bpf`"
    try:
        obj = libbpf.BpfObject(str(PROBES_OBJECT))
    except (CaptureError, OSError) as e:
        return str(e)
    try:
        target = None
        for prog in obj.programs():
            prog.set_autoload(prog.name == name)
            if prog.name == name:
                target = prog
        if target is None:
            return f"no program {name} in {PROBES_OBJECT.name}"
        obj.load()
        obj.attach(target)
        return None
    except (CaptureError, OSError) as e:
        if os.geteuid() == 0:  # the hint for non-root is wrong here: the kernel itself refuses
            return str(e).replace(" (BPF needs root or CAP_BPF+CAP_PERFMON)", " (refused by the kernel although root)")
        return str(e)
    finally:
        obj.close()


_fentry_refused: list[str | None] = []  # the one answer of this process (the kernel's policy does not change)


def fentry_refused() -> str | None:
    """Why the kernel refuses fentry programs (None: it attaches them), asked once per process: a tiny program
    first, so that a kernel that refuses them costs no load of the whole VFS object."""
    if not _fentry_refused:
        _fentry_refused.append(probe_program("probe_fentry"))
    return _fentry_refused[0]


HOOKS = ("vfs", "tracepoints")

#: fexit programs written for one prototype of their kernel function (bpf/kwatch_vfs.bpf.c): program name ->
#: (function, the return kind it expects, as libbpf.func_return_kind names it). The verifier takes either program
#: on either kernel, reading the return value as the wrong type, so the loader keeps the one the BTF of the running
#: kernel matches (vfs_mkdir returns an int up to Linux 6.14, the new dentry since 6.15).
FEXIT_VARIANTS = {
    "kw_vfs_mkdir": ("vfs_mkdir", "int"),
    "kw_vfs_mkdir_dentry": ("vfs_mkdir", "ptr"),
}


def variant_fits(prog: str, btf_path: str | None = None) -> bool:
    """Whether the program ``prog`` fits the kernel whose BTF is ``btf_path`` (default: the running kernel's);
    programs without variants always do."""
    if prog not in FEXIT_VARIANTS:
        return True
    func, kind = FEXIT_VARIANTS[prog]
    return _return_kind(func, btf_path) == kind


@functools.lru_cache(maxsize=64)
def _return_kind(func: str, btf_path: str | None) -> str | None:
    """libbpf.func_return_kind, once per process and BTF (parsing the kernel's BTF takes tens of milliseconds)."""
    return libbpf.func_return_kind(func, btf_path)


def _candidates(hooks: str | None) -> list[Path]:
    """The builds to try, best first: the VFS ones where fentry attaches, then the tracepoint ones; ``hooks`` keeps
    one kind only."""
    if hooks not in (None, *HOOKS):
        raise CaptureError(f"unknown BPF hooks {hooks!r}: choose one of {', '.join(HOOKS)}")
    tracepoints = [DEFAULT_OBJECT, PROBE_READ_OBJECT]
    if hooks == "tracepoints":
        return tracepoints
    why = fentry_refused()
    if hooks == "vfs" and why is not None:
        raise libbpf.BpfError(f"the VFS hooks need fentry, which this kernel refuses: {why}")
    vfs = [VFS_OBJECT, VFS_PROBE_READ_OBJECT] if why is None else []
    return vfs if hooks == "vfs" else vfs + tracepoints


def _tracepoint_of(section: str) -> str | None:
    """``tp/syscalls/sys_enter_openat`` -> ``syscalls/sys_enter_openat``; None for programs not attached by name."""
    parts = section.split("/")
    return f"{parts[1]}/{parts[2]}" if len(parts) == 3 and parts[0] == "tp" else None


#: where a path of another mount namespace leads, as _place tells it
SAME, ELSEWHERE, UNKNOWN = "same", "elsewhere", "unknown"


def _ns_of(pid: int) -> int | None:
    try:
        return os.stat(b"/proc/%d/ns/mnt" % pid).st_ino
    except OSError:
        return None


def _member(mntns: int, pid: int | None, known: dict[int, int]) -> int | None:
    """A live process of the mount namespace ``mntns``: ``pid`` if it still runs, else the one ``known`` for it
    if it still runs there, else the first found in /proc (once per namespace and read: None when none is left)."""
    for cand in (pid, known.get(mntns)):
        if cand and _ns_of(cand) == mntns:
            known[mntns] = cand
            return cand
    known.pop(mntns, None)
    try:
        entries = os.listdir(b"/proc")
    except OSError:
        return None
    for e in entries:
        if e.isdigit() and _ns_of(int(e)) == mntns:
            known[mntns] = int(e)
            return int(e)
    return None


def _place(member: int, path: bytes, root_devs: frozenset[int] | None, seen: dict[tuple[int, bytes], str]) -> str:
    """Where ``path``, as a process of another mount namespace named it, leads (``member``: a live process of that
    namespace, whose /proc/PID/root resolves names in its mounts):

    - SAME: its directory is the directory of that name in kwatch's namespace (same device and inode): a
      namespace that copied the host's mounts, a volume bind-mounted at the same path;
    - ELSEWHERE: its directory is on a file system no watched root is on (a container's overlay root, its tmpfs):
      it cannot be inside a watched tree, bind mounts included (they keep their file system's device);
    - UNKNOWN: anything else (a bind mount of a watched file system at another path, a directory gone on both
      sides): the caller's loss marker.

    A directory that is gone is judged by its nearest existing ancestor's device. Answers are kept in ``seen``
    for one read."""
    if not path.startswith(b"/"):
        return UNKNOWN
    d = path.rpartition(b"/")[0] or b"/"
    key = (member, d)
    hit = seen.get(key)
    if hit is not None:
        return hit
    hit = UNKNOWN
    theirs = None
    probe = d
    while theirs is None:
        try:
            theirs = os.stat(b"/proc/%d/root%s" % (member, probe))
        except OSError:
            if probe == b"/":
                break
            probe = probe.rpartition(b"/")[0] or b"/"
    if theirs is not None:
        if probe == d:
            try:
                ours = os.stat(d)
                if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
                    hit = SAME
            except OSError:
                pass
        if hit is UNKNOWN and root_devs is not None and theirs.st_dev not in root_devs:
            hit = ELSEWHERE
    seen[key] = hit
    return hit


class BpfSource:
    """Capture through the kernel program; see the module docstring for what is filtered where.

    ``hooks`` keeps one kind of program ("vfs" or "tracepoints"; None: the best the kernel takes), ``obj_path`` one
    build; :attr:`hooks` and :attr:`object_path` say what was loaded, :attr:`refused` what the kernel refused first.
    """

    name = "bpf"
    fields = _FIELDS

    def __init__(
        self,
        filt: CaptureFilter | None = None,
        *,
        ringbuf_bytes: int = DEFAULT_RINGBUF,
        obj_path: Path | str | None = None,
        wake_s: float = WAKE_S,
        hooks: str | None = None,
    ) -> None:
        if os.geteuid() != 0:
            raise CaptureError("the BPF backend needs root (or CAP_BPF and CAP_PERFMON); try --backend inotify")
        if ringbuf_bytes & (ringbuf_bytes - 1) or ringbuf_bytes < 4096:
            raise CaptureError(f"ring buffer size must be a power of two >= 4096, not {ringbuf_bytes}")
        paths = [Path(obj_path)] if obj_path else _candidates(hooks)
        for path in paths:
            if not path.exists():
                raise CaptureError(f"BPF object {path} is missing: build it with `make bpf`")
        ensure_mounts()
        self.filter = filt or CaptureFilter()
        self.wake_s = wake_s
        self._rb_bytes = ringbuf_bytes
        self._last_data = 0.0  # time.monotonic() of the last read that found records
        self._last_drain = 0.0  # time.monotonic() of the last read that returned records
        self._next_loss_check = 0.0
        self._stats = SourceStats()
        self._by_op: collections.Counter[Op] = collections.Counter()
        self._lost_seen = 0
        self._uring_seen = 0
        self._foreign_seen = record.foreign_decoded
        self._ns_members: dict[int, int] = {}  # a live process of each other mount namespace seen
        # The kernel decides which build it takes: each is loaded and attached in turn (a probe by trying, never a
        # version test); the refusals of the ones before are kept for the error and for `kwatch doctor`.
        self.refused: list[tuple[str, str]] = []
        if not obj_path and hooks is None and fentry_refused() is not None:
            self.refused.append((VFS_OBJECT.name, "fentry refused: " + str(fentry_refused())))
        for i, path in enumerate(paths):
            try:
                self._open(path, ringbuf_bytes)
            except libbpf.BpfError as e:
                self.refused.append((path.name, str(e)))
                if i + 1 < len(paths):
                    continue
                if len(self.refused) > 1:
                    raise libbpf.BpfError("the kernel refused every build of the BPF program:\n" + "\n".join(
                        f"{name}: {msg}" for name, msg in self.refused)) from e
                raise
            self.object_path = path
            break

    def _open(self, path: Path, ringbuf_bytes: int) -> None:
        """Load, configure and attach one build; on a refusal (load or attach) nothing of it stays."""
        self._obj, progs = self._load(path, ringbuf_bytes)
        #: "vfs" (fentry/fexit on VFS functions) or "tracepoints" (syscall tracepoints): what this object hooks
        self.hooks = "vfs" if any(p.section.startswith(("fentry/", "fexit/")) for p in progs) else "tracepoints"
        try:
            self._cfg = self._obj.map("kw_cfg")
            self._roots = self._obj.map("kw_roots")
            self._root_paths = self._obj.map("kw_root_paths")
            self._excl = self._obj.map("kw_excl")
            self._losses = self._obj.map("kw_losses")
            self._uring = self._obj.map("kw_uring")
            self._ncpu = libbpf.possible_cpus()
            self._excluded: set[int] = set()  # exclude_pid() calls
            self._filter_excl: set[int] = set()  # the filter's exclude_pids now in the kernel map
            self._root_values: dict[bytes, bytes] = {}
            self._root_inos: list[int] = []
            self._cfg_gen = 0  # bumped by each configuration write (the kernel's path cache checks it)
            self.set_filter(self.filter)
            for prog in progs:
                if _attached_by_name(prog.section):
                    self._obj.attach(prog)
            self._rb = RingBuffer(self._obj.map("kw_events").fd, ringbuf_bytes)
        except BaseException:
            self._obj.close()
            raise

    def _load(self, path: Path, ringbuf_bytes: int) -> tuple[libbpf.BpfObject, list[libbpf.BpfProgram]]:
        """Open and load one build of the program (closed again if the kernel refuses it)."""
        obj = libbpf.BpfObject(str(path))
        try:
            obj.map("kw_events").set_max_entries(ringbuf_bytes)
            self.skipped: list[str] = []
            progs = []
            for prog in obj.programs():
                tp = _tracepoint_of(prog.section)
                if tp and not (TRACEFS / "events" / tp).is_dir():
                    # e.g. setxattrat on kernels before 6.13: that syscall cannot happen there
                    prog.set_autoload(False)
                    self.skipped.append(tp)
                elif not variant_fits(prog.name):
                    prog.set_autoload(False)  # the other prototype's program is the one loaded
                else:
                    progs.append(prog)
            obj.load()
        except BaseException:
            obj.close()
            raise
        return obj, progs

    # ---- configuration -------------------------------------------------------------------------------------------

    def set_filter(self, filt: CaptureFilter) -> None:
        """Push a new filter into the kernel maps (safe while running: each map update is atomic)."""
        self.filter = filt
        old = self._root_values
        new: dict[bytes, bytes] = {}
        inos: list[int] = []
        for root in filt.roots:
            # the watched directory itself, and each directory above it: a name resolved under one of those may
            # lead into the tree, so the kernel leaves such events to userspace
            chain = [root] + [parent for parent in _ancestors(root)]
            for i, d in enumerate(chain):
                try:
                    st = os.stat(d)
                except OSError as e:
                    raise CaptureError(f"cannot watch {root.decode(errors='replace')}: {d!r}: {e.strerror}") from e
                key = bytes(KwInodeKey(ino=st.st_ino, dev=kernel_dev(st.st_dev)))
                if i == 0:
                    new[key] = _WATCHED
                    inos.append(st.st_ino)
                else:
                    new.setdefault(key, _ANCESTOR)
        for key, value in new.items():
            if old.get(key) != value:
                self._roots.update(key, value)
        for key in old.keys() - new.keys():
            self._roots.delete(key)
        self._root_values = new
        self._root_inos = sorted(set(inos))
        # the same roots as strings, for absolute names (compared in the kernel without a walk)
        self._strings_ok = len(filt.roots) <= MAX_ROOT_PATHS and all(len(r) < ROOT_PATH_MAX for r in filt.roots)
        paths = list(filt.roots) if self._strings_ok else []
        for i in range(MAX_ROOT_PATHS):
            p = paths[i] if i < len(paths) else b""
            self._root_paths.update(i.to_bytes(4, "little"), bytes(KwRootPath(len=len(p), path=p)))
        self._write_config()

    def _write_config(self) -> None:
        mask = 0
        for op in self.filter.ops:
            mask |= 1 << int(op)
        self._cfg_gen = (self._cfg_gen + 1) & 0xFFFFFFFF
        cfg = KwConfig(
            cfg_gen=self._cfg_gen,
            wake_us=int(self.wake_s * 1e6),
            wake_bytes=self._rb_bytes // 4,
            op_mask=mask,
            self_tgid=os.getpid(),
            # roots the kernel cannot hold as strings (too many, too long) are filtered in userspace only
            use_roots=1 if self.filter.roots and b"/" not in self.filter.roots and self._strings_ok else 0,
            use_excl=1 if (self._excluded or self.filter.exclude_pids) else 0,
        )
        if len(self._root_inos) <= MAX_ROOT_PATHS:
            cfg.n_root_inos = len(self._root_inos)
            cfg.root_ino[: len(self._root_inos)] = self._root_inos
        else:
            cfg.use_roots = 0  # more roots than the walk compares: userspace filters alone
        self._exclude_trees(self.filter.exclude_pids - self._filter_excl)
        for pid in self._filter_excl - self.filter.exclude_pids - self._excluded:
            self._excl.delete(pid.to_bytes(4, "little"))
        self._filter_excl = set(self.filter.exclude_pids)
        self._cfg.update(b"\0\0\0\0", bytes(cfg))

    def exclude_pid(self, pid: int) -> None:
        """Ignore ``pid`` and its descendants (used for the processes of actions kwatch starts).

        The pid goes into the kernel's table first, so any process it forks from then on is added by the kernel;
        then the descendants it already had are added from /proc. No window lets a child slip through. The
        configuration is written after the table (use_excl on, and a new cfg_gen: the kernel's per-CPU memo of
        exclusion answers is only valid for the generation it was made in).
        """
        self._excluded.add(pid)
        self._exclude_trees([pid])
        self._write_config()

    def _exclude_trees(self, pids: Iterable[int]) -> None:
        """Put ``pids`` into the kernel's table first (their forks from then on are added by the kernel), then the
        descendants they already have (one /proc scan)."""
        pids = list(pids)
        if not pids:
            return
        for pid in pids:
            self._excl.update(pid.to_bytes(4, "little"), b"\x01")
        for child in _descendants(pids):
            self._excl.update(child.to_bytes(4, "little"), b"\x01")

    def include_pid(self, pid: int) -> None:
        if pid in self._excluded:
            self._excluded.discard(pid)
            if pid not in self._filter_excl:
                self._excl.delete(pid.to_bytes(4, "little"))
            self._write_config()  # after the table (a new cfg_gen: see exclude_pid)

    # ---- reading --------------------------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._rb.fd

    def _percpu_total(self, m: libbpf.BpfMap) -> int:
        raw = m.lookup(bytes(4), 8 * self._ncpu)
        if not raw:
            return 0
        return sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))

    def lost_total(self) -> int:
        """Sum over CPUs of the records lost because the ring buffer was full."""
        return self._percpu_total(self._losses)

    def uring_total(self) -> int:
        """Sum over CPUs of the io_uring file operations submitted by processes not excluded (not traced)."""
        return self._percpu_total(self._uring)

    def poll_within(self) -> float | None:
        """How long a caller may wait on :meth:`fileno` before calling :meth:`read` (None: until it is readable).

        While events flow the kernel wakes the consumer at most once per ``wake_s`` and counts on it to poll; after
        ``2 * wake_s`` without data the next record wakes it at once (see kw_config.wake_us in bpf/kwatch.h), and
        a read every :data:`IDLE_CHECK_S` looks at the io_uring counter, which no record announces.
        """
        if time.monotonic() - self._last_data < 2 * self.wake_s:
            return self.wake_s
        return IDLE_CHECK_S

    def read(self, timeout: float | None = None) -> list[FileEvent]:
        """The events captured since the last read: waits up to ``timeout`` (None: the poll interval) for some.

        Records that are already waiting are returned within WAKE_S; a read with ``timeout`` 0 never waits."""
        pending = self._rb.pending()
        if not pending:
            within = self.poll_within()
            if within is not None and (timeout is None or timeout > within):
                timeout = within
            self._rb.wait(timeout)
        elif pending < HOLD_BYTES and timeout != 0:
            # let a batch build up while events flow (the kernel does not wake a consumer it knows to be polling)
            left = self._last_drain + self.wake_s - time.monotonic()
            if left > 0:
                self._rb.wait_signal(left if timeout is None else min(left, timeout))
        raw = self._rb.drain(decode_batch)
        markers: list[FileEvent] = []
        if record.foreign_decoded != self._foreign_seen:  # a counter: the common batch costs no pass over it
            self._foreign_seen = record.foreign_decoded
            raw, markers = self._other_namespaces(raw)
        now = time.monotonic()
        if raw:
            self._last_drain = now
        if raw or self._rb.pending():
            self._last_data = now
        out = self.filter.select(raw)
        if len(out) != len(raw) and self.filter.roots:
            out = self._through_symlinks(raw, out)
        st = self._stats
        st.filtered += len(raw) - len(out)
        # the loss counters cost two map lookups (syscalls): read them on every idle read, and at most every
        # LOSS_CHECK_S while records flow
        lost, uring = self._lost_seen, self._uring_seen
        if not raw or now >= self._next_loss_check:
            self._next_loss_check = now + LOSS_CHECK_S
            lost = self.lost_total()
            uring = self.uring_total()
        if lost > self._lost_seen:
            delta = lost - self._lost_seen
            self._lost_seen = lost
            st.lost += delta
            st.overflows += 1
            out.append(FileEvent(op=Op.LOSS, path=b"/", lost=delta, ts_ns=time.monotonic_ns(), backend=self.name))
        if uring > self._uring_seen:
            # io_uring file operations: what they touched is unknown, so a marker of unknown count and place (the
            # replicator rescans the whole tree), never silence
            delta = uring - self._uring_seen
            self._uring_seen = uring
            st.overflows += 1
            out.append(FileEvent(op=Op.LOSS, path=b"/", lost=None, ts_ns=time.monotonic_ns(), backend=self.name,
                                 extra={"io_uring": delta}))
        if markers:
            st.overflows += len(markers)
            out.extend(markers)
        st.events += len(out)
        self._by_op.update(map(_OP_OF, out))
        return out

    def _other_namespaces(self, raw: list[FileEvent]) -> tuple[list[FileEvent], list[FileEvent]]:
        """Events whose paths belong to another mount namespace (a container, ``unshare -m``): (the events to
        filter, the LOSS markers that stand for those whose paths kwatch's namespace cannot reach).

        A whole-system watch keeps them all, with ``mntns`` set. Watched roots are host paths, so each path is
        looked up through a live process of its namespace (:func:`_place`; the event's own process, or another of
        the namespace once it has exited): one that names the same place here is kept (still with ``mntns``); one on
        a file system no watched root is on is dropped, as the kernel drops the host's events outside the roots (the
        tracepoint program passes every absolute name outside the roots to userspace, as it may go through a
        symlinked directory: without this, every container's mkdir or unlink became a loss marker); any other names
        a place kwatch cannot map (a bind mount of a watched file system elsewhere, a namespace with no process
        left), and comparing it with a root would place the change wrongly or miss it, so each namespace's such
        events become one marker of unknown place: the replicator rescans, rules see a loss, never a wrong path.
        """
        if not self.filter.roots or b"/" in self.filter.roots:
            return raw, []
        root_devs: set[int] | None = set()
        for r in self.filter.roots:
            try:
                root_devs.add(os.stat(r).st_dev)  # type: ignore[union-attr]
            except OSError:  # a root that is gone: its device is unknown, so no path can be ELSEWHERE
                root_devs = None
                break
        devs = frozenset(root_devs) if root_devs is not None else None
        kept: list[FileEvent] = []
        per_ns: collections.Counter[int] = collections.Counter()
        seen: dict[tuple[int, bytes], str] = {}
        for ev in raw:
            if ev.mntns is None:
                kept.append(ev)
                continue
            member = _member(ev.mntns, ev.pid, self._ns_members)
            places = {_place(member, p, devs, seen) if member else UNKNOWN for p in (ev.path, ev.new_path) if p}
            if places == {SAME}:
                kept.append(ev)
            elif places == {ELSEWHERE}:
                self._stats.filtered += 1
            elif UNKNOWN in places:
                per_ns[ev.mntns] += 1
            else:  # a rename between a namespace's own files and the same files as here: the latter side counts
                kept.append(ev)
        now = time.monotonic_ns()
        return kept, [FileEvent(op=Op.LOSS, path=b"/", lost=None, ts_ns=now, backend=self.name,
                                extra={"mount_namespace": ns, "events": n}) for ns, n in per_ns.items()]

    #: the ops whose paths are the names a process passed (not resolved from a descriptor in the kernel)
    _NAME_OPS = frozenset({Op.MKDIR, Op.RMDIR, Op.UNLINK, Op.RENAME, Op.SYMLINK, Op.LINK, Op.CHMOD, Op.CHOWN,
                           Op.XATTR, Op.UTIMES, Op.TRUNCATE})

    def _through_symlinks(self, raw: list[FileEvent], kept: list[FileEvent]) -> list[FileEvent]:
        """Events the filter refused, placed again by the real directory of their names.

        A name such as /link/f with /link -> /watched is what the process passed; the kernel resolved it into the
        watched tree, which a tracepoint cannot see. The name's directory is resolved here (realpath: every symlink
        in it, as kwatch's mount namespace sees it, at read time) and the event kept, with the real path, when that
        lands in a root; ``extra["via_symlink"]`` holds the name as passed. A directory renamed or a link changed
        between the call and this read is resolved as it is now. Within one read a directory is resolved once.
        """
        ids = set(map(id, kept))
        out: list[FileEvent] = []
        real: dict[bytes, bytes] = {}

        def place(p: bytes | None) -> bytes | None:
            if p is None:
                return None
            d, name = os.path.split(p)
            r = real.get(d)
            if r is None:
                r = real[d] = os.path.realpath(d)
            return os.path.join(r, name) if name else r

        accepts = self.filter.accepts
        for ev in raw:
            if id(ev) in ids:
                out.append(ev)
                continue
            if ev.op not in self._NAME_OPS or ev.truncated or ev.mntns is not None:
                continue  # a name of another mount namespace is not resolved in kwatch's
            path, new = place(ev.path) or ev.path, place(ev.new_path)
            if path == ev.path and new == ev.new_path:
                continue
            moved = ev._replace(path=path, new_path=new, extra={**(ev.extra or {}), "via_symlink": ev.path})
            if accepts(moved):
                out.append(moved)
        return out

    # ---- the capture barrier (see kwatch.capture.barrier) ----------------------------------------------------------

    def produced(self) -> int:
        """The ring's producer position now. A record is reserved (the position moves past it) before the syscall
        that made it returns, so every event of an operation that has completed ends at or before this position."""
        return self._rb.produced()

    def consumed(self) -> int:
        """The ring position up to which :meth:`read` has returned the records (it stops at one still BUSY)."""
        return self._rb.consumed()

    def check_losses(self) -> None:
        """Read the kernel's loss counters at the next :meth:`read`, even while records flow: a failed reserve is
        counted before its syscall returns, so that read reports it (as a LOSS marker) with what came before."""
        self._next_loss_check = 0.0

    def stats(self) -> SourceStats:
        self._stats.by_op = {op.label: n for op, n in self._by_op.items()}
        return self._stats

    def close(self) -> None:
        rb = getattr(self, "_rb", None)
        if rb is not None:
            rb.close()
            self._rb = None  # type: ignore[assignment]
        self._obj.close()

    def __enter__(self) -> BpfSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The BPF backend against the real kernel: a table of scripted workloads, each run by a child process.

For each case the exact sequence of (op, path, new_path-or-target) from the child is asserted — nothing missing,
nothing duplicated, nothing wrong — and every event carries the child's pid, uid and comm. Set-up steps run in the
test process itself, which the backend excludes as kwatch's own pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from timescale import scaled

from kwatch.capture.base import CaptureFilter
from kwatch.capture.bpf import IDLE_CHECK_S
from kwatch.events import RENAME_EXCHANGE, FileEvent, Op

pytestmark = pytest.mark.root

COMM = b"kwtest-child"

# Runs in the child: names its process, then executes the case's body with `d` (bytes) = the case directory.
CHILD_PRELUDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"kwtest-child", 0, 0, 0)  # PR_SET_NAME: a comm the assertions can name
d = os.fsencode(sys.argv[1])
W = os.O_WRONLY
C = os.O_CREAT
AT_FDCWD = -100
def touch(p, flags=W | C):
    fd = os.open(p, flags, 0o644)
    os.close(fd)
"""

Expected = list[tuple[str, bytes, bytes | None]]


@dataclass
class Case:
    name: str
    body: str
    expected: Callable[[bytes], Expected]
    setup: Callable[[bytes], None] = lambda d: None
    teardown: Callable[[bytes], None] = lambda d: None
    uid: int = 0
    check: Callable[[bytes, list[FileEvent]], None] | None = None
    extra: dict[str, object] = field(default_factory=dict)
    #: the sequence on the VFS hooks where it differs (CLOSE_WRITE once per last close: tests/kernel/test_capture_vfs.py)
    expected_vfs: Callable[[bytes], Expected] | None = None


def mkfile(*names: str) -> Callable[[bytes], None]:
    def setup(d: bytes) -> None:
        for n in names:
            p = os.path.join(d, n.encode())
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if not n.endswith("/"):
                Path(os.fsdecode(p)).write_bytes(b"data")

    return setup


def ev(op: str, d: bytes, rel: str | bytes, new: str | bytes | None = None, *, target: bytes | None = None) -> tuple:
    r = rel.encode() if isinstance(rel, str) else rel
    path = d + b"/" + r if r else d
    if target is not None:
        return (op, path, target)
    if new is None:
        return (op, path, None)
    n = new.encode() if isinstance(new, str) else new
    return (op, path, d + b"/" + n)


HOSTILE = [b"a b", b"q'\"`", b"nl\nx", b"\xff\xfe-latin", b"$(touch canary)", b"-rf", b"*"]
DEEP = 100
LONG = b"L" * 200


def _bind_mount(d: bytes) -> None:
    os.makedirs(d + b"/src")
    os.makedirs(d + b"/mnt")
    subprocess.run(["mount", "--bind", d + b"/src", d + b"/mnt"], check=True)


def _umount(d: bytes) -> None:
    subprocess.run(["umount", d + b"/mnt"], check=False)


def _near_path_max_check(d: bytes, events: list[FileEvent]) -> None:
    # 19 levels of 200-byte names plus the base: a ~3.9 KiB path, resolved whole
    depth = 19
    rel = b"/".join([LONG] * depth)
    got = [(e.op.name, e.path, e.truncated) for e in events]
    want = [("MKDIR", d + b"/" + b"/".join([LONG] * (i + 1)), False) for i in range(depth)]
    want += [("CREATE", d + b"/" + rel + b"/f", False), ("CLOSE_WRITE", d + b"/" + rel + b"/f", False)]
    assert got == want


def _too_long_check(d: bytes, events: list[FileEvent]) -> None:
    # 22 levels: the file's path is longer than PATH_MAX; the event must say it is cut, never pass a wrong path
    creates = [e for e in events if e.op is Op.CREATE]
    assert len(creates) == 1
    e = creates[0]
    assert e.truncated
    assert e.path.endswith(b"/" + LONG + b"/f")
    full = d + b"/" + b"/".join([LONG] * 22) + b"/f"
    assert full.endswith(e.path) and len(e.path) < len(full)


CASES = [
    Case(
        "create_write_close_absolute",
        "fd = os.open(d + b'/f', W | C, 0o640); os.write(fd, b'x'); os.close(fd)",
        lambda d: [ev("CREATE", d, "f"), ev("CLOSE_WRITE", d, "f")],
    ),
    Case(
        "open_existing_for_write",
        "fd = os.open(d + b'/f', os.O_RDWR); os.close(fd)",
        lambda d: [ev("OPEN_WRITE", d, "f"), ev("CLOSE_WRITE", d, "f")],
        setup=mkfile("f"),
    ),
    Case(
        "read_only_opens_are_silent",
        "fd = os.open(d + b'/f', os.O_RDONLY); os.read(fd, 9); os.close(fd)\n"
        "fd = os.open(d + b'/f', os.O_RDONLY | C); os.close(fd)",
        lambda d: [],
        setup=mkfile("f"),
    ),
    Case(
        "relative_to_cwd_with_dots",
        "os.chdir(d + b'/sub'); touch(b'../sub/./r'); os.mkdir(b'../m'); os.unlink(b'./r')",
        lambda d: [ev("CREATE", d, "sub/r"), ev("CLOSE_WRITE", d, "sub/r"), ev("MKDIR", d, "m"),
                   ev("UNLINK", d, "sub/r")],
        setup=mkfile("sub/"),
    ),
    Case(
        "dirfd_relative",
        "dfd = os.open(d + b'/sub', os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.mkdir(b'm', dir_fd=dfd); os.rename(b'm', b'm2', src_dir_fd=dfd, dst_dir_fd=dfd)\n"
        "touch(os.path.join(d, b'sub/m2/x')); os.unlink(b'm2/x', dir_fd=dfd); os.rmdir(b'm2', dir_fd=dfd)\n"
        "os.close(dfd)",
        lambda d: [ev("MKDIR", d, "sub/m"), ev("RENAME", d, "sub/m", "sub/m2"), ev("CREATE", d, "sub/m2/x"),
                   ev("CLOSE_WRITE", d, "sub/m2/x"), ev("UNLINK", d, "sub/m2/x"), ev("RMDIR", d, "sub/m2")],
        setup=mkfile("sub/"),
    ),
    Case(
        "unlink_and_rmdir_syscalls",
        "os.unlink(d + b'/f'); os.rmdir(d + b'/e'); libc.unlinkat(AT_FDCWD, d + b'/g', 0)",
        lambda d: [ev("UNLINK", d, "f"), ev("RMDIR", d, "e"), ev("UNLINK", d, "g")],
        setup=mkfile("f", "g", "e/"),
    ),
    Case(
        "rename_across_directories",
        "os.rename(d + b'/a/x', d + b'/b/y'); os.rename(d + b'/a', d + b'/b/a2')",
        lambda d: [ev("RENAME", d, "a/x", "b/y"), ev("RENAME", d, "a", "b/a2")],
        setup=mkfile("a/x", "b/"),
    ),
    Case(
        "rename_exchange",
        "assert libc.renameat2(AT_FDCWD, d + b'/a/x', AT_FDCWD, d + b'/b/y', 2) == 0",
        lambda d: [ev("RENAME", d, "a/x", "b/y")],
        setup=mkfile("a/x", "b/y"),
        extra={"rename_flags": RENAME_EXCHANGE},
    ),
    Case(
        "symlinks",
        "os.symlink(b'../t/../x y', d + b'/s')\n"
        "dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY); os.symlink(b'/abs', b's2', dir_fd=dfd); os.close(dfd)",
        lambda d: [ev("SYMLINK", d, "s", target=b"../t/../x y"), ev("SYMLINK", d, "s2", target=b"/abs")],
    ),
    Case(
        "hard_links",
        "os.link(d + b'/f', d + b'/h'); os.link(b'f', b'h2', src_dir_fd=os.open(d, 0), dst_dir_fd=os.open(d, 0))",
        lambda d: [ev("LINK", d, "f", "h"), ev("LINK", d, "f", "h2")],
        setup=mkfile("f"),
    ),
    Case(
        "chmod_family",
        "os.chmod(d + b'/f', 0o600); fd = os.open(d + b'/f', os.O_RDONLY); os.fchmod(fd, 0o640); os.close(fd)\n"
        "os.chmod(b'f', 0o644, dir_fd=os.open(d, 0))",
        lambda d: [ev("CHMOD", d, "f"), ev("CHMOD", d, "f"), ev("CHMOD", d, "f")],
        setup=mkfile("f"),
        extra={"modes": [0o600, 0o640, 0o644]},
    ),
    Case(
        "chown_family",
        "os.chown(d + b'/f', 1, 2); os.lchown(d + b'/f', 3, 4)\n"
        "fd = os.open(d + b'/f', os.O_RDONLY); os.fchown(fd, 5, -1); os.close(fd)",
        lambda d: [ev("CHOWN", d, "f"), ev("CHOWN", d, "f"), ev("CHOWN", d, "f")],
        setup=mkfile("f"),
        extra={"owners": [(1, 2), (3, 4), (5, -1)]},
    ),
    Case(
        "truncate_family",
        "os.truncate(d + b'/f', 1); fd = os.open(d + b'/f', W); os.ftruncate(fd, 0); os.close(fd)",
        lambda d: [ev("TRUNCATE", d, "f"), ev("OPEN_WRITE", d, "f"), ev("TRUNCATE", d, "f"),
                   ev("CLOSE_WRITE", d, "f")],
        setup=mkfile("f"),
    ),
    Case(
        "xattr_family",
        "os.setxattr(d + b'/f', b'user.k', b'v'); fd = os.open(d + b'/f', os.O_RDONLY)\n"
        "os.setxattr(fd, b'user.j', b'w'); os.removexattr(d + b'/f', b'user.k'); os.close(fd)",
        lambda d: [ev("XATTR", d, "f"), ev("XATTR", d, "f"), ev("XATTR", d, "f")],
        setup=mkfile("f"),
    ),
    Case(
        "utimes_by_name_and_fd",
        "os.utime(d + b'/f', (1, 2)); fd = os.open(d + b'/f', os.O_RDONLY); os.utime(fd, (3, 4)); os.close(fd)",
        lambda d: [ev("UTIMES", d, "f"), ev("UTIMES", d, "f")],
        setup=mkfile("f"),
    ),
    Case(
        "hostile_names",
        f"for n in {HOSTILE!r}:\n    touch(d + b'/' + n)\n    os.rename(d + b'/' + n, d + b'/' + n + b'.2')",
        lambda d: [x for n in HOSTILE for x in (ev("CREATE", d, n), ev("CLOSE_WRITE", d, n),
                                                  ev("RENAME", d, n, n + b".2"))],
    ),
    Case(
        "deep_tree_100_levels",
        f"os.chdir(d)\nfor i in range({DEEP}):\n    os.mkdir(b'd'); os.chdir(b'd')\ntouch(b'f')",
        lambda d: [ev("MKDIR", d, "/".join(["d"] * (i + 1))) for i in range(DEEP)]
        + [ev("CREATE", d, "d/" * DEEP + "f"), ev("CLOSE_WRITE", d, "d/" * DEEP + "f")],
    ),
    Case(
        "near_path_max",
        f"os.chdir(d)\nfor i in range(19):\n    os.mkdir({LONG!r}); os.chdir({LONG!r})\ntouch(b'f')",
        lambda d: [],
        check=_near_path_max_check,
    ),
    Case(
        "longer_than_path_max_is_flagged",
        f"os.chdir(d)\nfor i in range(22):\n    os.mkdir({LONG!r}); os.chdir({LONG!r})\ntouch(b'f')",
        lambda d: [],
        check=_too_long_check,
    ),
    Case(
        "bind_mount",
        "touch(d + b'/mnt/f'); os.rename(d + b'/mnt/f', d + b'/mnt/g')",
        lambda d: [ev("CREATE", d, "mnt/f"), ev("CLOSE_WRITE", d, "mnt/f"), ev("RENAME", d, "mnt/f", "mnt/g")],
        setup=_bind_mount,
        teardown=_umount,
    ),
    Case(
        "absolute_name_from_elsewhere",
        "os.chdir('/'); os.mkdir(d + b'/abs'); os.rmdir(d + b'/abs')",
        lambda d: [ev("MKDIR", d, "abs"), ev("RMDIR", d, "abs")],
    ),
    Case(
        "absolute_name_with_dotdot",
        "os.chdir('/'); os.mkdir(d + b'/../' + os.path.basename(d) + b'/dd'); os.mkdir(b'/tmp/kwatch-out-' + d[-6:])\n"
        "os.rmdir(b'/tmp/kwatch-out-' + d[-6:])",
        lambda d: [ev("MKDIR", d, "dd")],
    ),
    Case(
        "relative_name_from_parent_directory",
        "os.chdir(os.path.dirname(d)); b = os.path.basename(d)\n"
        "os.mkdir(b + b'/x'); os.rename(b + b'/x', b + b'/y')",
        lambda d: [ev("MKDIR", d, "x"), ev("RENAME", d, "x", "y")],
    ),
    Case(
        "dotdot_from_outside_the_tree",
        "os.chdir('/tmp'); rel = os.path.relpath(d, b'/tmp/kwatch-outside')\n"
        "os.makedirs(b'/tmp/kwatch-outside', exist_ok=True); os.chdir(b'/tmp/kwatch-outside')\n"
        "os.mkdir(rel + b'/z')",
        lambda d: [ev("MKDIR", d, "z")],
    ),
    Case(
        # the kernel caches the last paths a thread resolved; a rename of the directory above an open file must show
        "path_cache_sees_rename_of_parent_under_open_file",
        "os.mkdir(d + b'/a'); fd = os.open(d + b'/a/f', W | C, 0o644); os.fchmod(fd, 0o600)\n"
        "os.rename(d + b'/a', d + b'/b'); os.fchmod(fd, 0o640); os.close(fd)\n"
        "os.rename(d + b'/b', d + b'/a'); os.unlink(d + b'/a/f'); fd = os.open(d + b'/a/f', W | C, 0o644)\n"
        "os.fchmod(fd, 0o600); os.close(fd)",
        lambda d: [ev("MKDIR", d, "a"), ev("CREATE", d, "a/f"), ev("CHMOD", d, "a/f"), ev("RENAME", d, "a", "b"),
                   ev("CHMOD", d, "b/f"), ev("CLOSE_WRITE", d, "b/f"), ev("RENAME", d, "b", "a"),
                   ev("UNLINK", d, "a/f"), ev("CREATE", d, "a/f"), ev("CHMOD", d, "a/f"), ev("CLOSE_WRITE", d, "a/f")],
    ),
    Case(
        # a freed dentry's memory may come back for another name: the cache checks parent, name and inode
        "path_cache_survives_dentry_reuse",
        "for i in range(200):\n"
        "    n = d + b'/x%d' % i; fd = os.open(n, W | C, 0o644); os.fchmod(fd, 0o600); os.close(fd); os.unlink(n)",
        lambda d: [e for i in range(200) for e in (ev("CREATE", d, f"x{i}"), ev("CHMOD", d, f"x{i}"),
                                                   ev("CLOSE_WRITE", d, f"x{i}"), ev("UNLINK", d, f"x{i}"))],
    ),
    Case(
        # the kernel scans names for ".." eight bytes at a time: put it at every offset across two word boundaries
        "dotdot_at_every_offset_from_outside",
        "os.makedirs(b'/tmp/kwatch-outside', exist_ok=True); os.chdir(b'/tmp/kwatch-outside')\n"
        "rel = os.path.relpath(d, b'/tmp/kwatch-outside')\n"
        # the only ".." at offset n: "./" pairs for even n, ".//" for the odd rest (no name lets it sit at 1)
        "for n in [0] + list(range(2, 18)):\n"
        "    os.mkdir(b'./' * (n // 2 - n % 2) + b'.//' * (n % 2) + rel + b'/o%d' % n)",
        lambda d: [ev("MKDIR", d, f"o{n}") for n in [0, *range(2, 18)]],
    ),
    Case(
        "as_another_user",
        "os.setgid(65534); os.setuid(65534); touch(d + b'/nobody')",
        lambda d: [ev("CREATE", d, "nobody"), ev("CLOSE_WRITE", d, "nobody")],
        setup=lambda d: os.chmod(d, 0o777),
        uid=65534,
    ),
    Case(
        "close_at_exit_and_dup2",
        "fd = os.open(d + b'/f', W | C); os.dup2(fd, 9)\n"  # dup2 onto a free fd closes nothing
        "fd2 = os.open(d + b'/g', W | C); os.dup2(fd2, 9)\n"  # closes f's second descriptor
        "os.close(fd2); os._exit(0)",  # closes g (fd2); exit closes f (fd) and g (fd 9)
        lambda d: [ev("CREATE", d, "f"), ev("CREATE", d, "g"), ev("CLOSE_WRITE", d, "f"), ev("CLOSE_WRITE", d, "g"),
                   ev("CLOSE_WRITE", d, "f"), ev("CLOSE_WRITE", d, "g")],
        # each file's last reference goes at exit; the exiting task runs its pending final fputs newest first
        expected_vfs=lambda d: [ev("CREATE", d, "f"), ev("CREATE", d, "g"), ev("CLOSE_WRITE", d, "g"),
                                ev("CLOSE_WRITE", d, "f")],
    ),
    Case(
        # a shell redirection's pattern: the file is written through a duplicate, both descriptors closed
        "close_of_a_duplicated_descriptor",
        "fd = os.open(d + b'/f', W | C); fd2 = os.dup(fd); os.close(fd); os.write(fd2, b'x'); os.close(fd2)",
        lambda d: [ev("CREATE", d, "f"), ev("CLOSE_WRITE", d, "f"), ev("CLOSE_WRITE", d, "f")],
        expected_vfs=lambda d: [ev("CREATE", d, "f"), ev("CLOSE_WRITE", d, "f")],
    ),
]


@pytest.fixture(scope="module", params=["auto", "probe-read"])
def source(request: pytest.FixtureRequest) -> Iterator[object]:
    """The tracepoint program as `--backend bpf` loads it where fentry is refused (the first build the kernel
    accepts), then forced to the build that reads kernel memory by helper calls (the one kernels before 6.2 take):
    both must give the same sequences. Where fentry attaches, `--backend bpf` takes the VFS program instead: its
    own module (tests/kernel/test_capture_vfs.py) runs this table against it."""
    from kwatch.capture.bpf import PROBE_READ_OBJECT, BpfSource

    # under /tmp and traversable, so the case that drops to another uid can reach it
    base = tempfile.mkdtemp(prefix="kwatch-bpf-", dir="/tmp")
    os.chmod(base, 0o755)
    obj = PROBE_READ_OBJECT if request.param == "probe-read" else None
    src = BpfSource(CaptureFilter.make(roots=[base]), obj_path=obj, hooks="tracepoints")
    src.base = os.fsencode(base)  # type: ignore[attr-defined]
    try:
        yield src
    finally:
        src.close()
        shutil.rmtree(base, ignore_errors=True)


def drain(src: object, until_quiet: float = 0.3) -> list[FileEvent]:
    out: list[FileEvent] = []
    deadline = time.monotonic() + scaled(10)
    until_quiet = scaled(until_quiet)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        batch = src.read(0.05)  # type: ignore[attr-defined]
        if batch:
            out.extend(batch)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > until_quiet:
            break
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_workload(source: object, case: Case) -> None:
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, case.name.encode())
    os.mkdir(d)
    case.setup(d)
    drain(source, 0.1)
    try:
        p = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + case.body, d], stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode(errors="replace")
        # a cut path cannot be placed, so the source delivers every one: keep only the child's, or another
        # process's deep-tree case (a second test run at the same time) lands here
        events = [
            e for e in drain(source)
            if e.op is not Op.LOSS
            and ((e.truncated and e.pid == p.pid) or any(x.startswith(d + b"/") for x in e.paths()))
        ]
    finally:
        case.teardown(d)
    assert all(e.pid == p.pid for e in events), [(e.op.name, e.pid, e.comm, e.path, e.ppid, p.pid, os.getpid()) for e in events if e.pid != p.pid]
    assert all(e.comm == COMM and e.uid == case.uid and e.gid == case.uid for e in events)
    assert all(e.ppid == os.getpid() for e in events)
    if case.check is not None:
        case.check(d, events)
        return
    got = [(e.op.name, e.path, e.new_path if e.new_path is not None else e.target) for e in events]
    vfs = getattr(source, "hooks", None) == "vfs"
    assert got == (case.expected_vfs if vfs and case.expected_vfs is not None else case.expected)(d)
    assert not any(e.truncated for e in events)
    if "rename_flags" in case.extra:
        assert [e.flags for e in events] == [case.extra["rename_flags"]]
    if "modes" in case.extra:
        assert [e.mode for e in events] == case.extra["modes"]
    if "owners" in case.extra:
        assert [e.owner for e in events] == case.extra["owners"]
    assert not os.path.exists(os.path.join(d, b"canary"))


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if f[2] == "cgroup2":
            return Path(f[1])
    return None


THREAD_CHILD = """
import os, sys, threading
sys.stdin.readline()
def work():
    print(threading.get_native_id(), flush=True)
    os.close(os.open(os.path.join(sys.argv[1], "by-thread"), os.O_WRONLY | os.O_CREAT, 0o644))
t = threading.Thread(target=work)
t.start()
t.join()
"""


def test_record_names_the_thread_and_the_cgroup(source: object) -> None:
    """tid is the writing thread's, not the process's; cgroup_id is the cgroup v2 the process runs in (a cgroup's
    id is the inode number of its directory in the cgroup2 mount)."""
    mnt = _cgroup2_mount()
    if mnt is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)
    cg = mnt / f"kwtest-{os.getpid()}"
    cg.mkdir()
    p = subprocess.Popen([sys.executable, "-c", THREAD_CHILD, base], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        cg_id = cg.stat().st_ino
        (cg / "cgroup.procs").write_text(str(p.pid))
        out, _ = p.communicate(b"go\n", timeout=30)
        assert p.returncode == 0
        events = [e for e in drain(source) if e.path == base + b"/by-thread"]
    finally:
        p.kill()
        p.wait()
        cg.rmdir()
    tid = int(out)
    assert tid != p.pid
    assert [(e.op.name, e.pid, e.tid, e.cgroup_id) for e in events] == [
        ("CREATE", p.pid, tid, cg_id),
        ("CLOSE_WRITE", p.pid, tid, cg_id),
    ]


def test_events_outside_roots_are_not_delivered(source: object, tmp_path: Path) -> None:
    outside = os.fsencode(tmp_path)
    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)
    subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + "touch(d + b'/o'); touch(sys.argv[2].encode() + b'/in')",
         outside, base], check=True,
    )
    paths = [e.path for e in drain(source)]
    assert paths == [base + b"/in", base + b"/in"]
    os.unlink(base + b"/in")


def test_path_cache_follows_a_new_filter(tmp_path: Path) -> None:
    """Paths the kernel cached while a directory was outside the watched roots count once it is inside."""
    from kwatch.capture.bpf import BpfSource

    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    with BpfSource(CaptureFilter.make(roots=[inside]), hooks="tracepoints") as src:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_PRELUDE + "fd = os.open(d + b'/f', W | C, 0o644); os.fchmod(fd, 0o600)\n"
             "print('done', flush=True); sys.stdin.readline(); os.fchmod(fd, 0o640); os.close(fd)", outside],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"done\n"  # its first calls are made (and were not delivered)
            assert [e for e in drain(src, 0.2) if e.op is not Op.LOSS] == []
            src.set_filter(CaptureFilter.make(roots=[inside, outside]))
            child.communicate(b"go\n", timeout=30)
        finally:
            child.kill()
        got = [(e.op.name, e.path) for e in drain(src) if e.op is not Op.LOSS]
    f = os.fsencode(outside / "f")
    assert got == [("CHMOD", f), ("CLOSE_WRITE", f)]


def test_self_is_excluded(source: object) -> None:
    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)
    with open(base + b"/mine", "wb") as f:
        f.write(b"x")
    os.unlink(base + b"/mine")
    assert drain(source) == []


def test_exclude_pid_covers_descendants(source: object) -> None:
    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)
    # a shell that waits for its go signal, then runs a grandchild that writes
    sh = subprocess.Popen(["sh", "-c", 'read x; sh -c "touch \\"$0/excl\\""', base], stdin=subprocess.PIPE)
    source.exclude_pid(sh.pid)  # type: ignore[attr-defined]
    try:
        sh.communicate(b"go\n", timeout=30)
        subprocess.run(["touch", base + b"/incl"], check=True)
        paths = {e.path for e in drain(source)}
    finally:
        source.include_pid(sh.pid)  # type: ignore[attr-defined]
    assert base + b"/incl" in paths
    assert base + b"/excl" not in paths


def test_exclusion_follows_a_running_process(source: object) -> None:
    """One process writes before, while and after it is excluded: each CPU's memo of "not excluded" (made by its
    first writes) must not outlive the exclusion, nor "excluded" the inclusion."""
    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)
    # the shell writes itself (a redirection, no child), so the same pid asks the kernel before and after
    script = 'while read step; do for i in 1 2 3 4 5 6 7 8; do : > "$0/$step-$i"; done; echo done; done'
    sh = subprocess.Popen(["sh", "-c", script, base], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sh.stdin is not None and sh.stdout is not None

    def step(name: str) -> set[bytes]:
        sh.stdin.write(name.encode() + b"\n")  # type: ignore[union-attr]
        sh.stdin.flush()  # type: ignore[union-attr]
        assert sh.stdout.readline() == b"done\n"  # type: ignore[union-attr]
        return {e.path for e in drain(source)} & {b"%s/%s-%d" % (base, name.encode(), i) for i in range(1, 9)}

    # another excluded process keeps the kernel's exclusion check on throughout, so its memo is used
    other = subprocess.Popen(["sleep", "60"])
    source.exclude_pid(other.pid)  # type: ignore[attr-defined]
    try:
        before = step("before")
        source.exclude_pid(sh.pid)  # type: ignore[attr-defined]
        during = step("during")
        source.include_pid(sh.pid)  # type: ignore[attr-defined]
        after = step("after")
    finally:
        source.include_pid(other.pid)  # type: ignore[attr-defined]
        other.kill()
        other.wait()
        sh.stdin.close()
        sh.wait(30)
    assert len(before) == 8
    assert during == set()
    assert len(after) == 8


def test_quiet_consumer_is_woken_by_the_first_record(source: object) -> None:
    """After a quiet spell the consumer may sleep on the descriptor with no timeout: the next record must wake it."""
    import select

    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)
    time.sleep(3 * source.wake_s)  # type: ignore[attr-defined]
    # quiet: a read once a second at most (for the io_uring counter), no polling at the wake interval
    assert source.poll_within() == IDLE_CHECK_S  # type: ignore[attr-defined]
    ep = select.epoll()
    ep.register(source.fileno(), select.EPOLLIN)  # type: ignore[attr-defined]
    try:
        t = subprocess.Popen(["sh", "-c", 'sleep 0.2; mkdir "$0/woken"', base])
        t0 = time.monotonic()
        ready = ep.poll(10)
        waited = time.monotonic() - t0
        t.wait(10)
    finally:
        ep.close()
    assert ready, "the ring buffer never signalled the new record"
    assert waited < 5
    assert [e.path for e in source.read(0)] == [base + b"/woken"]  # type: ignore[attr-defined]
    assert source.poll_within() is not None  # type: ignore[attr-defined]  # data seen: poll while it flows
    os.rmdir(base + b"/woken")


def test_records_waiting_right_after_a_batch_come_with_the_next_read_within_the_wake_interval(source: object) -> None:
    """A read that finds a few records just after a batch waits for more (at most the wake interval, not its own
    timeout) and then returns them; a read with timeout 0 returns them at once."""
    base: bytes = source.base  # type: ignore[attr-defined]
    drain(source, 0.1)

    def made(*names: str) -> None:
        # by a child: the source leaves out its own process
        subprocess.run(["mkdir", *(base + b"/" + n.encode() for n in names)], check=True)
        deadline = time.monotonic() + scaled(10)
        while source._rb.pending() == 0:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the records never reached the ring buffer"
            time.sleep(0.001)

    made("first")
    assert [e.path for e in source.read(0)] == [base + b"/first"]  # type: ignore[attr-defined]
    made("second", "third")
    t0 = time.monotonic()
    got = source.read(scaled(60))  # type: ignore[attr-defined]
    waited = time.monotonic() - t0
    assert [e.path for e in got] == [base + b"/second", base + b"/third"]
    assert waited < scaled(60) / 2, f"the read waited {waited:.1f} s with records there"
    made("fourth")
    assert [e.path for e in source.read(0)] == [base + b"/fourth"]  # type: ignore[attr-defined]
    for n in ("first", "second", "third", "fourth"):
        os.rmdir(base + b"/" + n.encode())


BURST_CHILD = """
import os, sys
d = sys.argv[1].encode()
n = int(sys.argv[2])
for i in range(n):
    p = b"%s/f%d" % (d, i)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    os.unlink(p)
"""


def _burst(src: object, d: bytes, n: int, *, read_while_running: bool) -> tuple[int, int]:
    """Run n create/close/unlink cycles in a child; return (events delivered for it, events counted lost)."""
    child = subprocess.Popen([sys.executable, "-c", BURST_CHILD, d, str(n)])
    delivered = lost = 0

    def take(batch: list[FileEvent]) -> None:
        nonlocal delivered, lost
        for e in batch:
            if e.op is Op.LOSS:
                lost += e.lost or 0
            elif e.pid == child.pid:
                delivered += 1

    while child.poll() is None:
        if read_while_running:
            take(src.read(0.05))  # type: ignore[attr-defined]
        else:
            time.sleep(0.05)
    assert child.returncode == 0
    take(drain(src))
    return delivered, lost


@pytest.mark.slow
def test_burst_nothing_lost_with_bulk_consumer() -> None:
    from kwatch.capture.bpf import BpfSource

    d = tempfile.mkdtemp(prefix="kwatch-burst-", dir="/tmp").encode()
    n = 70_000  # 210,000 events of at least 96 + 8 bytes each: over 20 MiB
    # A ring of 8 MiB holds well under half the burst, so only a consumer that keeps up loses nothing (with the
    # default 64 MiB the whole burst fits and a consumer that reads nothing until the end would pass too). The same
    # ring without a reader must lose (half the burst is still over 10 MiB), or the second half proves nothing.
    ring = 8 << 20
    with BpfSource(CaptureFilter.make(roots=[d]), ringbuf_bytes=ring, hooks="tracepoints") as src:
        delivered, lost = _burst(src, d, n // 2, read_while_running=False)
        assert lost > 0 and src.stats().lost == lost, (delivered, lost)
        delivered, lost = _burst(src, d, n, read_while_running=True)
    shutil.rmtree(d)
    assert (delivered, lost) == (3 * n, 0)


def assert_burst_losses_counted(hooks: str, n: int) -> None:
    """A 64 KiB ring that nobody reads during a burst of ``n`` x 3 events must overflow; each event is delivered or
    counted lost."""
    from kwatch.capture.bpf import BpfSource

    d = tempfile.mkdtemp(prefix="kwatch-lossy-", dir="/tmp").encode()
    with BpfSource(CaptureFilter.make(roots=[d]), ringbuf_bytes=64 << 10, hooks=hooks) as src:
        delivered, lost = _burst(src, d, n, read_while_running=False)
        assert src.stats().lost == lost
    shutil.rmtree(d)
    assert lost > 0
    # every event of the child is delivered or counted lost; the count may also hold events of other processes
    # that the kernel could not place outside the tree (a relative name from a directory above it, a name with "..")
    assert delivered < 3 * n
    assert delivered + lost >= 3 * n


def test_burst_losses_are_counted_not_silent() -> None:
    assert_burst_losses_counted("tracepoints", 5_000)


def test_names_outside_the_tree_are_not_delivered(source: object, tmp_path: Path) -> None:
    """Absolute names outside the roots, and relative ones with a directory part, reach userspace (they may go
    through a symlinked directory into the tree), which resolves their directory and drops them; a relative name
    without a directory part is placed by the kernel's walk of its base and dropped there. Neither is delivered."""
    drain(source, 0.1)
    outside = os.fsencode(tmp_path)
    subprocess.run([sys.executable, "-c", CHILD_PRELUDE + "os.chdir('/')\nfor i in range(50):\n"
                    "    p = d + b'/o%d' % i; os.mkdir(p); os.chmod(p, 0o700); os.rmdir(p)", outside], check=True)
    assert drain(source) == []
    subprocess.run([sys.executable, "-c", CHILD_PRELUDE + "os.chdir(d)\nfor i in range(50):\n"
                    "    p = b'o%d' % i; os.mkdir(p); os.chmod(p, 0o700); os.rmdir(p)", outside], check=True)
    assert drain(source) == []


def test_names_through_a_symlinked_directory_are_placed_in_the_tree(source: object, tmp_path: Path) -> None:
    """With lnk -> a watched directory, names passed through lnk (absolute, or relative from elsewhere with lnk
    as a directory part) are reported at their real place, with the name as passed in extra["via_symlink"].
    Before, they gave no event at all: the kernel dropped the absolute names as outside the tree."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"symdir")
    os.mkdir(d)
    for n in (b"a", b"b", b"c", b"e"):
        Path(os.fsdecode(os.path.join(d, n))).write_bytes(b"x")
    outside = os.fsencode(tmp_path)
    lnk = os.path.join(outside, b"lnk")
    os.symlink(d, lnk)
    drain(source, 0.1)
    body = (
        "lnk = d + b'/lnk'\n"
        "os.unlink(lnk + b'/a'); os.rename(lnk + b'/b', lnk + b'/b2'); os.chmod(lnk + b'/c', 0o600)\n"
        "os.mkdir(lnk + b'/m')\n"
        "os.chdir(d); os.unlink(b'lnk/e')\n"
    )
    p = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + body, outside], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    events = [e for e in drain(source) if e.op is not Op.LOSS and any(x.startswith(d + b"/") for x in e.paths())]
    got = [(e.op.name, e.path, e.new_path) for e in events]
    assert got == [
        ("UNLINK", d + b"/a", None),
        ("RENAME", d + b"/b", d + b"/b2"),
        ("CHMOD", d + b"/c", None),
        ("MKDIR", d + b"/m", None),
        ("UNLINK", d + b"/e", None),
    ]
    passed = [lnk + b"/a", lnk + b"/b", lnk + b"/c", lnk + b"/m", b"lnk/e"]
    assert [e.extra["via_symlink"] if e.extra else None for e in events][:4] == passed[:4]


URING = str(Path(__file__).parents[1] / "support" / "uring.py")


def test_io_uring_file_operations_become_a_rescan_marker(source: object) -> None:
    """io_uring operations pass no syscall tracepoint: the backend cannot say what they changed, so each batch of
    them becomes a LOSS marker of unknown count and place (the replicator rescans), never silence. kwatch's own
    process (this one) is excluded there too."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"uring")
    os.mkdir(d)
    drain(source, 0.1)
    import uring

    assert uring.main(["mkdirat", os.fsdecode(os.path.join(d, b"self"))]) == 0  # from the excluded process
    mine = [e for e in drain(source) if e.op is Op.LOSS and e.extra and e.extra.get("io_uring")]
    assert mine == [], "io_uring use by kwatch's own process must not count"
    for args in (["mkdirat", "x"], ["renameat", "x", "y"], ["unlinkat", "self/../nothing"]):
        argv = [args[0]] + [os.fsdecode(os.path.join(d, a.encode())) for a in args[1:]]
        subprocess.run([sys.executable, URING, *argv], check=args[0] != "unlinkat", timeout=60)
    assert os.path.isdir(os.path.join(d, b"y"))
    events = drain(source)
    markers = [e for e in events if e.op is Op.LOSS and e.extra and e.extra.get("io_uring")]
    assert markers, f"io_uring mkdirat/renameat/unlinkat under a watched tree gave no marker: {events}"
    assert sum(int(e.extra["io_uring"]) for e in markers) >= 3  # type: ignore[index, call-overload]
    assert all(e.path == b"/" and e.lost is None for e in markers)



# Runs as `unshare -m python -c NS_CHILD DIR` and prints its pid and mount namespace: in a mount
# namespace of its own, DIR/real is bound over DIR/view, so DIR/view/... names files that the host sees at DIR/real.
NS_CHILD = """
import os, subprocess, sys
d = sys.argv[1]
subprocess.run(["mount", "--bind", d + "/real", d + "/view"], check=True)
print(os.getpid(), os.stat("/proc/self/ns/mnt").st_ino, flush=True)
v = d + "/view"
os.close(os.open(v + "/f", os.O_WRONLY | os.O_CREAT, 0o644))
os.mkdir(v + "/m")
os.rename(v + "/f", v + "/g")
"""


def _in_own_mount_namespace(d: bytes) -> tuple[int, int]:
    """Run NS_CHILD on d in a new mount namespace: (its pid, its namespace's inode number)."""
    os.makedirs(d + b"/real")
    os.makedirs(d + b"/view")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", NS_CHILD, d],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert os.listdir(d + b"/view") == [] and sorted(os.listdir(d + b"/real")) == [b"g", b"m"]
    pid, ns = map(int, p.stdout.split())
    assert ns != os.stat("/proc/self/ns/mnt").st_ino
    return pid, ns


def test_paths_of_another_mount_namespace_are_flagged(source: object, tmp_path: Path) -> None:
    """Watching the whole system, a process in a mount namespace of its own (unshare -m, a bind mount there) is
    reported with the paths it used, which are not host paths (the host has the files under real/, not view/):
    each event says so by its namespace."""
    from kwatch.capture.bpf import BpfSource

    d = os.fsencode(tmp_path)
    with BpfSource(CaptureFilter(), obj_path=source.object_path) as whole:  # type: ignore[attr-defined]
        drain(whole, 0.1)
        pid, ns = _in_own_mount_namespace(d)
        mine = [e for e in drain(whole) if e.pid == pid and e.op is not Op.LOSS and e.path.startswith(d + b"/")]
    v = d + b"/view"
    assert [(e.op.name, e.path, e.new_path) for e in mine] == [
        ("CREATE", v + b"/f", None), ("CLOSE_WRITE", v + b"/f", None), ("MKDIR", v + b"/m", None),
        ("RENAME", v + b"/f", v + b"/g"),
    ]
    assert [e.mntns for e in mine] == [ns] * 4


def test_changes_in_another_mount_namespace_become_a_rescan_marker(source: object) -> None:
    """Under watched roots (host paths), the same changes are not delivered with paths that would be taken for the
    host's (view/ has nothing on the host): they become one LOSS marker of unknown place naming the namespace (the
    replicator rescans). A change by a process of kwatch's namespace is an event as always."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"mntns")
    os.mkdir(d)
    drain(source, 0.1)
    _, ns = _in_own_mount_namespace(d)
    subprocess.run([sys.executable, "-c", CHILD_PRELUDE + "touch(d + b'/real/h')", d], check=True, timeout=60)
    events = drain(source)
    markers = [e for e in events if e.op is Op.LOSS and e.extra and e.extra.get("mount_namespace") == ns]
    assert [(e.path, e.lost, e.mntns, e.extra) for e in markers] == [
        (b"/", None, None, {"mount_namespace": ns, "events": 4})]
    assert [(e.op.name, e.path, e.mntns) for e in events if e.op is not Op.LOSS] == [
        ("CREATE", d + b"/real/h", None), ("CLOSE_WRITE", d + b"/real/h", None)]


# Runs as `unshare -m python -c LIVE_NS_CHILD DIR BIND`: in a mount namespace of its own (with DIR/real bound over
# DIR/view when BIND is 1), creates DIR/view/f, prints its pid and namespace, and stays alive until its stdin closes.
LIVE_NS_CHILD = """
import os, subprocess, sys
d, bind = sys.argv[1], sys.argv[2] == "1"
if bind:
    subprocess.run(["mount", "--bind", d + "/real", d + "/view"], check=True)
os.close(os.open(d + "/view/f", os.O_WRONLY | os.O_CREAT, 0o644))
print(os.getpid(), os.stat("/proc/self/ns/mnt").st_ino, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("bind", [False, True], ids=["same-mounts", "bind-mount"])
def test_a_live_process_of_another_mount_namespace_is_kept_when_its_paths_name_the_same_files_here(
        source: object, bind: bool) -> None:
    """Under watched roots, a change by a process in another mount namespace is an event, with its namespace, when
    its path names the same directory from kwatch's namespace (``unshare -m`` copied the host's mounts: a container
    writing to a volume mounted at the same path); when a bind mount there makes the path name other files (view/
    is real/ in its namespace, an empty directory here), its changes are a marker of unknown place, as for a
    process that has exited (test_changes_in_another_mount_namespace_become_a_rescan_marker)."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"live-ns-bind" if bind else b"live-ns")
    os.makedirs(d + b"/real")
    os.makedirs(d + b"/view")
    drain(source, 0.1)
    child = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-c", LIVE_NS_CHILD, d,
                              "1" if bind else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        pid, ns = map(int, child.stdout.readline().split())
        assert ns != os.stat("/proc/self/ns/mnt").st_ino
        events = drain(source)  # read while the process is alive: its root can be looked through
    finally:
        child.communicate(b"", timeout=60)
    mine = [(e.op.name, e.path, e.mntns) for e in events if e.op is not Op.LOSS and e.pid == pid]
    markers = [e.extra for e in events if e.op is Op.LOSS and e.extra and e.extra.get("mount_namespace") == ns]
    if bind:
        assert mine == [] and markers == [{"mount_namespace": ns, "events": 2}], events
    else:
        assert mine == [("CREATE", d + b"/view/f", ns), ("CLOSE_WRITE", d + b"/view/f", ns)], events
        assert markers == [], events


# Runs as `unshare -m python -c PRIVATE_NS_CHILD DIR`: mounts a tmpfs of its namespace's own on DIR and changes it by
# absolute names through short-lived commands (gone by the read), prints its pid and namespace, and stays alive
# until its stdin closes: a container's own files.
PRIVATE_NS_CHILD = """
import os, subprocess, sys
p = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "kwatch-test", p], check=True)
for argv in (["mkdir", p + "/a"], ["mv", p + "/a", p + "/b"], ["rmdir", p + "/b"]):
    subprocess.run(argv, check=True)
print(os.getpid(), os.stat("/proc/self/ns/mnt").st_ino, flush=True)
sys.stdin.read()
"""


def test_changes_to_another_mount_namespace_s_own_file_system_are_no_loss_for_a_watched_tree(source: object) -> None:
    """Under watched roots, the absolute names a process of another mount namespace changes on a file system no
    watched root is on (a container's own root or tmpfs) are not in any watched tree: the kernel leaves them to
    userspace (any absolute name may pass a symlinked directory), which looks them up through a live process of
    that namespace, here after the commands that made them have exited, and drops them instead of raising a
    loss marker (a rescan of every replicated tree) for each container's mkdir."""
    base: bytes = source.base  # type: ignore[attr-defined]
    outside = tempfile.mkdtemp(prefix="kwatch-private-ns-", dir="/tmp").encode()
    drain(source, 0.1)
    filtered = source.stats().filtered  # type: ignore[attr-defined]
    child = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-c", PRIVATE_NS_CHILD,
                              outside], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        _, ns = map(int, child.stdout.readline().split())
        events = drain(source)
        filtered = source.stats().filtered - filtered  # type: ignore[attr-defined]
    finally:
        child.communicate(b"", timeout=60)
        os.rmdir(outside)
    assert [e for e in events if e.op is Op.LOSS and e.extra and e.extra.get("mount_namespace") == ns] == [], events
    assert [e for e in events if e.path.startswith(outside)] == []
    assert not [e for e in events if e.op is not Op.LOSS and not e.path.startswith(base)], events
    # the kernel did send them (mkdir, the rename and rmdir by absolute name): dropped here, not lost on the way
    assert filtered >= 3


# Runs as `unshare -m python -c PIVOT_CHILD NEWROOT VOLUME`: in a mount namespace of its own, binds NEWROOT over
# itself (pivot_root wants a mount point), binds VOLUME (when not empty) at NEWROOT/vol, pivot_roots into NEWROOT and
# detaches the old root, then writes by absolute names and by names relative to a directory of the new root; prints
# its pid and stays alive until its stdin closes. Nothing is imported after the pivot (the old root,
# and with it Python's library, is gone).
PIVOT_CHILD = """
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
nr, vol = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "--bind", nr, nr], check=True)
if vol:
    subprocess.run(["mount", "--bind", vol, nr + "/vol"], check=True)
os.chdir(nr)
if libc.syscall(155, b".", b"old") != 0:  # SYS_pivot_root on x86_64
    raise OSError(ctypes.get_errno(), "pivot_root")
os.chdir("/")
if libc.umount2(b"/old", 2) != 0:  # MNT_DETACH
    raise OSError(ctypes.get_errno(), "umount2")
top = "/vol" if vol else "/data"
os.close(os.open(top + "/f", os.O_WRONLY | os.O_CREAT, 0o644))
os.mkdir(top + "/m")
os.rename(top + "/f", top + "/g")
os.chdir(top + "/m")
os.close(os.open("h", os.O_WRONLY | os.O_CREAT, 0o644))
print(os.getpid(), flush=True)  # no /proc in the new root: the test reads the namespace from its own
sys.stdin.read()
"""


@pytest.mark.parametrize("where", ["root-in-tree", "volume-from-tree"])
def test_a_pivot_rooted_process_is_never_reported_under_a_wrong_host_path(source: object, where: str) -> None:
    """A process that pivot_roots (``unshare -m``, a bind-mounted new root) and writes: its names are from its new
    root, not from kwatch's. root-in-tree: the new root is a directory of the watched tree (a container's root file
    system kept there); volume-from-tree: the new root is elsewhere and the watched tree is bound into it at /vol (a
    container's volume). Each record of its changes either names the changed file as kwatch's namespace names it,
    or is a LOSS marker of its namespace (the replicator rescans); never a path that names another file here. The
    changes are inside the watched tree, so none is silent: the walks of their paths pass no watched directory (they
    follow the new root's mounts), the file system's directories above the mount's root do (kw_common.h)."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"pivot-" + where.encode())
    if where == "root-in-tree":
        nr, vol, top = d + b"/nr", b"", d + b"/nr/data"
        os.makedirs(top)
    else:
        outside = tempfile.mkdtemp(prefix="kwatch-pivot-", dir="/tmp").encode()
        nr, vol, top = outside + b"/nr", d, d
        os.makedirs(nr + b"/vol")
        os.makedirs(d)
    os.makedirs(nr + b"/old")
    drain(source, 0.1)
    child = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-c", PIVOT_CHILD, nr,
                              vol], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else b""
        pid = int(line)
        ns = os.stat(b"/proc/%d/ns/mnt" % pid).st_ino
        assert ns != os.stat("/proc/self/ns/mnt").st_ino
        events = drain(source)  # while the process is alive: its root can be looked through
    finally:
        child.communicate(b"", timeout=60)
        if where != "root-in-tree":
            shutil.rmtree(os.path.dirname(nr), ignore_errors=True)
    assert sorted(os.listdir(top)) == [b"g", b"m"] and os.listdir(top + b"/m") == [b"h"]
    changed = {top + b"/f", top + b"/g", top + b"/m", top + b"/m/h"}
    mine = [e for e in events if e.op is not Op.LOSS and e.pid == pid]
    wrong = [e for e in mine if not {e.path, e.new_path} - {None} <= changed]
    assert wrong == [], f"paths that name other files here: {wrong}"
    markers = [e for e in events if e.op is Op.LOSS and e.extra and e.extra.get("mount_namespace") == ns]
    # CREATE f, CLOSE_WRITE f, MKDIR m, RENAME f g, CREATE h, CLOSE_WRITE h: each one an event or counted in a marker
    assert len(mine) + sum(int(e.extra["events"]) for e in markers) == 6, events  # type: ignore[index, call-overload]

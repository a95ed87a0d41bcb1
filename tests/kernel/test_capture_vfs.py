"""The BPF backend's VFS program (fentry/fexit on VFS functions, bpf/kwatch_vfs.bpf.c) against the real kernel.

The tracepoint program's whole table (tests/kernel/test_capture_bpf.py) runs here against the VFS program, with the
same exact sequences except where the VFS hooks are right and the tracepoints are not (CLOSE_WRITE once per last
close: ``Case.expected_vfs``); then what only the VFS hooks see: io_uring operations as events, names through a
symlinked directory and ``..`` after a symlink placed by the kernel, and the name the kernel used when another
thread rewrites the buffer during the call.

Where the kernel refuses fentry programs (this development VM: EPERM) every test here is skipped, an allowed skip
(tests/conftest.py); the kernel matrix's guests (6.1, 6.12) attach them and run it all:
``make test-kernels KERNEL_PYTEST_ARGS="-k vfs"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_capture_bpf import (  # the shared table and the tests that take any source  # noqa: F401
    CHILD_PRELUDE,
    URING,
    drain,
    test_a_live_process_of_another_mount_namespace_is_kept_when_its_paths_name_the_same_files_here,
    test_a_pivot_rooted_process_is_never_reported_under_a_wrong_host_path,
    test_changes_in_another_mount_namespace_become_a_rescan_marker,
    test_events_outside_roots_are_not_delivered,
    test_exclude_pid_covers_descendants,
    test_exclusion_follows_a_running_process,
    test_names_outside_the_tree_are_not_delivered,
    test_paths_of_another_mount_namespace_are_flagged,
    test_quiet_consumer_is_woken_by_the_first_record,
    test_record_names_the_thread_and_the_cgroup,
    test_self_is_excluded,
    test_workload,
)

from kwatch.capture.base import CaptureFilter
from kwatch.events import FileEvent, Op

pytestmark = pytest.mark.root


def _skip_unless_fentry() -> None:
    from kwatch.capture.bpf import fentry_refused

    why = fentry_refused()
    if why is not None:
        pytest.skip("the kernel refuses fentry programs, the VFS hooks cannot load here: " + why.splitlines()[0])


@pytest.fixture(scope="module")
def source() -> Iterator[object]:
    """The backend as `--backend bpf` loads it where fentry attaches: the VFS program (the first build the kernel
    accepts: the probe-read one on 6.1)."""
    _skip_unless_fentry()
    from kwatch.capture.bpf import BpfSource

    base = tempfile.mkdtemp(prefix="kwatch-vfs-", dir="/tmp")
    os.chmod(base, 0o755)
    src = BpfSource(CaptureFilter.make(roots=[base]))
    src.base = os.fsencode(base)  # type: ignore[attr-defined]
    try:
        assert src.hooks == "vfs", f"fentry attaches here, yet --backend bpf took {src.object_path}: {src.refused}"
        yield src
    finally:
        src.close()
        shutil.rmtree(base, ignore_errors=True)


def test_the_probe_read_build_gives_the_same_records(tmp_path: Path) -> None:
    """The VFS program built for kernels without bpf_rdonly_cast() (KW_PROBE_READ) loads wherever fentry does and
    records what the default build records."""
    _skip_unless_fentry()
    from kwatch.capture.bpf import VFS_PROBE_READ_OBJECT, BpfSource

    d = os.fsencode(tmp_path)
    with BpfSource(CaptureFilter.make(roots=[d]), obj_path=VFS_PROBE_READ_OBJECT) as src:
        assert src.hooks == "vfs"
        body = "touch(d + b'/f'); os.rename(d + b'/f', d + b'/g'); os.chmod(d + b'/g', 0o600); os.unlink(d + b'/g')"
        p = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + body, d], timeout=60)
        assert p.returncode == 0
        got = [(e.op.name, e.path, e.new_path) for e in drain(src) if e.op is not Op.LOSS]
    assert got == [("CREATE", d + b"/f", None), ("CLOSE_WRITE", d + b"/f", None), ("RENAME", d + b"/f", d + b"/g"),
                   ("CHMOD", d + b"/g", None), ("UNLINK", d + b"/g", None)]


def _mine(source: object, d: bytes) -> list[FileEvent]:
    return [e for e in drain(source) if e.op is not Op.LOSS and any(x.startswith(d + b"/") for x in e.paths())]


def test_names_through_a_symlinked_directory_are_the_kernels(source: object, tmp_path: Path) -> None:
    """With lnk -> a watched directory, names passed through lnk come out at their real place, placed by the kernel
    (no userspace resolution: no extra["via_symlink"]), and ``lnk/..`` is the real directory's parent, not the
    link's (the tracepoints resolve ".." as text)."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"symdir")
    os.mkdir(d)
    for n in (b"a", b"b", b"c", b"e"):
        Path(os.fsdecode(os.path.join(d, n))).write_bytes(b"x")
    lnk = os.path.join(os.fsencode(tmp_path), b"lnk")
    os.symlink(d, lnk)
    drain(source, 0.1)
    body = (
        "lnk = d + b'/lnk'\n"
        "os.unlink(lnk + b'/a'); os.rename(lnk + b'/b', lnk + b'/b2'); os.chmod(lnk + b'/c', 0o600)\n"
        "os.mkdir(lnk + b'/m'); os.mkdir(lnk + b'/../dotdot')\n"
        "os.chdir(d); os.unlink(b'lnk/e')\n"
    )
    p = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + body, tmp_path])
    assert p.wait(60) == 0
    events = [e for e in drain(source) if e.op is not Op.LOSS and any(x.startswith(base + b"/") for x in e.paths())]
    assert [(e.op.name, e.path, e.new_path) for e in events] == [
        ("UNLINK", d + b"/a", None),
        ("RENAME", d + b"/b", d + b"/b2"),
        ("CHMOD", d + b"/c", None),
        ("MKDIR", d + b"/m", None),
        ("MKDIR", base + b"/dotdot", None),
        ("UNLINK", d + b"/e", None),
    ]
    assert not any(e.extra for e in events)
    assert all(e.pid == p.pid for e in events)


def test_io_uring_file_operations_are_events(source: object) -> None:
    """io_uring's mkdirat, renameat and unlinkat are events with their paths, from the submitting process (io_uring
    runs them in a worker thread of that process), and no rescan marker comes."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"uring")
    os.mkdir(d)
    Path(os.fsdecode(d + b"/f")).write_bytes(b"x")
    drain(source, 0.1)
    pids = []
    for args in (["mkdirat", "x"], ["renameat", "x", "y"], ["unlinkat", "f"]):
        argv = [args[0]] + [os.fsdecode(os.path.join(d, a.encode())) for a in args[1:]]
        p = subprocess.Popen([sys.executable, URING, *argv])
        assert p.wait(60) == 0
        pids.append(p.pid)
    events = drain(source)
    assert not [e for e in events if e.op is Op.LOSS], "the VFS hooks see io_uring: no rescan marker"
    mine = [e for e in events if any(x.startswith(d + b"/") for x in e.paths())]
    assert [(e.op.name, e.path, e.new_path, e.pid) for e in mine] == [
        ("MKDIR", d + b"/x", None, pids[0]), ("RENAME", d + b"/x", d + b"/y", pids[1]), ("UNLINK", d + b"/f", None, pids[2])]


def test_a_chmod_through_a_proc_fd_link_is_seen(source: object) -> None:
    """tar sets a directory's mode by openat(O_PATH) then chmod("/proc/self/fd/N") (glibc's fchmodat with
    AT_SYMLINK_NOFOLLOW); the kernel follows the magic link to the directory, and so do the VFS hooks. The syscall
    tracepoints see only the string and lose it (94 directory modes per untar of the benchmark's tree)."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"procfd")
    os.mkdir(d)
    drain(source, 0.1)
    body = "fd = os.open(d, os.O_PATH); os.chmod(b'/proc/self/fd/%d' % fd, 0o750); os.close(fd)"
    p = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + body, d])
    assert p.wait(60) == 0
    events = [e for e in drain(source) if e.op is not Op.LOSS and e.path.startswith(base + b"/")]
    assert [(e.op.name, e.path, e.mode, e.pid) for e in events] == [("CHMOD", d, 0o750, p.pid)]


RACE_CHILD = """
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
d = os.fsencode(sys.argv[1])
n = int(sys.argv[2])
buf = ctypes.create_string_buffer(d + b"/a00000", 64)
at = len(d) + 1  # the byte another thread flips between 'a' and 'b' while the kernel works on the name
stop = False
def flip():
    while not stop:
        buf[at] = b"b"
        buf[at] = b"a"
t = threading.Thread(target=flip)
t.start()
for i in range(n):
    ctypes.memmove(ctypes.addressof(buf) + at + 1, b"%05d" % i, 5)
    libc.mkdir(buf, 0o755)
stop = True
t.join()
"""


def test_a_name_rewritten_by_another_thread_is_the_one_the_kernel_used(source: object) -> None:
    """One thread makes directories while another keeps rewriting the name's first byte: whichever name each mkdir
    got, the event names the directory that exists (the tracepoints read the buffer again at syscall exit, after
    the kernel used it, and may name the other one)."""
    base: bytes = source.base  # type: ignore[attr-defined]
    d = os.path.join(base, b"race")
    os.mkdir(d)
    drain(source, 0.1)
    n = 300
    p = subprocess.run([sys.executable, "-c", RACE_CHILD, d, str(n)], timeout=300)
    assert p.returncode == 0
    made = sorted(os.listdir(d))
    got = sorted(os.path.basename(e.path) for e in _mine(source, d) if e.op is Op.MKDIR)
    assert len(made) == n
    assert got == made


def test_losses_are_counted_not_silent_on_the_vfs_hooks() -> None:
    """A 64 KiB ring nobody reads during a burst overflows: every event is delivered or counted lost."""
    _skip_unless_fentry()
    from test_capture_bpf import assert_burst_losses_counted

    assert_burst_losses_counted("vfs", 2_000)

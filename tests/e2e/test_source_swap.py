"""Source-side symlink swaps: a directory of the source replaced by a symlink between planning and opening.

kwatch reads the source as root. A user who owns a directory there can swap it for a symlink to a directory of
root's (``renameat2(RENAME_EXCHANGE)`` in a loop) after the plan named a file under it and before kwatch opens that
file. The hook below does the swap at exactly that moment (it wraps the opening step), so the race is won every
time; the canary's bytes must never reach the mirror, on the agent path and on the rsync:// path (real daemon).
A FIFO swapped in for a file must not hang the sender either.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from rsyncd import RsyncDaemon

from kwatch.events import FileEvent, Op
from kwatch.replicate import rsync_transport
from kwatch.replicate.agent_transport import AgentSender
from kwatch.replicate.engine import Replicator, Target, TargetOptions
from kwatch.replicate.scan import scan

CANARY = b"root-only canary: must never be replicated\n"


def make_world(tmp_path: Path) -> tuple[Path, Path]:
    """``src/d/f`` (public) and ``canary/f`` (root's secret) with the same relative name under each directory."""
    src, canary = tmp_path / "src", tmp_path / "canary"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"public v1\n")
    canary.mkdir(mode=0o700)
    (canary / "f").write_bytes(CANARY)
    os.chmod(canary / "f", 0o600)
    return src, canary


def swap_to_link(src: Path, canary: Path) -> None:
    """What the attacker does: ``d`` becomes a symlink to the canary directory (its old content moved aside)."""
    os.rename(src / "d", src / "d.moved")
    os.symlink(canary, src / "d")


def swap_to_fifo(src: Path, canary: Path) -> None:
    os.unlink(src / "d" / "f")
    os.mkfifo(src / "d" / "f")


def leaked(tree: Path) -> list[str]:
    """Files under ``tree`` that hold the canary's bytes (symlinks are not followed)."""
    found = []
    for dp, _dirs, files in os.walk(tree):
        for n in files:
            p = Path(dp) / n
            if p.is_file() and not p.is_symlink() and CANARY in p.read_bytes():
                found.append(str(p.relative_to(tree)))
    return found


def once(swap: Callable[[], None]) -> Callable[[], None]:
    done = threading.Event()

    def run() -> None:
        if not done.is_set():
            done.set()
            swap()
    return run


SWAPS = [("directory becomes a symlink", swap_to_link), ("file becomes a fifo", swap_to_fifo)]


def run_bounded(fn: Callable[[], Any], unblock: Callable[[], None], timeout: float = 120) -> Any:
    """Run ``fn`` in a thread; fail if it is still running after ``timeout`` (then ``unblock`` lets it end)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        unblock()
        t.join(30)
        pytest.fail(f"the sender hung for {timeout}s opening a source file")
    if errors:
        raise errors[0]
    return result[0]


def open_fifo_writer(src: Path) -> None:
    """Let a reader blocked on ``src/d/f`` (a fifo) go: open and close its write end."""
    fifo = src / "d" / "f"
    if fifo.exists():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)


@pytest.mark.parametrize(("name", "swap"), SWAPS, ids=[s[0] for s in SWAPS])
def test_agent_path_reads_only_beneath_the_source(name: str, swap: Callable[[Path, Path], None], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src, canary = make_world(tmp_path)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01, max_delay=30.0))
    try:
        rep.coalescer.rescan(b"")
        rep.sync_now(rep.coalescer.take(time.monotonic()))
        assert (mirror / "d" / "f").read_bytes() == b"public v1\n"
        (src / "d" / "f").write_bytes(b"public v2, longer\n")
        now = time.monotonic()
        rep.coalescer.add(FileEvent(Op.CLOSE_WRITE, os.fsencode(src / "d" / "f")), now)
        batch = rep.coalescer.take(now)
        # the hook: the plan is made (d/f is a file to send); the swap happens just before the source is opened
        hook = once(lambda: swap(src, canary))
        real = AgentSender._open_source

        def opening(self: AgentSender, rel: bytes) -> Any:
            hook()
            return real(self, rel)

        monkeypatch.setattr(AgentSender, "_open_source", opening)
        run_bounded(lambda: rep.sync_now(batch), lambda: open_fifo_writer(src))
        assert leaked(mirror) == [], "bytes of a file outside the source reached the mirror"
        assert (mirror / "d" / "f").read_bytes() == b"public v1\n", "the mirror's copy was replaced"
    finally:
        rep.stop()
    assert (canary / "f").read_bytes() == CANARY


@pytest.mark.parametrize(("name", "swap"), SWAPS, ids=[s[0] for s in SWAPS])
def test_rsync_path_reads_only_beneath_the_source(name: str, swap: Callable[[Path, Path], None], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src, canary = make_world(tmp_path)
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        mirror = d.module_path("push")
        res = rsync_transport.push(os.fsencode(src), d.url("push"), [b"d/f"])
        assert not res.errors and (mirror / "d" / "f").read_bytes() == b"public v1\n"
        (src / "d" / "f").write_bytes(b"public v2, longer\n")
        # the hook: the file list (with d/f) is built and sent; the swap happens as the daemon asks for d/f's data
        hook = once(lambda: swap(src, canary))
        real = rsync_transport._send_one

        def sending(*args: Any) -> None:
            hook()
            real(*args)

        monkeypatch.setattr(rsync_transport, "_send_one", sending)
        res = run_bounded(lambda: rsync_transport.push(os.fsencode(src), d.url("push"), [b"d/f"], timeout=60),
                          lambda: open_fifo_writer(src))
        assert res.errors, "the swapped file was sent as if nothing happened"
        assert leaked(mirror) == [], "bytes of a file outside the source reached the mirror"
    assert (canary / "f").read_bytes() == CANARY


def test_scan_does_not_descend_into_a_directory_swapped_during_the_walk(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The root is listed (``d`` is a directory, stat'ed as one), then ``d`` becomes a symlink to the canary as the
    walk goes into it: the scan lists nothing of the canary (names, sizes or checksums)."""
    src, canary = make_world(tmp_path)
    (canary / "only-in-canary").write_bytes(b"x")
    real = os.scandir
    calls = [0]

    def listing(path: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # going into d
            swap_to_link(src, canary)
        return real(path)

    monkeypatch.setattr(os, "scandir", listing)
    man = scan(os.fsencode(src), checksum=True)
    monkeypatch.undo()
    canary_digest = xxhash.xxh3_128_digest(CANARY)
    assert all(e.digest != canary_digest and e.size != len(CANARY) for e in man.entries.values()), man.entries
    assert b"d/only-in-canary" not in man.entries, sorted(man.entries)


def test_rsync_file_list_does_not_descend_into_a_directory_swapped_during_the_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same swap as above while the rsync:// path builds its file list (names, sizes and link targets would go
    to the daemon)."""
    src, canary = make_world(tmp_path)
    (canary / "only-in-canary").write_bytes(b"x")
    os.symlink(b"/root/secret-target", canary / "canary-link")
    real = os.scandir
    calls = [0]

    def listing(path: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # going into d
            swap_to_link(src, canary)
        return real(path)

    monkeypatch.setattr(os, "scandir", listing)
    entries = rsync_transport.scan_tree(os.fsencode(src))
    monkeypatch.undo()
    names = {e.name for e in entries}
    assert not names & {b"d/only-in-canary", b"d/canary-link"}, sorted(names)
    assert all(e.link_target != b"/root/secret-target" for e in entries)


SHRINK_CHILD = r"""
import os, sys
from kwatch.fsutil import DirFds
from kwatch.replicate import rsync_transport
src, url, when = os.fsencode(sys.argv[1]), sys.argv[2], sys.argv[3]
real_open, real_send = DirFds.open_regular, rsync_transport.PushSession.send_file
real_literal = rsync_transport.PushSession.send_literal

def opening(self, rel):
    fd, st = real_open(self, rel)
    if when == "opened":
        os.truncate(os.path.join(src, rel), 0)  # the file's owner, right after kwatch took its size (root: an fd)
    return fd, st

def sending(self, ndx, data):
    if when == "reading":
        os.truncate(os.path.join(src, b"big"), 0)  # while kwatch reads it
    return real_send(self, ndx, data)

def sending_literal(self, ndx, chunks):  # a new file: read in pieces as it is sent
    if when == "reading":
        os.truncate(os.path.join(src, b"big"), 0)
    return real_literal(self, ndx, chunks)

DirFds.open_regular = opening
rsync_transport.PushSession.send_file = sending
rsync_transport.PushSession.send_literal = sending_literal
res = rsync_transport.push(src, url, [b"big"], timeout=60)
print("errors", res.errors, "files", res.files)
"""


@pytest.mark.parametrize("when", ["opened", "reading"])
def test_rsync_path_survives_a_file_shrunk_while_it_is_read(when: str, tmp_path: Path) -> None:
    """A user truncates their own file after the sender opened it: the sender must not die (an exception, or SIGBUS
    on a mapping past the new end of file) and the mirror never holds bytes the file did not have at some point.
    A child process runs the push: SIGBUS would take pytest down with it."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(4 << 20)
    (src / "big").write_bytes(data)
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        r = subprocess.run([sys.executable, "-c", SHRINK_CHILD, str(src), d.url("push"), when], capture_output=True,
                           timeout=120)
        assert r.returncode == 0, f"the sender died ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}"
        got = d.module_path("push") / "big"
        if got.exists():
            assert got.read_bytes() in (b"", data), "the mirror holds bytes the file never had"

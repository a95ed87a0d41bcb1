"""Files open for writing are not sent mid-write. A real process holds a half-written file open while ``kwatch
replicate`` is killed and restarted (it never saw the open; it finds it in /proc) or while its agent is killed (the
reconnect's reconcile knows the open from events): the mirror keeps what it had until the close, then gets the whole
file (live BPF capture, a real agent on a pipe). In-process: a file opened for writing after its batch was taken
and read half-written is not landed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from treecmp import assert_trees_equal

from kwatch.events import FileEvent, Op
from kwatch.replicate.engine import Replicator, Target, TargetOptions

CONVERGE = 60.0
SIZE = 2 << 20

# writes the first half of a file in one write(2), says so, waits for a line, writes the rest and closes
WRITER = r"""
import os, sys
path, size = sys.argv[1].encode(), int(sys.argv[2])
data = bytes(range(256)) * (size // 256)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, data[: size // 2])
print("half", flush=True)
sys.stdin.readline()
os.write(fd, data[size // 2 :])
os.close(fd)
"""


def _full() -> bytes:
    return bytes(range(256)) * (SIZE // 256)


class Writer:
    """A process holding ``path`` open for writing, half written, until :meth:`finish`."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(SIZE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"half\n"

    def finish(self) -> None:
        self.proc.communicate(b"go\n", timeout=30)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _wait_file(path: Path, data: bytes, live: LiveReplicate, offset: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes() == data):
        assert time.monotonic() < deadline, f"{path} did not arrive:\n{live.log_text(offset)[-3000:]}"
        time.sleep(0.05)


def _mirror_state(mirror: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in mirror.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("kill", ["daemon", "agent"])
def test_a_file_open_for_writing_is_not_sent_mid_write_by_a_reconcile(kill: str, tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    (src / "old").write_bytes(b"version 1")
    (src / "steady").write_bytes(b"never open")
    # a long max_delay: only the close may send these files within the test (see Coalescer.take for the escape)
    live = LiveReplicate(src, [str(mirror)], tmp_path / "replicate.log", ["--max-delay", "30"])
    writers: list[Writer] = []
    with live:
        wait_identical(src, mirror, CONVERGE, what="before the writers", live=live)
        writers = [Writer(src / "new"), Writer(src / "old")]  # a new file, and a rewrite of one the mirror has
        try:
            offset = live.log_size()
            if kill == "daemon":
                live.kill9()
                live.start()  # waits for the restart's reconcile
            else:
                os.kill(live.agent_pids()[str(mirror)], signal.SIGKILL)
            # the next batch finds the agent dead, reconnects and reconciles the whole tree, this file with it
            (src / "later").write_bytes(b"a change after the kill")
            _wait_file(mirror / "later", b"a change after the kill", live, offset)
            if kill == "agent":
                assert "agent up" in live.log_text(offset)
            time.sleep(0.5)  # a few more batches
            got = _mirror_state(mirror)
            assert "new" not in got, f"a half-written file reached the mirror ({len(got['new'])} bytes)"
            assert got["old"] == b"version 1", f"the mirror's copy was replaced mid-write ({len(got['old'])} bytes)"
            if kill == "daemon":  # the restarted daemon never saw the opens: it found them in /proc
                assert "2 files open for writing wait for their close" in live.log_text(offset)
            for w in writers:
                w.finish()
        finally:
            for w in writers:
                w.kill()
        # well before max_delay (30 s from the hold's start) ends the holds: the closes released them (the BPF
        # backend reports CLOSE_WRITE for a descriptor opened before the daemon started)
        wait_identical(src, mirror, 15.0, what="after the writers closed", live=live)
        assert (mirror / "new").read_bytes() == (mirror / "old").read_bytes() == _full()
        assert live.stop() == 0


def test_a_file_opened_after_the_take_and_read_mid_write_is_not_landed(tmp_path: Path) -> None:
    """The batch is read seconds after its take at times (a reconcile, a slow target): a writer that opened the file
    meanwhile and is descheduled mid-write shows a stable prefix (size and times do not move during the read). The
    events queued meanwhile say the file is open: the read is dropped, and the close sends the whole file."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    (src / "f").write_bytes(b"version 1")
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01, max_delay=30.0))
    writer: Writer | None = None
    try:
        rep.coalescer.rescan(b"")
        rep.sync_now(rep.coalescer.take(time.monotonic()))
        assert (mirror / "f").read_bytes() == b"version 1"
        rep.coalescer.add(FileEvent(Op.CLOSE_WRITE, os.fsencode(src / "f")), time.monotonic())
        batch = rep.coalescer.take(time.monotonic())  # f is dirty and, as far as the coalescer knows, closed
        writer = Writer(src / "f")  # then a writer opens it, writes half and stalls
        rep.feed([FileEvent(Op.OPEN_WRITE, os.fsencode(src / "f"))])  # its event arrives while the batch is sent
        r = rep.sync_now(batch)
        assert not r.errors, "a read dropped on purpose is not an error"
        assert (mirror / "f").read_bytes() == b"version 1", "a half-written file landed under its final name"
        writer.finish()
        rep.feed([FileEvent(Op.CLOSE_WRITE, os.fsencode(src / "f"))])
        rep.start()
        deadline = time.monotonic() + 30
        while (mirror / "f").read_bytes() != _full():
            assert time.monotonic() < deadline, "the closed file did not follow"
            time.sleep(0.05)
        assert_trees_equal(src, mirror)
    finally:
        if writer is not None:
            writer.kill()
        rep.stop()

"""Files open for writing are not sent mid-write. A real process holds a half-written file open while ``kwatch
replicate`` is killed and restarted (it never saw the open; it finds it in /proc) or while its agent is killed (the
reconnect's reconcile knows the open from events): the mirror keeps what it had until the close, then gets the whole
file (live BPF capture, a real agent on a pipe). In-process: a file opened for writing after its batch was taken
and read half-written is not landed, also while its open is still in the BPF ring buffer (the capture barrier,
through ``kwatch replicate``'s loop and the daemon's; a control without the barrier shows the prefixes landing); a
file opened and closed after the take waits for the next batch; a file open longer than ``max_delay`` is sent.
rsync:// targets (a real rsync daemon) leave files open for writing out of their sessions until the close.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from treecmp import assert_trees_equal, tree_differences

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


def _full(size: int = SIZE) -> bytes:
    return bytes(range(256)) * (size // 256)


class Writer:
    """A process holding ``path`` open for writing, half written, until :meth:`finish`."""

    def __init__(self, path: Path, size: int = SIZE) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)],
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
            seq = live.last_seq()
            for i in range(2):  # two more batches, each one made and seen, while the writers still write
                (src / f"marker-{i}").write_bytes(b"%d" % i)
                _wait_file(mirror / f"marker-{i}", b"%d" % i, live, offset)
            live.wait_batches(offset, seq=seq + 2)
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


# ---- the capture barrier: an open whose event is still in the ring buffer ------------------------------------------

#: The kernel wakes the capture loop for a record only when its last such wake-up is this old (and the loop, having
#: seen data, polls this often): a busy ring's batched wake-up (10 ms by default) made long, so that the writer's open
#: waits in the ring for the whole test unless something forces a read.
WAKE_S = 120.0
SMALL = 64 << 10  # half of it (32 KiB) goes in a PutFiles frame; SIZE's half (1 MiB) as a delta or a streamed put
# name -> (size written by the writer, what the mirror has before: None for a new file)
STALLED: dict[str, tuple[int, bytes | None]] = {
    "small": (SMALL, b"version 1"),  # PutFiles frame (one barrier per frame)
    "delta": (SIZE, b"version 1"),  # a delta against the mirror's copy (a barrier before DeltaEnd)
    "new": (SIZE, None),  # a new file streamed whole (a barrier before PutEnd)
}


class _Fed:
    """Hands captured batches to the replicator and remembers which paths they named."""

    def __init__(self, rep: Replicator) -> None:
        self.rep = rep
        self.paths: set[bytes] = set()

    def feed(self, events: list[FileEvent]) -> None:
        self.paths.update(ev.path for ev in events)
        self.rep.feed(events)


def _opened_after_the_take(src: Path, mirror: Path, rep: Replicator, wait: Callable[[float], bool], fed: _Fed,
                           barrier: bool) -> None:
    """The batch is taken while the files are closed; then writers open them, write half and stall; their opens
    are in the ring buffer, not delivered (the loop's next wake-up is WAKE_S away) when the batch is read."""
    rep.barrier = wait if barrier else None
    rep.coalescer.rescan(b"")
    rep.sync_now(rep.coalescer.take(time.monotonic()))
    for name, (_size, before) in STALLED.items():
        if before is not None:
            assert (mirror / name).read_bytes() == before
    # A first record wakes the loop at once (and then none for WAKE_S); a barrier wait makes sure it was read.
    subprocess.run(["touch", str(src / "prime")], check=True)
    assert wait(30.0) and os.fsencode(src / "prime") in fed.paths, "capture does not deliver"
    now = time.monotonic()
    for name in STALLED:
        rep.coalescer.add(FileEvent(Op.CLOSE_WRITE, os.fsencode(src / name)), now)
    batch = rep.coalescer.take(now)  # dirty and, as far as the coalescer knows, closed
    writers = {name: Writer(src / name, size) for name, (size, _before) in STALLED.items()}
    try:
        r = rep.sync_now(batch)
        assert not r.errors, "a read dropped on purpose is not an error"
        got = _mirror_state(mirror)
        if not barrier:  # the control: the same steps land the prefixes (the reproduction reaches the hole)
            assert not fed.paths & {os.fsencode(src / n) for n in STALLED}, "the opens were not held in the ring"
            for name, (size, _before) in STALLED.items():
                assert got.get(name) == _full(size)[: size // 2], f"{name}: the hole was not reproduced"
            return
        for name, (_size, before) in STALLED.items():
            assert got.get(name) == before, f"{name}: a half-written file landed ({len(got.get(name) or b'')} bytes)"
        for w in writers.values():
            w.finish()
        assert wait(30.0)  # the closes are in the ring too: fetch them now rather than after WAKE_S
        rep.start()
        deadline = time.monotonic() + 60
        while any(not (mirror / n).exists() or (mirror / n).read_bytes() != _full(size)
                  for n, (size, _b) in STALLED.items()):
            assert time.monotonic() < deadline, "the closed files did not follow"
            time.sleep(0.05)
    finally:
        for w in writers.values():
            w.kill()


def _stalled_tree(tmp_path: Path) -> tuple[Path, Path]:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    for name, (_size, before) in STALLED.items():
        if before is not None:
            (src / name).write_bytes(before)
    return src, mirror


@pytest.mark.root
@pytest.mark.parametrize("barrier", [True, False], ids=["barrier", "control-without-barrier"])
def test_an_open_still_in_the_ring_buffer_keeps_a_read_from_landing_kwatch_replicate(
        barrier: bool, tmp_path: Path) -> None:
    """``kwatch replicate``'s loop (capture.barrier.pump) on a real BPF source: the barrier forces the read of the
    ring, so the writers' opens are folded before the reads land; without it the prefixes land (the control)."""
    from kwatch.capture.barrier import CaptureBarrier, pump
    from kwatch.capture.base import CaptureFilter
    from kwatch.capture.bpf import BpfSource

    src, mirror = _stalled_tree(tmp_path)
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01, max_delay=30.0))
    fed = _Fed(rep)
    source = BpfSource(CaptureFilter.make(roots=[src]), wake_s=WAKE_S)
    gate = CaptureBarrier(source)
    loop = threading.Thread(target=pump, args=(source, fed.feed, gate), daemon=True)
    loop.start()
    try:
        _opened_after_the_take(src, mirror, rep, gate.wait, fed, barrier)
        if barrier:
            assert_trees_equal(src, mirror)
    finally:
        rep.stop()
        gate.stop()
        loop.join(10)
        gate.close()
        source.close()


class _Sink:
    """An event sink the daemon gives its barrier (as it does ReplicationSink)."""

    capture_ops = frozenset(Op) - {Op.LOSS}

    def __init__(self, src: Path, fed: _Fed) -> None:
        self.capture_roots = [os.fsencode(src)]
        self.fed = fed
        self.barrier: Callable[[float], bool] | None = None

    def feed(self, events: list[FileEvent]) -> None:
        self.fed.feed(events)

    def close(self) -> None:
        pass


def test_the_replication_sink_hands_the_barrier_to_its_replicators(tmp_path: Path) -> None:
    """The daemon sets ReplicationSink.barrier before start (see the kwatch run test above for the loop's side)."""
    from kwatch.daemon.replication import ReplicationSink
    from kwatch.metrics.stats import DaemonStats
    from kwatch.rules.model import ReplicateTarget, Where

    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    sink = ReplicationSink([ReplicateTarget(str(mirror), {"source": str(src)}, Where("r.toml", 1))], DaemonStats())
    assert hasattr(sink, "barrier")  # what the daemon looks for

    def barrier(timeout: float) -> bool:
        return True

    sink.barrier = barrier
    sink.start(object())  # type: ignore[arg-type]  # a source without exclude_pid
    try:
        assert [r.barrier for r in sink.replicators] == [barrier]
    finally:
        sink.close()


@pytest.mark.root
def test_an_open_still_in_the_ring_buffer_keeps_a_read_from_landing_kwatch_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the daemon's loop (``kwatch run``): the sink gets the barrier, the loop serves it."""
    import io

    from kwatch.capture.bpf import BpfSource
    from kwatch.daemon import core
    from kwatch.daemon.logs import StructLog
    from kwatch.rules import parse_config

    monkeypatch.setattr(core, "HOUSEKEEPING", 3600.0)  # its turns read the source too: none during the test
    src, mirror = _stalled_tree(tmp_path)
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01, max_delay=30.0))
    fed = _Fed(rep)
    sink = _Sink(src, fed)
    cfg, errs = parse_config("", "empty.conf", toml=False)
    assert cfg is not None and not errs
    daemon = core.Daemon(cfg, log=StructLog(io.StringIO()), sinks=[sink], grace=1.0,
                         source_factory=lambda filt, backend, warn: BpfSource(filt, wake_s=WAKE_S))
    failed: list[BaseException] = []

    def scenario() -> None:
        try:
            deadline = time.monotonic() + 60
            while sink.barrier is None or daemon.barrier is None:  # the daemon is starting
                assert time.monotonic() < deadline
                time.sleep(0.01)
            _opened_after_the_take(src, mirror, rep, sink.barrier, fed, True)
            assert_trees_equal(src, mirror)
        except BaseException as e:
            failed.append(e)
        finally:
            rep.stop()
            os.kill(os.getpid(), signal.SIGTERM)  # the daemon drains and returns

    t = threading.Thread(target=scenario, daemon=True)
    t.start()
    try:
        assert daemon.run() == 0
    finally:
        t.join(30)
    if failed:
        raise failed[0]


def test_a_file_opened_and_closed_after_the_take_is_sent_by_the_next_batch(tmp_path: Path) -> None:
    """A writer that opened the file after the take may have finished and closed it by the time the events are
    folded: the read may still hold its prefix, so it is not landed; the next batch sends the closed file."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    f = src / "f"
    f.write_bytes(b"version 1")
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01, max_delay=30.0))
    try:
        rep.coalescer.rescan(b"")
        rep.sync_now(rep.coalescer.take(time.monotonic()))
        rep.coalescer.add(FileEvent(Op.CLOSE_WRITE, os.fsencode(f)), time.monotonic())
        batch = rep.coalescer.take(time.monotonic())
        f.write_bytes(b"version 2")
        rep.feed([FileEvent(Op.OPEN_WRITE, os.fsencode(f)), FileEvent(Op.CLOSE_WRITE, os.fsencode(f))])
        assert not rep.sync_now(batch).errors
        assert (mirror / "f").read_bytes() == b"version 1", "a read that may have raced a writer landed"
        rep.sync_now(rep.coalescer.take(time.monotonic()))
        assert (mirror / "f").read_bytes() == b"version 2"
        assert_trees_equal(src, mirror)
    finally:
        rep.stop()


def test_a_file_open_for_writing_longer_than_max_delay_is_sent(tmp_path: Path) -> None:
    """The hold of a file open for writing ends after ``max_delay`` (a log written forever must reach the mirror):
    the check after the read ends it too, as the take does."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01, max_delay=0.2))
    writer = Writer(src / "log", SMALL)  # open (before the replicator starts: found in /proc), half written
    try:
        rep.start()
        deadline = time.monotonic() + 30
        while not (mirror / "log").exists() or (mirror / "log").read_bytes() != _full(SMALL)[: SMALL // 2]:
            assert time.monotonic() < deadline, "a file open for writing longer than max_delay was not sent"
            time.sleep(0.05)
        writer.finish()
        rep.feed([FileEvent(Op.CLOSE_WRITE, os.fsencode(src / "log"))])
        deadline = time.monotonic() + 30
        while (mirror / "log").read_bytes() != _full(SMALL):
            assert time.monotonic() < deadline, "the closed file did not follow"
            time.sleep(0.05)
    finally:
        writer.kill()
        rep.stop()


@pytest.mark.root
@pytest.mark.parametrize("fuzzy", [True, False], ids=["fuzzy", "plain"])
def test_rsync_target_leaves_files_open_for_writing_until_their_close(fuzzy: bool, tmp_path: Path) -> None:
    """rsync:// targets (a real rsync daemon): the reconcile at start (a full push with --delete) and a directory
    sent whole leave out the files some process has open for writing; the daemon's copy stays (protected from
    --delete) until the close, then the whole file follows."""
    from rsyncd import RsyncDaemon

    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"version 1")
    (src / "steady").write_bytes(b"never open")
    writers: list[Writer] = []
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        mirror = d.module_path("push")
        (mirror / "old").write_bytes(b"version 1")  # the daemon has the old version, as after an earlier run
        writers = [Writer(src / "new"), Writer(src / "old")]  # opened before the replicator starts: found in /proc
        rep = Replicator(os.fsencode(src), Target.parse(d.url("push")),
                         TargetOptions(settle=0.01, max_delay=30.0, fuzzy=fuzzy))
        try:
            rep.start()

            def batches_after(n: int) -> int:
                deadline = time.monotonic() + 30
                while rep.stats.batches <= n:
                    assert time.monotonic() < deadline, f"no rsync batch after {n}: {rep.last_error}"
                    time.sleep(0.02)
                return rep.stats.batches

            done = batches_after(0)
            assert (mirror / "steady").read_bytes() == b"never open"
            got = _mirror_state(mirror)
            assert "new" not in got, f"a half-written file reached the daemon ({len(got['new'])} bytes)"
            assert got["old"] == b"version 1", f"the daemon's copy was replaced mid-write ({len(got['old'])} bytes)"
            # a new directory goes whole (its subtree scanned), with a file being written in it
            (src / "sub").mkdir()
            writers.append(Writer(src / "sub" / "w"))
            rep.feed([FileEvent(Op.MKDIR, os.fsencode(src / "sub")),
                      FileEvent(Op.CREATE, os.fsencode(src / "sub" / "w"))])
            # sub/w is held at the take, its directory is sent: with the subtree it scans, but not sub/w
            batches_after(done)
            assert (mirror / "sub").is_dir()
            assert not (mirror / "sub" / "w").exists(), "a half-written file in a directory sent whole reached the daemon"
            assert (mirror / "old").read_bytes() == b"version 1"
            for w in writers:
                w.finish()
            rep.feed([FileEvent(Op.CLOSE_WRITE, os.fsencode(p)) for p in (src / "new", src / "old", src / "sub/w")])
            deadline = time.monotonic() + 30
            while tree_differences(src, mirror, hardlinks=False):
                assert time.monotonic() < deadline, f"no convergence: {tree_differences(src, mirror, hardlinks=False)}"
                time.sleep(0.05)
            assert (mirror / "new").read_bytes() == (mirror / "old").read_bytes() == _full()
        finally:
            for w in writers:
                w.kill()
            rep.stop()


@pytest.mark.parametrize("backend", ["fanotify", "inotify"])
def test_a_rewrite_in_progress_is_held_on_backends_without_open_events(backend: str, tmp_path: Path) -> None:
    """fanotify and inotify report no open for writing of an existing file, only its writes (MODIFY) and its close:
    the first MODIFY holds the file, so a rewriter stalled mid-file does not get its prefix onto the mirror while
    later changes flow past it."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    (src / "old").write_bytes(b"version 1")
    live = LiveReplicate(src, [str(mirror)], tmp_path / "replicate.log", ["--max-delay", "30"], backend=backend)
    writer: Writer | None = None
    with live:
        wait_identical(src, mirror, CONVERGE, what="before the writer", live=live)
        try:
            writer = Writer(src / "old")
            offset = live.log_size()
            # a change queued after the rewriter's MODIFY: once it is on the mirror, a batch taken after the MODIFY
            # was folded has been sent
            (src / "later").write_bytes(b"a change after the rewrite began")
            _wait_file(mirror / "later", b"a change after the rewrite began", live, offset)
            got = (mirror / "old").read_bytes()
            assert got == b"version 1", f"the mirror's copy was replaced mid-write ({len(got)} bytes)"
            writer.finish()
        finally:
            if writer is not None:
                writer.kill()
        wait_identical(src, mirror, 15.0, what="after the writer closed", live=live)
        assert (mirror / "old").read_bytes() == _full()
        assert live.stop() == 0

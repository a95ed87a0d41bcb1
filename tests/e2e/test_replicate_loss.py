"""Live recovery after a loss: a real BPF source with a small ring buffer overflows while nobody reads it; its LOSS
marker reaches the replicator, which reconciles the whole tree, so files whose events were lost still reach the
mirror (a real agent on a pipe). The full rescan a loss asks for comes at most once per ``full_rescan_every``: the
loss here follows the start's full reconcile within that interval, so it is deferred, then made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from timescale import scaled

from kwatch.events import FileEvent, Op
from kwatch.replicate.engine import Replicator, Target, TargetOptions

N_FILES = 3000

# a child makes N files of 64 bytes each in a few directories (far more records than the 16 KiB ring holds)
BURST = r"""
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i % 7}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(b"%063d\n" % i)
"""


@pytest.mark.root
@pytest.mark.slow
def test_a_loss_makes_the_mirror_converge_by_a_deferred_full_rescan(tmp_path: Path) -> None:
    from kwatch.capture.barrier import CaptureBarrier, pump
    from kwatch.capture.base import CaptureFilter
    from kwatch.capture.bpf import BpfSource

    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(settle=0.01))
    rep.coalescer.full_rescan_every = 3.0  # short, so the deferral shows within the test
    losses: list[FileEvent] = []

    def feed(events: list[FileEvent]) -> None:
        losses.extend(e for e in events if e.op is Op.LOSS)
        rep.feed(events)

    source = BpfSource(CaptureFilter.make(roots=[src]), ringbuf_bytes=16384)
    gate = CaptureBarrier(source)
    rep.barrier = gate.wait
    loop = threading.Thread(target=pump, args=(source, feed, gate), daemon=True)
    try:
        rep.start()
        assert rep.synced.wait(60), "the start's reconcile of an empty tree did not finish"
        assert rep.stats.rescans_full == 1
        # nobody reads the ring while the burst runs: it overflows, and the kernel counts what it drops
        subprocess.run([sys.executable, "-c", BURST, str(src), str(N_FILES)], check=True, timeout=120)
        loop.start()
        deadline = time.monotonic() + scaled(60)
        while not losses:
            assert time.monotonic() < deadline, "no LOSS marker after the ring overflowed"
            time.sleep(0.05)
        assert sum(e.lost or 0 for e in losses) > 0
        wait_identical(src, mirror, 120, what="after a loss")
        # a marker of unknown count is not the ring's: another mount namespace's changes (another session's
        # `unshare -m` on this machine, gone before the read) or io_uring activity (docs/capture.md), each a loss of
        # its own with its own rescan
        foreign = [e for e in losses if e.lost is None]
        assert 2 <= rep.stats.rescans_full <= 2 + len(foreign), (
            "the loss's full rescan (deferred to the interval's end) made it", losses)
    finally:
        rep.stop()
        gate.stop()
        if loop.is_alive():
            loop.join(10)
        gate.close()
        source.close()


URING = str(Path(__file__).parents[1] / "support" / "uring.py")


@pytest.mark.root
@pytest.mark.slow
def test_io_uring_changes_reach_the_mirror_through_a_rescan(tmp_path: Path) -> None:
    """The BPF backend sees no io_uring operation; its marker makes `kwatch replicate` rescan, so a directory made
    and a file renamed through io_uring still reach the mirror (they never did: no event, no marker)."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    (src / "old").write_bytes(b"before\n")
    with LiveReplicate(src, [str(mirror)], tmp_path / "replicate.log", backend="bpf") as live:
        wait_identical(src, mirror, 60, what="the start", live=live)
        for argv in (["mkdirat", str(src / "made by io_uring")], ["renameat", str(src / "old"), str(src / "new")]):
            subprocess.run([sys.executable, URING, *argv], check=True, timeout=60)
        # a full rescan comes at most once per 30 s after the start's: up to 30 s, then the rescan itself
        wait_identical(src, mirror, 120, what="after io_uring mkdirat + renameat", live=live)
        assert live.stop() == 0


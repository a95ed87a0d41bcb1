"""The fault matrix (issue 17): replication through a test network (tests/netlab.py) while a continuous workload
runs on the source and one fault is injected, for the agent over ssh and for ``rsync://``.

During each run a checker polls the mirror and fails the test if a file ever shows under its final name with a
content the source never had there (tests/faultlab.py: Churn.check_mirror). Once the fault has ended and the
workload is done, the mirror must be identical to the source within :data:`CONVERGE` seconds (:data:`CONVERGE_SLOW`
on a link that stays at 200 ms RTT with loss, or at 1 Mbit/s). :func:`test_reconnects_leak_nothing` kills the agent
100 times and compares the fd count and RSS of ``kwatch replicate`` after 100 reconnects with those after 10.

Faults that take a minute (the 60 s partition) are marked ``slow`` and run only with ``KWATCH_SLOW_FAULTS=1``: CI
does not run them.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from faultlab import FAULTS, Churn, Rig, build_untar_tree, fd_count, rss_kib
from livereplicate import wait_identical

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONVERGE = 60.0  # seconds from the end of the fault and of the workload to an identical mirror, clean link
CONVERGE_SLOW = 120.0  # ... on a link that stays slow or lossy until then
SLOW_FAULTS = {"partition-60s"}
RUN_SLOW = os.environ.get("KWATCH_SLOW_FAULTS") == "1"

CASES = [
    pytest.param(kind, name, id=f"{kind}-{name}",
                 marks=[pytest.mark.skipif(not RUN_SLOW, reason="long form: KWATCH_SLOW_FAULTS=1")]
                 if name in SLOW_FAULTS else [])
    for name, (_fn, kinds, _dur) in FAULTS.items() for kind in kinds
]


def _tarball(tmp: Path, files: int, seed: int) -> tuple[Path, Path]:
    staging = tmp / "staging"
    build_untar_tree(staging, files, seed)
    tarball = tmp / "tree.tar"
    subprocess.run(["tar", "cf", str(tarball), "-C", str(staging), "."], check=True, timeout=60)
    return tarball, staging


def run_fault(kind: str, fault: str, tmp: Path, *, seed: int = 5, files: int = 300, seconds: float = 8.0
              ) -> dict[str, object]:
    """One fault during one workload; returns what happened (asserts the mirror's correctness)."""
    fn, _kinds, duration = FAULTS[fault]
    tarball, staging = _tarball(tmp, files, seed)
    with Rig(kind, tmp / "rig", mirror_fs_mib=24 if fault == "disk-full" else 0) as rig:
        churn = Churn(rig.src, tarball, staging, ops=2000, seconds=seconds, seed=seed)
        violations: list[str] = []
        polls = 0
        stop = threading.Event()
        mirror = os.fsencode(rig.mirror)

        def checker() -> None:
            nonlocal polls
            while not stop.is_set():
                violations.extend(churn.check_mirror(mirror))
                polls += 1

        writer = threading.Thread(target=churn.run, name="churn")
        check = threading.Thread(target=checker, name="checker")
        writer.start()
        check.start()
        try:
            deadline = time.monotonic() + 60
            while churn.done < 40 and not churn.finished.is_set():  # the fault hits a workload under way
                assert time.monotonic() < deadline, "the workload did not start"
                time.sleep(0.02)
            fn(rig, True)
            if duration:
                time.sleep(duration)  # how long the fault lasts is the fault itself, not a wait for a state
                fn(rig, False)
            writer.join(120)
            assert churn.error is None, churn.error
            assert churn.finished.is_set(), "the workload did not end"
            bound = CONVERGE if duration else CONVERGE_SLOW
            took = wait_identical(rig.src, rig.mirror, bound, what=f"{kind} after {fault}", live=rig.live)
            if not duration:
                fn(rig, False)
        finally:
            stop.set()
            check.join(120)
        violations.extend(churn.check_mirror(mirror))
        assert rig.live is not None
        log = rig.live.log_text()
        print(f"{kind} {fault}: {churn.done} operations {churn.counts}; {polls} polls, {churn.checked} files checked; "
              f"identical {took:.1f}s after the fault and the workload ended; events: {rig.events}")
        assert not violations, (f"{len(violations)} files under final names with content the source never had:\n"
                                + "\n".join(violations[:30]) + "\n---- log tail ----\n" + log[-3000:])
        assert polls >= 3, "the mirror was hardly checked"
        return {"took": took, "ops": churn.done, "events": list(rig.events), "log": log}


@pytest.mark.parametrize(("kind", "fault"), CASES)
def test_fault(kind: str, fault: str, tmp_path: Path) -> None:
    run_fault(kind, fault, tmp_path)


def test_reconnects_leak_nothing(tmp_path: Path) -> None:
    """fd count and RSS of ``kwatch replicate`` after 100 reconnects (the agent killed each time) against after 10:
    fds equal (+2 allowed for a connection being set up), RSS within 8 MiB (allocator noise)."""
    tarball, _staging = _tarball(tmp_path, 100, 3)
    with Rig("ssh", tmp_path / "rig") as rig:
        assert rig.live is not None
        subprocess.run(["tar", "xf", str(tarball), "-C", str(rig.src)], check=True, timeout=60)
        wait_identical(rig.src, rig.mirror, CONVERGE, what="before the reconnects", live=rig.live)
        pid = rig.live.pid
        seen: dict[int, tuple[int, int]] = {}
        for n in range(1, 101):
            offset = rig.live.log_size()
            rig.kill_agent()
            # an idle link finds its agent gone when it next has something to send: a change, then its batch line
            (rig.src / f"touch{n % 3}").write_bytes(b"%d" % n)
            rig.live.wait_batches(offset, timeout=60)
            if n in (10, 100):
                wait_identical(rig.src, rig.mirror, CONVERGE, what=f"after {n} reconnects", live=rig.live)
                seen[n] = (fd_count(pid), rss_kib(pid))
        (fd10, rss10), (fd100, rss100) = seen[10], seen[100]
        print(f"kwatch replicate after 10 reconnects: {fd10} fds, {rss10} KiB RSS; after 100: {fd100} fds, "
              f"{rss100} KiB RSS")
        assert fd100 <= fd10 + 2, f"fds grew from {fd10} to {fd100} over 90 reconnects"
        assert rss100 - rss10 < 8 << 10, f"RSS grew from {rss10} to {rss100} KiB over 90 reconnects"

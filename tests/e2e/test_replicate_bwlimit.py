"""``--bwlimit``: ``kwatch replicate`` (real process, BPF capture) paces file data to the limit, to a local agent
and to a real ``rsync --daemon`` (the native rsync client paces every byte it writes).

Each case writes 4 MiB of new data in one shape (one streamed file, small files sent in one frame each, many tiny
files, a delta against the mirror's copy) with a limit of 1 MiB/s and checks that the mirror took at least 3 s to become identical
(4 s of data at that rate, less a burst of at most one chunk): a lower bound on the time is what a limiter
guarantees. Without a limit the same data only has to arrive intact; its speed is not asserted.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from rsyncd import RsyncDaemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

MIB = 1 << 20
LIMIT_KIB = 1024  # --bwlimit is KiB/s
AT_LEAST = 3.0  # seconds for 4 MiB at 1 MiB/s (4 s), less one chunk sent ahead of the pacing
CONVERGE = 60.0


def _prepare_none(src: Path) -> None:
    pass


def _one_file(src: Path) -> None:
    (src / "big.bin").write_bytes(os.urandom(4 * MIB))


def _small_files(src: Path) -> None:
    for i in range(32):  # 128 KiB each: below the small-file threshold, one PutFile frame per file
        (src / f"small-{i:02d}.bin").write_bytes(os.urandom(128 << 10))


def _tiny_files(src: Path) -> None:
    for i in range(1024):  # 4 KiB each: the pacing must hold per file, not only within a file
        (src / f"tiny-{i:04d}").write_bytes(os.urandom(4096))


def _prepare_large(src: Path) -> None:
    (src / "large.bin").write_bytes(os.urandom(12 * MIB))


def _edit_large(src: Path) -> None:
    with open(src / "large.bin", "r+b") as f:  # 4 MiB of new data in the middle: a delta of about 4 MiB literal
        f.seek(4 * MIB)
        f.write(os.urandom(4 * MIB))


CASES: list[tuple[str, Callable[[Path], None], Callable[[Path], None]]] = [
    ("one_streamed_file", _prepare_none, _one_file),
    ("small_file_frames", _prepare_none, _small_files),
    ("tiny_files", _prepare_none, _tiny_files),
    ("delta_literal", _prepare_large, _edit_large),
]




@contextlib.contextmanager
def _target(kind: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(the target to replicate to, the directory the mirror is in)."""
    if kind == "agent":
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        yield str(mirror), mirror
        return
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        yield d.url("push"), d.module_path("push")


@pytest.mark.parametrize("limited", [True, False], ids=["limited", "unlimited"])
@pytest.mark.parametrize("kind", ["agent", "rsync"])
@pytest.mark.parametrize(("name", "prepare", "write"), CASES, ids=[c[0] for c in CASES])
def test_bwlimit_paces_file_data(name: str, prepare: Callable[[Path], None], write: Callable[[Path], None],
                                 kind: str, limited: bool, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    prepare(src)
    extra = ["--bwlimit", str(LIMIT_KIB)] if limited else []
    with _target(kind, tmp_path) as (target, mirror):
        live = LiveReplicate(src, [target], tmp_path / "replicate.log", extra)
        try:
            live.start()
            wait_identical(src, mirror, CONVERGE, what="initial", live=live)
            offset = live.log_size()
            t0 = time.monotonic()
            write(src)
            wait_identical(src, mirror, CONVERGE, what=f"after writing 4 MiB ({name})", live=live)
            took = time.monotonic() - t0
            sent = live.wait_batches(offset)
            assert live.stop() == 0
        finally:
            live.kill_all()
    sent = live.batches(offset)  # all of them, the process has ended
    assert all(x.errors == 0 for x in sent), sent
    literal = sum(x.literal for x in sent)
    assert literal >= 4 * MIB - 64 * 1024, f"the 4 MiB of new data was not sent as literal data: {literal}"
    print(f"{name} ({kind}, {'limited' if limited else 'unlimited'}): {literal} literal bytes in {took:.2f}s")
    if limited:
        assert took >= AT_LEAST, f"{literal} bytes reached the mirror in {took:.2f}s at a limit of {LIMIT_KIB} KiB/s"

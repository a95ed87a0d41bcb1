"""Live replication to a stock ``rsync --daemon`` (started by the test on 127.0.0.1) through the native client,
with real BPF capture: `kwatch replicate SRC rsync://127.0.0.1:PORT/push`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rsyncd import RsyncDaemon
from treecmp import tree_differences

pytestmark = pytest.mark.root

KWATCH = [sys.executable, "-m", "kwatch"]


def converge(a: Path, b: Path, timeout: float = 30.0) -> list[str]:
    """Poll until the trees are equal (content, type, mode, mtime, symlinks); the remaining differences if not."""
    deadline = time.monotonic() + timeout
    while True:
        diffs = tree_differences(a, b, hardlinks=False)
        if not diffs or time.monotonic() > deadline:
            return [str(d) for d in diffs]
        time.sleep(0.2)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Path, Path, Callable[[], str]]]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "seed").write_bytes(b"seed")
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        proc = subprocess.Popen([*KWATCH, "replicate", str(src), d.url("push"), "--settle", "0.05"],
                                stderr=subprocess.PIPE)
        mirror = d.module_path("push")
        try:
            assert converge(src, mirror) == []

            def log() -> str:
                return d.log()

            yield src, mirror, log
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            sys.stderr.write(err.decode(errors="replace"))
        assert proc.returncode == 0


WORKLOADS: list[tuple[str, Callable[[Path], None]]] = [
    ("create_tree", lambda s: [
        (s / "d/e").mkdir(parents=True), (s / "d/e/f").write_bytes(b"x" * 5000),
        (s / "d/sp ace").write_bytes(b""), os.symlink("e/f", s / "d/link"),
        (s / os.fsdecode(b"n\xffutf8")).write_bytes(b"odd")]),
    ("edit_and_chmod", lambda s: [(s / "seed").write_bytes(b"seed2" * 1000), os.chmod(s / "seed", 0o600)]),
    ("rename_and_delete", lambda s: [(s / "a").write_bytes(b"a" * 100), (s / "b").mkdir(),
                                    os.rename(s / "seed", s / "b/seed2"), os.unlink(s / "a")]),
]


@pytest.mark.parametrize(("name", "work"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_live_rsync_target(live: tuple[Path, Path, Callable[[], str]], name: str, work: Callable[[Path], None]) -> None:
    src, mirror, log = live
    work(src)
    assert converge(src, mirror) == [], log()

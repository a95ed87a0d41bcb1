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
from importprobe import once_importing
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


def _progress_fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split("progress ", 1)[1].split(" "))


def test_a_first_sync_to_a_daemon_logs_its_progress(tmp_path: Path) -> None:
    """``kwatch replicate --once SRC rsync://...`` not on a terminal: ``key=value`` progress lines as the sessions go
    through the tree (as often as they report, with --progress-interval 0), the figures only growing, the last one
    the whole tree."""
    files = 400
    src = tmp_path / "src"
    sizes = [(i * 7919) % 20_000 for i in range(files)]
    for i, n in enumerate(sizes):
        d = src / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(n))
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        res = subprocess.run([*KWATCH, "replicate", "--once", "--progress-interval", "0", str(src), d.url("push")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert tree_differences(src, d.module_path("push")) == []
    lines = [_progress_fields(line) for line in res.stderr.splitlines() if " progress target=" in line]
    assert len(lines) > 2, res.stderr
    last = lines[-1]
    assert last["done"] == "1" and all(f["done"] == "0" for f in lines[:-1])
    assert (int(last["files"]), int(last["bytes"])) == (files, sum(sizes))
    assert (int(last["files_total"]), int(last["bytes_total"])) == (files, sum(sizes))
    before = (0, 0)
    for f in lines:
        assert int(f["files"]) <= int(f["files_total"]) and int(f["bytes"]) <= int(f["bytes_total"]), f
        assert (int(f["files"]), int(f["bytes"])) >= before, (before, f)
        before = (int(f["files"]), int(f["bytes"]))


def test_a_first_sync_to_an_empty_module_imports_no_numpy(tmp_path: Path) -> None:
    """numpy is the block matcher's: new files are sent whole, so a first sync into an empty module does not import
    it. A file the daemon has an older copy of is matched against it, which does (the probe works)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    big = os.urandom(1 << 20)
    (src / "d" / "big").write_bytes(big)
    (src / "small").write_bytes(b"x")
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        started, numpy = once_importing(tmp_path, src, d.url("push"), "numpy")
        assert tree_differences(src, d.module_path("push")) == []
        assert started == 1 and numpy == set(), "a first sync into an empty module imported numpy"
        stale = d.module_path("push") / "d" / "big"
        stale.write_bytes(big[:-100] + bytes(100))
        os.utime(stale, ns=(1, 1))
        started, numpy = once_importing(tmp_path, src, d.url("push"), "numpy")
        assert tree_differences(src, d.module_path("push")) == []
        assert len(numpy) == 1, "matching against a basis did not import numpy: the probe is broken"

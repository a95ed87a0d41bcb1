"""The JSON-lines file output: pure rotation/repair rules, and the writer on real files (a full tmpfs included)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import OutputStats
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.jsonl import JsonlWriter, repair_cut, rotation_plan, split_lines
from kwatch.outputs.record import Record, event_record, output_loss_record


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def recs(n: int, start: int = 0, pad: int = 0) -> list[Record]:
    return [event_record(FileEvent(Op.CLOSE_WRITE, b"/d/f%06d%s" % (i, b"x" * pad), pid=i, backend="bpf"),
                         1_700_000_000_000_000_000 + i, "h") for i in range(start, start + n)]


def marker(lost: int, why: str) -> Record:
    return output_loss_record("t", lost, why, 1_700_000_000_000_000_000, "h")


def writer(path: Path, **kw: object) -> tuple[JsonlWriter, OutputStats]:
    st = OutputStats("t", "file")
    return JsonlWriter(OutputSpec(kind="file", name="t", path=str(path), **kw), st, loss_marker=marker), st  # type: ignore[arg-type]


def read_records(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends with a torn line"
    return [json.loads(ln) for ln in data.splitlines()]


# -- pure -----------------------------------------------------------------------------------------------------------

REPAIR_CASES = {
    "empty file": (0, b"", 0),
    "ends with a newline": (10, b'{"a":1}\n{}\n', 10),
    "torn last line": (20, b'{"a":1}\n{"b":', 20 - len(b'{"b":')),
    "no newline in the tail: look further": (5, b'{"b":', -1),
}


@pytest.mark.parametrize("name", list(REPAIR_CASES))
def test_repair_cut(name: str) -> None:
    size, tail, want = REPAIR_CASES[name]
    assert repair_cut(size, tail) == want


SPLIT_CASES = {
    "fits": (b"a\nb\n", 10, 10, (b"a\nb\n", b"")),
    "first line only": (b"aaa\nbbb\n", 5, 10, (b"aaa\n", b"bbb\n")),
    "nothing fits a used file": (b"aaaa\n", 3, 10, (b"", b"aaaa\n")),
    "a new file takes one long line": (b"aaaaaaaa\nb\n", 4, 4, (b"aaaaaaaa\n", b"b\n")),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_lines(name: str) -> None:
    data, room, limit, want = SPLIT_CASES[name]
    assert split_lines(data, room, limit) == want


def test_rotation_plan_shifts_oldest_first() -> None:
    oldest, renames = rotation_plan("/l/a.jsonl", 3)
    assert oldest == "/l/a.jsonl.3"
    assert renames == [("/l/a.jsonl.2", "/l/a.jsonl.3"), ("/l/a.jsonl.1", "/l/a.jsonl.2"), ("/l/a.jsonl", "/l/a.jsonl.1")]


# -- the writer on real files ---------------------------------------------------------------------------------------


def test_rotation_by_size_and_count_keeps_whole_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w, st = writer(path, max_bytes=4096, keep=3, fsync="none")
    line = len(recs(1)[0].line)
    for i in range(0, 400, 20):
        w.write(recs(20, i))
    w.close()
    files = [path.with_name(f"audit.jsonl.{n}") for n in (3, 2, 1)] + [path]
    assert all(f.exists() for f in files) and not path.with_name("audit.jsonl.4").exists()
    got = [r for f in files for r in read_records(f)]
    for f in files:
        assert f.stat().st_size <= 4096
    pids = [r["pid"] for r in got]
    assert pids == list(range(400 - len(pids), 400)), "the newest records, in order, nothing twice"
    assert len(pids) >= 3 * (4096 // line), "the rotated files are full"
    assert st.rotations >= 4 and st.records == 400 and st.lost == 0


def test_torn_last_line_is_cut_and_announced_on_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    whole = b"".join(r.line for r in recs(3))
    torn = recs(1, 3)[0].line[:17]
    path.write_bytes(whole + torn)
    w, st = writer(path, fsync="every")
    w.write(recs(1, 4))
    w.close()
    got = read_records(path)
    assert [r.get("pid") for r in got] == [0, 1, 2, None, 4]
    assert got[3]["kind"] == "loss" and f"cut {len(torn)} bytes" in str(got[3]["reason"])
    assert st.repaired_bytes == len(torn)


def test_a_file_of_one_torn_line_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"x" * 70000)  # longer than one backwards read, no newline at all
    w, st = writer(path)
    w.close()
    assert st.repaired_bytes == 70000
    assert [r["kind"] for r in read_records(path)] == ["loss"]


FSYNC_CASES = {"none": 0, "every": 5}


@pytest.mark.parametrize("policy", list(FSYNC_CASES))
def test_fsync_policy_counts(tmp_path: Path, policy: str) -> None:
    w, st = writer(tmp_path / "a.jsonl", fsync=policy)
    for i in range(5):
        w.write(recs(2, 2 * i))
    assert st.fsyncs == FSYNC_CASES[policy]
    w.close()


def test_fsync_interval_syncs_in_the_background(tmp_path: Path) -> None:
    w, st = writer(tmp_path / "a.jsonl", fsync="interval", fsync_interval=0.05)
    w.write(recs(2))
    wait_for(lambda: st.fsyncs >= 1, what="the background fsync")
    n = st.fsyncs
    w.close()
    assert st.fsyncs == n, "nothing new to sync at close"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_disk_full_leaves_no_torn_line_and_the_loss_is_announced(small_fs: Path) -> None:
    path = small_fs / "audit.jsonl"
    w, st = writer(path, fsync="none", max_bytes=0)
    i = 0
    while st.lost == 0:
        w.write(recs(50, i, pad=200))
        i += 50
        assert i < 10000, "the 64 KiB tmpfs never filled"
    lost = st.lost
    assert st.errors >= 1 and not st.connected
    got = read_records(path)  # asserts the file ends with a whole line
    assert [r["pid"] for r in got] == list(range(len(got)))
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_fs)], check=True)
    w.write(recs(1, 100000))
    w.close()
    got = read_records(path)
    assert got[-2]["kind"] == "loss" and got[-2]["lost"] == lost
    assert got[-1]["pid"] == 100000 and st.connected

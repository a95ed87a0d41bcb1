"""`kwatch trace`: the pure formatting/matching, and the real command on the BPF backend."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from timescale import scaled

from kwatch.events import FT_DIR, FT_REG, FileEvent, Op
from kwatch.trace import TraceMatcher, compile_path_regex, format_json, format_text, to_json

EV = FileEvent(Op.RENAME, b"/d/a\nb", b"/d/\xff.jpg", pid=7, ppid=1, uid=0, gid=0, comm=b"mv", backend="bpf")

MATCH_CASES = [
    ("no_filters", TraceMatcher(), True),
    ("rule_matches_new_path", TraceMatcher(rules=[compile_path_regex(r"\.jpg$")]), True),
    ("rule_misses", TraceMatcher(rules=[compile_path_regex(r"\.png$")]), False),
    ("ignore_hits_old_path", TraceMatcher(ignores=[compile_path_regex("a\nb")]), False),
    ("pid_filter", TraceMatcher(pids=frozenset({8})), False),
    ("comm_filter", TraceMatcher(comms=frozenset({b"mv"})), True),
    ("uid_filter", TraceMatcher(uids=frozenset({1000})), False),
]


@pytest.mark.parametrize(("name", "matcher", "want"), MATCH_CASES, ids=[c[0] for c in MATCH_CASES])
def test_matcher(name: str, matcher: TraceMatcher, want: bool) -> None:
    assert matcher(EV) is want


def test_json_round_trips_non_utf8_paths() -> None:
    d = json.loads(format_json(EV))
    assert d["op"] == "rename" and d["pid"] == 7 and d["comm"] == "mv"
    assert d["path"].encode("utf-8", "surrogateescape") == b"/d/a\nb"
    assert d["new_path"].encode("utf-8", "surrogateescape") == b"/d/\xff.jpg"
    assert "\n" not in format_json(EV)
    assert to_json(FileEvent(Op.LOSS, b"/", lost=5, backend="bpf"))["lost"] == 5


def test_json_names_the_file_type_and_return_value_when_known() -> None:
    d = to_json(FileEvent(Op.MKDIR, b"/d/new", ftype=FT_DIR, ret=0, backend="bpf"))
    assert d["ftype"] == "dir" and d["ret"] == 0
    d = to_json(FileEvent(Op.OPEN_WRITE, b"/d/f", ftype=FT_REG, ret=3, backend="bpf"))
    assert d["ftype"] == "file" and d["ret"] == 3
    d = to_json(FileEvent(Op.MODIFY, b"/d/f", backend="fanotify"))
    assert "ftype" not in d and "ret" not in d, "unknown fields are left out, not invented"


def test_a_path_of_another_mount_namespace_says_so() -> None:
    """Text and JSON name the mount namespace of a path that is not a host path; host paths carry none."""
    ev = FileEvent(Op.CREATE, b"/data/f", pid=9, backend="bpf", mntns=4026532999)
    assert to_json(ev)["mntns"] == 4026532999 and "mntns=4026532999" in format_text(ev)
    assert "mntns" not in to_json(ev._replace(mntns=None)) and "mntns" not in format_text(ev._replace(mntns=None))
    marker = FileEvent(Op.LOSS, b"/", backend="bpf", extra={"mount_namespace": 4026532999, "events": 4})
    assert "4 changes in mount namespace 4026532999" in format_text(marker)


def test_text_is_one_line_per_event() -> None:
    line = format_text(EV)
    assert "\n" not in line
    assert "RENAME" in line and "/d/a\\x0ab -> /d/\\xff.jpg" in line and "pid=7" in line


@pytest.mark.root
def test_trace_command_json(tmp_path: Path) -> None:
    d = tmp_path / "w"
    d.mkdir()
    err_path = tmp_path / "trace.err"
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kwatch", "trace", str(d), "--json", "--backend", "bpf", "--rule", r"keep",
             "--ignore", r"\.tmp$", "--count", "3", "--duration", "120"],
            stdout=subprocess.PIPE, stderr=err_file,
        )
    # the ready line is written once the programs are attached: events from then on are seen
    deadline = time.monotonic() + scaled(60)
    # "with the bpf backend (VFS hooks: fentry/fexit)" or "(syscall tracepoints)": the program the kernel took
    while not re.search(rb"with the bpf backend \((VFS hooks|syscall tracepoints)[^)]*\); Ctrl-C to stop",
                        err_path.read_bytes()):
        assert proc.poll() is None, err_path.read_bytes()
        assert time.monotonic() < deadline, f"trace not ready within 60s: {err_path.read_bytes()!r}"
        time.sleep(0.05)
    name = os.fsencode(d) + b"/keep \xff"
    with open(name, "wb") as f:
        f.write(b"x")
    (d / "keep.tmp").write_bytes(b"y")
    (d / "other").write_bytes(b"z")
    os.rename(name, os.fsencode(d) + b"/keep2")
    out, _ = proc.communicate(timeout=120)
    err = err_path.read_bytes()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    got = [(e["op"], e["path"].encode("utf-8", "surrogateescape")) for e in events]
    assert got == [("create", name), ("close_write", name), ("rename", name)]
    assert all(e["pid"] == os.getpid() and e["backend"] == "bpf" for e in events)
    assert b"3 events shown" in err


@pytest.mark.root
def test_sigterm_while_an_output_is_stuck_ends_the_trace_and_counts_every_record(tmp_path: Path) -> None:
    """A journald that takes nothing (the test's own socket, never read): every send waits out its timeout. SIGTERM
    then must end ``kwatch trace`` with its summary, and every event it handed to the output is either taken or
    counted lost. Before: the signal's exception was raised inside the output's send, taken by the fan-out for an
    output error (the batch counted lost), and the trace went on as if no signal had come."""
    import socket

    d = tmp_path / "w"
    d.mkdir()
    sock_path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    journal.bind(sock_path)
    err_path = tmp_path / "trace.err"
    try:
        with open(err_path, "wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kwatch", "trace", str(d), "-q", "--backend", "bpf", "--no-context",
                 "--output", f"journal:{sock_path}"], stdout=subprocess.DEVNULL, stderr=err_file)
        deadline = time.monotonic() + scaled(60)
        while b"Ctrl-C to stop" not in err_path.read_bytes():
            assert proc.poll() is None, err_path.read_bytes()
            assert time.monotonic() < deadline, f"trace not ready within 60s: {err_path.read_bytes()!r}"
            time.sleep(0.05)
        # a writer keeps the output busy until the trace ends; by its 2,000th file the socket's queue (4 KiB) has long
        # been full, and every batch waits out a send timeout
        written = threading.Event()
        ended = threading.Event()

        def churn() -> None:
            i = 0
            while not ended.is_set():
                (d / f"f{i % 500}").write_bytes(b"x")
                i += 1
                if i == 2000:
                    written.set()

        writer = threading.Thread(target=churn, daemon=True)
        writer.start()
        assert written.wait(scaled(60)), "the writer did not get going"
        proc.terminate()
        try:
            proc.wait(timeout=scaled(30))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("SIGTERM did not end the trace: " + err_path.read_text(errors="replace")[-2000:]) from None
        finally:
            ended.set()
            writer.join()
    finally:
        journal.close()
    err = err_path.read_text(errors="replace")
    assert proc.returncode == 0, err
    m = re.search(r"(\d+) events shown, (\d+) captured, (\d+) lost", err)
    o = re.search(r"output \S+ \(journal\): (\d+) records, (\d+) lost", err)
    assert m and o, err
    shown, records, lost = int(m[1]), int(o[1]), int(o[2])
    assert shown > 0 and records + lost == shown, err

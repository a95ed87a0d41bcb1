"""Output records: the fast JSON line of an event is the same JSON as the record's object encoded the slow way (named
cases and a property test), and paths come back as their exact bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kwatch.events import FT_DIR, FT_LNK, FT_REG, FileEvent, Op
from kwatch.outputs.record import encode, event_data, event_record, rfc3339

T = 1_733_000_000_123_456_789

CASES = {
    "plain": FileEvent(Op.CLOSE_WRITE, b"/a/b", pid=1, backend="bpf"),
    "every field": FileEvent(Op.RENAME, b"/a/x", b"/a/y", b"t", pid=1, tid=2, ppid=3, uid=4, gid=5, comm=b"mv",
                             cgroup_id=6, ts_ns=7, ret=0, flags=2, mode=0o644, owner=(1000, -1), ftype=FT_REG,
                             truncated=True, backend="bpf", mntns=4026532999),
    "non-UTF-8, newline, quote, backslash": FileEvent(Op.CREATE, b'/a/\xff\n"\\', comm=b"c\xfe", backend="bpf"),
    "unicode": FileEvent(Op.MKDIR, "/a/é€😀".encode(), ftype=FT_DIR, backend="fanotify"),
    "symlink": FileEvent(Op.SYMLINK, b"/l", target=b"../x", ftype=FT_LNK, backend="inotify"),
    "no process": FileEvent(Op.MODIFY, b"/m", backend="inotify"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_line_is_the_slow_json(name: str) -> None:
    ev = CASES[name]
    rec = event_record(ev, T, "web-1")
    assert rec.line == encode(event_data(ev, T, "web-1"))
    assert rec.data == event_data(ev, T, "web-1")
    assert rec.line.endswith(b"\n") and b"\n" not in rec.line[:-1]
    assert rec.data["path"].encode("utf-8", "surrogateescape") == ev.path  # type: ignore[union-attr]


names = st.binary(min_size=1, max_size=40).map(lambda b: b"/" + b.replace(b"\0", b"x"))


@given(path=names, new=st.none() | names, comm=st.none() | st.binary(max_size=16),
       pid=st.none() | st.integers(0, 2**31), flags=st.integers(0, 2**31), host=st.text(max_size=10))
def test_fast_line_property(path: bytes, new: bytes | None, comm: bytes | None, pid: int | None, flags: int,
                            host: str) -> None:
    ev = FileEvent(Op.RENAME if new else Op.UNLINK, path, new, pid=pid, comm=comm, flags=flags, backend="bpf")
    assert event_record(ev, T, host).line == encode(event_data(ev, T, host))


def test_rfc3339() -> None:
    assert rfc3339(T) == "2024-11-30T20:53:20.123456Z"
    assert rfc3339(T + 1_000_000_000) == "2024-11-30T20:53:21.123456Z", "the cached second moves on"
    assert json.loads(event_record(CASES["plain"], T, "h").line)["time"] == rfc3339(T)


def test_loss_marker_record() -> None:
    rec = event_record(FileEvent(Op.LOSS, b"/", lost=3, backend="bpf"), T, "h")
    assert rec.kind == "loss" and rec.priority == 4 and rec.data["lost"] == 3 and rec.data["op"] == "loss"

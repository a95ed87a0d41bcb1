"""The journal output: the native protocol's encoding (pure), the wire against a socket the test binds (datagrams
and the memfd of a big entry), and a real ``systemd-journald`` instance read back with ``journalctl -o json``.

journald does not run on this machine (PID 1 is not systemd), so the test starts its own instance in a journal
namespace of its own (``systemd-journald NS``: socket ``/run/systemd/journal.NS/socket``, read with
``journalctl --namespace=NS``) and removes its files afterwards.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from journald import JOURNALD, Journald

from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import OutputStats
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.journal import JournalWriter, encode_entry, record_fields
from kwatch.outputs.record import Record, alert_record, event_record, output_loss_record

T0 = 1_700_000_000_000_000_000
EV = FileEvent(Op.RENAME, b"/etc/a\xffb", b"/etc/passwd", pid=42, uid=0, comm=b"mv", backend="bpf")


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def decode_entry(data: bytes) -> dict[bytes, bytes]:
    """The test's own reading of the native protocol (the inverse of encode_entry)."""
    out: dict[bytes, bytes] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k] = v
            i = nl + 1
        else:
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            out[line] = data[start : start + n]
            assert data[start + n : start + n + 1] == b"\n"
            i = start + n + 1
    return out


def marker(lost: int, why: str) -> Record:
    return output_loss_record("journal", lost, why, T0, "h")


ENCODE_CASES = {
    "plain": ([(b"MESSAGE", b"hi"), (b"PRIORITY", b"6")], b"MESSAGE=hi\nPRIORITY=6\n"),
    "newline in a value": ([(b"MESSAGE", b"a\nb")], b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n"),
    "binary value without newline": ([(b"KWATCH_PATH", b"/x\xff")], b"KWATCH_PATH=/x\xff\n"),
}


@pytest.mark.parametrize("name", list(ENCODE_CASES))
def test_encode_entry(name: str) -> None:
    fields, want = ENCODE_CASES[name]
    assert encode_entry(fields) == want
    assert decode_entry(want) == dict(fields)


@pytest.mark.parametrize("bad", [b"_PID", b"lower", b"1ABC", b"A" * 65, b"A-B", b""])
def test_bad_field_names_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        encode_entry([(bad, b"x")])


def test_fields_of_an_alert_carry_exact_path_bytes() -> None:
    r = alert_record(EV, "passwd", "account database changed", "warning", T0, "h")
    f = dict(record_fields(r, "kwatch"))
    assert f[b"PRIORITY"] == b"4" and f[b"SYSLOG_IDENTIFIER"] == b"kwatch"
    assert f[b"KWATCH_PATH"] == b"/etc/a\xffb" and f[b"KWATCH_NEW_PATH"] == b"/etc/passwd"
    assert f[b"KWATCH_RULE"] == b"passwd" and f[b"KWATCH_KIND"] == b"alert" and f[b"KWATCH_PID"] == b"42"
    assert b"passwd" in f[b"MESSAGE"] and b"\\xff" in f[b"MESSAGE"]


@pytest.fixture
def bound_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(10)
    try:
        yield s, path
    finally:
        s.close()


def test_wire_datagram_per_record(bound_socket: tuple[socket.socket, str]) -> None:
    s, path = bound_socket
    st = OutputStats("journal", "journal")
    w = JournalWriter(OutputSpec(kind="journal", name="journal", socket=path), st, loss_marker=marker)
    w.write([event_record(EV, T0, "h"), alert_record(EV, "r", "m", "crit", T0, "h")])
    first = decode_entry(s.recv(1 << 20))
    second = decode_entry(s.recv(1 << 20))
    assert first[b"KWATCH_KIND"] == b"event" and first[b"PRIORITY"] == b"6"
    assert second[b"KWATCH_KIND"] == b"alert" and second[b"PRIORITY"] == b"2"
    assert st.records == 2 and st.lost == 0
    w.close()


def test_wire_big_entry_goes_through_a_sealed_memfd(bound_socket: tuple[socket.socket, str]) -> None:
    s, path = bound_socket
    w = JournalWriter(OutputSpec(kind="journal", name="journal", socket=path), OutputStats("j", "journal"),
                      loss_marker=marker)
    big = b"Y" * (4 << 20)  # far over a datagram's limit (the socket's send buffer)
    w.send(encode_entry([(b"MESSAGE", b"big"), (b"KWATCH_BLOB", big)]))
    data, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(4))
    assert data == b"", "the entry travels in the memfd, the datagram is empty"
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    assert len(fds) == 1
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            got = decode_entry(f.read())
        assert got[b"KWATCH_BLOB"] == big and got[b"MESSAGE"] == b"big"
    finally:
        os.close(fd)
    w.close()


def test_missing_socket_counts_the_loss_and_announces_it(bound_socket: tuple[socket.socket, str],
                                                         tmp_path: Path) -> None:
    s, path = bound_socket
    st = OutputStats("journal", "journal")
    w = JournalWriter(OutputSpec(kind="journal", name="journal", socket=str(tmp_path / "nowhere")), st,
                      loss_marker=marker)
    w.write([event_record(EV, T0, "h")] * 3)
    assert st.lost == 3 and st.errors == 1 and not st.connected
    w.spec = OutputSpec(kind="journal", name="journal", socket=path)  # journald is back
    w.write([event_record(EV, T0, "h")])
    loss = decode_entry(s.recv(1 << 20))
    assert loss[b"KWATCH_KIND"] == b"loss" and loss[b"KWATCH_LOST"] == b"3"
    assert decode_entry(s.recv(1 << 20))[b"KWATCH_KIND"] == b"event"
    w.close()


# -- a real journald ------------------------------------------------------------------------------------------------


@pytest.fixture
def journald() -> Iterator[Journald]:
    if os.geteuid() != 0 or not os.path.exists(JOURNALD):
        pytest.skip("needs root and systemd-journald")
    with Journald() as j:
        yield j


@pytest.mark.root
def test_journalctl_shows_the_structured_fields(journald: Journald) -> None:
    sock = journald.socket
    st = OutputStats("journal", "journal")
    w = JournalWriter(OutputSpec(kind="journal", name="journal", socket=sock, identifier="kwtest"), st,
                      loss_marker=marker)
    w.write([event_record(EV, T0, "h"), alert_record(EV, "passwd", "account database changed", "warning", T0, "h")])
    w.send(encode_entry([(b"MESSAGE", b"big one"), (b"SYSLOG_IDENTIFIER", b"kwtest"),
                         (b"KWATCH_BLOB", b"Z" * (1 << 20))]))
    w.close()
    wait_for(lambda: len(journald.entries("kwtest")) >= 3, what="the entries in journalctl -o json")
    entries = journald.entries("kwtest")
    ev, alert, big = entries[:3]
    # journalctl -o json shows a value that is not UTF-8 as an array of its bytes (and, without --all, a value
    # over 4096 bytes as null)
    assert bytes(ev["KWATCH_PATH"]) == b"/etc/a\xffb"  # type: ignore[arg-type]
    assert ev["KWATCH_NEW_PATH"] == "/etc/passwd" and ev["KWATCH_OP"] == "rename" and ev["PRIORITY"] == "6"
    assert alert["KWATCH_KIND"] == "alert" and alert["KWATCH_RULE"] == "passwd" and alert["PRIORITY"] == "4"
    assert alert["KWATCH_MESSAGE"] == "account database changed" and alert["KWATCH_PID"] == "42"
    assert big["MESSAGE"] == "big one" and len(str(big["KWATCH_BLOB"])) == 1 << 20
    assert st.records == 2 and st.lost == 0

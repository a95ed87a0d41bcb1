"""The fleet bus on real ``nats-server`` processes with JetStream (tests/support/natsd.py), and its pure parts.

- one server: records published, the server killed (they wait in the spool), restarted: every record stored once,
  in order; a batch the server already holds (a lost acknowledgement, a restarted daemon's spool) is not stored
  again, and a message id JetStream has seen is dropped as a duplicate; a full spool counts and announces its loss;
- a three-node cluster with an R3 stream: two hosts publish while the stream's leader is killed, and ``kwatch
  collect`` reads the merged stream meanwhile: nothing lost, nothing twice, each host in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from natsd import NatsCluster, NatsServer, run, stored_records

from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import OutputStats
from kwatch.outputs import fleet
from kwatch.outputs.bus import NatsOutput, ensure_stream, read_boot_id
from kwatch.outputs.collect import Reorder
from kwatch.outputs.config import parse_output
from kwatch.outputs.record import Record, event_record, output_loss_record
from kwatch.outputs.spool import Spool, decode_frames, encode_frame

KWATCH = [sys.executable, "-c", "import sys; from kwatch.cli import main; sys.exit(main())"]
T0 = 1_700_000_000_000_000_000
STREAM = "KWATCH"


def wait_for(cond: Callable[[], bool], timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def recs(host: str, start: int, n: int, pad: int = 0) -> list[Record]:
    return [event_record(FileEvent(Op.CLOSE_WRITE, b"/%s/%06d%s" % (host.encode(), i, b"p" * pad), pid=i,
                                   backend="bpf"), T0 + i, host) for i in range(start, start + n)]


def open_output(tmp: Path, servers: list[str], host: str, **kw: object) -> tuple[NatsOutput, OutputStats]:
    spec, problems = parse_output({"type": "nats", "servers": servers, "spool": str(tmp / f"spool-{host}"),
                                   "host": host, **kw})
    assert spec is not None, problems
    st = OutputStats(spec.name, "nats")
    out = NatsOutput(spec, st, host=host, boot=read_boot_id(),
                     loss_marker=lambda n, why: output_loss_record(spec.name, n, why, T0, host))
    return out, st


# -- pure -----------------------------------------------------------------------------------------------------------


def test_spool_frames_round_trip_and_a_torn_tail_is_cut() -> None:
    a = fleet.Batch("ab" * 16, 1, 2, b'{"x":1}\n{"x":2}\n')
    b = fleet.Batch("ab" * 16, 3, 1, b'{"x":3}\n')
    data = encode_frame(a) + encode_frame(b)
    frames, good = decode_frames(data)
    assert [f[1] for f in frames] == [a, b] and good == len(data)
    frames, good = decode_frames(data[:-3])
    assert [f[1] for f in frames] == [a] and good == len(encode_frame(a))
    corrupt = bytearray(data)
    corrupt[-2] ^= 1
    assert [f[1] for f in decode_frames(bytes(corrupt))[0]] == [a]


ALREADY_CASES = {
    "nothing stored": (None, False),
    "stored up to this batch": (("b" * 32, 10), True),
    "stored past it": (("b" * 32, 50), True),
    "stored before it": (("b" * 32, 9), False),
    "another boot": (("c" * 32, 50), False),
}


@pytest.mark.parametrize("name", list(ALREADY_CASES))
def test_already_stored(name: str) -> None:
    upto, want = ALREADY_CASES[name]
    b = fleet.Batch("b" * 32, 8, 3, b"")
    assert fleet.already_stored(b.boot, b.last_seq, upto) is want


def test_reorder_holds_a_message_ahead_of_a_missing_one() -> None:
    r = Reorder(next_seq=5)
    assert r.push(6, "m6", now=0.0) == ([], [])
    assert r.push(4, "m4", now=0.0) == ([], ["m4"]), "already handled: acknowledged, skipped"
    assert r.push(5, "m5", now=1.0) == (["m5", "m6"], [])
    assert r.push(6, "m6 again", now=1.0) == ([], ["m6 again"])
    assert r.push(9, "m9", now=2.0) == ([], [])
    assert r.release(now=3.0, gap_timeout=5.0) == []
    assert r.release(now=8.0, gap_timeout=5.0) == ["m9"], "7 and 8 are gone from the stream"


def test_spool_keeps_batches_across_reopen_and_bounds_its_size(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), max_bytes=3000, segment_bytes=1000)
    batches = [fleet.Batch("ab" * 16, 1 + 10 * i, 10, b"x" * 399 + b"\n") for i in range(8)]
    took = [s.append(b) for b in batches]
    assert took == [True] * 6 + [False] * 2 and s.records == 60
    s.close()
    with open(sorted(p for p in tmp_path.iterdir() if p.name.startswith("seg-"))[-1], "ab") as f:
        f.write(b"\x01\x02torn")  # a crash in the middle of an append
    s = Spool(str(tmp_path), max_bytes=3000, segment_bytes=1000)
    assert s.repaired_bytes == 6 and s.records == 60 and s.last_seq == 60
    got = []
    while (h := s.head()) is not None:
        got.append(h)
        s.pop()
    assert got == batches[:6] and s.bytes == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("seg-")], "acknowledged segments are deleted"


def test_spool_merges_consecutive_batches_and_drops_what_is_stored(tmp_path: Path) -> None:
    boot, other = "ab" * 16, "cd" * 16
    a = fleet.Batch(boot, 1, 2, b'{"x":1}\n{"x":2}\n')
    b = fleet.Batch(boot, 3, 1, b'{"x":3}\n')
    gap = fleet.Batch(boot, 5, 1, b'{"x":5}\n')
    new_boot = fleet.Batch(other, 1, 1, b'{"y":1}\n')
    s = Spool(str(tmp_path), 1 << 20)
    for x in (a, b, gap, new_boot):
        assert s.append(x)
    cases = {
        "consecutive batches of one boot merge": ((1 << 20, 100), fleet.Batch(boot, 1, 3, a.body + b.body), 2),
        "at most max_bytes of bodies": ((len(a.body) + len(b.body) - 1, 100), a, 1),
        "at most max_frames": ((1 << 20, 1), a, 1),
        "the first batch even when larger than max_bytes": ((1, 100), a, 1),
    }
    for name, (args, want, n) in cases.items():
        assert s.head_run(*args) == (want, n), name
    s.pop(2)
    assert s.head_run(1 << 20, 100) == (gap, 1), "a gap in the numbers ends the merge"
    s.pop()
    assert s.head_run(1 << 20, 100) == (new_boot, 1)
    s2 = Spool(str(tmp_path / "two"), 1 << 20)
    for x in (a, b, gap):
        s2.append(x)
    assert s2.drop_stored(lambda bt, last: fleet.already_stored(bt, last, (boot, 3))) == (3, len(a.body + b.body))
    assert s2.head() == gap and s2.records == 1


# -- one real server ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_killed_and_restarted_every_record_once_in_order(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as srv:
        out, st = open_output(tmp_path, [srv.url], "h1")
        try:
            out.write(recs("h1", 0, 500))
            wait_for(lambda: st.records == 500, what="the first records stored")
            srv.kill()
            wait_for(lambda: not st.connected, what="the publisher to see the server gone")
            out.write(recs("h1", 500, 700))
            assert out.spool.records == 700, "write spools in the caller's thread"
            assert st.records == 500 and st.backlog is not None and st.backlog() == 700
            srv.start()
            wait_for(lambda: st.records == 1200, what="the spool sent after the restart")
            assert out.spool.records == 0 and st.lost == 0
        finally:
            out.close()
        got = stored_records([srv.url])
    assert [r["pid"] for r in got["h1"]] == list(range(1200))


@pytest.mark.slow
def test_a_writer_faster_than_the_publisher_loses_nothing(tmp_path: Path) -> None:
    """The capture thread writes faster than one batch in flight can publish (here: 400,000 records in a tight loop):
    everything waits in the spool, nothing is dropped while the spool has room (a bounded in-memory queue in front of
    the spool dropped records here)."""
    n, chunk = 400_000, 2_000
    lines = [r.line for r in recs("h1", 0, chunk)]
    with NatsServer(tmp_path / "nats") as srv:
        out, st = open_output(tmp_path, [srv.url], "h1")
        try:
            for _ in range(n // chunk):
                out.write_lines(lines)
            assert st.lost == 0, f"{st.lost} records dropped while the spool had room"
            assert out.spool.records + st.records == n
            wait_for(lambda: st.records == n, timeout=300, what="every record stored")
            assert st.lost == 0 and out.spool.records == 0
        finally:
            out.close()


@pytest.mark.slow
def test_small_writes_go_out_merged_in_few_messages(tmp_path: Path) -> None:
    """Each ``write`` spools a batch, often of a few records; one acknowledged message per batch held the publisher
    to a few thousand records/s. Spooled while the server is away, 3,000 one-record writes go out as a handful of
    messages, every record once and in order."""
    import nats

    with NatsServer(tmp_path / "nats") as srv:
        srv.kill()
        out, st = open_output(tmp_path, [srv.url], "h1")
        try:
            for r in recs("h1", 0, 3000, pad=200):
                out.write([r])
            assert out.spool.records == 3000
            srv.start()
            wait_for(lambda: st.records == 3000, what="the spool sent")
        finally:
            out.close()

        async def messages() -> int:
            nc = await nats.connect([srv.url])
            try:
                return int((await nc.jetstream().stream_info(STREAM)).state.messages)
            finally:
                await nc.close()

        assert run(messages()) <= 3, "about 250 bytes x 3,000 records: one or two messages of up to 1 MiB"
        got = stored_records([srv.url])
    assert [r["pid"] for r in got["h1"]] == list(range(3000))


@pytest.mark.slow
def test_a_stream_that_refuses_big_messages_gets_smaller_ones(tmp_path: Path) -> None:
    """A stream made beforehand with a small ``max_msg_size`` refuses a message of merged batches (the server
    answers with an error: nothing stored): the publisher merges fewer, instead of sending the refused one forever."""
    import nats

    with NatsServer(tmp_path / "nats") as srv:

        async def make_stream() -> None:
            nc = await nats.connect([srv.url])
            try:
                await nc.jetstream().add_stream(name=STREAM, subjects=["kwatch.>"], max_msg_size=64 << 10)
            finally:
                await nc.close()

        run(make_stream())
        srv.kill()
        out, st = open_output(tmp_path, [srv.url], "h1", create_stream=False)
        try:
            for r in recs("h1", 0, 3000, pad=200):
                out.write([r])
            srv.start()
            wait_for(lambda: st.records == 3000, what="every record stored in messages the stream takes")
            assert st.lost == 0
        finally:
            out.close()
        got = stored_records([srv.url])
    assert [r["pid"] for r in got["h1"]] == list(range(3000))


@pytest.mark.slow
def test_a_batch_the_stream_holds_is_not_stored_again(tmp_path: Path) -> None:
    """A daemon that died after the server stored a batch but before it heard the acknowledgement."""
    import nats

    boot = read_boot_id()
    lines = [r.line for r in recs("h1", 0, 30)]
    b1 = fleet.Batch(boot, 5_000_001, 10, b"".join(lines[:10]))
    b2 = fleet.Batch(boot, 5_000_011, 20, b"".join(lines[10:]))
    spool_dir = tmp_path / "spool-h1"
    sp = Spool(str(spool_dir), 1 << 20)
    assert sp.append(b1) and sp.append(b2)
    sp.close()
    with NatsServer(tmp_path / "nats") as srv:

        async def publish(batch: fleet.Batch) -> bool:
            nc = await nats.connect([srv.url])
            try:
                js = nc.jetstream()
                await ensure_stream(js, STREAM, "kwatch", 1)
                ack = await js.publish("kwatch.h1", batch.body, headers=batch.headers("h1"))
                return bool(ack.duplicate)
            finally:
                await nc.close()

        assert run(publish(b1)) is False
        out, st = open_output(tmp_path, [srv.url], "h1")
        try:
            wait_for(lambda: out.spool.records == 0, what="the spool emptied")
            assert st.records == 30, "the records the stream holds, whoever published them"
            assert st.already_stored == 10, "the batch the stream held was not sent again"
        finally:
            out.close()
        assert run(publish(b2)) is True, "JetStream drops a message id it has stored"
        got = stored_records([srv.url])
    assert [r["pid"] for r in got["h1"]] == list(range(30))


@pytest.mark.slow
def test_collect_archives_and_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """``kwatch collect --archive``: a second run of the same durable consumer appends only what came since."""
    archive = tmp_path / "archive.jsonl"
    with NatsServer(tmp_path / "nats") as srv:

        def publish(start: int, n: int) -> None:
            out, st = open_output(tmp_path, [srv.url], "h1")
            try:
                out.write(recs("h1", start, n))
                wait_for(lambda: st.records == n, what="the records stored")
            finally:
                out.close()

        for start, n in ((0, 500), (500, 300)):
            publish(start, n)
            r = subprocess.run([*KWATCH, "collect", "--server", srv.url, "--durable", "archiver", "--archive",
                                str(archive), "--count", str(n), "--duration", "120"],
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stderr
            assert r.stdout == "", "an archiving collector prints no records"
    got = [json.loads(ln) for ln in archive.read_bytes().splitlines()]
    assert [g["pid"] for g in got] == list(range(800)), "each record once, in order, across the two runs"


@pytest.mark.slow
def test_full_spool_counts_and_announces_the_loss(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "nats")  # not started: unreachable
    out, st = open_output(tmp_path, [srv.url], "h1", spool_max_bytes=20000)
    try:
        for i in range(10):
            out.write(recs("h1", 50 * i, 50, pad=100))  # about 9 KB a write
        assert st.lost > 0 and out.spool.records + st.lost == 500
        spooled, lost = out.spool.records, st.lost
        srv.start()
        wait_for(lambda: out.spool.records == 0, what="the spool sent")
        out.write(recs("h1", 1000, 5))
        wait_for(lambda: st.records == spooled + 1 + 5, what="the marker and the new records")
        got = stored_records([srv.url])["h1"]
    finally:
        out.close()
        srv.kill()
    assert [r["pid"] for r in got[:spooled]] == list(range(spooled))
    assert got[spooled]["kind"] == "loss" and got[spooled]["lost"] == lost and "spool" in got[spooled]["reason"]
    assert [r["pid"] for r in got[spooled + 1 :]] == list(range(1000, 1005))


# -- a three-node cluster -------------------------------------------------------------------------------------------


async def _leader(servers: list[str]) -> str:
    import nats

    nc = await nats.connect(servers)
    try:
        info = await nc.jsm().stream_info(STREAM)
        assert info.cluster is not None and info.cluster.leader
        return str(info.cluster.leader)
    finally:
        await nc.close()


@pytest.mark.slow
def test_cluster_loses_its_leader_mid_stream(tmp_path: Path) -> None:
    hosts = ("h1", "h2")
    steps, per_step = 12, 150
    total = steps * per_step
    collected_file = open(tmp_path / "collected.jsonl", "wb")  # noqa: SIM115 - a pipe would fill up and block it
    with collected_file, NatsCluster(tmp_path / "cluster") as c:
        outs = {h: open_output(tmp_path, c.urls, h, replicas=3) for h in hosts}
        collector = None
        try:
            for h, (out, _) in outs.items():
                out.write(recs(h, 0, per_step))
            wait_for(lambda: all(st.records == per_step for _, st in outs.values()), what="the stream created")
            collector = subprocess.Popen(
                [*KWATCH, "collect", *(a for u in c.urls for a in ("--server", u)), "--durable", "audit",
                 "--count", str(len(hosts) * total), "--duration", "300"],
                stdout=collected_file, stderr=subprocess.PIPE)
            for step in range(1, steps):
                for h, (out, _) in outs.items():
                    out.write(recs(h, step * per_step, per_step))
                if step == steps // 2:
                    leader = run(_leader(c.urls))
                    c.by_name(leader).kill()
            for h, (_, st) in outs.items():
                out = outs[h][0]
                wait_for(lambda st=st: st.records == total,  # type: ignore[misc]
                         what=f"every record of {h} stored (stored {st.records}, spooled {out.spool.records}, "
                              f"connected {st.connected}, errors {st.errors})")
                assert st.lost == 0
        finally:
            for out, _ in outs.values():
                out.close()
            if collector is not None:
                try:
                    _, err_b = collector.communicate(timeout=300)
                except subprocess.TimeoutExpired:
                    collector.kill()
                    _, err_b = collector.communicate()
        assert collector is not None
        assert collector.returncode == 0, err_b.decode(errors="replace")
        alive = [s.url for s in c.servers if s.proc is not None]
        stored = stored_records(alive)
    for h in hosts:
        assert [r["pid"] for r in stored[h]] == list(range(total)), f"{h}: the stream holds each record once, in order"
    collected: dict[str, list[int]] = {}
    for line in (tmp_path / "collected.jsonl").read_bytes().splitlines():
        r = json.loads(line)
        collected.setdefault(r["host"], []).append(r["pid"])
    for h in hosts:
        assert collected[h] == list(range(total)), f"{h}: kwatch collect printed each record once, in order"

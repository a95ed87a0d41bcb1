"""Durable outputs end to end: ``kwatch run`` writing a JSON file, the journal (a journald of the test's own) and
NATS JetStream (a real nats-server) at once, alerts included, with the outputs' metrics scraped; and ``kwatch trace
--output``. BPF backend, real file operations."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from journald import Journald
from natsd import NatsServer, stored_records
from prometheus_client.parser import text_string_to_metric_families

KWATCH = [sys.executable, "-c", "import sys; from kwatch.cli import main; sys.exit(main())"]


def wait_for(cond: Callable[[], bool], timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(ln) for ln in data[: data.rfind(b"\n") + 1].splitlines()]


def scrape(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@pytest.mark.root
@pytest.mark.slow
def test_run_writes_file_journal_and_nats_at_once(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    with Journald() as jd, NatsServer(tmp_path / "nats") as srv:
        conf = tmp_path / "k.toml"
        conf.write_text(f"""
[[rule]]
name = "watched"
match = '^{w}/'
on = ["OPENW"]
alert = "a watched file changed"

[[output]]
type = "file"
path = "{audit}"
fsync = "every"

[[output]]
type = "journal"
socket = "{jd.socket}"
identifier = "kwtest"

[[output]]
type = "nats"
servers = ["{srv.url}"]
spool = "{tmp_path / 'spool'}"
host = "h1"
""")
        err = open(tmp_path / "daemon.err", "wb")  # noqa: SIM115
        d = subprocess.Popen([*KWATCH, "run", "-c", str(conf), "--backend", "bpf", "--metrics", f"127.0.0.1:{port}"],
                             stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: d.poll() is not None or b"event=ready" in (tmp_path / "daemon.err").read_bytes(),
                     what="the daemon ready")
            assert d.poll() is None, (tmp_path / "daemon.err").read_text()
            (w / "a").write_bytes(b"1")
            (w / "b").write_bytes(b"2")
            wait_for(lambda: sum(r.get("kind") == "alert" for r in lines(audit)) >= 2, what="both alerts in the file")
            wait_for(lambda: scrape(port, "kwatch_output_records_total", output="nats:KWATCH") >= 4,
                     what="the records stored in JetStream")
            wait_for(lambda: len([e for e in jd.entries("kwtest") if e.get("KWATCH_KIND") == "alert"]) >= 2,
                     what="the alerts in the journal")
            assert scrape(port, "kwatch_alerts_total", rule="watched") == 2
            assert scrape(port, "kwatch_output_lost_total", output="journal") == 0
            assert scrape(port, "kwatch_output_fsyncs_total", output=f"file:{audit}") >= 1
            assert scrape(port, "kwatch_output_connected", output="nats:KWATCH") == 1
        finally:
            d.send_signal(signal.SIGTERM)
            try:
                d.wait(90)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
            err.close()
        assert d.returncode == 0
        nats_recs = stored_records([srv.url])["h1"]
        journal = jd.entries("kwtest")
    in_file = lines(audit)
    for name, recs in (("file", in_file), ("nats", nats_recs)):
        got = [(r["kind"], r["op"], r["path"]) for r in recs if str(r.get("path", "")).startswith(str(w))]
        want = [(k, "close_write", str(w / n)) for n in "ab" for k in ("event", "alert")]
        assert [g for g in got if g[1] == "close_write"] == want, name
    alerts = [e for e in journal if e.get("KWATCH_KIND") == "alert"]
    assert [e["KWATCH_PATH"] for e in alerts] == [str(w / "a"), str(w / "b")]
    assert all(e["PRIORITY"] == "4" and e["KWATCH_RULE"] == "watched" for e in alerts)


@pytest.mark.root
@pytest.mark.slow
def test_trace_output_file_and_journal(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    out = tmp_path / "trace.jsonl"
    with Journald() as jd:
        t = subprocess.Popen([*KWATCH, "trace", str(w), "--backend", "bpf", "--op", "close_write", "--quiet",
                              "--output", f"file:{out},fsync=every",
                              "--output", f"journal:{jd.socket},identifier=kwtest"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            n = 0

            def seen() -> bool:  # write files until trace has attached and recorded one
                nonlocal n
                if t.poll() is not None:
                    raise AssertionError(f"trace exited: {t.stderr.read().decode() if t.stderr else ''}")
                (w / f"probe{n}").write_bytes(b"x")
                n += 1
                return len(lines(out)) > 0

            wait_for(seen, what="trace attached")
            (w / "last").write_bytes(b"y")
            wait_for(lambda: any(r["path"] == str(w / "last") for r in lines(out)), what="the last write in the file")
        finally:
            t.send_signal(signal.SIGTERM)
            stdout, stderr = t.communicate(timeout=60)
        assert t.returncode == 0, stderr
        assert stdout == b"", "--quiet prints no events"
        recs = lines(out)
        assert out.read_bytes().endswith(b"\n")
        assert all(r["kind"] == "event" and r["op"] == "close_write" and "time" in r and "host" in r for r in recs)
        wait_for(lambda: len(jd.entries("kwtest")) >= len(recs), what="the journal entries")
        assert [e["KWATCH_PATH"] for e in jd.entries("kwtest")] == [r["path"] for r in recs]

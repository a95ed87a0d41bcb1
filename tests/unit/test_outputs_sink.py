"""The fan-out (kwatch.outputs.sink.Outputs) over real file outputs: an alert's record follows its event's, an
alerts-only output gets alerts and loss markers only, and an output's own server's operations are left out of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import OutputStats
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.sink import FEEDBACK_COMMS, Outputs
from kwatch.rules import parse_config
from kwatch.rules.match import config_alerts


def read(path: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in path.read_bytes().splitlines()]


def test_alerts_follow_their_events_and_selection_by_output(tmp_path: Path) -> None:
    cfg, errs = parse_config("[[rule]]\nname = 'r'\nmatch = '^/s/'\non = ['CLOSEW']\nalert = 'hit'\n", "k.toml")
    assert cfg is not None, errs
    evs = [FileEvent(Op.CLOSE_WRITE, b"/o/x", pid=1, comm=b"a", backend="bpf"),
           FileEvent(Op.CLOSE_WRITE, b"/s/y", pid=2, comm=b"b", backend="bpf"),
           FileEvent(Op.LOSS, b"/", lost=7, backend="bpf"),
           FileEvent(Op.CLOSE_WRITE, b"/s/z", pid=3, comm=b"c", backend="bpf")]
    stats: dict[str, OutputStats] = {}
    outs = Outputs([OutputSpec(kind="file", name="all", path=str(tmp_path / "all.jsonl"), fsync="none"),
                    OutputSpec(kind="file", name="alerts", path=str(tmp_path / "alerts.jsonl"), fsync="none",
                               records="alerts")], stats, host="h")
    try:
        for e in evs:
            for a in config_alerts(cfg, e):
                outs.alert(a)
        outs.feed(evs)
    finally:
        outs.close()
    got = [(r["kind"], r.get("path")) for r in read(tmp_path / "all.jsonl")]
    assert got == [("event", "/o/x"), ("event", "/s/y"), ("alert", "/s/y"), ("loss", "/"), ("event", "/s/z"),
                   ("alert", "/s/z")]
    assert [(r["kind"], r.get("path")) for r in read(tmp_path / "alerts.jsonl")] == [
        ("alert", "/s/y"), ("loss", "/"), ("alert", "/s/z")]
    first = read(tmp_path / "alerts.jsonl")[0]
    assert first["rule"] == "r" and first["message"] == "hit" and first["level"] == "warning" and first["host"] == "h"
    assert stats["all"].records == 6 and stats["alerts"].records == 3


def test_the_outputs_own_server_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FEEDBACK_COMMS, "file", frozenset({"nats-server"}))  # as if the file were that server's output
    stats: dict[str, OutputStats] = {}
    outs = Outputs([OutputSpec(kind="file", name="f", path=str(tmp_path / "f.jsonl"), fsync="none")], stats, host="h")
    outs.feed([FileEvent(Op.CLOSE_WRITE, b"/store/blk", pid=9, comm=b"nats-server", backend="bpf"),
               FileEvent(Op.CLOSE_WRITE, b"/etc/x", pid=10, comm=b"vi", backend="bpf")])
    outs.close()
    assert [r["path"] for r in read(tmp_path / "f.jsonl")] == ["/etc/x"]
    assert stats["f"].skipped == 1

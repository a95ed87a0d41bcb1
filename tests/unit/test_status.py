"""``kwatch status``'s pure parts: the snapshot built from the daemon's counters, and its text. The live test (a real
daemon, its socket, the command) is tests/e2e/test_daemon.py::test_status_reads_the_running_daemon."""

from __future__ import annotations

import io
import json
from collections import Counter

from kwatch.daemon.status import format_status, snapshot
from kwatch.metrics.stats import DaemonStats, OutputStats, TargetStats


def test_snapshot_sums_events_by_op_and_lists_outputs_and_targets() -> None:
    st = DaemonStats()
    st.events = Counter({("close_write", "bpf"): 5, ("close_write", "fanotify"): 2, ("unlink", "bpf"): 1})
    st.lost = Counter({"bpf": 3})
    st.alerts = Counter({"sudoers": 2})
    st.actions = Counter({("convert", "ok"): 4})
    st.queues = {"actions_waiting": lambda: 7}
    o = OutputStats("bus", "nats", records=10, lost=1, connected=False)
    o.backlog = lambda: 42
    st.outputs = {"bus": o}
    t = TargetStats("host:/dst", files=9, batches=2, reconnects=5, connected=False, down="auth_failed")
    st.targets = {"host:/dst": t}
    snap = snapshot(st, {"pid": 1, "config": "/etc/kwatch/kwatch.toml", "backend": "bpf",
                         "capture": "bpf (VFS hooks: fentry/fexit)", "blind_spots": ["io_uring"], "started": 0.0})
    assert json.loads(json.dumps(snap)) == snap, "plain JSON"
    assert snap["events"] == {"close_write": 7, "unlink": 1} and snap["events_total"] == 8
    assert snap["lost_total"] == 3 and snap["queues"] == {"actions_waiting": 7}
    assert snap["outputs"] == [{"name": "bus", "kind": "nats", "connected": False, "records": 10, "bytes": 0,
                                "lost": 1, "errors": 0, "skipped": 0, "backlog": 42, "spool_bytes": 0}]
    (tgt,) = snap["targets"]
    assert tgt["name"] == "host:/dst" and tgt["down"] == "auth_failed" and tgt["files"] == 9 and tgt["reconnects"] == 5 and tgt["connected"] is False
    out = io.StringIO()
    format_status(snap, out)
    text = out.getvalue()
    assert "capture: bpf; cannot see: io_uring" in text
    assert "capture program: bpf (VFS hooks: fentry/fexit)\n" in text
    assert "events: 8 (close_write 7, unlink 1); lost 3" in text
    assert "output bus (nats): NOT CONNECTED, records 10, backlog 42, lost 1" in text
    assert "target host:/dst: DOWN (auth_failed), " in text and "reconnects 5" in text

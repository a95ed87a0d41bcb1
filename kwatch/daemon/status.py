"""``kwatch status``: what a running daemon is doing, read from the daemon itself.

``kwatch run`` serves a snapshot of its state on a Unix socket (``--status-socket``, mode 0600 in a 0700
directory: it names paths and targets, so root's daemon shows it to root only). A client connects, the daemon writes
one JSON object and closes; nothing is read from the client, so a client cannot hold the daemon up. The snapshot is
built from the same counters the Prometheus endpoint reads (:class:`kwatch.metrics.stats.DaemonStats`), at the
moment of the request.

``kwatch status`` prints it the way ``systemctl status`` would (or ``--json`` as is) and exits 3 when no daemon
answers, as systemctl does for a unit that is not running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from kwatch.metrics.stats import DaemonStats

NOT_RUNNING = 3  # systemctl status's "program is not running"
READ_TIMEOUT = 10.0


def default_socket() -> str:
    """``/run/kwatch/status.sock`` for root; a per-user runtime directory otherwise."""
    if os.geteuid() == 0:
        return "/run/kwatch/status.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kwatch-{os.geteuid()}"
    return os.path.join(base, "kwatch", "status.sock")


def snapshot(stats: DaemonStats, info: dict[str, Any]) -> dict[str, Any]:
    """The state a client sees: the daemon's facts (``info``: pid, config, backend...) and its counters."""
    events: dict[str, int] = {}
    for (op, _backend), n in stats.events.items():
        events[op] = events.get(op, 0) + n
    outputs = []
    for o in sorted(stats.outputs.values(), key=lambda o: o.name):
        outputs.append({
            "name": o.name, "kind": o.kind, "connected": o.connected, "records": o.records, "bytes": o.bytes,
            "lost": o.lost, "errors": o.errors, "skipped": o.skipped,
            "backlog": o.backlog() if o.backlog is not None else 0,
            "spool_bytes": o.backlog_bytes() if o.backlog_bytes is not None else 0,
        })
    targets = []
    for t in sorted(stats.targets.values(), key=lambda t: t.name):
        # every plain field: a new one (a state, a reason) shows here without touching this code
        targets.append({f.name: getattr(t, f.name) for f in dataclasses.fields(t)
                        if isinstance(getattr(t, f.name), (int, float, str, bool, type(None)))})
    started = info.get("started")
    return {
        **info,
        "uptime": round(time.time() - started, 1) if isinstance(started, (int, float)) else None,
        "events": dict(sorted(events.items())),
        "events_total": sum(events.values()),
        "lost": dict(sorted(stats.lost.items())),
        "lost_total": sum(stats.lost.values()),
        "rules": dict(sorted(stats.rule_matches.items())),
        "alerts": dict(sorted(stats.alerts.items())),
        "actions": {f"{rule}/{result}": n for (rule, result), n in sorted(stats.actions.items())},
        "queues": {name: depth() for name, depth in sorted(stats.queues.items())},
        "reloads": stats.reloads,
        "reload_errors": stats.reload_errors,
        "outputs": outputs,
        "targets": targets,
    }


class StatusServer:
    """Serves ``snapshot()`` on a Unix socket from a thread of its own; ``close`` removes the socket."""

    def __init__(self, path: str, make: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.make = make
        d = os.path.dirname(path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        if _answers(path):
            raise OSError(f"{path} is served by another running kwatch")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a daemon that died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    data = json.dumps(self.make(), ensure_ascii=True, default=str).encode() + b"\n"
                    conn.settimeout(READ_TIMEOUT)  # a client that never reads cannot hold this thread
                    conn.sendall(data)
                except Exception:  # one bad request never stops the server
                    continue

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def fetch(path: str) -> dict[str, Any]:
    """The running daemon's snapshot (OSError when none answers)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(READ_TIMEOUT)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = json.loads(b"".join(chunks))
    if not isinstance(data, dict):
        raise ValueError("the status is not a JSON object")
    return data


def _n(x: object) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{d}d"] * bool(d) + [f"{h}h"] * bool(h) + [f"{m}min"] * bool(m) + [f"{sec}s"]
    return " ".join(parts[:2])


def format_status(st: dict[str, Any], out: IO[str]) -> None:
    w = out.write
    w(f"kwatch run (pid {st.get('pid')}), up {_duration(st.get('uptime'))}, config {st.get('config')}\n")
    w(f"  capture: {st.get('backend')}")
    blind = st.get("blind_spots") or []
    w(f"; cannot see: {'; '.join(blind)}\n" if blind else "\n")
    if st.get("capture") and st.get("capture") != st.get("backend"):
        w(f"  capture program: {st.get('capture')}\n")  # the BPF backend's hooks
    ev = st.get("events") or {}
    w(f"  events: {_n(st.get('events_total', 0))}"
      + (" (" + ", ".join(f"{k} {_n(v)}" for k, v in ev.items()) + ")" if ev else "")
      + f"; lost {_n(st.get('lost_total', 0))}\n")
    rules = st.get("rules") or {}
    if rules:
        w("  rules: " + ", ".join(f"{k} {_n(v)}" for k, v in rules.items()) + "\n")
    alerts = st.get("alerts") or {}
    if alerts:
        w("  alerts: " + ", ".join(f"{k} {_n(v)}" for k, v in alerts.items()) + "\n")
    actions = st.get("actions") or {}
    if actions:
        w("  actions: " + ", ".join(f"{k} {_n(v)}" for k, v in actions.items()) + "\n")
    for o in st.get("outputs") or []:
        w(f"  output {o['name']} ({o['kind']}): {'connected' if o['connected'] else 'NOT CONNECTED'}, "
          f"records {_n(o['records'])}, backlog {_n(o['backlog'])}, lost {_n(o['lost'])}, "
          f"errors {_n(o['errors'])}\n")
    for t in st.get("targets") or []:
        state = "connected" if t.get("connected") else "DOWN"
        why = t.get("down")
        if why and not t.get("connected"):
            state += f" ({why})"
        w(f"  target {t['name']}: {state}, lag {t.get('lag_seconds', 0):.1f} s, pending {_n(t.get('pending_paths'))}, "
          f"files {_n(t.get('files'))}, batches {_n(t.get('batches'))}, errors {_n(t.get('errors'))}, "
          f"reconnects {_n(t.get('reconnects'))}\n")
        if t.get("syncing"):
            w(f"    reconciling: {_n(t.get('sync_files'))}/{_n(t.get('sync_files_total'))} files, "
              f"{t.get('sync_bytes', 0) / 1e6:.1f}/{t.get('sync_bytes_total', 0) / 1e6:.1f} MB, "
              f"{t.get('sync_bytes_per_s', 0) / 1e6:.1f} MB/s, {_duration(t.get('sync_eta_s'))} left\n")

"""The fan-out to durable outputs: each record is built and encoded once per batch, then written to every output.

:class:`Outputs` is what ``kwatch trace`` and the daemon hold. In the daemon it is an event sink
(:class:`kwatch.daemon.EventSink`): ``feed`` gets every captured batch (LOSS markers included) and ``alert`` the alerts
the daemon's rules raised; an alert's record follows its event's record in every output. An output with
``records = "alerts"`` gets alert and loss records only.

Feedback: an output's own server writes files when it stores a record (journald its journal, nats-server its
store); when the capture sees those writes, each record would make another. Records of processes named like the
output's server (``systemd-journal``, ``nats-server``) are therefore left out of that output and counted in
``skipped``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from kwatch.context import ProcInfo, Resolver
from kwatch.events import FileEvent, Op
from kwatch.metrics.stats import OutputStats
from kwatch.outputs import record as rec
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.record import Record

log = logging.getLogger("kwatch.outputs")

#: process names (comm) of each kind's server: their file operations are not written to that output (feedback)
FEEDBACK_COMMS: dict[str, frozenset[str]] = {
    "journal": frozenset({"systemd-journal"}),
    "nats": frozenset({"nats-server"}),
    "file": frozenset(),
}


class Output(Protocol):
    def write(self, records: Sequence[Record]) -> None: ...

    def close(self) -> None: ...


def open_output(spec: OutputSpec, stats: OutputStats, host: str) -> Output:
    """Open one output (raises OSError, or ImportError for a nats output without nats-py)."""

    def marker(lost: int, reason: str) -> Record:
        return rec.output_loss_record(spec.name, lost, reason, time.time_ns(), host)

    if spec.kind == "file":
        from kwatch.outputs.jsonl import JsonlWriter

        return JsonlWriter(spec, stats, loss_marker=marker)
    if spec.kind == "journal":
        from kwatch.outputs.journal import JournalWriter

        return JournalWriter(spec, stats, loss_marker=marker)
    from kwatch.outputs.bus import NatsOutput, read_boot_id

    return NatsOutput(spec, stats, host=spec.host or host, boot=read_boot_id(), loss_marker=marker)


class _Alert(Protocol):
    """What the daemon hands to :meth:`Outputs.alert` (``kwatch.rules.match.AlertMatch``)."""

    @property
    def event(self) -> FileEvent: ...

    @property
    def rule_name(self) -> str: ...

    @property
    def message(self) -> str: ...

    @property
    def level(self) -> str: ...


class Outputs:
    def __init__(self, specs: Sequence[OutputSpec], stats: dict[str, OutputStats] | None = None,
                 host: str | None = None, resolver: Callable[[FileEvent], ProcInfo | None] | None = None) -> None:
        self.host = host or socket.gethostname()
        # who did it (kwatch.context): exe, login uid, container...; shared with ``kwatch trace``'s own lines
        self.resolver = resolver if resolver is not None else Resolver()
        self.stats = stats if stats is not None else {}
        self.outputs: list[tuple[OutputSpec, Output, OutputStats, frozenset[bytes]]] = []
        self._alerts: dict[int, list[Record]] = {}
        try:
            for spec in specs:
                st = self.stats.setdefault(spec.name, OutputStats(spec.name, spec.kind))
                out = open_output(spec, st, self.host)
                feedback = frozenset(c.encode() for c in FEEDBACK_COMMS[spec.kind])
                self.outputs.append((spec, out, st, feedback))
        except BaseException:
            self.close()
            raise

    def alert(self, a: _Alert) -> None:
        """An alert about an event of the batch about to be fed; its record follows the event's."""
        ev = a.event
        now_w, now_m = time.time_ns(), time.monotonic_ns()
        r = rec.alert_record(ev, a.rule_name, a.message, a.level, rec.event_wall_ns(ev, now_w, now_m), self.host,
                             self.resolver(ev))
        self._alerts.setdefault(id(ev), []).append(r)

    def feed(self, events: Sequence[FileEvent]) -> None:
        now_w, now_m = time.time_ns(), time.monotonic_ns()
        want_all = any(spec.records == "all" for spec, _, _, _ in self.outputs)
        alerts = self._alerts
        resolve = self.resolver
        records: list[tuple[Record, bytes | None]] = []
        for ev in events:
            if want_all or ev.op is Op.LOSS:
                records.append((rec.event_record(ev, rec.event_wall_ns(ev, now_w, now_m), self.host, resolve(ev)),
                                ev.comm))
            if alerts:
                for r in alerts.pop(id(ev), ()):
                    records.append((r, ev.comm))
        if alerts:  # alerts about events not in this batch (should not happen): still written
            for rs in alerts.values():
                records.extend((r, None) for r in rs)
            alerts.clear()
        self.write(records)

    def write(self, records: Sequence[tuple[Record, bytes | None]]) -> None:
        """Write (record, comm of its process) pairs to every output that takes them."""
        if not records:
            return
        for spec, out, st, feedback in self.outputs:
            sel = [r for r, comm in records
                   if (spec.records == "all" or r.kind != rec.KIND_EVENT) and not (feedback and comm in feedback)]
            st.skipped += sum(1 for _, comm in records if feedback and comm in feedback)
            try:
                out.write(sel)
            except Exception as e:  # one broken output must not stop the others
                st.errors += 1
                st.lost += len(sel)
                log.error("output %s: %s: %s", spec.name, type(e).__name__, e)

    def close(self) -> None:
        for spec, out, st, _ in self.outputs:
            try:
                out.close()
            except Exception as e:
                st.errors += 1
                log.error("output %s: close: %s: %s", spec.name, type(e).__name__, e)
        self.outputs = []


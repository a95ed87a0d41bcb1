"""Output records: what every durable output writes, one JSON object per record. Pure: the clock is passed in.

A record is the JSON object of ``kwatch trace --json`` (:func:`kwatch.trace.to_json`: paths as UTF-8 with non-UTF-8
bytes as lone surrogates ``\\udcNN``) plus:

- ``kind``: ``event`` (a captured file operation), ``alert`` (a rule's alert about that operation: the event's fields
  plus ``rule``, ``message`` and ``level``) or ``loss`` (records were lost: by the capture, ``op`` ``loss`` with
  ``lost``, or by an output, with ``output`` and ``reason`` too);
- ``time``: wall-clock time of the operation, RFC 3339 UTC with microseconds (from the kernel's monotonic stamp when
  the backend has one, else when kwatch read it);
- ``host``: the host name the record was made on.

A record's JSON line is encoded once and written as is by every output (file, NATS); the journal takes its fields.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from kwatch.events import FileEvent, Op
from kwatch.trace import to_json

#: syslog priorities (journald's PRIORITY field) of the levels a record can have
LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}

KIND_EVENT = "event"
KIND_ALERT = "alert"
KIND_LOSS = "loss"


class Record(NamedTuple):
    kind: str
    priority: int  # syslog priority: events 6 (info), alerts their level (warning by default), losses 4
    data: dict[str, object]
    line: bytes  # the JSON line, newline included


def rfc3339(wall_ns: int) -> str:
    secs, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1000:06d}Z"


def event_wall_ns(ev: FileEvent, wall_now_ns: int, mono_now_ns: int) -> int:
    """The wall-clock time of an event: its monotonic stamp moved onto the wall clock, else now."""
    if ev.ts_ns is None:
        return wall_now_ns
    return wall_now_ns - (mono_now_ns - ev.ts_ns)


def encode(data: dict[str, object]) -> bytes:
    # ensure_ascii keeps lone surrogates as \udcNN escapes: the line is always valid UTF-8 and never holds a newline
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def make(kind: str, priority: int, data: dict[str, object]) -> Record:
    return Record(kind, priority, data, encode(data))


def event_record(ev: FileEvent, wall_ns: int, host: str) -> Record:
    """An event's record; a capture LOSS marker becomes a ``loss`` record."""
    data: dict[str, object] = {"kind": KIND_LOSS if ev.op is Op.LOSS else KIND_EVENT, "time": rfc3339(wall_ns),
                               "host": host}
    data.update(to_json(ev))
    if ev.op is Op.LOSS:
        return make(KIND_LOSS, LEVELS["warning"], data)
    return make(KIND_EVENT, LEVELS["info"], data)


def alert_record(ev: FileEvent, rule: str, message: str, level: str, wall_ns: int, host: str) -> Record:
    data: dict[str, object] = {"kind": KIND_ALERT, "time": rfc3339(wall_ns), "host": host, "rule": rule,
                               "message": message, "level": level}
    data.update(to_json(ev))
    return make(KIND_ALERT, LEVELS.get(level, LEVELS["warning"]), data)


def output_loss_record(output: str, lost: int, reason: str, wall_ns: int, host: str) -> Record:
    """The marker an output writes when it had to drop records: how many, and why."""
    data: dict[str, object] = {"kind": KIND_LOSS, "time": rfc3339(wall_ns), "host": host, "op": "loss",
                               "lost": lost, "backend": f"output:{output}", "output": output, "reason": reason}
    return make(KIND_LOSS, LEVELS["warning"], data)

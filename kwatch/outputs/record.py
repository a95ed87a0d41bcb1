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
An event's line is built by :func:`event_line` straight from the event, without the dict and ``json.dumps`` (a
third of the cost); the dict is made only when an output asks for it (the journal), and a test checks that both
give the same JSON.
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring_ascii as _quote

from kwatch.context import ProcInfo
from kwatch.events import FT_NAMES, FileEvent, Op, json_path
from kwatch.trace import to_json

#: syslog priorities (journald's PRIORITY field) of the levels a record can have
LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}

_INFO = 6
KIND_EVENT = "event"
KIND_ALERT = "alert"
KIND_LOSS = "loss"


class Record:
    """One record: ``kind``, ``priority`` (syslog: events 6, alerts their level, losses 4), ``line`` (the JSON line,
    newline included) and ``data`` (its object, made on first use when the line came first)."""

    __slots__ = ("_data", "kind", "line", "priority")

    def __init__(self, kind: str, priority: int, data: dict[str, object] | None, line: bytes) -> None:
        self.kind = kind
        self.priority = priority
        self.line = line
        self._data = data

    @property
    def data(self) -> dict[str, object]:
        if self._data is None:
            self._data = json.loads(self.line)
        return self._data

    def __repr__(self) -> str:
        return f"Record({self.kind!r}, {self.line!r})"


_second: list[object] = [None, ""]  # the last whole second formatted, and its text


def rfc3339(wall_ns: int) -> str:
    secs, ns = divmod(wall_ns, 1_000_000_000)
    if _second[0] != secs:  # strftime once a second, not once a record
        _second[0], _second[1] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{_second[1]}.{ns // 1000:06d}Z"


def event_line(ev: FileEvent, time_text: str, host: str, info: ProcInfo | None = None) -> bytes:
    """The JSON line of an event record, the same bytes as ``encode`` of its dict (kind, time, host, to_json, and
    the process context's fields)."""
    parts = ['{"kind":"event","time":"', time_text, '","host":', _quote(host), ',"op":"', ev.op.label,
             '","path":', _quote(json_path(ev.path)), ',"backend":', _quote(ev.backend)]
    if ev.new_path is not None:
        parts += (',"new_path":', _quote(json_path(ev.new_path)))
    if ev.target is not None:
        parts += (',"target":', _quote(json_path(ev.target)))
    if ev.pid is not None:
        parts += (',"pid":', str(ev.pid))
    if ev.tid is not None:
        parts += (',"tid":', str(ev.tid))
    if ev.ppid is not None:
        parts += (',"ppid":', str(ev.ppid))
    if ev.uid is not None:
        parts += (',"uid":', str(ev.uid))
    if ev.gid is not None:
        parts += (',"gid":', str(ev.gid))
    if ev.cgroup_id is not None:
        parts += (',"cgroup_id":', str(ev.cgroup_id))
    if ev.ts_ns is not None:
        parts += (',"ts_ns":', str(ev.ts_ns))
    if ev.ret is not None:
        parts += (',"ret":', str(ev.ret))
    if ev.mode is not None:
        parts += (',"mode":', str(ev.mode))
    if ev.lost is not None:
        parts += (',"lost":', str(ev.lost))
    if ev.comm is not None:
        parts += (',"comm":', _quote(json_path(ev.comm)))
    if ev.owner is not None:
        parts += (',"owner":[', str(ev.owner[0]), ",", str(ev.owner[1]), "]")
    if ev.flags:
        parts += (',"flags":', str(ev.flags))
    if ev.ftype in FT_NAMES:
        parts += (',"ftype":"', FT_NAMES[ev.ftype], '"')
    if ev.truncated:
        parts.append(',"truncated":true')
    if ev.mntns is not None:
        parts += (',"mntns":', str(ev.mntns))
    if info is not None:
        parts.append(info.fragment)  # encoded once per process
    parts.append("}\n")
    return "".join(parts).encode("ascii")


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


def event_record(ev: FileEvent, wall_ns: int, host: str, info: ProcInfo | None = None) -> Record:
    """An event's record (with its process context when given); a capture LOSS marker becomes a ``loss`` record."""
    if ev.op is Op.LOSS:
        data: dict[str, object] = {"kind": KIND_LOSS, "time": rfc3339(wall_ns), "host": host}
        data.update(to_json(ev))
        return make(KIND_LOSS, LEVELS["warning"], data)
    return Record(KIND_EVENT, _INFO, None, event_line(ev, rfc3339(wall_ns), host, info))


def event_data(ev: FileEvent, wall_ns: int, host: str, info: ProcInfo | None = None) -> dict[str, object]:
    """The object of an event record, built the slow way (what :func:`event_line` must agree with)."""
    data: dict[str, object] = {"kind": KIND_EVENT, "time": rfc3339(wall_ns), "host": host}
    data.update(to_json(ev))
    if info is not None:
        data.update(info.fields())
    return data


def alert_record(ev: FileEvent, rule: str, message: str, level: str, wall_ns: int, host: str,
                 info: ProcInfo | None = None) -> Record:
    data: dict[str, object] = {"kind": KIND_ALERT, "time": rfc3339(wall_ns), "host": host, "rule": rule,
                               "message": message, "level": level}
    data.update(to_json(ev))
    if info is not None:
        data.update(info.fields())
    return make(KIND_ALERT, LEVELS.get(level, LEVELS["warning"]), data)


def output_loss_record(output: str, lost: int, reason: str, wall_ns: int, host: str) -> Record:
    """The marker an output writes when it had to drop records: how many, and why."""
    data: dict[str, object] = {"kind": KIND_LOSS, "time": rfc3339(wall_ns), "host": host, "op": "loss",
                               "lost": lost, "backend": f"output:{output}", "output": output, "reason": reason}
    return make(KIND_LOSS, LEVELS["warning"], data)

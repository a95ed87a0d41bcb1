"""The daemon's structured log: one line per event of interest on stderr, ``key=value`` pairs or JSON objects.

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level`` and ``event`` (what happened: ``start``,
``action_start``, ``action_done``, ``reload``, ``loss``, ...), then fields. In ``key=value`` form a value is written
bare when it is a plain word and double-quoted otherwise (``"`` and ``\\`` escaped, control characters as ``\\xNN``);
paths (bytes) are shown with :func:`kwatch.events.display_path`. In JSON, paths follow
:func:`kwatch.events.json_path` (non-UTF-8 bytes as ``\\udcNN``), as ``kwatch trace --json`` does.

Records of the ``kwatch`` loggers (e.g. the action runner's warnings) are routed into the same stream by
:class:`LogHandler`, as ``event=log logger=... msg=...``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO

from kwatch.events import display_path, json_path

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_BARE = re.compile(r"[A-Za-z0-9_.,:/@+%-]+")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        s = display_path(value)
    elif isinstance(value, float):
        s = f"{value:.6g}"
    else:
        s = str(value)
    if _BARE.fullmatch(s):
        return s
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    s = "".join(c if c >= " " and c != "\x7f" else f"\\x{ord(c):02x}" for c in s)
    return f'"{s}"'


def _json(value: object) -> object:
    if isinstance(value, bytes):
        return json_path(value)
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class StructLog:
    """Writes structured lines; ``level`` is the least level written."""

    def __init__(self, out: IO[str] | None = None, *, json_lines: bool = False, level: str = "info") -> None:
        self.out = out if out is not None else sys.stderr
        self.json_lines = json_lines
        self.level = LEVELS[level]

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.level

    def emit(self, level: str, event: str, **fields: object) -> None:
        if LEVELS[level] < self.level:
            return
        record: dict[str, object] = {"ts": _now(), "level": level, "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        if self.json_lines:
            line = json.dumps(
                {k: _json(v) for k, v in record.items()}, ensure_ascii=True, separators=(",", ":")
            )
        else:
            line = " ".join(f"{k}={_text(v)}" for k, v in record.items())
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except (OSError, ValueError):  # stderr closed or a broken pipe: logging must never stop the daemon
            pass

    def debug(self, event: str, **fields: object) -> None:
        self.emit("debug", event, **fields)

    def info(self, event: str, **fields: object) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: object) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit("error", event, **fields)


class LogHandler(logging.Handler):
    """Routes ``logging`` records (the runner's, the capture backends') into a StructLog."""

    def __init__(self, log: StructLog) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "debug" if record.levelno < 20 else "info" if record.levelno < 30 else "warning"
        if record.levelno >= 40:
            level = "error"
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string in someone's log call
            msg = str(record.msg)
        self.log.emit(level, "log", logger=record.name, msg=msg)

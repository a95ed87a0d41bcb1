"""What an output is configured with: ``[[output]]`` TOML tables and ``kwatch trace --output`` strings, both checked by
:func:`parse_output` into an :class:`OutputSpec`. Pure.

TOML (every key but ``type`` and the kind's main key optional)::

    [[output]]
    type = "file"                         # JSON lines
    path = "/var/log/kwatch/audit.jsonl"  # required
    max_bytes = "100M"                    # rotate before the file would grow past this (0: never); K/M/G suffixes
    keep = 10                             # rotated files kept: audit.jsonl.1 (newest) .. audit.jsonl.10
    fsync = "interval"                    # none | interval (every fsync_interval seconds) | every (each write)
    fsync_interval = 1.0
    records = "all"                       # all | alerts (alerts and loss markers only)

    [[output]]
    type = "journal"                      # the systemd journal, native protocol
    socket = "/run/systemd/journal/socket"
    identifier = "kwatch"                 # SYSLOG_IDENTIFIER

    [[output]]
    type = "nats"                         # the fleet bus: NATS JetStream
    servers = ["nats://127.0.0.1:4222"]   # required
    stream = "KWATCH"                     # created when missing (create_stream = false: must exist)
    subject_prefix = "kwatch"             # this host publishes to <subject_prefix>.<host>
    host = "web1"                         # default: the host name
    spool = "/var/lib/kwatch/spool/nats"  # on-disk spool (required: records wait there for the server)
    spool_max_bytes = "1G"                # then records are dropped, counted and announced by a marker record
    replicas = 1                          # the stream's replicas when kwatch creates it (3 on a cluster)

``--output`` strings: ``KIND[:MAIN][,key=value...]``, e.g. ``file:/var/log/kwatch.jsonl,max_bytes=10M,keep=3``,
``journal``, ``nats:nats://127.0.0.1:4222,spool=/var/lib/kwatch/spool``. A comma-separated part without ``=``
continues the main value (``nats:nats://a:4222,nats://b:4222``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

KINDS = ("file", "journal", "nats")
MAIN_KEY = {"file": "path", "journal": "socket", "nats": "servers"}
FSYNC = ("none", "interval", "every")
RECORDS = ("all", "alerts")
JOURNAL_SOCKET = "/run/systemd/journal/socket"

_COMMON = ("type", "name", "records")
_KEYS = {
    "file": ("path", "max_bytes", "keep", "fsync", "fsync_interval"),
    "journal": ("socket", "identifier"),
    "nats": ("servers", "stream", "subject_prefix", "host", "spool", "spool_max_bytes", "replicas", "create_stream"),
}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME_PART = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    name: str
    records: str = "all"
    # file
    path: str = ""
    max_bytes: int = 100 << 20
    keep: int = 10
    fsync: str = "interval"
    fsync_interval: float = 1.0
    # journal
    socket: str = JOURNAL_SOCKET
    identifier: str = "kwatch"
    # nats
    servers: tuple[str, ...] = ()
    stream: str = "KWATCH"
    subject_prefix: str = "kwatch"
    host: str = ""  # "" : the host name, filled in where the output is opened
    spool: str = ""
    spool_max_bytes: int = 1 << 30
    replicas: int = 1
    create_stream: bool = True
    options: dict[str, object] = field(default_factory=dict, compare=False, repr=False)


def parse_size(v: object) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v if v >= 0 else None
    if isinstance(v, str):
        m = _SIZE.fullmatch(v)
        if m is not None:
            return int(m.group(1)) * _UNITS[m.group(2).upper()]
    return None


def _bool(v: object) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "on", "yes", "1", "false", "off", "no", "0"):
        return v.lower() in ("true", "on", "yes", "1")
    return None


def _int(v: object, minimum: int) -> int | None:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= minimum:
        return v
    return None


def _float(v: object, minimum: float) -> float | None:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= minimum:
        return float(v)
    return None


def parse_output(table: Mapping[str, object]) -> tuple[OutputSpec | None, list[str]]:
    """An OutputSpec from a table (TOML values, or strings from ``--output``), or None and every problem."""
    problems: list[str] = []
    kind = table.get("type")
    if kind not in KINDS:
        return None, [f"an output needs type = {' | '.join(repr(k) for k in KINDS)}, not {kind!r}"]
    assert isinstance(kind, str)
    known = (*_COMMON, *_KEYS[kind])
    for key in table:
        if key not in known:
            problems.append(f"unknown key {key!r} for a {kind} output; known: {', '.join(known)}")
    main = MAIN_KEY[kind]
    kw: dict[str, object] = {}

    def bad(key: str, what: str) -> None:
        problems.append(f"{key} must be {what}, not {table[key]!r}")

    for key, v in table.items():
        if key in ("type",) or key not in known:
            continue
        if key in ("max_bytes", "spool_max_bytes"):
            size = parse_size(v)
            if size is None:
                bad(key, "a size in bytes (an integer, or a string such as \"100M\")")
            kw[key] = size
        elif key in ("keep", "replicas"):
            n = _int(v, 1)
            if n is None:
                bad(key, "an integer >= 1")
            kw[key] = n
        elif key == "fsync_interval":
            f = _float(v, 0.001)
            if f is None:
                bad(key, "a number of seconds > 0")
            kw[key] = f
        elif key == "create_stream":
            b = _bool(v)
            if b is None:
                bad(key, "true or false")
            kw[key] = b
        elif key == "fsync":
            if v not in FSYNC:
                bad(key, " | ".join(FSYNC))
            kw[key] = v
        elif key == "records":
            if v not in RECORDS:
                bad(key, " | ".join(RECORDS))
            kw[key] = v
        elif key == "servers":
            servers = [v] if isinstance(v, str) else v
            if not isinstance(servers, list) or not servers or not all(
                isinstance(s, str) and s.startswith(("nats://", "tls://")) for s in servers
            ):
                bad(key, "a nats:// URL or a list of them")
                servers = []
            kw[key] = tuple(s for part in servers for s in part.split(",") if s)
        elif key in ("stream", "subject_prefix", "host"):
            if not isinstance(v, str) or not all(_NAME_PART.match(p) for p in v.split(".")) or (
                key != "subject_prefix" and "." in v
            ):
                bad(key, "a name of letters, digits, '-' and '_'" + (" (dots between parts)" if key == "subject_prefix" else ""))
            kw[key] = v
        else:  # path, socket, identifier, spool, name
            if not isinstance(v, str) or not v:
                bad(key, "a non-empty string")
            kw[key] = v
    if main not in table and kind != "journal":
        problems.append(f"a {kind} output needs {main!r}")
    if kind == "nats" and "spool" not in table:
        problems.append("a nats output needs 'spool' (a directory: records wait there while the server is unreachable)")
    for key in ("path", "socket", "spool"):
        v = kw.get(key)
        if isinstance(v, str) and v and not v.startswith("/"):
            problems.append(f"{key} must be an absolute path, not {v!r}")
    if problems:
        return None, problems
    if "name" not in kw:
        kw["name"] = {"journal": "journal", "file": f"file:{kw.get('path')}",
                      "nats": f"nats:{kw.get('stream', 'KWATCH')}"}[kind]
    return OutputSpec(kind=kind, **kw), []  # type: ignore[arg-type]


def parse_output_option(text: str) -> tuple[OutputSpec | None, list[str]]:
    """An OutputSpec from an ``--output`` string (see the module docstring)."""
    head, *rest = text.split(",")
    kind, sep, main = head.partition(":")
    table: dict[str, object] = {"type": kind}
    mains = [main] if sep and main else []
    for part in rest:
        key, eq, value = part.partition("=")
        if eq:
            table[key.strip()] = value
        else:
            mains.append(part)
    if mains and kind in MAIN_KEY:
        table[MAIN_KEY[kind]] = ",".join(mains) if kind != "nats" else list(mains)
    return parse_output(table)

"""``kwatch trace``: a live stream of file operations, filtered, as text lines or JSON lines.

Formatting and matching are pure functions (:func:`format_text`, :func:`format_json`, :class:`TraceMatcher`); the
loop that reads a Source and writes lines is :func:`run_trace`.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO

from kwatch.capture.base import Source
from kwatch.context import ContextFilter, ProcInfo
from kwatch.events import FT_NAMES, FileEvent, Op, display_path, json_path

Resolve = Callable[[FileEvent], "ProcInfo | None"]


def compile_path_regex(pattern: str) -> re.Pattern[bytes]:
    """A regex over path bytes; the pattern's non-ASCII text matches its UTF-8 (or surrogate-escaped) bytes."""
    return re.compile(pattern.encode("utf-8", "surrogateescape"))


@dataclass
class TraceMatcher:
    """Userspace selection for trace: path regexes (any path of the event), process fields, and the process context
    (:mod:`kwatch.context`: exe regex, login uid, user name, container id or prefix, cgroup path regex), which is
    looked up only when one of those is asked for. Each kind of filter given must match (AND); values of one kind
    are alternatives (OR)."""

    rules: list[re.Pattern[bytes]] = field(default_factory=list)
    ignores: list[re.Pattern[bytes]] = field(default_factory=list)
    pids: frozenset[int] = frozenset()
    uids: frozenset[int] = frozenset()
    comms: frozenset[bytes] = frozenset()
    context: ContextFilter = field(default_factory=ContextFilter)
    resolve: Resolve | None = None

    def __call__(self, ev: FileEvent) -> bool:
        if ev.op is Op.LOSS:
            return True
        if self.rules or self.ignores:
            paths = ev.paths()
            if self.rules and not any(r.search(p) for r in self.rules for p in paths):
                return False
            if self.ignores and any(r.search(p) for r in self.ignores for p in paths):
                return False
        if self.pids and ev.pid not in self.pids:
            return False
        if self.uids and ev.uid not in self.uids:
            return False
        if self.comms and ev.comm not in self.comms:
            return False
        if self.context.empty:
            return True
        return self.context.accepts(self.resolve(ev) if self.resolve is not None else None)


def _clock(ev: FileEvent) -> str:
    t = time.time()
    if ev.ts_ns is not None:  # the kernel's CLOCK_MONOTONIC stamp, moved onto the wall clock
        t -= (time.monotonic_ns() - ev.ts_ns) / 1e9
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def format_text(ev: FileEvent, info: ProcInfo | None = None) -> str:
    if ev.op is Op.LOSS:
        ns = ev.extra.get("mount_namespace") if ev.extra else None
        if ns is not None:  # BpfSource._other_namespaces
            return (f"{_clock(ev)} LOSS        {ev.extra['events']} changes in mount namespace {ns} "  # type: ignore[index]
                    f"(paths there are not host paths; backend {ev.backend}); affected trees need a rescan")
        n = "unknown number of" if ev.lost is None else str(ev.lost)
        return f"{_clock(ev)} LOSS        {n} events lost (backend {ev.backend}); affected trees need a rescan"
    path = ("…" if ev.truncated else "") + display_path(ev.path)
    if ev.new_path is not None:
        path += " -> " + display_path(ev.new_path)
    if ev.target is not None:
        path += " => " + display_path(ev.target)
    who = []
    if ev.pid is not None:
        who.append(f"pid={ev.pid}")
    if ev.ppid is not None:
        who.append(f"ppid={ev.ppid}")
    if ev.uid is not None:
        who.append(f"uid={ev.uid}")
    if ev.comm is not None:
        who.append(f"comm={display_path(ev.comm)}")
    if info is not None:
        if info.exe is not None:
            who.append(f"exe={display_path(info.exe)}")
        if info.auid is not None:
            who.append(f"auid={info.auid}")
        if info.user is not None:
            who.append(f"user={info.user}")
        if info.container is not None:
            who.append(f"container={info.runtime}:{info.container[:12]}")
        elif info.unit is not None:
            who.append(f"unit={info.unit}")
    if ev.op is Op.CHMOD and ev.mode is not None:
        who.append(f"mode={ev.mode:o}")
    if ev.op is Op.CHOWN and ev.owner is not None:
        who.append(f"owner={ev.owner[0]}:{ev.owner[1]}")
    if ev.mntns is not None:  # the path is inside that mount namespace, not the host's
        who.append(f"mntns={ev.mntns}")
    return f"{_clock(ev)} {ev.op.name:<11} {path}  " + " ".join(who)


def to_json(ev: FileEvent) -> dict[str, object]:
    """The JSON object of an event. Paths: UTF-8 text, other bytes as lone surrogates U+DC80..U+DCFF (PEP 383)."""
    d: dict[str, object] = {"op": ev.op.label, "path": json_path(ev.path), "backend": ev.backend}
    if ev.new_path is not None:
        d["new_path"] = json_path(ev.new_path)
    if ev.target is not None:
        d["target"] = json_path(ev.target)
    for name in ("pid", "tid", "ppid", "uid", "gid", "cgroup_id", "ts_ns", "ret", "mode", "lost"):
        v = getattr(ev, name)
        if v is not None:
            d[name] = v
    if ev.comm is not None:
        d["comm"] = json_path(ev.comm)
    if ev.owner is not None:
        d["owner"] = list(ev.owner)
    if ev.flags:
        d["flags"] = ev.flags
    if ev.ftype in FT_NAMES:  # absent: the backend does not know (fanotify for most events, inotify's files)
        d["ftype"] = FT_NAMES[ev.ftype]
    if ev.truncated:
        d["truncated"] = True
    if ev.mntns is not None:
        d["mntns"] = ev.mntns
    return d


def format_json(ev: FileEvent, info: ProcInfo | None = None) -> str:
    # ensure_ascii keeps lone surrogates as \\udcXX escapes: the output is always valid UTF-8
    text = json.dumps(to_json(ev), ensure_ascii=True, separators=(",", ":"))
    if info is None or not info.fragment:
        return text
    return text[:-1] + info.fragment + "}"  # the context's members, encoded once per process


def run_trace(
    src: Source,
    match: TraceMatcher,
    *,
    json_lines: bool = False,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
    count: int | None = None,
    duration: float | None = None,
    sink: Callable[[list[FileEvent]], None] | None = None,
    quiet: bool = False,
    resolve: Resolve | None = None,
) -> int:
    """Print matching events until Ctrl-C/SIGTERM, ``count`` events, or ``duration`` seconds; then a summary.

    ``sink`` (the durable outputs) gets the matching events of each batch; ``quiet`` prints none of them."""
    fmt = format_json if json_lines else format_text
    shown = 0
    deadline = None if duration is None else time.monotonic() + duration
    # SIGTERM ends the loop after the batch in hand (reads wait at most a second): raised from the handler, it cut
    # an output's write in the middle, where an ``except Exception`` took it for the output's error and the rest of
    # the batch was neither written nor counted
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while (count is None or shown < count) and not stop.is_set():
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and timeout == 0:
                break
            batch = src.read(min(timeout, 1.0) if timeout is not None else 1.0)
            matched = _matching(batch, match, None if count is None else count - shown)
            if matched and sink is not None:
                sink(matched)
            if matched and not quiet:
                out.write("\n".join(fmt(ev, resolve(ev) if resolve is not None else None) for ev in matched) + "\n")
                out.flush()
            shown += len(matched)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
    st = src.stats()
    ops = ", ".join(f"{k} {v}" for k, v in sorted(st.by_op.items()))
    err.write(f"kwatch trace: {shown} events shown, {st.events} captured, {st.lost} lost ({src.name}); {ops}\n")
    return 0


def _matching(batch: Iterable[FileEvent], match: TraceMatcher, room: int | None) -> list[FileEvent]:
    out = []
    for ev in batch:
        if match(ev):
            out.append(ev)
            if room is not None and len(out) >= room:
                break
    return out

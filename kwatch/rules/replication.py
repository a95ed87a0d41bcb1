"""Replication targets in a config: the options a target takes, checked the same way for both formats. Pure.

TOML::

    [[replicate]]
    source = "/srv/data"              # required: the tree to replicate
    target = "backup:/srv/data"       # /local/path, [user@]host:/path (kwatch agent over ssh), rsync://host/module/path
    delete = true                     # and: exclude = ["*.tmp"], settle = 0.05, max_delay = 1.0, eager = 0.2 (0: off),
                                      # bwlimit = 1024 (KiB/s),
                                      # compress, checksum, owner, fsync = "none|file|batch", ssh = "ssh -p 22",
                                      # agent_command = "kwatch", password_file = "/etc/kwatch/rsync.pw"

changedfiles, inside a RULE that names a whole directory (its source)::

    RULE ^/srv/data(/|$)
    REPLICATE backup:/srv/data delete=on exclude=*.tmp settle=0.1
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

BOOL_OPTIONS = ("delete", "compress", "checksum", "owner")
FLOAT_OPTIONS = ("settle", "max_delay", "eager")
INT_OPTIONS = ("bwlimit",)
STR_OPTIONS = ("source", "ssh", "agent_command", "password_file", "fsync")
LIST_OPTIONS = ("exclude",)
KNOWN = (*BOOL_OPTIONS, *FLOAT_OPTIONS, *INT_OPTIONS, *STR_OPTIONS, *LIST_OPTIONS)
_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


def check_target(target: str) -> str | None:
    """None when ``target`` has a form kwatch replicates to, else the reason."""
    if target.startswith("/"):
        return None
    scheme, sep, rest = target.partition("://")
    if sep and scheme in ("rsync", "ssh"):
        host = rest
    else:
        host, sep, _ = target.partition(":")
        if not sep or not host or "/" in host:
            return (
                f"target {target!r}: expected /local/path, [user@]host:/path, ssh://[user@]host[:port]/path or "
                "rsync://host/module/path"
            )
    if host.startswith("-"):
        # ssh would take "-oProxyCommand=...:/p" for an option and run that command (as root)
        return f"target {target!r}: a host cannot start with '-' (ssh would read it as an option)"
    return None


def check_options(opts: Mapping[str, object]) -> list[str]:
    """Every problem with a target's options (types, ranges, unknown keys)."""
    problems: list[str] = []
    for key, v in opts.items():
        if key not in KNOWN:
            problems.append(f"unknown replicate option {key!r}; known: {', '.join(KNOWN)}")
        elif key in BOOL_OPTIONS and not isinstance(v, bool):
            problems.append(f"{key} must be true or false")
        elif key in FLOAT_OPTIONS and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            problems.append(f"{key} must be a number of seconds >= 0")
        elif key in INT_OPTIONS and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            problems.append(f"{key} must be a positive whole number (KiB/s)")
        elif key in STR_OPTIONS and not isinstance(v, str):
            problems.append(f"{key} must be a string")
        elif key in LIST_OPTIONS and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            problems.append(f"{key} must be a list of glob patterns")
    if opts.get("fsync", "none") not in ("none", "file", "batch"):
        problems.append("fsync must be none, file or batch")
    src = opts.get("source")
    if src is None:
        problems.append("a replication target needs 'source' (the tree to replicate)")
    elif isinstance(src, str) and not src.startswith("/"):
        problems.append(f"source {src!r} must be an absolute path")
    return problems


def parse_replicate_line(arg: str) -> tuple[str, dict[str, object], list[str]]:
    """``target key=value ...`` from a changedfiles REPLICATE line: (target, options, problems)."""
    try:
        words = shlex.split(arg)
    except ValueError as e:
        return "", {}, [f"REPLICATE: {e}"]
    if not words:
        return "", {}, ["REPLICATE needs a target"]
    target = words[0]
    opts: dict[str, object] = {}
    problems: list[str] = []
    for w in words[1:]:
        key, sep, val = w.partition("=")
        if not sep:
            problems.append(f"REPLICATE option {w!r} is not key=value")
            continue
        if key in BOOL_OPTIONS:
            low = val.lower()
            if low not in _TRUE | _FALSE:
                problems.append(f"{key} must be on or off, not {val!r}")
                continue
            opts[key] = low in _TRUE
        elif key in FLOAT_OPTIONS or key in INT_OPTIONS:
            try:
                opts[key] = int(val) if key in INT_OPTIONS else float(val)
            except ValueError:
                problems.append(f"{key} must be a number, not {val!r}")
        elif key in LIST_OPTIONS:
            cur = opts.setdefault(key, [])
            assert isinstance(cur, list)
            cur.append(val)
        else:
            opts[key] = val
    return target, opts, problems

"""Replication targets in a config: the options a target takes, checked the same way for both formats. Pure.

The options and their checks are kwatch.replicate.options (one schema for the CLI, the config and the daemon);
the target syntax is kwatch.replicate.target's parser. TOML::

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

from kwatch.replicate import options as schema
from kwatch.replicate.target import EXPECTED, Target

KNOWN = schema.KNOWN


def check_target(target: str) -> str | None:
    """None when ``target`` has a form kwatch replicates to, else the reason. A config has no working directory
    of its own, so a local target must be absolute there (the command line takes a relative one, as rsync)."""
    try:
        t = Target.parse(target)
    except ValueError as e:
        return str(e)
    if t.kind == "local" and not target.startswith("/"):
        return f"target {target!r}: {EXPECTED}"
    return None


def check_options(opts: Mapping[str, object]) -> list[str]:
    """Every problem with a target's options (types, ranges, unknown keys)."""
    problems = schema.check(opts)
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
        problem = schema.parse_word(key, val, opts)
        if problem is not None:
            problems.append(problem)
    return target, opts, problems

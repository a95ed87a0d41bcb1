"""The options of a replication target: one schema for the command line (``kwatch replicate``), a config's
``[[replicate]]`` table and changedfiles ``REPLICATE`` line (checked by ``check-config`` and at load), and the
daemon's replication sink (kwatch.daemon.replication). Pure.

Each :class:`Option` says its key (the TOML key, the changedfiles ``key=value`` word, the CLI flag's name), its kind
(how a value is checked and converted) and its default; :class:`TargetOptions` is what a replicator is given.
docs/config.md lists them (tests/unit/test_docs.py holds the two together).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

DELTA_MIN = 64 << 10  # below this a whole put is cheaper than a signature round trip


@dataclass
class TargetOptions:
    delete: bool = True
    excludes: tuple[bytes, ...] = ()
    settle: float = 0.05
    max_delay: float = 1.0
    eager: float | None = 0.2  # an idle target takes a batch this long after its first event (see _due_in)
    bwlimit: int | None = None  # bytes per second of file data, None: unlimited
    compress: bool = True
    checksum: bool = False
    delta_min: int = DELTA_MIN
    owner: bool = False  # replicate uid/gid (the agent applies them only as root)
    fsync: str = "none"  # the agent's policy: none | file | batch
    ssh: str = "ssh"  # the ssh command, as rsync's -e: "ssh -p 2222 -i key"
    agent_command: str = "kwatch"  # the remote kwatch executable
    timeout: float = 60.0
    password_file: str | None = None  # rsync:// targets: the daemon password (else $RSYNC_PASSWORD)
    fuzzy: bool = True  # rsync:// targets: let a renamed file use a similar file in its directory as the basis
    #: rsync:// targets: batches that create and change go while earlier ones are in flight. Off until it has been
    #: through the fault matrix again: the latency benchmark lost files with it (the directories it lists again met
    #: a bug of the attributes-only listing, fixed since) and showed no gain over serial batches at 200 ms RTT
    ahead: bool = False


@dataclass(frozen=True)
class Option:
    key: str
    kind: str  # bool | seconds | kib | str | globs | choice
    default: object
    help: str
    choices: tuple[str, ...] = ()
    short: str = ""  # a one-letter CLI alias (-e, as rsync's)
    cli: bool = True  # False: config only (``source``: the CLI takes it as an argument)


FSYNC = ("none", "file", "batch")

#: every option, in the order error messages list them
OPTIONS: tuple[Option, ...] = (
    Option("delete", "bool", True, "delete on the mirror what the source no longer has"),
    Option("compress", "bool", True, "compress the agent protocol (zstd) on ssh targets"),
    Option("checksum", "bool", False, "compare content hashes, not size+mtime, when reconciling"),
    Option("owner", "bool", False, "replicate uid/gid (the agent must run as root)"),
    Option("settle", "seconds", 0.05, "seconds of quiet before a batch is sent"),
    Option("max_delay", "seconds", 1.0, "seconds a change may wait at most"),
    Option("eager", "seconds", 0.2, "seconds after a change before an idle target gets it, even while changes keep "
           "coming (files still open for writing wait for their close or --max-delay); 0 disables"),
    Option("bwlimit", "kib", None, "KiB/s of file data per target"),
    Option("source", "str", None, "the tree to replicate", cli=False),
    Option("ssh", "str", "ssh", "ssh command for host:/path targets (as rsync -e)", short="-e"),
    Option("agent_command", "str", "kwatch", "the kwatch executable on the remote host"),
    Option("password_file", "str", None, "rsync:// targets: file holding the daemon password (else $RSYNC_PASSWORD)"),
    Option("ahead", "bool", False, "rsync:// targets: a batch that only creates and changes goes while the ones "
           "before it are still in flight (up to 3 at once); experimental"),
    Option("fsync", "choice", "none", "when the agent fsyncs what it lands", choices=FSYNC),
    Option("exclude", "globs", [], "glob of names (or paths, with a /) not to replicate; repeatable"),
)
BY_KEY = {o.key: o for o in OPTIONS}
KNOWN = tuple(BY_KEY)
_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


def check(opts: Mapping[str, object]) -> list[str]:
    """Every problem with a target's options as a config gives them (types, ranges, unknown keys)."""
    problems: list[str] = []
    for key, v in opts.items():
        o = BY_KEY.get(key)
        if o is None:
            problems.append(f"unknown replicate option {key!r}; known: {', '.join(KNOWN)}")
        elif o.kind == "bool" and not isinstance(v, bool):
            problems.append(f"{key} must be true or false")
        elif o.kind == "seconds" and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
            problems.append(f"{key} must be a number of seconds >= 0")
        elif o.kind == "kib" and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            problems.append(f"{key} must be a positive whole number (KiB/s)")
        elif o.kind in ("str", "choice") and not isinstance(v, str):
            problems.append(f"{key} must be a string")
        elif o.kind == "globs" and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            problems.append(f"{key} must be a list of glob patterns")
        elif o.kind == "choice" and v not in o.choices:
            problems.append(f"{key} must be {', '.join(o.choices[:-1])} or {o.choices[-1]}")
    return problems


def parse_word(key: str, text: str, into: dict[str, object]) -> str | None:
    """Put a changedfiles ``key=value`` word's value into ``into``; the problem, if any (an unknown key goes in as
    text: :func:`check` names it with the others)."""
    o = BY_KEY.get(key)
    if o is None or o.kind in ("str", "choice"):
        into[key] = text
    elif o.kind == "bool":
        low = text.lower()
        if low not in _TRUE | _FALSE:
            return f"{key} must be on or off, not {text!r}"
        into[key] = low in _TRUE
    elif o.kind in ("seconds", "kib"):
        try:
            into[key] = int(text) if o.kind == "kib" else float(text)
        except ValueError:
            return f"{key} must be a number, not {text!r}"
    else:
        cur = into.setdefault(key, [])
        assert isinstance(cur, list)
        cur.append(text)
    return None


def build(values: Mapping[str, object]) -> TargetOptions:
    """TargetOptions from checked values (a config table, or the CLI's): keys absent keep their defaults."""
    t = TargetOptions()
    for key, v in values.items():
        if v is None or key == "source":
            continue
        kind = BY_KEY[key].kind
        if key == "eager":
            t.eager = float(v) or None  # type: ignore[arg-type]  # 0: wait for settle/max_delay only
        elif kind == "bool":
            setattr(t, key, bool(v))
        elif kind == "seconds":
            setattr(t, key, float(v))  # type: ignore[arg-type]
        elif kind == "kib":
            t.bwlimit = int(v) * 1024  # type: ignore[call-overload]
        elif kind == "globs":
            t.excludes = tuple(os.fsencode(x) for x in v)  # type: ignore[attr-defined]
        else:
            setattr(t, key, str(v))
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options as ``kwatch replicate`` flags: ``--KEY`` (underscores as dashes), ``--no-KEY`` for an option
    on by default."""
    for o in OPTIONS:
        if not o.cli:
            continue
        flag = "--" + o.key.replace("_", "-")
        if o.kind == "bool":
            name = flag if not o.default else "--no-" + flag[2:]
            p.add_argument(name, dest=o.key, action="store_false" if o.default else "store_true", help=o.help)
            continue
        flags = [o.short, flag] if o.short else [flag]
        if o.kind == "globs":
            p.add_argument(*flags, dest=o.key, action="append", default=[], metavar="GLOB", help=o.help)
        elif o.kind == "choice":
            p.add_argument(*flags, dest=o.key, choices=list(o.choices), default=o.default, help=o.help)
        else:
            conv = {"seconds": float, "kib": int, "str": str}[o.kind]
            p.add_argument(*flags, dest=o.key, type=conv, default=o.default, help=o.help)


def from_args(args: argparse.Namespace) -> TargetOptions:
    """TargetOptions from the flags :func:`add_arguments` made."""
    return build({o.key: getattr(args, o.key) for o in OPTIONS if o.cli})

"""The ``agent`` command: the mirror end, started by ``kwatch replicate`` on a local pipe or over ssh.

It imports only the mirror side (:mod:`kwatch.mirror.server` and what that needs): an agent starts once per
connection, and a first sync waits for it.
"""

from __future__ import annotations

import argparse
import os
import sys

#: the agent's exit status when its --root cannot be used (kwatch.replicate.failure: a permanent "destination")
ROOT_UNUSABLE = 3


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("agent", help="the mirror end (started by `kwatch replicate` over ssh or a pipe)")
    a.add_argument("--root", required=True)
    a.add_argument("--fsync", choices=["none", "file", "batch"], default="none")
    a.add_argument("--owner", action="store_true", help="apply uid/gid (as root)")
    a.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from kwatch.mirror.server import serve

    root = os.fsencode(args.root)
    problem = ensure_root(root)
    if problem is not None:
        print(f"kwatch agent: {problem}", file=sys.stderr)
        return ROOT_UNUSABLE
    return serve(root, sys.stdin.buffer, sys.stdout.buffer, fsync=args.fsync, preserve_owner=args.owner)


def ensure_root(root: bytes) -> str | None:
    """Make ``root`` usable as a mirror root: as rsync does with its destination, the last component is created
    when missing (its parent must exist: a typo two levels up is not silently turned into a tree). None when it is
    a directory now, else what is wrong."""
    try:
        os.mkdir(root)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot create {os.fsdecode(root)}: {e.strerror}"
    if not os.path.isdir(root):
        return f"{os.fsdecode(root)} is not a directory"
    return None

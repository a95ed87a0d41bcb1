"""Who an action runs as: a config's ``user``/``group`` resolved against the account databases (pwd, grp), and
whether this process can switch to them. Read at config load (so a config naming an unknown user is refused then)
and by the runner when it starts an action (:mod:`kwatch.actions.privileges` hands the result to Popen).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class RunAs:
    """Credentials of an action's process. ``uid``/``name``/``home`` are None when only the group changes."""

    uid: int | None
    gid: int
    groups: tuple[int, ...] | None  # supplementary groups; None: keep the daemon's (only the group changes)
    name: bytes | None = None
    home: bytes | None = None


def _user(spec: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        raise LookupError(f"unknown user {spec!r}") from None


def _group(spec: str) -> int:
    if spec.isdigit():
        return int(spec)  # a gid needs no entry in /etc/group to be used
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise LookupError(f"unknown group {spec!r}") from None


def resolve_run_as(user: str | None, group: str | None) -> RunAs | None:
    """The credentials for ``user``/``group`` (None, None: run as the daemon). Raises LookupError for an unknown
    user or group name."""
    if user is None and group is None:
        return None
    if user is None:
        assert group is not None
        return RunAs(None, _group(group), None)
    pw = _user(user)
    gid = _group(group) if group is not None else pw.pw_gid
    # initgroups(user, gid): the user's groups from the group database, with gid among them
    groups = tuple(os.getgrouplist(pw.pw_name, gid))
    return RunAs(pw.pw_uid, gid, groups, os.fsencode(pw.pw_name), os.fsencode(pw.pw_dir))


def switch_problem(run_as: RunAs) -> str | None:
    """Why this process cannot start a child with ``run_as``'s credentials, or None."""
    if os.geteuid() == 0:
        return None
    if run_as.uid is not None and run_as.uid != os.geteuid():
        return f"kwatch runs as uid {os.geteuid()} and cannot start actions as uid {run_as.uid} (only root can)"
    if run_as.gid != os.getegid():
        return f"kwatch runs as gid {os.getegid()} and cannot start actions with gid {run_as.gid} (only root can)"
    return None  # the daemon's own credentials: nothing to switch (see popen_credentials)

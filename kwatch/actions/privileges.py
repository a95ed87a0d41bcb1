"""Who an action runs as, and what environment it gets. Reads the account databases (pwd, grp); runs nothing.

- :func:`resolve_run_as` turns a config's ``user``/``group`` (names or numeric ids) into a :class:`RunAs`: uid,
  primary gid and the supplementary groups ``initgroups(3)`` would give (``os.getgrouplist``), plus the user's
  name and home for the environment. The runner hands these to ``subprocess.Popen(user=, group=, extra_groups=)``,
  which applies them in the child between fork and exec in the safe order: setgroups, setregid, setreuid (no
  Python code runs in the child, so this is safe while the daemon has threads).
- :func:`switch_problem` says why the daemon cannot switch to a RunAs (only root can become another user or
  group), for config checks at load time.
- :func:`action_environment` is the allowlist of the daemon's environment that actions see: ``PATH`` (a standard
  one if unset), ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``, ``TERM``, ``HOME``, ``USER``, ``LOGNAME``; the last three
  are replaced by the target user's when the action runs as another user. Everything else, ``RSYNC_PASSWORD``
  and ``SSH_AUTH_SOCK`` included, stays with the daemon. The runner adds the ``KWATCH_*`` variables of each run.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ALLOWED = frozenset({b"PATH", b"LANG", b"LANGUAGE", b"TZ", b"TERM", b"HOME", b"USER", b"LOGNAME"})


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


def popen_credentials(
    uid: int | None, gid: int | None, groups: tuple[int, ...] | None
) -> tuple[int | None, int | None, list[int] | None]:
    """``user``, ``group`` and ``extra_groups`` for ``subprocess.Popen`` (None: unchanged).

    Not root: :func:`switch_problem` allowed only the daemon's own uid and gid, and setgroups would fail without
    CAP_SETGID, so nothing is switched (the child keeps the daemon's supplementary groups)."""
    if gid is None or os.geteuid() != 0:
        return None, None, None
    return uid, gid, None if groups is None else list(groups)


def action_environment(env: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The part of the daemon's environment an action may see (see the module docstring)."""
    out = {k: v for k, v in env.items() if k in _ALLOWED or k.startswith(b"LC_")}
    out.setdefault(b"PATH", DEFAULT_PATH)
    return out


def user_environment(env: Mapping[bytes, bytes], run_as: RunAs | None) -> dict[bytes, bytes]:
    """``env`` with ``HOME``, ``USER`` and ``LOGNAME`` of the user an action runs as (unchanged for the daemon's)."""
    out = dict(env)
    if run_as is not None and run_as.name is not None and run_as.home is not None:
        out[b"HOME"] = run_as.home
        out[b"USER"] = run_as.name
        out[b"LOGNAME"] = run_as.name
    return out

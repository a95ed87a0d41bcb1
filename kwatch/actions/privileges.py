"""The credentials and environment an action's process gets; runs nothing.

- :func:`kwatch.rules.runas.resolve_run_as` turns a config's ``user``/``group`` (names or numeric ids) into a
  :class:`~kwatch.rules.runas.RunAs`: uid, primary gid and the supplementary groups ``initgroups(3)`` would give
  (``os.getgrouplist``), plus the user's name and home for the environment. The runner hands these to
  ``subprocess.Popen(user=, group=, extra_groups=)`` (:func:`popen_credentials`), which applies them in the child
  between fork and exec in the safe order: setgroups, setregid, setreuid (no Python code runs in the child, so
  this is safe while the daemon has threads).
- :func:`action_environment` is the allowlist of the daemon's environment that actions see: ``PATH`` (a standard
  one if unset), ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``, ``TERM``, ``HOME``, ``USER``, ``LOGNAME``; the last three
  are replaced by the target user's when the action runs as another user. Everything else, ``RSYNC_PASSWORD``
  and ``SSH_AUTH_SOCK`` included, stays with the daemon. The runner adds the ``KWATCH_*`` variables of each run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from kwatch.rules.runas import RunAs

DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ALLOWED = frozenset({b"PATH", b"LANG", b"LANGUAGE", b"TZ", b"TERM", b"HOME", b"USER", b"LOGNAME"})


def popen_credentials(
    uid: int | None, gid: int | None, groups: tuple[int, ...] | None
) -> tuple[int | None, int | None, list[int] | None]:
    """``user``, ``group`` and ``extra_groups`` for ``subprocess.Popen`` (None: unchanged).

    Not root: :func:`~kwatch.rules.runas.switch_problem` allowed only the daemon's own uid and gid, and setgroups would fail without
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

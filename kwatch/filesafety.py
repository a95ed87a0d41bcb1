"""Whether a file kwatch trusts can be changed by someone else: config files, the files they include, and secrets
(rsync password files). Reads file metadata (``os.stat``); nothing else.

A config file says which commands kwatch runs, with kwatch's privileges (often root): whoever can write it, or
replace it, can run commands as root. So it, and every directory above it, must be owned by root or by the user
kwatch runs as, and writable by no one else: not by every user, and by a group only if that group is root's or
kwatch's own. A world-writable directory with the sticky bit (``/tmp``) is accepted: others cannot rename or
remove a file they do not own there. A secret (a password file) must moreover not be readable by every user, as
rsync requires of its ``--password-file`` (group access is left to the admin, as rsync does).
"""

from __future__ import annotations

import os
import stat


def _who_can_write(st: os.stat_result) -> str | None:
    """Who other than the owner and root can change an object with this stat, or None."""
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_uid not in (0, os.geteuid()):
        return f"its owner, uid {st.st_uid}"
    if st.st_mode & stat.S_IWOTH and not sticky_dir:
        return "every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()) and not sticky_dir:
        return f"group {st.st_gid}"
    return None


def unsafe_file(path: str, secret: bool = False) -> str | None:
    """Why ``path`` cannot be trusted (who could change or, for a secret, read it, and the fix), or None.

    Raises OSError when the file cannot be examined (missing, no permission)."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    who = _who_can_write(st)
    if who is not None:
        fix = f"chown root {path}" if who.startswith("its owner") else f"chmod go-w {path}"
        return f"{path} can be changed by {who} (mode {mode:04o}); fix: {fix}"
    if secret and st.st_mode & stat.S_IROTH:
        return f"{path} can be read by every user (mode {mode:04o}); fix: chmod o-rwx {path}"
    real = os.path.realpath(path)
    d = os.path.dirname(real)
    while True:
        dst = os.stat(d)
        who = _who_can_write(dst)
        if who is not None:
            fix = f"chown root {d}" if who.startswith("its owner") else f"chmod go-w {d}"
            return f"{path}: the directory {d} can be changed by {who}, who could replace the file; fix: {fix}"
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent

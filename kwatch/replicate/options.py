"""The options of a replication target. Pure."""

from __future__ import annotations

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



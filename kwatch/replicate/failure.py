"""Why a replication target is down, from what its transport process left behind. Pure.

A target that fails is retried (:mod:`kwatch.replicate.backoff`); the reason is exported as a metric
(``kwatch_replicate_target_down``, docs/metrics.md) and decides whether retrying can help at all: a missing remote
command, a refused login or a changed host key need the operator, and ``kwatch replicate --once`` gives up on them
with what to do instead of retrying in silence.

The evidence is the exit status of the command we ran (ssh passes the remote command's status through; its own
failures are 255) and the last lines it wrote on stderr. ssh's messages are stable English strings from
OpenSSH's ssh.c / sshconnect.c; the shell's "command not found" is exit status 127 (POSIX, "Command Search and
Execution"), 126 "found but not executable".
"""

from __future__ import annotations

from collections.abc import Sequence

from kwatch.metrics.stats import DOWN_REASONS

#: every value of the down reason ("" while the target is up): the metric's labels
REASONS = DOWN_REASONS

#: reasons that retrying cannot fix without the operator (``--once`` exits non-zero on them at once)
PERMANENT = frozenset({"auth", "hostkey", "missing_command", "destination"})

_SSH_PATTERNS: tuple[tuple[str, str], ...] = (
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "hostkey"),
    ("Host key verification failed", "hostkey"),
    ("Permission denied", "auth"),
    ("Too many authentication failures", "auth"),
    ("Connection refused", "refused"),
    ("Could not resolve hostname", "unreachable"),
    ("No route to host", "unreachable"),
    ("Network is unreachable", "unreachable"),
    ("Connection timed out", "unreachable"),
    ("Operation timed out", "unreachable"),
)

MISSING_HINT = ("; the remote command was not found (exit status {status}): install kwatch on the remote host "
                "(pip install kwatch; Python >= 3.11) or give the path of its kwatch with --agent-command "
                "(agent_command in a config)")


def classify(status: int | None, stderr: Sequence[str]) -> tuple[str, bool, str]:
    """(down reason, permanent, hint to append to the message) for a transport process that ended with ``status``
    (None: still running, or unknown) after writing ``stderr``; reason "error" when nothing more is known."""
    text = "\n".join(stderr)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return "disk_full", False, ""
    if status in (126, 127):
        return "missing_command", True, MISSING_HINT.format(status=status)
    if status == 255:  # ssh's own failure: the remote command never ran
        for needle, reason in _SSH_PATTERNS:
            if needle in text:
                return reason, reason in PERMANENT, _SSH_HINTS.get(reason, "")
        return "unreachable", False, ""
    if (status == 3 and "kwatch agent:" in text) or (status == 2 and "is not a directory" in text):
        return "destination", True, ""  # the agent refused its --root (kwatch.mirror.command.cmd_agent; 2: older)
    if status == 2 and "usage:" in text:
        return "missing_command", True, ("; the remote kwatch does not take these arguments: install the same "
                                         "kwatch version there or point --agent-command at it")
    return "error", False, ""


_SSH_HINTS = {
    "auth": "; ssh could not log in (BatchMode: no password prompt): install a key for this user",
    "hostkey": "; the host key is unknown or changed: check it, then fix known_hosts (ssh-keygen -R host)",
}

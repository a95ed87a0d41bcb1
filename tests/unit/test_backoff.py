"""The reconnect backoff (kwatch.replicate.backoff) and the down reasons (kwatch.replicate.failure): pure tables."""

from __future__ import annotations

import pytest

from kwatch.replicate.backoff import Backoff
from kwatch.replicate.failure import PERMANENT, REASONS, classify


@pytest.mark.parametrize(("rand", "waits"), [
    (0.0, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]),  # the lower bound: half the nominal wait
    (1.0, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),  # the upper bound: the nominal wait, capped at 30 s
    (0.5, [0.375, 0.75, 1.5, 3.0, 6.0, 12.0, 22.5, 22.5]),
])
def test_backoff_doubles_with_jitter_up_to_the_cap(rand: float, waits: list[float]) -> None:
    b = Backoff(rand=lambda: rand)
    assert [b.next() for _ in waits] == waits


def test_backoff_resets_after_a_success() -> None:
    b = Backoff(rand=lambda: 1.0)
    for _ in range(5):
        b.next()
    b.reset()
    assert b.next() == 0.5


CASES = [
    ("ssh: connect to host 10.0.0.1 port 22: Connection refused", 255, "refused", False),
    ("Permission denied (publickey,password).", 255, "auth", True),
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@", 255, "hostkey", True),
    ("Host key verification failed.", 255, "hostkey", True),
    ("ssh: Could not resolve hostname nohost: Name or service not known", 255, "unreachable", False),
    ("ssh: connect to host 10.9.9.9 port 22: No route to host", 255, "unreachable", False),
    ("bash: line 1: kwatch: command not found", 127, "missing_command", True),
    ("bash: line 1: /opt/kwatch: Permission denied", 126, "missing_command", True),
    ("kwatch agent: cannot create /srv/a/b: No such file or directory", 3, "destination", True),
    ("kwatch agent: /srv/x is not a directory", 2, "destination", True),
    ("usage: kwatch [-h] {trace,run}\nkwatch: error: invalid choice: 'agent'", 2, "missing_command", True),
    ("OSError: [Errno 28] No space left on device", 1, "disk_full", False),
    ("Traceback (most recent call last):", 1, "error", False),
    ("", None, "error", False),
]


@pytest.mark.parametrize(("stderr", "status", "down", "permanent"), CASES, ids=[c[2] + str(i) for i, c in
                                                                           enumerate(CASES)])
def test_classify(stderr: str, status: int | None, down: str, permanent: bool) -> None:
    got, perm, _hint = classify(status, stderr.splitlines())
    assert (got, perm) == (down, permanent)
    assert got in REASONS and (got in PERMANENT) == perm


def test_missing_command_says_what_to_do() -> None:
    assert "--agent-command" in classify(127, ["kwatch: command not found"])[2]

"""When a path that failed with a transient error is sent again (kwatch.replicate.retries; pure, the clock passed in)."""

from __future__ import annotations

import pytest

from kwatch.replicate.retries import PathRetries

# (name, events, the waits ``schedule`` returned for b"p", in order). An event: ("fail", now) - b"p" failed in a batch
# at ``now``; ("due", now) - the loop takes what is due at ``now``; ("land", now) - a batch sent b"p" and it landed.
CASES: list[tuple[str, list[tuple[str, float]], list[float]]] = [
    ("first_failure_waits_first", [("fail", 0)], [2.0]),
    ("each_failed_retry_doubles", [("fail", 0), ("due", 2), ("fail", 2), ("due", 6), ("fail", 6)], [2.0, 4.0, 8.0]),
    ("capped", [("fail", 0)] + [e for t in range(1, 9) for e in (("due", 1000.0 * t), ("fail", 1000.0 * t))],
     [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]),
    # failures in other batches while the retry waits (a full disk for a few seconds, a busy path): no doubling
    ("failures_while_waiting_keep_the_wait", [("fail", 0), ("fail", 0.5), ("fail", 1.0), ("fail", 1.5)],
     [2.0, 1.5, 1.0, 0.5]),
    ("then_the_retry_fails_once_more", [("fail", 0), ("fail", 1.0), ("due", 2), ("fail", 2)], [2.0, 1.0, 4.0]),
    ("landing_starts_over", [("fail", 0), ("due", 2), ("fail", 2), ("due", 6), ("land", 6), ("fail", 7)],
     [2.0, 4.0, 2.0]),
]


@pytest.mark.parametrize(("name", "events", "want"), CASES, ids=[c[0] for c in CASES])
def test_waits(name: str, events: list[tuple[str, float]], want: list[float]) -> None:
    r = PathRetries()
    got: list[float] = []
    for what, now in events:
        if what == "fail":
            got += [w for rel, w in r.schedule([b"p"], now) if rel == b"p"]
        elif what == "due":
            assert r.due(now) == [b"p"]
        else:
            r.landed({b"p"}, set())
    assert got == pytest.approx(want)


def test_a_failure_while_waiting_does_not_move_the_retry_later() -> None:
    r = PathRetries()
    r.schedule([b"p"], 0)
    r.schedule([b"p"], 1.5)
    assert r.due(1.9) == []
    assert r.due(2.0) == [b"p"]

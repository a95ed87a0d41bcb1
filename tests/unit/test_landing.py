"""LandingCheck (kwatch.replicate.landing) with a real coalescer and a barrier given by hand."""

from __future__ import annotations

import time

from kwatch.events import FileEvent, Op
from kwatch.replicate.coalesce import Coalescer
from kwatch.replicate.landing import LandingCheck


def check(barrier: object = None, folds: list[int] | None = None) -> tuple[LandingCheck, Coalescer]:
    c = Coalescer(b"/src")
    seen = folds if folds is not None else []
    return LandingCheck(c, 1.0, "t", lambda: seen.append(1), lambda: barrier), c  # type: ignore[arg-type,return-value]


def test_a_barrier_that_times_out_drops_every_read() -> None:
    lc, _ = check(barrier=lambda timeout: False)
    assert lc.unlandable([b"a", b"b"]) == {b"a", b"b"}


def test_without_a_barrier_the_events_folded_decide() -> None:
    folds: list[int] = []
    lc, c = check(folds=folds)
    now = time.monotonic()
    c.add(FileEvent(Op.OPEN_WRITE, b"/src/w"), now)
    assert lc.unlandable([b"w", b"quiet"]) == {b"w"}
    assert folds == [1]  # queued events are folded before the coalescer is asked


def test_nothing_to_check_folds_nothing() -> None:
    folds: list[int] = []
    lc, _ = check(barrier=lambda timeout: False, folds=folds)
    assert lc.unlandable([]) == set() and folds == []

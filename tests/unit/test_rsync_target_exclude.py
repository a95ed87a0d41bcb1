"""rsync_target.excluded_path: a path is excluded when it or an ancestor matches, with the ancestors' answers kept
across the paths of a batch (the same answers as testing every ancestor of every path)."""

from __future__ import annotations

import pytest

from kwatch.replicate.rsync_target import excluded_path
from kwatch.replicate.scan import Excluder

EX = Excluder((b"*.o", b"/build", b"src/*.tmp", b".git"))
CASES = [
    (b"a", False), (b"a.o", True), (b"build", True), (b"build/x", True), (b"x/build", False),
    (b"src/a.tmp", True), (b"src/a.tmp/y", True), (b"q/.git/z", True), (b"q/w/e.o", True), (b"q/w/e.c", False),
    (b"a/" * 1500 + b"b", False),  # deeper than Python's recursion limit
]


@pytest.mark.parametrize(("path", "want"), CASES, ids=[c[0][:20].decode() for c in CASES])
def test_excluded_path(path: bytes, want: bool) -> None:
    assert excluded_path(EX, path) is want


def test_excluded_path_with_shared_answers() -> None:
    seen: dict[bytes, bool] = {}
    assert [excluded_path(EX, p, seen) for p, _ in CASES] == [w for _, w in CASES]
    assert seen[b"build"] is True and seen[b"q/.git"] is True

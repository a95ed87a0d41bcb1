"""kwatch.replicate.rsync_moves: where a batch's renamed names are on the mirror, and the move sessions for them."""

from __future__ import annotations

import pytest

from kwatch.replicate.rsync_moves import MAX_SESSIONS, Move, origins, plan

ORIGINS = [
    ("one", [(b"a", b"b")], {b"b": b"a"}),
    ("chain", [(b"a", b"b"), (b"b", b"c")], {b"c": b"a"}),
    ("back_again", [(b"a", b"b"), (b"b", b"a")], {}),
    ("out_of_a_moved_tree", [(b"a", b"b"), (b"b/x", b"y")], {b"b": b"a", b"y": b"a/x"}),
    ("into_a_moved_tree", [(b"a", b"b"), (b"c", b"b/c")], {b"b": b"a", b"b/c": b"c"}),
    ("moved_tree_moves_again", [(b"c", b"a/c"), (b"a", b"z")], {b"z": b"a", b"z/c": b"c"}),
    ("overwritten", [(b"a", b"b"), (b"c", b"b")], {b"b": b"c"}),
    ("root_ignored", [(b"", b"b"), (b"a", b"")], {}),
]


@pytest.mark.parametrize(("name", "renames", "want"), ORIGINS, ids=[c[0] for c in ORIGINS])
def test_origins(name: str, renames: list[tuple[bytes, bytes]], want: dict[bytes, bytes]) -> None:
    assert origins(renames) == want



PLANS = [
    ("dir", [(b"x/a", b"y/b")], {b"y/b": "dir"}, [Move(b"y/b", None, b"../../x/a", True)]),
    ("dir_at_root", [(b"a", b"b")], {b"b": "dir"}, [Move(b"b", None, b"../a", True)]),
    ("gone_since", [(b"a", b"b")], {}, []),
    ("file_same_dir", [(b"d/a", b"d/b")], {b"d/b": "file"}, []),
    ("files_across", [(b"d/a", b"e/a"), (b"d/b", b"e/c")], {b"e/a": "file", b"e/c": "file"},
     [Move(b"e", (b"e/a", b"e/c"), b"../d", True)]),
    ("file_same_name", [(b"d/a", b"a")], {b"a": "file"}, [Move(b"", (b"a",), b"d", False)]),
    ("inner_first", [(b"a", b"b"), (b"c", b"b/c")], {b"b": "dir", b"b/c": "dir"},
     [Move(b"b/c", None, b"../../c", True), Move(b"b", None, b"../a", True)]),
    ("symlink_left", [(b"d/a", b"e/a")], {b"e/a": "link"}, []),
]


@pytest.mark.parametrize(("name", "renames", "kind", "want"), PLANS, ids=[c[0] for c in PLANS])
def test_plan(name: str, renames: list[tuple[bytes, bytes]], kind: dict[bytes, str], want: list[Move]) -> None:
    assert plan(renames, kind.get) == want


def test_plan_is_bounded() -> None:
    renames = [(b"d%d" % i, b"e%d" % i) for i in range(MAX_SESSIONS * 2)]
    assert len(plan(renames, lambda p: "dir")) == MAX_SESSIONS

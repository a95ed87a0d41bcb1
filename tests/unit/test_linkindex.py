"""The hard-link index (pure): tables of operations and the groups each must leave."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kwatch.replicate.linkindex import Key, LinkIndex

A: Key = (1, 100)
B: Key = (1, 200)


def _groups(ix: LinkIndex, keys: tuple[Key, ...] = (A, B)) -> dict[Key, set[bytes]]:
    return {k: set(ix.names(k)) for k in keys if ix.names(k)}


Step = Callable[[LinkIndex], None]

CASES: list[tuple[str, list[Step], dict[Key, set[bytes]]]] = [
    ("add_two_names", [lambda ix: ix.add(A, [b"a", b"d/b"])], {A: {b"a", b"d/b"}}),
    ("a_name_moves_to_its_new_inode", [lambda ix: ix.add(A, [b"a", b"b"]), lambda ix: ix.add(B, [b"b"])],
     {A: {b"a"}, B: {b"b"}}),
    ("discard_one_name_keeps_the_other", [lambda ix: ix.add(A, [b"a", b"b"]), lambda ix: ix.discard(b"a")],
     {A: {b"b"}}),
    ("discard_unknown_is_harmless", [lambda ix: ix.add(A, [b"a"]), lambda ix: ix.discard(b"zz")], {A: {b"a"}}),
    ("discard_under_a_directory", [lambda ix: ix.add(A, [b"d/a", b"da", b"d/e/f"]),
                                   lambda ix: ix.discard_under(b"d")], {A: {b"da"}}),
    ("discard_under_the_root_forgets_all", [lambda ix: ix.add(A, [b"a"]), lambda ix: ix.add(B, [b"b"]),
                                            lambda ix: ix.discard_under(b"")], {}),
    ("rename_a_file", [lambda ix: ix.add(A, [b"a", b"b"]), lambda ix: ix.rename(b"b", b"x/c")],
     {A: {b"a", b"x/c"}}),
    ("rename_a_directory_rebases_its_names", [lambda ix: ix.add(A, [b"d/a", b"d/s/b", b"dd"]),
                                              lambda ix: ix.rename(b"d", b"e")], {A: {b"e/a", b"e/s/b", b"dd"}}),
    ("rename_over_a_name_replaces_it", [lambda ix: ix.add(A, [b"a"]), lambda ix: ix.add(B, [b"b", b"c"]),
                                        lambda ix: ix.rename(b"a", b"b")], {A: {b"b"}, B: {b"c"}}),
    ("rename_over_a_directory_forgets_below", [lambda ix: ix.add(B, [b"t/x", b"y"]), lambda ix: ix.add(A, [b"s/a"]),
                                              lambda ix: ix.rename(b"s", b"t")], {A: {b"t/a"}, B: {b"y"}}),
]


@pytest.mark.parametrize(("name", "steps", "want"), CASES, ids=[c[0] for c in CASES])
def test_index(name: str, steps: list[Step], want: dict[Key, set[bytes]]) -> None:
    ix = LinkIndex()
    for step in steps:
        step(ix)
    assert _groups(ix) == want
    assert len(ix) == sum(len(v) for v in want.values())
    for key, names in want.items():
        for p in names:
            assert ix.key_of(p) == key


# (name, steps, the names in doubt after them): a name whose put or link failed stays a name of its inode (to be
# linked again when the data is next sent) but is never the name others are linked to, until a batch lands it
DOUBT_CASES: list[tuple[str, list[Step], set[bytes]]] = [
    ("a_failed_name_is_in_doubt", [lambda ix: ix.add(A, [b"a", b"h"]), lambda ix: ix.doubt([b"h"])], {b"h"}),
    ("trust_clears_it", [lambda ix: ix.add(A, [b"a", b"h"]), lambda ix: ix.doubt([b"h", b"a"]),
                         lambda ix: ix.trust([b"a"])], {b"h"}),
    ("landing_again_clears_it", [lambda ix: ix.add(A, [b"a", b"h"]), lambda ix: ix.doubt([b"h"]),
                                 lambda ix: ix.add(A, [b"h"])], set()),
    ("a_rename_carries_it", [lambda ix: ix.add(A, [b"d/a", b"h"]), lambda ix: ix.doubt([b"d/a"]),
                             lambda ix: ix.rename(b"d", b"e")], {b"e/a"}),
    ("discard_forgets_it", [lambda ix: ix.add(A, [b"a", b"h"]), lambda ix: ix.doubt([b"h"]),
                            lambda ix: ix.discard(b"h"), lambda ix: ix.add(B, [b"h"])], set()),
    ("discard_under_the_root_forgets_it", [lambda ix: ix.add(A, [b"a"]), lambda ix: ix.doubt([b"a"]),
                                           lambda ix: ix.discard_under(b""), lambda ix: ix.add(A, [b"a"])], set()),
]


def test_a_path_not_linked_yet_can_be_in_doubt() -> None:
    """A file whose put failed, before it has a second name: in doubt, and its doubt follows renames."""
    ix = LinkIndex()
    ix.doubt([b"d/n", b"m"])
    ix.rename(b"d", b"e")
    assert (ix.in_doubt(b"d/n"), ix.in_doubt(b"e/n"), ix.in_doubt(b"m")) == (False, True, True)
    ix.discard_under(b"e")
    ix.trust([b"m"])
    assert not ix.in_doubt(b"e/n") and not ix.in_doubt(b"m")
    assert len(ix) == 0


@pytest.mark.parametrize(("name", "steps", "want"), DOUBT_CASES, ids=[c[0] for c in DOUBT_CASES])
def test_doubt(name: str, steps: list[Step], want: set[bytes]) -> None:
    ix = LinkIndex()
    for step in steps:
        step(ix)
    recorded = set(ix.names(A)) | set(ix.names(B))
    assert {p for p in recorded if ix.in_doubt(p)} == want
    assert set(ix.sure(A)) | set(ix.sure(B)) == recorded - want


def test_keys_under() -> None:
    ix = LinkIndex()
    ix.add(A, [b"d/a", b"x"])
    ix.add(B, [b"dd/b", b"d/s/b"])
    assert ix.keys_under(b"d") == {A, B}
    assert ix.keys_under(b"dd") == {B}
    assert ix.keys_under(b"x") == {A}
    assert ix.keys_under(b"y") == set()

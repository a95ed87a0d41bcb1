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

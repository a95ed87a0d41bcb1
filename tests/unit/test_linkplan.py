"""kwatch.replicate.linkplan: the operations for one inode's names, as a table of named cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kwatch.replicate.linkplan import GroupOps, plan_group


@dataclass
class Case:
    name: str
    names: list[bytes]
    kept: list[bytes]
    basis: list[bytes]
    want: GroupOps


CASES = [
    Case("new inode: data under the first name, the others linked", [b"a", b"b", b"c"], [], [],
         GroupOps(b"a", True, [b"b", b"c"])),
    Case("a basis leads the put (a delta needs one)", [b"a", b"b", b"c"], [], [b"b"],
         GroupOps(b"b", True, [b"a", b"c"])),
    Case("the first basis wins", [b"a", b"b", b"c"], [], [b"c", b"b"], GroupOps(b"c", True, [b"a", b"b"])),
    Case("one name: a put, no link", [b"a"], [], [], GroupOps(b"a", True, [])),
    Case("kept inode: nothing sent, the other names linked", [b"a", b"b", b"c"], [b"b"], [b"a"],
         GroupOps(b"b", False, [b"a", b"c"])),
    Case("every kept name stays as it is", [b"a", b"b", b"c", b"d"], [b"c", b"a"], [],
         GroupOps(b"c", False, [b"b", b"d"])),
    Case("all names kept: nothing to do", [b"a", b"b"], [b"a", b"b"], [], GroupOps(b"a", False, [])),
    Case("a kept name outside the group (a put of a rescan) leads", [b"a", b"b"], [b"sub/x"], [],
         GroupOps(b"sub/x", False, [b"a", b"b"])),
    Case("links keep the order of the names", [b"z", b"m", b"a"], [], [b"m"], GroupOps(b"m", True, [b"z", b"a"])),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_plan_group(case: Case) -> None:
    assert plan_group(case.names, case.kept, case.basis) == case.want


def test_a_group_without_names_is_a_bug() -> None:
    with pytest.raises(ValueError):
        plan_group([], (), ())

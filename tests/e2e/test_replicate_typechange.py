"""A reconcile where the mirror has another type of object at a path than the source (a file where the source has a
symlink, a directory where it has a file...): the mirror ends identical. The plan's delete of the old object must go
before the create: sent after it (as deletes of extraneous paths are, so the mirror serves old data until the new is
in place), it removed the new object, and the path stayed missing on the mirror for good. A real agent on a pipe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from treecmp import assert_trees_equal

from kwatch.replicate.engine import Replicator, Target, TargetOptions
from kwatch.replicate.scan import Delete, Hardlink, Kind, Mkdir, Plan, Put, Symlink


def _file(p: Path) -> None:
    p.write_bytes(b"data of " + os.fsencode(p.name))


def _dir(p: Path) -> None:
    p.mkdir()
    (p / "inner").write_bytes(b"inside")
    (p / "sub").mkdir()
    (p / "sub" / "deeper").write_bytes(b"deeper")


def _symlink(p: Path) -> None:
    p.symlink_to("../elsewhere")


MAKERS: dict[str, Callable[[Path], None]] = {"file": _file, "dir": _dir, "symlink": _symlink}
PAIRS = [(m, s) for m in MAKERS for s in MAKERS if m != s]  # (what the mirror has, what the source has)


@pytest.mark.parametrize("delete", [True, False], ids=["delete", "no_delete"])
@pytest.mark.parametrize(("on_mirror", "in_source"), PAIRS, ids=[f"{m}_to_{s}" for m, s in PAIRS])
def test_a_reconcile_replaces_an_object_of_another_type(on_mirror: str, in_source: str, delete: bool,
                                                         tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    for top in (src, mirror):
        (top / "d").mkdir(parents=True)
        (top / "d" / "kept").write_bytes(b"the same on both")
    MAKERS[in_source](src / "d" / "x")
    MAKERS[on_mirror](mirror / "d" / "x")
    rep = Replicator(os.fsencode(src), Target.parse(str(mirror)), TargetOptions(delete=delete))
    try:
        rep.coalescer.rescan(b"")
        r = rep.sync_now(rep.coalescer.take(time.monotonic()))
        assert not r.errors, r.errors
        assert_trees_equal(src, mirror)
    finally:
        rep.stop()


CLEARING_CASES = [
    ("nothing_created: every delete may wait", Plan(deletes=[Delete(b"a", Kind.FILE)]), [], [b"a"]),
    ("the created path itself", Plan(deletes=[Delete(b"x", Kind.FILE)], symlinks=[Symlink(b"x", b"t", 0)]),
     [b"x"], []),
    ("under a created path, children first",
     Plan(deletes=[Delete(b"x/y/z", Kind.FILE), Delete(b"x/y", Kind.DIR), Delete(b"x", Kind.DIR), Delete(b"w", Kind.FILE)],
          puts=[Put(b"x", 1, 0o644, 0)]),
     [b"x/y/z", b"x/y", b"x"], [b"w"]),
    ("a sibling with a common prefix is not under it",
     Plan(deletes=[Delete(b"xy", Kind.FILE)], mkdirs=[Mkdir(b"x", 0o755)]), [], [b"xy"]),
    ("a hard link's name", Plan(deletes=[Delete(b"h", Kind.DIR)], hardlinks=[Hardlink(b"h", b"f")]), [b"h"], []),
]


@pytest.mark.parametrize(("plan", "first", "last"), [c[1:] for c in CLEARING_CASES],
                         ids=[c[0] for c in CLEARING_CASES])
def test_clearing_deletes(plan: Plan, first: list[bytes], last: list[bytes]) -> None:
    got_first, got_last = plan.clearing_deletes()
    assert ([d.path for d in got_first], [d.path for d in got_last]) == (first, last)

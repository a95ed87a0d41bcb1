"""The agent planner from (batch, source metadata) to operations, with no filesystem: the source is a table given as
the transport's ``look`` (the planner reads nothing itself; see kwatch.replicate.agent_transport.AgentPlanner)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kwatch.replicate.agent_transport import AgentTransport, BatchContext, Seen
from kwatch.replicate.coalesce import CONTENT, EXIST, META, Batch
from kwatch.replicate.engine import Replicator, Target, TargetOptions
from kwatch.replicate.scan import Entry, Kind, Manifest, Mkdir, Plan, Put, SetAttr, Symlink


def seen(mode: int, size: int = 0, mtime_ns: int = 7_000_000_000, target: bytes | None = None) -> Seen:
    st = os.stat_result((mode, 1, 1, 1, 0, 0, size, 7, 7, 7),
                        {"st_atime_ns": mtime_ns, "st_mtime_ns": mtime_ns, "st_ctime_ns": mtime_ns})
    return Seen(st, target)


DIR, FILE, LINK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o640, stat.S_IFLNK | 0o777
SOURCE = {
    b"": seen(DIR), b"d": seen(DIR, mtime_ns=5), b"d/f": seen(FILE, 10), b"d/big": seen(FILE, 10 << 20),
    b"d/l": seen(LINK, target=b"../x"), b"skip.tmp": seen(FILE, 1),
}


def transport(tmp_path: Path, table: dict[bytes, Seen], **opts: object) -> AgentTransport:
    # the source root does not exist: a read of it by the planner would find nothing and the plans below would differ
    rep = Replicator(os.fsencode(tmp_path / "no-source"), Target.parse(str(tmp_path / "mirror")),
                     TargetOptions(excludes=(b"*.tmp",), **opts))  # type: ignore[arg-type]
    t = rep.transport
    assert isinstance(t, AgentTransport)
    t.look = table.get
    return t


def plan_of(t: AgentTransport, dirty: dict[bytes, int], rescans: dict[bytes, tuple[Manifest, Manifest] | None]) -> Plan:
    b = Batch(dirty=dict(dirty), rescans=set(rescans))
    t.ctx = BatchContext(batch=b)
    plan = Plan()
    for rel in sorted(rescans, key=len):
        t.planner.plan_rescan(rel, plan, rescans[rel])
    for rel, flags in sorted(dirty.items()):
        t.planner.plan_path(rel, flags, plan)
    return plan


ALL = CONTENT | EXIST | META
CASES = [
    ("a new small file: put, then its directory's time", {b"d/f": ALL},
     {"puts": [Put(b"d/f", 10, 0o640, 7_000_000_000, None, None, False)], "dir_setattrs": [SetAttr(b"d", None, 5)]}),
    ("a large file: put as a delta candidate", {b"d/big": CONTENT},
     {"puts": [Put(b"d/big", 10 << 20, 0o640, 7_000_000_000, None, None, True)],
      "dir_setattrs": [SetAttr(b"d", None, 5)]}),
    ("attributes only", {b"d/f": META}, {"setattrs": [SetAttr(b"d/f", 0o640, 7_000_000_000, None, None)]}),
    ("a new directory", {b"d": EXIST | META},
     {"mkdirs": [Mkdir(b"d", 0o755, None, None)], "dir_setattrs": [SetAttr(b"d", 0o755, 5, None, None)]}),
    ("a symlink, its target from the table", {b"d/l": EXIST},
     {"symlinks": [Symlink(b"d/l", b"../x", 7_000_000_000, None, None)], "dir_setattrs": [SetAttr(b"d", None, 5)]}),
    ("gone from the source: deleted", {b"d/gone": ALL}, {"deletes": [(b"d/gone", Kind.OTHER)]}),
    ("excluded: nothing", {b"skip.tmp": ALL}, {}),
]


@pytest.mark.parametrize("name,dirty,want", CASES, ids=[c[0] for c in CASES])
def test_plan_path(tmp_path: Path, name: str, dirty: dict[bytes, int], want: dict[str, list[Any]]) -> None:
    plan = plan_of(transport(tmp_path, SOURCE), dirty, {})
    got = {k: [tuple(op) for op in getattr(plan, k)] for k in
           ("puts", "mkdirs", "symlinks", "setattrs", "dir_setattrs", "deletes", "hardlinks") if getattr(plan, k)}
    assert got == {k: [tuple(op) for op in v] for k, v in want.items()}


def test_a_rescan_plans_from_the_two_manifests(tmp_path: Path) -> None:
    src, dst = Manifest(), Manifest()
    src.entries[b"f"] = Entry(Kind.FILE, 0o644, 3, 9, 0, 0, 1, 0, 0)
    src.entries[b"same"] = Entry(Kind.FILE, 0o644, 4, 9, 0, 0, 1, 0, 0)
    dst.entries[b"same"] = Entry(Kind.FILE, 0o644, 4, 9, 0, 0, 1, 0, 0)
    dst.entries[b"old"] = Entry(Kind.FILE, 0o644, 1, 1, 0, 0, 1, 0, 0)
    plan = plan_of(transport(tmp_path, SOURCE), {}, {b"d": (src, dst)})
    assert [p.path for p in plan.puts] == [b"d/f"]
    assert [d.path for d in plan.deletes] == [b"d/old"]
    assert plan.mkdirs[0] == Mkdir(b"d", 0o755 | 0o700)
    # not a directory in the source any more: planned as one path, with no manifests
    plan = plan_of(transport(tmp_path, SOURCE), {}, {b"d/f": None})
    assert [p.path for p in plan.puts] == [b"d/f"]


def test_the_mkdirs_before_a_rename_come_from_the_table(tmp_path: Path) -> None:
    t = transport(tmp_path, {**SOURCE, b"n": seen(DIR), b"n/m": seen(DIR | 0o070)})
    t.ctx = BatchContext(batch=Batch(dirty={b"n": EXIST, b"n/m": EXIST}))
    ops = t.planner.mkdir_parents(b"n/m/f", t.ctx.batch, set())
    assert ops == [Mkdir(b"n", 0o755), Mkdir(b"n/m", 0o775)]

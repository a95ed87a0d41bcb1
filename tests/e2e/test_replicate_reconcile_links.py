"""Hard links in the reconcile (initial sync, restart, reconnect): the mirror ends with hard links exactly where the
source has them, the second and later names of a group cost no file data when the mirror has the content under one
name, and links the mirror has but the source does not are broken.

- a table of (source, mirror) starting states, each reconciled by a :class:`Replicator` against a real agent on a
  local pipe and through the real sshd the tests start, and against an agent that negotiates neither ``inodes`` nor
  ``linkcheck`` (as an older peer): it must still end with the source's link groups where the mirror had copies;
- ``kill -9`` of a live ``kwatch replicate`` (BPF capture), link changes while it is down, restart: the mirror
  converges with the right link groups, and the restart sends only data the mirror had under no name; and a kill in
  the middle of the initial sync of many link groups.

Every check uses treecmp, which compares which paths share an inode on both sides.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from livereplicate import KWATCH, LiveReplicate, wait_identical
from sshd import Sshd
from treecmp import assert_trees_equal

from kwatch.protocols import agent as ap
from kwatch.replicate.engine import Replicator, Target, TargetOptions

pytestmark = pytest.mark.root

SIZE = 100_000  # above the delta threshold: breaking a link with equal content goes as a delta (no literal data)
MTIME = 1_650_000_000_123_456_789
SLACK = 2_000  # literal bytes a run may send besides file data (none is expected: frames are not counted)

# A tree description: ("file", path, tag) writes SIZE bytes derived from tag with a fixed mtime, ("link", old, new)
# adds a hard link. The same tag gives the same content and mtime, so the quick check finds copies equal; another tag
# gives another mtime.
Op = tuple[str, str, str]


def _build(root: Path, ops: list[Op]) -> None:
    for kind, a, b in ops:
        if kind == "file":
            p = root / a
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes((b.encode() * SIZE)[:SIZE])
            mtime = MTIME + sum(b.encode())  # another tag, another mtime: the quick check tells them apart
            os.utime(p, ns=(mtime, mtime))
        else:
            (root / b).parent.mkdir(parents=True, exist_ok=True)
            os.link(root / a, root / b)


@dataclass(frozen=True)
class Case:
    name: str
    src: list[Op]
    mirror: list[Op]
    most: int  # literal bytes the reconcile may send
    identities: bool = False  # the mirror has links the source lacks: only the inode identities (capability
    # "inodes") show them, so an older peer leaves them
    delete: bool = True


def F(path: str, tag: str = "A") -> Op:
    return ("file", path, tag)


def L(old: str, new: str) -> Op:
    return ("link", old, new)


CASES = [
    Case("copies_become_links", [F("a"), L("a", "b")], [F("a"), F("b")], 0),
    Case("three_names_two_copies_one_missing", [F("a"), L("a", "b"), L("a", "c")], [F("b"), F("c")], 0),
    Case("missing_name_is_linked", [F("a"), L("a", "b")], [F("a")], 0),
    Case("the_name_the_mirror_has_leads", [F("a"), L("a", "b")], [F("b")], 0),
    Case("stale_copy_is_relinked_to_the_good_one", [F("a"), L("a", "b")], [F("a", "OLD"), F("b")], 0),
    Case("in_different_directories", [F("d1/a"), L("d1/a", "d2/sub/b")], [F("d1/a"), F("d2/sub/b")], 0),
    Case("new_group_is_sent_once", [F("a"), L("a", "b"), L("a", "d/c")], [], SIZE + SLACK),
    Case("mirror_link_the_source_lacks_is_broken", [F("a"), F("b")], [F("a"), L("a", "b")], SLACK, True),
    Case("mirror_links_three_the_source_two", [F("a"), L("a", "b"), F("c", "C")],
         [F("a"), L("a", "b"), L("a", "c")], SIZE + SLACK, True),
    Case("two_source_groups_on_one_mirror_inode", [F("a"), L("a", "b"), F("c"), L("c", "d"), L("c", "e")],
         [F("a"), L("a", "b"), L("a", "c"), L("a", "d"), L("a", "e")], SLACK, True),
    Case("extraneous_name_on_the_inode_is_deleted", [F("a")], [F("a"), L("a", "x")], 0, True),
    Case("extraneous_name_kept_without_delete", [F("a")], [F("a"), L("a", "x")], SLACK, True, delete=False),
]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with Sshd(tmp_path_factory.mktemp("sshd")) as d:
        yield d


TRANSPORTS = ["local", "ssh", "older_peer"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconcile_links(case: Case, transport: str, tmp_path: Path, request: pytest.FixtureRequest,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    _build(src, case.src)
    _build(mirror, case.mirror)
    opts = TargetOptions(delete=case.delete)
    if transport == "ssh":
        d: Sshd = request.getfixturevalue("sshd")
        target = Target.parse(d.target(mirror))
        opts.ssh, opts.agent_command = d.ssh_command, KWATCH
    else:
        target = Target.parse(str(mirror))
    if transport == "older_peer":
        monkeypatch.setattr(ap, "CAPABILITIES", ap.CAPABILITIES - {"inodes", "linkcheck"})
    rep = Replicator(os.fsencode(src), target, opts)
    try:
        rep.coalescer.rescan(b"")
        r = rep.sync_now(rep.coalescer.take(time.monotonic()))
        link = getattr(rep.transport, "link", None)
        caps = link.conn.capabilities if link is not None else frozenset()
    finally:
        rep.stop()
    assert ("inodes" in caps) is (transport != "older_peer")
    assert not r.errors, r.errors
    # An older peer's manifest cannot show links the mirror has and the source lacks: those stay (content, modes
    # and times are still right). Without delete an extraneous name stays, but on an inode of its own.
    blind = transport == "older_peer" and case.identities
    assert_trees_equal(src, mirror, ignore=() if case.delete else (b"x",), hardlinks=not blind)
    if not case.delete and not blind:
        assert os.stat(mirror / "a").st_ino != os.stat(mirror / "x").st_ino
    assert r.literal <= case.most, f"{r.literal} literal bytes sent, at most {case.most}: {r}"


# ---------------------------------------------------------------------------------------------------------------
# kill -9 and restart of a live kwatch replicate


def _file(p: Path, tag: bytes, size: int = SIZE) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes((tag * size)[:size])


@pytest.mark.slow
def test_restart_after_kill_relinks_without_data(tmp_path: Path) -> None:
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    for name in ("a", "x", "p", "lone"):
        _file(src / name, name.encode())
    os.link(src / "a", src / "b")
    os.link(src / "x", src / "y")
    os.link(src / "p", src / "q")
    with LiveReplicate(src, [str(mirror)], tmp_path / "replicate.log") as live:
        wait_identical(src, mirror, 60, what="initial", live=live)
        live.kill9()

        # while it is down: new links to files the mirror has, a link broken by a copy, the first name of a pair
        # removed, a link group the mirror has never seen, and a lone file that gains a name
        (src / "d").mkdir()
        os.link(src / "a", src / "d" / "c")
        (src / "q.tmp").write_bytes((src / "q").read_bytes())
        os.utime(src / "q.tmp", ns=(os.stat(src / "q").st_atime_ns, os.stat(src / "q").st_mtime_ns))
        os.rename(src / "q.tmp", src / "q")
        os.unlink(src / "x")
        _file(src / "new", b"new")
        os.link(src / "new", src / "new2")
        os.link(src / "lone", src / "lone2")

        offset = live.log_size()
        live.start()
        wait_identical(src, mirror, 60, what="after the restart", live=live)
        sent = live.batches(offset)
        assert live.stop() == 0
    assert all(x.errors == 0 for x in sent), sent
    literal = sum(x.literal for x in sent)
    assert literal <= SIZE + SLACK, f"the restart sent {literal} literal bytes (only 'new' is new data): {sent}"


@pytest.mark.slow
def test_kill_during_initial_sync_of_link_groups(tmp_path: Path) -> None:
    """Killed in the middle of the initial sync of 400 three-name groups (paced by bwlimit so that the kill lands
    in it), half of them separate copies that are hard-linked while the daemon is down: the restart links every
    name of every group and sends only the groups the mirror had under no name."""
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    src.mkdir()
    mirror.mkdir()
    size, groups = 10_000, 400

    def names(root: Path, i: int) -> list[Path]:
        return [root / f"d{i % 7}" / f"g{i}", root / f"d{(i + 1) % 7}" / f"g{i}-2", root / f"g{i}-3"]

    for j in range(7):
        (src / f"d{j}").mkdir()
    for i in range(groups):
        first, *others = names(src, i)
        _file(first, b"%d-" % i, size)
        for n in others:
            if i % 2:
                os.link(first, n)
            else:  # a copy with the same content and mtime
                _file(n, b"%d-" % i, size)
                os.utime(n, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns))
    log = tmp_path / "replicate.log"
    first_run = LiveReplicate(src, [str(mirror)], log, ["--bwlimit", "2048"])
    try:
        first_run.start(wait_targets=False)
        deadline = time.monotonic() + 60
        while sum(p.name.startswith("g") for p in mirror.rglob("*")) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        first_run.kill9()
    finally:
        first_run.kill_all()
    on_mirror = sum(p.name.startswith("g") for p in mirror.rglob("*"))
    assert on_mirror < 3 * groups, "the kill came after the initial sync: nothing left to test"
    for i in range(0, groups, 2):  # while it is down, the copies become links
        first, *others = names(src, i)
        for n in others:
            n.unlink()
            os.link(first, n)
    missing = 0  # groups the mirror has under no name
    for i in range(groups):
        want = names(src, i)[0].read_bytes()
        if not any(n.is_file() and n.read_bytes() == want for n in names(mirror, i)):
            missing += 1
    live = LiveReplicate(src, [str(mirror)], log)
    offset = live.log_size()
    with live:  # started here: its initial sync is the restart's reconcile
        wait_identical(src, mirror, 60, what="after the restart", live=live)
        sent = live.batches(offset)
        assert live.stop() == 0
    assert all(x.errors == 0 for x in sent), sent
    literal = sum(x.literal for x in sent)
    print(f"{on_mirror} names and {groups - missing} of {groups} groups on the mirror at the kill; the restart sent "
          f"{literal} literal bytes")
    assert literal <= missing * size + SLACK, f"{literal} literal bytes for {missing} groups missing: {sent}"

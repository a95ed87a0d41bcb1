"""Hard links to a stock ``rsync --daemon`` (``-H`` from the native client), with live BPF capture: the mirror has
the source's link groups after each step, and a step that only links names sends no file data.

Steps run in order on one live ``kwatch replicate SRC rsync://...``; the mirror is compared with treecmp, which
checks which paths share an inode (the receiver's one limit is noted at SAME_CONTENT_LINK_KEPT). A second test starts against a module that already holds the tree as separate
copies (a mirror made before, or by a client without ``-H``): the initial push links them without sending data.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from livereplicate import LiveReplicate, wait_identical
from rsyncd import RsyncDaemon
from treecmp import tree_differences

pytestmark = pytest.mark.root

SIZE = 100_000
CONVERGE = 60.0


def _literal(live: LiveReplicate, offset: int) -> int:
    """The literal bytes of the batches after ``offset``, once at least one of them logged its line."""
    return sum(b.literal for b in live.wait_batches(offset))


def _write(p: Path, tag: bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes((tag * SIZE)[:SIZE])


def _patch(p: Path, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.write(data)


def _copy_over(p: Path) -> None:
    """Break a link: a copy (same content and times) renamed over the name."""
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(p.read_bytes())
    st = p.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, p)


# (name, the step on the source, most literal bytes it may send; None: not checked)
STEPS: list[tuple[str, Callable[[Path], object], int | None]] = [
    ("new_group_sent_once", lambda s: [_write(s / "a", b"a"), os.link(s / "a", s / "b"),
                                       os.link(s / "a", s / "d" / "c")], SIZE + 100),
    ("link_to_a_file_the_mirror_has", lambda s: os.link(s / "seed", s / "d" / "seed-link"), 0),
    ("write_through_one_name_reaches_all", lambda s: _patch(s / "b", b"CHANGED THROUGH b"), None),
    ("rewrite_another_name", lambda s: _write(s / "d" / "c", b"rewritten "), None),
    ("unlink_the_first_name", lambda s: os.unlink(s / "a"), 0),
    ("link_then_unlink_the_old_name", lambda s: [os.link(s / "b", s / "e"), os.unlink(s / "b")], 0),
    # An rsync receiver leaves a file whose size and mtime match alone, links and all: a copy renamed over one name
    # of a linked file with the same content and times stays linked on the mirror (content is right; the links
    # differ) until one of the names changes, which the next step does.
    ("link_broken_by_a_copy", lambda s: _copy_over(s / "d" / "seed-link"), None),
    ("then_a_write_to_one_of_them", lambda s: _patch(s / "seed", b"SEED CHANGED"), None),
]
SAME_CONTENT_LINK_KEPT = {"link_broken_by_a_copy"}


def test_live_rsync_hard_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    _write(src / "seed", b"seed")
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        mirror = d.module_path("push")
        live = LiveReplicate(src, [d.url("push")], tmp_path / "replicate.log")
        try:
            live.start()
            wait_identical(src, mirror, CONVERGE, what="initial", live=live)
            for name, step, most in STEPS:
                offset = live.log_size()
                step(src)
                if name in SAME_CONTENT_LINK_KEPT:
                    deadline = time.monotonic() + CONVERGE
                    while tree_differences(src, mirror, hardlinks=False) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    assert tree_differences(src, mirror, hardlinks=False) == []
                else:
                    wait_identical(src, mirror, CONVERGE, what=f"after {name}", live=live)
                # a push's line is written after the mirror shows it: wait for this step's line before reading it
                # and before the next step takes its offset (start() waited for the initial push's line, which
                # otherwise counted the seed's 100,000 bytes against the first step)
                sent = _literal(live, offset)
                if most is not None:
                    assert sent <= most, f"{name}: {live.log_text(offset)}"
            assert live.stop() == 0
        finally:
            live.kill_all()


def test_rsync_initial_push_links_copies_without_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        _write(src / f"f{i}", b"%d " % i)
        os.link(src / f"f{i}", src / f"g{i}")
    with RsyncDaemon(tmp_path / "rsyncd") as d:
        mirror = d.module_path("push")
        for i in range(20):  # the mirror has every name, as separate copies with the same content and times
            for name in (f"f{i}", f"g{i}"):
                (mirror / name).write_bytes((src / name).read_bytes())
                st = (src / name).stat()
                os.utime(mirror / name, ns=(st.st_atime_ns, st.st_mtime_ns))
        live = LiveReplicate(src, [d.url("push")], tmp_path / "replicate.log")
        try:
            live.start()  # waits for the initial push's batch line
            wait_identical(src, mirror, CONVERGE, what="initial", live=live)
            assert _literal(live, 0) == 0, live.log_text()
            assert live.stop() == 0
        finally:
            live.kill_all()

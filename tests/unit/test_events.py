"""The event model's pure helpers: path normalisation and joining, and the capture filter's exact check."""

from __future__ import annotations

import pytest

from kwatch.capture.base import CaptureFilter
from kwatch.events import FileEvent, Op, join, normalize
from kwatch.paths import is_under

JOIN = [
    ("plain_name", b"/a/b", b"c", b"/a/b/c"),
    ("root_base", b"/", b"c", b"/c"),
    ("absolute_name", b"/a", b"/x//y/./z", b"/x/y/z"),
    ("dot", b"/a/b", b".", b"/a/b"),
    ("dotdot", b"/a/b", b"..", b"/a"),
    ("dotdot_past_root", b"/", b"../../x", b"/x"),
    ("nested_dots", b"/a", b"b/../c/./d", b"/a/c/d"),
    ("empty_name", b"/a/b", b"", b"/a/b"),
    ("non_utf8", b"/a", b"\xff\n", b"/a/\xff\n"),
]


@pytest.mark.parametrize(("name", "base", "rel", "want"), JOIN, ids=[c[0] for c in JOIN])
def test_join(name: str, base: bytes, rel: bytes, want: bytes) -> None:
    assert join(base, rel) == want
    assert normalize(want) == want


UNDER = [
    ("self", b"/srv", b"/srv", True),
    ("child", b"/srv/a", b"/srv", True),
    ("sibling_prefix", b"/srvx/a", b"/srv", False),
    ("parent", b"/", b"/srv", False),
    ("root_holds_all", b"/x", b"/", True),
]


@pytest.mark.parametrize(("name", "path", "root", "want"), UNDER, ids=[c[0] for c in UNDER])
def test_is_under_and_filter_agree(name: str, path: bytes, root: bytes, want: bool) -> None:
    assert is_under(path, root) is want
    filt = CaptureFilter.make(roots=[root])
    assert filt.accepts(FileEvent(Op.UNLINK, path)) is want
    # either path of a rename counts
    assert filt.accepts(FileEvent(Op.RENAME, b"/elsewhere", path)) is want


def test_filter_ops_pids_and_truncated() -> None:
    filt = CaptureFilter.make(roots=["/srv"], ops=[Op.UNLINK], exclude_pids=[7])
    assert not filt.accepts(FileEvent(Op.MKDIR, b"/srv/a"))
    assert not filt.accepts(FileEvent(Op.UNLINK, b"/srv/a", pid=7))
    assert filt.accepts(FileEvent(Op.UNLINK, b"/srv/a", pid=8))
    assert filt.accepts(FileEvent(Op.UNLINK, b"/cut/suffix", truncated=True))
    assert filt.accepts(FileEvent(Op.LOSS, b"/", lost=1))

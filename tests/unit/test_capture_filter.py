"""CaptureFilter: the batch path (select) keeps exactly what the per-event rule (accepts) keeps, in order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kwatch.capture.base import CaptureFilter
from kwatch.events import FileEvent, Op

PATHS = [b"/srv", b"/srv/a", b"/srv/a/b", b"/srvx/a", b"/other/f", b"/", b"/srv/", b"/home/mike/test/x"]
ROOTS = [b"/srv", b"/srv/a", b"/home/mike/test", b"/"]

events = st.builds(
    lambda op, path, new, pid, trunc: FileEvent(op=op, path=path, new_path=new, pid=pid, truncated=trunc),
    st.sampled_from(list(Op)),
    st.sampled_from(PATHS),
    st.one_of(st.none(), st.sampled_from(PATHS)),
    st.one_of(st.none(), st.integers(1, 4)),
    st.booleans(),
)
filters = st.builds(
    lambda roots, ops, pids: CaptureFilter.make(roots=roots, ops=ops, exclude_pids=pids),
    st.lists(st.sampled_from(ROOTS), max_size=3),
    st.one_of(st.none(), st.sets(st.sampled_from(list(Op)), min_size=1)),
    st.sets(st.integers(1, 4), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(filters, st.lists(events, max_size=30))
def test_select_is_accepts_in_order(filt: CaptureFilter, evs: list[FileEvent]) -> None:
    assert filt.select(evs) == [ev for ev in evs if filt.accepts(ev)]


CASES = [
    ("under_root", CaptureFilter.make(roots=[b"/srv"]), FileEvent(op=Op.CREATE, path=b"/srv/f"), True),
    ("sibling_prefix_is_outside", CaptureFilter.make(roots=[b"/srv"]), FileEvent(op=Op.CREATE, path=b"/srvx"), False),
    ("the_root_itself", CaptureFilter.make(roots=[b"/srv"]), FileEvent(op=Op.CHMOD, path=b"/srv"), True),
    ("rename_into_root", CaptureFilter.make(roots=[b"/srv"]),
     FileEvent(op=Op.RENAME, path=b"/tmp/x", new_path=b"/srv/x"), True),
    ("excluded_pid", CaptureFilter.make(roots=[b"/srv"], exclude_pids=[7]),
     FileEvent(op=Op.CREATE, path=b"/srv/f", pid=7), False),
    ("unwanted_op", CaptureFilter.make(roots=[b"/srv"], ops=[Op.UNLINK]),
     FileEvent(op=Op.CREATE, path=b"/srv/f"), False),
    ("loss_marker_always", CaptureFilter.make(roots=[b"/srv"], ops=[Op.UNLINK]),
     FileEvent(op=Op.LOSS, path=b"/"), True),
    ("cut_path_delivered", CaptureFilter.make(roots=[b"/srv"]),
     FileEvent(op=Op.CREATE, path=b"tail/f", truncated=True), True),
]


def test_named_cases() -> None:
    for name, filt, ev, kept in CASES:
        assert filt.accepts(ev) is kept, name
        assert filt.select([ev]) == ([ev] if kept else []), name

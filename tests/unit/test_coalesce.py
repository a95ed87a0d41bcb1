"""The coalescer: tables of event sequences and the batch each must fold into (pure, fake clock)."""

from __future__ import annotations

from typing import Any

import pytest

from kwatch.events import FT_DIR, RENAME_EXCHANGE, FileEvent, Op
from kwatch.replicate.coalesce import CONTENT, EXIST, LINKED, META, Coalescer

R = b"/src"


def e(op: Op, path: str, new: str | None = None, **kw: object) -> FileEvent:
    return FileEvent(op, R + path.encode(), None if new is None else R + new.encode(), **kw)  # type: ignore[arg-type]


CASES = [
    (
        "create_write_close_chmod_collapses",
        [e(Op.CREATE, "/a"), e(Op.CLOSE_WRITE, "/a"), e(Op.CHMOD, "/a")],
        [],
        {b"a": CONTENT | EXIST | META, b"": META},
        set(),
    ),
    (
        "rename_carries_pending_state",
        [e(Op.CREATE, "/a"), e(Op.CLOSE_WRITE, "/a"), e(Op.RENAME, "/a", "/b")],
        [(b"a", b"b")],
        {b"a": EXIST, b"b": CONTENT | EXIST, b"": META},
        set(),
    ),
    (
        "directory_rename_moves_children",
        [e(Op.CLOSE_WRITE, "/d/x/f"), e(Op.RENAME, "/d", "/e")],
        [(b"d", b"e")],
        {b"e/x/f": CONTENT, b"d": EXIST, b"e": EXIST, b"": META},
        set(),
    ),
    (
        "unlink_then_rmdir",
        [e(Op.UNLINK, "/d/f"), e(Op.RMDIR, "/d")],
        [],
        {b"d/f": EXIST | META, b"d": EXIST | META, b"": META},
        set(),
    ),
    (
        "moved_out_of_tree_is_a_delete",
        [e(Op.CLOSE_WRITE, "/d/f"), FileEvent(Op.RENAME, R + b"/d", b"/elsewhere/d")],
        [],
        {b"d": EXIST, b"": META},
        set(),
    ),
    (
        "moved_in_from_outside_is_a_rescan",
        [FileEvent(Op.RENAME, b"/elsewhere/t", R + b"/t")],
        [],
        {b"t": EXIST, b"": META},
        {b"t"},
    ),
    (
        "exchange_rescans_both",
        [e(Op.RENAME, "/a", "/b", flags=RENAME_EXCHANGE)],
        [],
        {},
        {b"a", b"b"},
    ),
    (
        "loss_rescans_everything",
        [e(Op.CLOSE_WRITE, "/a"), FileEvent(Op.LOSS, b"/", lost=3)],
        [],
        {},
        {b""},
    ),
    (
        "truncated_path_rescans_everything",
        [FileEvent(Op.CLOSE_WRITE, b"/x/y", truncated=True)],
        [],
        {},
        {b""},
    ),
    (
        "outside_root_ignored",
        [FileEvent(Op.CLOSE_WRITE, b"/srcother/a"), FileEvent(Op.CLOSE_WRITE, b"/other")],
        [],
        {},
        set(),
    ),
    (
        "hard_link_marks_both_names",
        [e(Op.LINK, "/a", "/h")],
        [],
        {b"h": LINKED | EXIST, b"a": LINKED, b"": META},
        set(),
    ),
    (
        "hard_link_then_write_marks_content",
        [e(Op.LINK, "/a", "/d/h"), e(Op.OPEN_WRITE, "/d/h"), e(Op.CLOSE_WRITE, "/d/h")],
        [],
        {b"d/h": LINKED | EXIST | CONTENT, b"a": LINKED, b"d": META},
        set(),
    ),
    (
        "hard_link_from_outside_the_root_marks_the_new_name",
        [FileEvent(Op.LINK, b"/elsewhere/a", R + b"/h")],
        [],
        {b"h": LINKED | EXIST, b"": META},
        set(),
    ),
    (
        "hard_link_mark_follows_a_rename",
        [e(Op.LINK, "/a", "/h"), e(Op.RENAME, "/h", "/g")],
        [(b"h", b"g")],
        {b"g": LINKED | EXIST, b"h": EXIST, b"a": LINKED, b"": META},
        set(),
    ),
]


@pytest.mark.parametrize(("name", "events", "renames", "dirty", "rescans"), CASES, ids=[c[0] for c in CASES])
def test_fold(name: str, events: list[FileEvent], renames: list, dirty: dict, rescans: set) -> None:
    c = Coalescer(R)
    for i, ev in enumerate(events):
        c.add(ev, now=i * 0.001)
    b = c.take(now=10.0)
    assert (b.renames, b.dirty, b.rescans) == (renames, dirty, rescans)
    assert b.events == len(events)


def test_settle_and_max_delay() -> None:
    c = Coalescer(R, settle=0.05, max_delay=1.0)
    assert c.due_in(0.0) is None
    c.add(e(Op.CLOSE_WRITE, "/a"), now=0.0)
    assert c.due_in(0.0) == pytest.approx(0.05)
    # a steady stream keeps settling, but max_delay caps the wait
    for i in range(1, 100):
        c.add(e(Op.CLOSE_WRITE, f"/f{i}"), now=i * 0.02)
    assert c.due_in(1.98) == 0.0


def test_open_files_are_held_until_closed() -> None:
    c = Coalescer(R, settle=0.05, max_delay=1.0)
    c.add(e(Op.CREATE, "/big"), now=0.0)
    c.add(e(Op.CLOSE_WRITE, "/small"), now=0.0)
    b = c.take(now=0.1)
    assert b.dirty == {b"small": CONTENT, b"": META}
    assert b.held == {b"big"}
    assert c.pending()
    c.add(e(Op.CLOSE_WRITE, "/big"), now=0.2)
    assert c.take(now=0.3).dirty == {b"big": CONTENT | EXIST}


def test_a_file_written_forever_is_sent_after_max_delay() -> None:
    c = Coalescer(R, settle=0.05, max_delay=1.0)
    c.add(e(Op.OPEN_WRITE, "/log"), now=0.0)
    assert c.take(now=0.5).dirty == {}
    assert c.take(now=1.1).dirty == {b"log": CONTENT}


# Holds of files open for writing. Steps run in order at the given clock times: an event, ("seed", {path: fds}) as
# the engine does with what /proc shows at start and after a loss, ("retry", path) as the engine does for a file
# that changed while read or that a rescan left out, ("take",) to take a batch and drop it. The last take is checked:
# (dirty paths -> flags, held paths, paths open for writing that a rescan must leave out).
Step = tuple[float, FileEvent | tuple[Any, ...]]
HOLD_CASES: list[tuple[str, list[Step], float, tuple[dict[bytes, int], set[bytes], set[bytes]]]] = [
    ("held_until_closed",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.1, ("take",)), (0.2, e(Op.CLOSE_WRITE, "/a"))], 0.3,
     ({b"a": CONTENT}, set(), set())),
    ("still_open_stays_behind",
     [(0.0, e(Op.OPEN_WRITE, "/a"))], 0.5,
     ({}, {b"a"}, {b"a"})),
    ("open_for_max_delay_is_sent",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.5, ("take",))], 1.1,
     ({b"a": CONTENT}, set(), set())),
    # max_delay counts per file: a batch waiting since 0.0 does not send a file whose write began at 0.95
    ("overdue_batch_holds_a_file_opened_just_now",
     [(0.0, e(Op.CLOSE_WRITE, "/x")), (0.95, e(Op.OPEN_WRITE, "/a"))], 1.0,
     ({b"x": CONTENT}, {b"a"}, {b"a"})),
    ("overdue_batch_holds_a_file_reopened_just_now",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.5, e(Op.CLOSE_WRITE, "/a")), (0.95, e(Op.OPEN_WRITE, "/a"))], 1.0,
     ({}, {b"a"}, {b"a"})),
    # fanotify and inotify report no open for writing of an existing file: its first MODIFY begins the hold
    ("modify_of_a_file_not_held_holds_it_until_close",
     [(0.0, e(Op.MODIFY, "/a"))], 0.5,
     ({}, {b"a"}, {b"a"})),
    ("modify_then_close_is_sent",
     [(0.0, e(Op.MODIFY, "/a")), (0.1, ("take",)), (0.2, e(Op.CLOSE_WRITE, "/a"))], 0.3,
     ({b"a": CONTENT}, set(), set())),
    ("modify_of_a_held_file_is_not_a_second_open",
     [(0.0, e(Op.CREATE, "/a")), (0.1, e(Op.MODIFY, "/a")), (0.2, e(Op.CLOSE_WRITE, "/a"))], 0.3,
     ({b"a": CONTENT | EXIST, b"": META}, set(), set())),
    ("modify_without_close_is_sent_after_max_delay",
     [(0.0, e(Op.MODIFY, "/a")), (0.5, ("take",))], 1.1,
     ({b"a": CONTENT}, set(), set())),
    # a MODIFY of a directory (fanotify: a utimensat(2) of mtime only, as tar does to each directory it made, with no
    # sign that the object is a directory) is no rewrite: held, the directory would stay behind its children
    ("modify_of_a_directory_made_in_the_batch_is_not_held",
     [(0.0, e(Op.MKDIR, "/d")), (0.1, e(Op.CLOSE_WRITE, "/d/f")), (0.2, e(Op.MODIFY, "/d"))], 0.3,
     ({b"d": CONTENT | EXIST | META, b"d/f": CONTENT, b"": META}, set(), set())),
    ("modify_of_a_renamed_new_directory_is_not_held",
     [(0.0, e(Op.MKDIR, "/d")), (0.1, e(Op.RENAME, "/d", "/e")), (0.2, e(Op.MODIFY, "/e"))], 0.3,
     ({b"d": EXIST, b"e": CONTENT | EXIST | META, b"": META}, set(), set())),
    ("modify_said_to_be_of_a_directory_is_not_held",
     [(0.0, e(Op.MODIFY, "/d", ftype=FT_DIR))], 0.1,
     ({b"d": CONTENT}, set(), set())),
    ("found_open_at_start_is_left_out_of_the_rescan",
     [(0.0, ("seed", {b"a": 1})), (0.0, ("rescan",))], 0.1,
     ({}, set(), {b"a"})),
    ("found_open_waits_for_its_close",
     [(0.0, ("seed", {b"a": 1})), (0.1, ("retry", b"a")), (0.2, ("take",)), (0.3, e(Op.CLOSE_WRITE, "/a"))], 0.4,
     ({b"a": CONTENT}, set(), set())),
    ("found_open_is_sent_after_max_delay",
     [(0.0, ("seed", {b"a": 1})), (0.1, ("retry", b"a")), (0.5, ("take",))], 1.05,
     ({b"a": CONTENT}, set(), set())),
    ("found_open_twice_needs_two_closes",
     [(0.0, ("seed", {b"a": 2})), (0.1, ("retry", b"a")), (0.2, e(Op.CLOSE_WRITE, "/a"))], 0.3,
     ({}, {b"a"}, {b"a"})),
    ("seed_drops_a_hold_whose_close_was_lost",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.5, ("seed", {}))], 0.6,
     ({b"a": CONTENT}, set(), set())),
    ("seed_keeps_when_a_known_hold_began",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.9, ("seed", {b"a": 1}))], 1.0,
     ({b"a": CONTENT}, set(), set())),
    # a file that changed while it was read is most likely still being written: looking again keeps its hold
    ("retry_keeps_the_hold",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.1, ("take",)), (0.2, ("retry", b"a"))], 0.3,
     ({}, {b"a"}, {b"a"})),
    ("hold_follows_a_rename",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.1, e(Op.RENAME, "/a", "/b"))], 0.2,
     ({b"a": EXIST, b"": META}, {b"b"}, {b"b"})),
    ("unlink_ends_the_hold",
     [(0.0, e(Op.OPEN_WRITE, "/a")), (0.1, e(Op.UNLINK, "/a"))], 0.2,
     ({b"a": CONTENT | EXIST | META, b"": META}, set(), set())),
]


@pytest.mark.parametrize(("name", "steps", "at", "want"), HOLD_CASES, ids=[c[0] for c in HOLD_CASES])
def test_holds(name: str, steps: list[Step], at: float,
               want: tuple[dict[bytes, int], set[bytes], set[bytes]]) -> None:
    c = Coalescer(R, settle=0.05, max_delay=1.0)
    for now, step in steps:
        if isinstance(step, FileEvent):
            c.add(step, now)
        elif step[0] == "seed":
            c.seed_writers(step[1], now)
        elif step[0] == "retry":
            c.retry(step[1], now)
        elif step[0] == "rescan":
            c.rescan(b"")
        else:
            c.take(now)
    b = c.take(at)
    assert (b.dirty, b.held, b.writing) == want


def test_held_files_are_polled_not_spun() -> None:
    """A batch that held files back is due again after ``settle``, not at once (its first event may be old)."""
    c = Coalescer(R, settle=0.05, max_delay=1.0)
    c.add(e(Op.CLOSE_WRITE, "/x"), now=0.0)
    c.add(e(Op.OPEN_WRITE, "/a"), now=0.9)
    assert c.take(1.0).held == {b"a"}
    assert c.due_in(1.0) == pytest.approx(0.05)


def test_too_many_paths_collapse_into_a_rescan() -> None:
    c = Coalescer(R, max_paths=100)
    for i in range(500):
        c.add(e(Op.CLOSE_WRITE, f"/f{i}"), now=0.0)
    b = c.take(now=1.0)
    assert b.rescans == {b""}
    assert len(b.dirty) <= 100


# (name, events, the batch's link origins: new name -> the name the mirror should still have its data under)
LINK_FROM_CASES = [
    ("link", [e(Op.LINK, "/a", "/b")], {b"b": b"a"}),
    ("link_then_unlink_the_old_name", [e(Op.LINK, "/a", "/b"), e(Op.UNLINK, "/a")], {b"b": b"a"}),
    ("chain_follows_to_the_first_name", [e(Op.LINK, "/a", "/b"), e(Op.LINK, "/b", "/c")], {b"b": b"a", b"c": b"a"}),
    ("old_name_written_in_the_batch_first", [e(Op.OPEN_WRITE, "/a"), e(Op.CLOSE_WRITE, "/a"),
                                             e(Op.LINK, "/a", "/b")], {}),
    ("old_name_created_in_the_batch", [e(Op.CREATE, "/a"), e(Op.CLOSE_WRITE, "/a"), e(Op.LINK, "/a", "/b")], {}),
    ("renames_rebase_both_names", [e(Op.LINK, "/d/a", "/d/b"), e(Op.RENAME, "/d", "/e")], {b"e/b": b"e/a"}),
    ("a_rename_onto_the_old_name_drops_it", [e(Op.LINK, "/a", "/b"), e(Op.UNLINK, "/a"), e(Op.RENAME, "/x", "/a")],
     {}),
    ("a_rename_onto_the_new_name_drops_it", [e(Op.LINK, "/a", "/b"), e(Op.RENAME, "/x", "/b")], {}),
    ("exchange_drops_both", [e(Op.LINK, "/a", "/b"), e(Op.RENAME, "/b", "/c", flags=RENAME_EXCHANGE)], {}),
    ("moved_out_of_the_tree", [e(Op.LINK, "/a", "/b"), FileEvent(Op.RENAME, R + b"/a", b"/elsewhere/a")], {}),
    ("a_loss_forgets_everything", [e(Op.LINK, "/a", "/b"), FileEvent(Op.LOSS, b"")], {}),
    ("link_from_outside_the_tree", [FileEvent(Op.LINK, b"/elsewhere/a", R + b"/b")], {}),
]


@pytest.mark.parametrize(("events", "link_from"), [c[1:] for c in LINK_FROM_CASES],
                         ids=[c[0] for c in LINK_FROM_CASES])
def test_link_origins(events: list[FileEvent], link_from: dict[bytes, bytes]) -> None:
    c = Coalescer(R)
    for i, ev in enumerate(events):
        c.add(ev, float(i))
    assert c.take(100.0).link_from == link_from


@pytest.mark.parametrize(
    ("renames", "rel", "now_at"),
    [
        ([], b"a/f", b"a/f"),
        ([(b"/r/a", b"/r/b")], b"a/f", b"b/f"),  # its directory moved
        ([(b"/r/a/f", b"/r/g")], b"a/f", b"g"),  # the file itself
        ([(b"/r/a", b"/r/b"), (b"/r/b/f", b"/r/c/h")], b"a/f", b"c/h"),  # in order
        ([(b"/r/ab", b"/r/x")], b"a/f", b"a/f"),  # a name that only starts the same
        ([(b"/r/a/f", b"/elsewhere/f")], b"a/f", b"a/f"),  # moved out: no rename to replay, the name stays
    ],
)
def test_current_name_follows_renames_folded_since_the_take(renames: list, rel: bytes, now_at: bytes) -> None:
    """A mark that belongs before the events folded since the last take (an ack's re-queue) follows their renames."""
    c = Coalescer(b"/r")
    c.add(FileEvent(Op.CREATE, b"/r/seen"), 0.0)
    c.take(1.0)
    for old, new in renames:
        c.add(FileEvent(Op.RENAME, old, new), 2.0)
    assert c.current_name(rel) == now_at


# Losses: (name, [(clock, event or "take")...], the rescans of the last take). Full rescans caused by losses or cut
# paths come at most once per full_rescan_every (30 s here); one asked for sooner is deferred, never dropped.
LOSS_CASES = [
    ("loss_below_one_directory_rescans_it", [(0.0, FileEvent(Op.LOSS, R + b"/d/e"))], {b"d/e"}),
    ("loss_of_the_root_rescans_everything", [(0.0, FileEvent(Op.LOSS, R))], {b""}),
    ("loss_above_the_root_rescans_everything", [(0.0, FileEvent(Op.LOSS, b"/"))], {b""}),
    ("loss_without_a_place_rescans_everything", [(0.0, FileEvent(Op.LOSS, b""))], {b""}),
    ("loss_in_another_tree_is_not_ours", [(0.0, FileEvent(Op.LOSS, b"/srcother/d"))], set()),
    ("a_cut_path_inside_rescans_everything", [(0.0, FileEvent(Op.CLOSE_WRITE, R + b"/x", truncated=True))], {b""}),
    ("second_loss_within_the_interval_waits",
     [(0.0, FileEvent(Op.LOSS, b"/")), (0.1, "take"), (5.0, FileEvent(Op.LOSS, b"/")), (5.0, e(Op.CLOSE_WRITE, "/a"))],
     set()),
    ("deferred_full_rescan_comes_at_the_end_of_the_interval",
     [(0.0, FileEvent(Op.LOSS, b"/")), (0.1, "take"), (5.0, FileEvent(Op.LOSS, b"/")), (30.1, e(Op.CLOSE_WRITE, "/a"))],
     {b""}),
    ("loss_after_the_interval_rescans_at_once",
     [(0.0, FileEvent(Op.LOSS, b"/")), (0.1, "take"), (31.0, FileEvent(Op.LOSS, b"/"))], {b""}),
    ("subtree_losses_are_not_rate_limited",
     [(0.0, FileEvent(Op.LOSS, b"/")), (0.1, "take"), (1.0, FileEvent(Op.LOSS, R + b"/d"))], {b"d"}),
]


@pytest.mark.parametrize(("steps", "rescans"), [c[1:] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_losses(steps: list, rescans: set[bytes]) -> None:
    c = Coalescer(R, full_rescan_every=30.0)
    now = 0.0
    for now, step in steps:
        if step == "take":
            c.take(now)
        else:
            c.add(step, now)
    assert c.take(now + 0.01).rescans == rescans


def test_a_deferred_full_rescan_keeps_the_target_due() -> None:
    """While a full rescan waits for its interval the coalescer is not idle: due_in names when it comes."""
    c = Coalescer(R, full_rescan_every=30.0)
    c.add(FileEvent(Op.LOSS, b"/"), 0.0)
    c.take(0.1)
    assert c.due_in(1.0) is None
    c.add(FileEvent(Op.LOSS, b"/"), 2.0)
    assert not c.pending()
    assert c.due_in(2.0) == pytest.approx(28.1)
    assert c.take(10.0).rescans == set()
    assert c.take(30.1).rescans == {b""}
    assert c.due_in(30.2) is None

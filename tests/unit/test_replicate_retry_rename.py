"""A name waiting for its retry (its put failed with a transient error such as ENOSPC) that is renamed, or whose
directory is renamed, before the retry is due: the retry follows it to its new name.

Found by the fault matrix (tests/e2e/test_netfaults.py, ssh-disk-full): files whose put failed while the mirror's disk
was full were renamed along with their directory by the workload; the retry went to the old name (gone in the
source, so only a delete was planned there), the mirror's stale copy moved with the directory's rename, and the
mirror stayed different from the source (same size, other content) until the next full reconcile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kwatch.events import FileEvent, Op
from kwatch.replicate.coalesce import CONTENT
from kwatch.replicate.engine import Replicator, Target, TargetOptions


def test_a_pending_retry_follows_the_rename_of_its_directory_and_of_itself(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    (src / "g").write_bytes(b"y")
    rep = Replicator(os.fsencode(src), Target.parse(str(tmp_path / "mirror")), TargetOptions())
    rep.coalescer.take(time.monotonic())
    # the batch that carried d/f and g failed for both with ENOSPC: each waits for its retry
    rep._schedule_retries([b"d/f", b"g"], {b"d/f", b"g"}, rep.coalescer.take(time.monotonic()))
    assert set(rep.retries.at) == {b"d/f", b"g"}
    # then the directory and the other file are renamed, in the source and (by the next batch) on the mirror
    os.rename(src / "d", src / "e")
    os.rename(src / "g", src / "h")
    now = time.monotonic()
    rep.coalescer.add(FileEvent(Op.RENAME, os.fsencode(src / "d"), new_path=os.fsencode(src / "e")), now)
    rep.coalescer.add(FileEvent(Op.RENAME, os.fsencode(src / "g"), new_path=os.fsencode(src / "h")), now)
    renames = rep._take(now)
    assert renames.renames == [(b"d", b"e"), (b"g", b"h")]
    assert set(rep.retries.at) == {b"e/f", b"h"} and set(rep.retries.wait) == {b"e/f", b"h"}
    rep._mark_due_retries(time.monotonic() + 3)
    batch = rep.coalescer.take(time.monotonic())
    assert batch.dirty.get(b"e/f", 0) & CONTENT and batch.dirty.get(b"h", 0) & CONTENT, batch
    assert b"d/f" not in batch.dirty and b"g" not in batch.dirty, batch


def test_a_retry_due_after_a_rename_still_in_the_batch_goes_to_the_new_name(tmp_path: Path) -> None:
    """The rename was folded in but its batch not taken yet when the retry comes due (seen in the matrix: a file
    whose put failed with ENOSPC stayed missing on the mirror for good)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    rep = Replicator(os.fsencode(src), Target.parse(str(tmp_path / "mirror")), TargetOptions())
    rep.coalescer.take(time.monotonic())
    rep._schedule_retries([b"d/f"], {b"d/f"}, rep.coalescer.take(time.monotonic()))
    os.rename(src / "d", src / "e")
    rep.coalescer.add(FileEvent(Op.RENAME, os.fsencode(src / "d"), new_path=os.fsencode(src / "e")), time.monotonic())
    rep._mark_due_retries(time.monotonic() + 3)
    batch = rep._take(time.monotonic())
    assert batch.renames == [(b"d", b"e")]
    assert batch.dirty.get(b"e/f", 0) & CONTENT, batch
    assert b"d/f" not in batch.dirty, batch


def test_a_failed_name_renamed_by_an_event_not_folded_yet_is_sent_at_its_new_name(tmp_path: Path) -> None:
    """The put failed (ENOSPC) and, by the time the batch's errors are handled, the source has renamed the file's
    directory but its rename event still waits in the queue: the name is not in the source, yet the file is not
    gone (seen in the matrix: w05-137/n00179 failed, w05-137 became w05-211, and n00179 never reached the
    mirror)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    rep = Replicator(os.fsencode(src), Target.parse(str(tmp_path / "mirror")), TargetOptions())
    rep.coalescer.take(time.monotonic())
    failed = rep.coalescer.take(time.monotonic())
    os.rename(src / "d", src / "e")  # the event comes after the batch's errors are handled
    rep._schedule_retries([b"d/f"], {b"d/f"}, failed)
    rep.coalescer.add(FileEvent(Op.RENAME, os.fsencode(src / "d"), new_path=os.fsencode(src / "e")), time.monotonic())
    batch = rep._take(time.monotonic())
    assert batch.dirty.get(b"e/f", 0) & CONTENT, batch

"""The tree-comparison oracle of the tests, on a tree that changes while it is walked (a receiver writing a mirror)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import treecmp


def test_a_name_renamed_between_the_listing_and_its_lstat_is_left_out(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".w.tmp").write_bytes(b"x")
    (tmp_path / "keep").write_bytes(b"k")
    real_lstat = os.lstat

    def lstat_after_rename(path: bytes) -> os.stat_result:
        if path.endswith(b"/.w.tmp"):  # what rsync does to its temporary: renamed into place under the walk
            os.rename(path, path[: -len(b".w.tmp")] + b"w")
        return real_lstat(path)

    monkeypatch.setattr(treecmp.os, "lstat", lstat_after_rename)
    got = treecmp.walk_lstat(os.fsencode(tmp_path))
    assert sorted(got) == [b"keep", b"sub"]


def test_a_directory_removed_before_it_is_listed_is_left_out_but_a_missing_root_still_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gone").mkdir()
    real_listdir = os.listdir

    def listdir_after_rmdir(path: bytes) -> list[bytes]:
        if path.endswith(b"/gone"):
            os.rmdir(path)
        return real_listdir(path)

    monkeypatch.setattr(treecmp.os, "listdir", listdir_after_rmdir)
    assert sorted(treecmp.walk_lstat(os.fsencode(tmp_path))) == [b"gone"]
    with pytest.raises(FileNotFoundError):
        treecmp.walk_lstat(os.fsencode(tmp_path / "absent"))


def test_a_file_that_goes_before_its_content_is_read_is_a_difference(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "f").write_bytes(b"same")
    real_open = open

    def open_after_unlink(path: bytes, mode: str = "r"):  # type: ignore[no-untyped-def]
        if path.endswith(b"/b/f"):
            os.unlink(path)
        return real_open(path, mode)

    monkeypatch.setattr(treecmp, "open", open_after_unlink, raising=False)
    assert treecmp.tree_differences(tmp_path / "a", tmp_path / "b") == ["f: went away during the comparison"]

"""kwatch.fsutil.DirFds: the files of a tree opened directory by directory, never through a symlink, never out of
the root, with a bounded number of descriptors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kwatch.fsutil import DirFds

SECRET = b"outside the root\n"


def world(tmp_path: Path) -> tuple[Path, Path]:
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "d" / "e").mkdir(parents=True)
    (src / "top").write_bytes(b"top\n")
    (src / "d" / "f").write_bytes(b"d/f\n")
    (src / "d" / "e" / "g").write_bytes(b"d/e/g\n")
    outside.mkdir()
    for rel in ("f", "g", "e/g"):
        (outside / rel).parent.mkdir(parents=True, exist_ok=True)
        (outside / rel).write_bytes(SECRET)
    return src, outside


def read(files: DirFds, rel: bytes) -> bytes:
    fd, st = files.open_regular(rel)
    try:
        data = os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)
    assert len(data) == st.st_size
    return data


def test_reads_files_at_every_depth(tmp_path: Path) -> None:
    src, _ = world(tmp_path)
    with DirFds(os.fsencode(src)) as files:
        assert [read(files, r) for r in (b"top", b"d/f", b"d/e/g", b"d/f")] == [b"top\n", b"d/f\n", b"d/e/g\n",
                                                                                 b"d/f\n"]


def _link_dir(src: Path, outside: Path) -> None:
    os.rename(src / "d", src / "d.moved")
    os.symlink(outside, src / "d")


def _link_file(src: Path, outside: Path) -> None:
    (src / "d" / "f").unlink()
    os.symlink(outside / "f", src / "d" / "f")


def _fifo(src: Path, outside: Path) -> None:
    (src / "d" / "f").unlink()
    os.mkfifo(src / "d" / "f")


REFUSED = [
    # (name, what is done to the source before d/f is first opened, the errnos that may say no)
    ("a directory in the path is a symlink", _link_dir, {errno.ELOOP, errno.ENOTDIR}),
    ("the file is a symlink", _link_file, {errno.ELOOP}),
    ("the file is a fifo (never blocks)", _fifo, {errno.EINVAL}),
]


@pytest.mark.parametrize(("name", "change", "errnos"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refuses(name: str, change: object, errnos: set[int], tmp_path: Path) -> None:
    src, outside = world(tmp_path)
    change(src, outside)  # type: ignore[operator]
    with DirFds(os.fsencode(src)) as files, pytest.raises(OSError) as e:
        read(files, b"d/f")
    assert e.value.errno in errnos


@pytest.mark.parametrize("rel", [b"../outside/f", b"d/../../outside/f", b"d/e/../../../outside/g", b".."])
def test_never_climbs_out(rel: bytes, tmp_path: Path) -> None:
    src, _ = world(tmp_path)
    with DirFds(os.fsencode(src)) as files, pytest.raises(OSError):
        read(files, rel)


def test_a_directory_swapped_after_it_was_opened_is_not_followed(tmp_path: Path) -> None:
    src, outside = world(tmp_path)
    with DirFds(os.fsencode(src)) as files:
        assert read(files, b"d/f") == b"d/f\n"
        _link_dir(src, outside)  # d is now a symlink to outside, which has an f of its own
        # the directory opened beneath the root (now d.moved), or a refusal: never the symlink's target
        assert read(files, b"d/f") == b"d/f\n"
        # d/e was not opened yet: it is resolved now, and d is a symlink on the way
        with pytest.raises(OSError) as e:
            read(files, b"d/e/g")
        assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_descriptors_stay_bounded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(100):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_bytes(b"%d" % i)
    before = len(os.listdir("/proc/self/fd"))
    with DirFds(os.fsencode(src), keep=8) as files:
        for i in range(100):
            assert read(files, b"d%d/f" % i) == b"%d" % i
        assert len(os.listdir("/proc/self/fd")) - before <= 8 + 1  # the kept directories and the root
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_root_given_as_a_descriptor_is_duplicated_and_left_open(tmp_path: Path) -> None:
    """The rsync:// sender hands the session's root fd: DirFds reads beneath it and closes only its own copy."""
    src, outside = world(tmp_path)
    root = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        with DirFds(root) as files:
            assert read(files, b"d/f") == b"d/f\n"
            _link_dir(src, outside)  # d was opened beneath the root before the swap: its fd is kept
            assert read(files, b"d/f") == b"d/f\n"
            with pytest.raises(OSError):  # d/e was not: its path now goes through the symlink
                read(files, b"d/e/g")
        assert os.fstat(root).st_ino == os.stat(src).st_ino
    finally:
        os.close(root)

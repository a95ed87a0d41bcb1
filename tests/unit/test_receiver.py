"""kwatch.mirror.receiver: each operation, plan round trips between real trees, hostile paths, full disk.

Every test that can runs twice: with openat2 (RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS) and with the fallback
component-by-component O_NOFOLLOW walk, so both resolvers are held to the same rules.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treecmp import assert_trees_equal, snapshot, tree_differences

from kwatch.mirror.receiver import (
    Receiver,
    ReceiverError,
    apply_plan,
    have_openat2,
    is_temp_name,
    temp_name,
    validate_path,
)
from kwatch.mirror.server import AgentServer
from kwatch.protocols import agent as ap
from kwatch.replicate import delta as delta_mod
from kwatch.replicate.scan import diff, scan

MT = 1_600_000_000_123_456_789

RESOLVERS = [pytest.param(True, id="openat2"), pytest.param(False, id="dirfd-walk")]


@pytest.fixture(params=RESOLVERS)
def use_openat2(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    if value and not have_openat2():
        pytest.skip("openat2 not available on this kernel")
    return value


@dataclass
class Env:
    base: Path  # holds root/ and outside/
    root: bytes
    outside: bytes
    rx: Receiver


@pytest.fixture
def env(tmp_path: Path, use_openat2: bool) -> Iterator[Env]:
    yield from _make_env(tmp_path, use_openat2)


def _make_env(base: Path, use_openat2: bool) -> Iterator[Env]:
    root = base / "root"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "file").write_bytes(b"canary")
    (outside / "dir").mkdir()
    (outside / "dir" / "inner").write_bytes(b"canary 2")
    rx = Receiver(os.fsencode(root), use_openat2=use_openat2)
    try:
        yield Env(base, os.fsencode(root), os.fsencode(outside), rx)
    finally:
        rx.close()


def _files(root: bytes) -> list[bytes]:
    return sorted(os.listdir(root))


# ---------------------------------------------------------------------------------------------------------------
# path validation


VALID = [b"a", b"a/b/c", b"\xff\xfe", b"new\nline", b".hidden", b"...", b"a b", b"x" * 255]
INVALID = [
    (b"", "empty"),
    (b"/etc/passwd", "absolute"),
    (b"../../etc/passwd", "'..'"),
    (b"a/../../b", "'..'"),
    (b"a/./b", "'.'"),
    (b"x\0y", "NUL"),
    (b"a//b", "empty component"),
    (b"a/", "empty component"),
    (b"x" * 256, "longer than"),
]


@pytest.mark.parametrize("path", VALID, ids=repr)
def test_validate_path_accepts(path: bytes) -> None:
    assert validate_path(path) == path.split(b"/")


@pytest.mark.parametrize(("path", "why"), INVALID, ids=[repr(p[:20]) for p, _ in INVALID])
def test_validate_path_refuses(path: bytes, why: str) -> None:
    with pytest.raises(ReceiverError, match=why):
        validate_path(path)


def test_temp_names() -> None:
    t = temp_name(b"file")
    assert t.startswith(b".file.kwatch-tmp-") and is_temp_name(t) and len(t) == len(b".file.kwatch-tmp-") + 16
    assert len(temp_name(b"n" * 255)) <= 255 and is_temp_name(temp_name(b"n" * 255))
    assert is_temp_name(temp_name(b"new\nline\xff"))
    assert not is_temp_name(b"file") and not is_temp_name(b".file.kwatch-tmp-xyz")


def test_error_message_names_path_and_reason() -> None:
    e = ReceiverError(b"dir/\xffname", "refused: dir is a symlink", errno.ELOOP)
    assert str(e) == "dir/\\xffname: refused: dir is a symlink" and e.errno == errno.ELOOP


def test_missing_root() -> None:
    with pytest.raises(ReceiverError, match="cannot open mirror root"):
        Receiver(b"/nonexistent/kwatch/root")


# ---------------------------------------------------------------------------------------------------------------
# each operation


def test_mkdir(env: Env) -> None:
    env.rx.mkdir(b"d", 0o750)
    assert stat.S_IMODE(os.stat(env.root + b"/d").st_mode) == 0o750  # exact, whatever the umask
    env.rx.mkdir(b"d", 0o700)  # existing: just the mode
    assert stat.S_IMODE(os.stat(env.root + b"/d").st_mode) == 0o700
    env.rx.mkdir(b"d/e", 0o755)
    (Path(os.fsdecode(env.root)) / "f").write_bytes(b"")
    with pytest.raises(ReceiverError, match="non-directory is in the way"):
        env.rx.mkdir(b"f")
    with pytest.raises(ReceiverError, match="does not exist"):
        env.rx.mkdir(b"missing/x")


def test_put_whole_file(env: Env) -> None:
    n = env.rx.put(b"f", [b"hello ", b"world"], mode=0o640, mtime_ns=MT)
    st_ = os.lstat(env.root + b"/f")
    assert n == 11 and (stat.S_IMODE(st_.st_mode), st_.st_mtime_ns) == (0o640, MT)
    assert Path(os.fsdecode(env.root + b"/f")).read_bytes() == b"hello world"
    env.rx.put(b"f", [b"v2"], mode=0o600)
    assert Path(os.fsdecode(env.root + b"/f")).read_bytes() == b"v2"
    assert _files(env.root) == [b"f"]


def test_put_is_invisible_until_end(env: Env) -> None:
    env.rx.put(b"f", [b"old"])
    h = env.rx.put_begin(b"f", mode=0o644)
    env.rx.put_write(h, b"new content, partially written")
    names = _files(env.root)
    assert b"f" in names and len(names) == 2 and is_temp_name(next(n for n in names if n != b"f"))
    assert Path(os.fsdecode(env.root + b"/f")).read_bytes() == b"old"  # final name still shows the old file
    assert set(scan(env.root)) == {b"f"}  # scans ignore temporaries
    env.rx.put_end(h)
    assert _files(env.root) == [b"f"]
    with pytest.raises(ReceiverError, match="not open"):
        env.rx.put_end(h)


def test_put_abort_removes_temp(env: Env) -> None:
    h = env.rx.put_begin(b"f")
    env.rx.put_write(h, b"x")
    env.rx.put_abort(h)
    env.rx.put_abort(h)  # twice is fine
    assert _files(env.root) == []


def test_put_exception_in_chunks_removes_temp(env: Env) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"a"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        env.rx.put(b"f", chunks())
    assert _files(env.root) == []


def test_put_replaces_a_symlink_without_writing_through(env: Env) -> None:
    os.symlink(env.outside + b"/file", env.root + b"/link")
    env.rx.put(b"link", [b"mine"])
    assert not os.path.islink(env.root + b"/link")
    assert Path(os.fsdecode(env.outside + b"/file")).read_bytes() == b"canary"


def test_put_refuses_directory_in_the_way(env: Env) -> None:
    os.mkdir(env.root + b"/d")
    with pytest.raises(ReceiverError, match="directory is in the way"):
        env.rx.put(b"d", [b"x"])
    assert _files(env.root) == [b"d"]


def test_put_files(env: Env) -> None:
    os.mkdir(env.root + b"/d")
    os.mkdir(env.root + b"/d/e")
    env.rx.put(b"d/old", [b"old"])
    os.mkdir(env.root + b"/in-the-way")
    files = [
        (b"top", 0o600, MT, b"t"),
        (b"d/a", 0o640, MT + 1, b"a" * 5000),
        (b"d/e/b", 0o755, None, b""),
        (b"missing-dir/x", 0o644, MT, b"x"),  # fails alone: the others still land
        (b"d/old", 0o644, MT, b"new"),  # replaces
        (b"in-the-way", 0o644, MT, b"file"),  # a directory there: refused without replace_dirs
        (b"d/c", 0o1755, MT, b"c"),  # special bits: always set by fchmod
        (b"d/s", 0o6755, MT, b"s"),  # setuid/setgid: dropped (these carry no owner; see _safe_mode)
        (b"d/w", 0o666, MT, b"w"),  # bits a usual umask (022) removes: set by fchmod
        (b"d/n", 0o000, MT, b"n"),  # no permission at all: still written
    ]
    errors = env.rx.put_files(files)
    assert [(e.path, e.errno) for e in errors] == [(b"missing-dir/x", errno.ENOENT), (b"in-the-way", errno.EISDIR)]
    for path, mode, mtime, data in files:
        if path in (b"missing-dir/x", b"in-the-way"):
            continue
        st_ = os.lstat(env.root + b"/" + path)
        want = mode & ~0o6000
        assert stat.S_IMODE(st_.st_mode) == want and Path(os.fsdecode(env.root + b"/" + path)).read_bytes() == data, path
        assert mtime is None or st_.st_mtime_ns == mtime
    assert os.path.isdir(env.root + b"/in-the-way")
    assert env.rx.put_files([(b"in-the-way", 0o644, MT, b"file"), (b"d/e/b", 0o644, MT, b"b2")],
                            replace_dirs=True) == []
    assert Path(os.fsdecode(env.root + b"/in-the-way")).read_bytes() == b"file"
    assert Path(os.fsdecode(env.root + b"/d/e/b")).read_bytes() == b"b2"
    assert env.rx.cleanup_temps() == []


def test_put_files_after_replacing_a_parent_directory(env: Env) -> None:
    """A directory removed for a file in the same call is not used again through a cached descriptor."""
    os.mkdir(env.root + b"/p")
    errors = env.rx.put_files([(b"p/x", 0o644, MT, b"1"), (b"p", 0o644, MT, b"now a file"),
                               (b"p/y", 0o644, MT, b"2")], replace_dirs=True)
    assert [(e.path, e.errno) for e in errors] == [(b"p/y", errno.ENOTDIR)]
    assert Path(os.fsdecode(env.root + b"/p")).read_bytes() == b"now a file"
    assert env.rx.cleanup_temps() == []


def _delta_via_agent(rx: Receiver, path: bytes, new: bytes, *, mode: int = 0o604,
                     bad_digest: bool = False) -> tuple[ap.PathError, ...]:
    """Patch ``path`` on the mirror to ``new`` the way production does: an in-process AgentServer over ``rx``
    answers a SigRequest (blocks of 1 KiB) and applies the delta frames a sender makes against that signature.
    Returns the errors of the Ack."""
    server = AgentServer(rx)
    sender = ap.AgentConnection(ap.Role.SENDER)
    hello = sender.send(sender.hello())
    sender.receive_data(server.start())
    assert isinstance(sender.next_event(), ap.Hello)
    sender.receive_data(server.feed(hello + sender.send(ap.SigRequest(1, path, 1024))))
    weak, strong, sig = b"", b"", None
    while not isinstance(ev := sender.next_event(), ap.NeedData):
        if isinstance(ev, ap.Signature):
            weak, strong, sig = weak + ev.weak, strong + ev.strong, ev
    assert sig is not None and sig.done
    stream = delta_mod.delta(delta_mod.Signature.from_wire(sig.block_size, sig.file_size, weak, strong, sig.seed),
                             new)
    frames = sender.send(ap.DeltaBegin(path, 1, len(new), mode))
    frames += b"".join(sender.send(ap.DeltaChunk((op,))) for op in stream)
    frames += sender.send(ap.DeltaEnd(b"\0" * 16 if bad_digest else stream.stats.digest))
    frames += sender.send(ap.Commit(1))
    sender.receive_data(server.feed(frames))
    acks = []
    while not isinstance(ev := sender.next_event(), ap.NeedData):
        if isinstance(ev, ap.Ack):
            acks.append(ev)
    assert len(acks) == 1
    return acks[0].errors


def test_delta_applied_by_the_agent(env: Env) -> None:
    old = os.urandom(300_000)
    new = old[:100_000] + b"inserted" + old[100_000:250_000] + os.urandom(1000)
    env.rx.put(b"big", [old], mode=0o600)
    assert _delta_via_agent(env.rx, b"big", new, mode=0o604) == ()
    assert Path(os.fsdecode(env.root + b"/big")).read_bytes() == new
    assert stat.S_IMODE(os.lstat(env.root + b"/big").st_mode) == 0o604
    assert _files(env.root) == [b"big"]


def test_delta_with_a_wrong_digest_keeps_old(env: Env) -> None:
    env.rx.put(b"f", [b"old content " * 100])
    errors = _delta_via_agent(env.rx, b"f", b"new content " * 100, bad_digest=True)
    assert [(e.relpath, e.code) for e in errors] == [(b"f", "digest-mismatch")]
    assert Path(os.fsdecode(env.root + b"/f")).read_bytes() == b"old content " * 100 and _files(env.root) == [b"f"]


@pytest.mark.parametrize("what", ["symlink", "directory", "missing"])
def test_delta_without_a_regular_basis_copies_nothing(env: Env, what: str) -> None:
    """A basis that is a symlink (to a file outside), a directory or nothing has no blocks: the signature is
    empty, so the delta is all literal, and no byte of anything else reaches the mirror."""
    if what == "symlink":
        os.symlink(env.outside + b"/file", env.root + b"/p")
    elif what == "directory":
        os.mkdir(env.root + b"/p")
    outside = snapshot(Path(os.fsdecode(env.outside)))
    errors = _delta_via_agent(env.rx, b"p", b"new data")
    assert errors == () or what == "directory", errors
    if not errors:
        assert Path(os.fsdecode(env.root + b"/p")).read_bytes() == b"new data"
    assert snapshot(Path(os.fsdecode(env.outside))) == outside


def test_rename(env: Env) -> None:
    env.rx.mkdir(b"a")
    env.rx.mkdir(b"b")
    env.rx.put(b"a/f", [b"1"])
    env.rx.put(b"b/g", [b"2"])
    env.rx.rename(b"a/f", b"b/g")  # over an existing file
    assert _files(env.root + b"/a") == [] and Path(os.fsdecode(env.root + b"/b/g")).read_bytes() == b"1"
    env.rx.rename(b"b", b"a/b")  # a directory
    env.rx.rename(b"a/b", b"a/b")  # onto itself: nothing
    assert _files(env.root + b"/a/b") == [b"g"]
    with pytest.raises(ReceiverError, match="into itself"):
        env.rx.rename(b"a", b"a/b/c")
    with pytest.raises(ReceiverError, match=r"rename to .* failed"):
        env.rx.rename(b"missing", b"x")


def test_delete(env: Env) -> None:
    r = env.root
    os.makedirs(r + b"/t/u/v")
    for p in (b"/t/f", b"/t/u/g", b"/t/u/v/h"):
        Path(os.fsdecode(r + p)).write_bytes(b"x")
    os.symlink(env.outside, r + b"/t/u/out-link")  # inside the tree being deleted: unlinked, not followed
    os.chmod(r + b"/t/u/v", 0o500)
    Path(os.fsdecode(r + b"/f")).write_bytes(b"x")
    assert env.rx.delete(b"t") is True
    assert env.rx.delete(b"f") is True
    assert env.rx.delete(b"f") is False
    assert _files(r) == []
    assert snapshot(env.outside)[b"dir/inner"][4] == b"canary 2"


def test_delete_deep_tree(env: Env) -> None:
    fd = os.open(env.root, os.O_RDONLY)
    for _ in range(1200):  # deeper than the recursion limit; relative so PATH_MAX is no limit
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    assert env.rx.delete(b"d") and _files(env.root) == []


def test_symlink(env: Env) -> None:
    env.rx.symlink(b"l", b"/anywhere/at/all", mtime_ns=MT)
    assert os.readlink(env.root + b"/l") == b"/anywhere/at/all" and os.lstat(env.root + b"/l").st_mtime_ns == MT
    Path(os.fsdecode(env.root + b"/f")).write_bytes(b"x")
    env.rx.symlink(b"f", b"l")  # replaces a file
    assert os.readlink(env.root + b"/f") == b"l"
    env.rx.symlink(b"l", b"other")  # replaces a symlink
    assert os.readlink(env.root + b"/l") == b"other"
    os.mkdir(env.root + b"/d")
    with pytest.raises(ReceiverError, match="cannot put the symlink in place"):
        env.rx.symlink(b"d", b"x")
    with pytest.raises(ReceiverError, match="NUL"):
        env.rx.symlink(b"n", b"a\0b")
    assert sorted(_files(env.root)) == [b"d", b"f", b"l"]


def test_hardlink(env: Env) -> None:
    env.rx.put(b"a", [b"data"])
    env.rx.mkdir(b"d")
    env.rx.hardlink(b"d/b", b"a")
    sa, sb = os.lstat(env.root + b"/a"), os.lstat(env.root + b"/d/b")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == 2
    env.rx.hardlink(b"d/b", b"a")  # already the same inode: nothing, and no temp left
    env.rx.put(b"c", [b"other"])
    env.rx.hardlink(b"c", b"a")  # replaces
    assert os.lstat(env.root + b"/c").st_ino == sa.st_ino
    with pytest.raises(ReceiverError, match="cannot hard-link a directory"):
        env.rx.hardlink(b"x", b"d")
    with pytest.raises(ReceiverError, match="unusable"):
        env.rx.hardlink(b"x", b"missing")
    assert sorted(_files(env.root)) == [b"a", b"c", b"d"] and _files(env.root + b"/d") == [b"b"]


def test_setattr(env: Env) -> None:
    env.rx.put(b"f", [b"x"], mode=0o644)
    env.rx.setattr(b"f", mode=0o600)
    env.rx.setattr(b"f", mtime_ns=MT)
    st_ = os.lstat(env.root + b"/f")
    assert (stat.S_IMODE(st_.st_mode), st_.st_mtime_ns) == (0o600, MT)
    os.symlink(env.outside + b"/file", env.root + b"/l")
    before = os.stat(env.outside + b"/file")
    env.rx.setattr(b"l", mode=0o777, mtime_ns=MT)  # the link itself; its target untouched
    after = os.stat(env.outside + b"/file")
    assert os.lstat(env.root + b"/l").st_mtime_ns == MT
    assert (before.st_mode, before.st_mtime_ns) == (after.st_mode, after.st_mtime_ns)
    with pytest.raises(ReceiverError, match="no such file"):
        env.rx.setattr(b"missing", mode=0o600)


def test_owner_preserved_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    with Receiver(os.fsencode(tmp_path), preserve_owner=True) as rx:
        rx.put(b"f", [b"x"], uid=1234, gid=2345)
        rx.mkdir(b"d", uid=1234, gid=2345)
        rx.symlink(b"l", b"t", uid=1234, gid=2345)
        rx.put(b"g", [b"x"])
        rx.setattr(b"g", uid=4321)
    for name in ("f", "d", "l"):
        st_ = os.lstat(tmp_path / name)
        assert (st_.st_uid, st_.st_gid) == (1234, 2345), name
    assert os.lstat(tmp_path / "g").st_uid == 4321
    with Receiver(os.fsencode(tmp_path), preserve_owner=False) as rx:
        rx.put(b"h", [b"x"], uid=1234, gid=2345)
    assert os.lstat(tmp_path / "h").st_uid == 0


@pytest.mark.parametrize("mode", ["none", "file", "batch"])
def test_fsync_modes(tmp_path: Path, mode: Any) -> None:
    with Receiver(os.fsencode(tmp_path), fsync=mode) as rx:
        rx.mkdir(b"d")
        rx.put(b"d/f", [b"x"])
        rx.symlink(b"d/l", b"f")
        rx.rename(b"d/f", b"g")
        rx.delete(b"d")
        rx.commit()
    assert os.listdir(tmp_path) == ["g"]
    with pytest.raises(ValueError, match="fsync"):
        Receiver(os.fsencode(tmp_path), fsync="always")  # type: ignore[arg-type]


def test_cleanup_temps(env: Env) -> None:
    r = env.root
    os.makedirs(r + b"/d/e")
    stale = [b"." + b"f" + b".kwatch-tmp-0123456789abcdef", b"d/e/.g\n.kwatch-tmp-fedcba9876543210"]
    for p in stale:
        Path(os.fsdecode(r + b"/" + p)).write_bytes(b"partial")
    Path(os.fsdecode(r + b"/d/.keep.kwatch-tmp-short")).write_bytes(b"not ours: wrong shape")
    os.symlink(env.outside, r + b"/out")  # not descended
    Path(os.fsdecode(env.outside + b"/.x.kwatch-tmp-0123456789abcdef")).write_bytes(b"outside")
    live = env.rx.put_begin(b"d/live")
    removed = env.rx.cleanup_temps()
    assert sorted(removed) == sorted(stale)
    assert os.path.exists(env.outside + b"/.x.kwatch-tmp-0123456789abcdef")
    assert os.path.exists(r + b"/d/.keep.kwatch-tmp-short")
    env.rx.put_write(live, b"still going")
    env.rx.put_end(live)
    assert Path(os.fsdecode(r + b"/d/live")).read_bytes() == b"still going"


# ---------------------------------------------------------------------------------------------------------------
# plan round trips: scan two real trees, diff, apply, compare


def make_tree(root: Path, variant: int) -> None:
    """Source trees with every replicable type; ``variant`` changes content, types, modes and times."""
    r = os.fsencode(root)
    os.makedirs(r + b"/d/e", exist_ok=True)
    os.makedirs(r + b"/ro", exist_ok=True)
    files = {
        b"a": b"alpha" * (1 + variant),
        b"d/b": b"beta",
        b"d/e/c": random.Random(variant).randbytes(70_000),  # same size in both variants: a real delta case
        b"\xff\xfe-latin": b"bytes",
        b"new\nline": b"nl",
        b"ro/inner": b"inside a read-only dir",
    }
    if variant == 0:
        files[b"only-in-old"] = b"old"
        files[b"type-change"] = b"a file in v0"
        os.makedirs(r + b"/old-dir/sub", exist_ok=True)
        files[b"old-dir/sub/x"] = b"x"
    else:
        files[b"only-in-new"] = b"new"
        os.makedirs(r + b"/type-change/sub", exist_ok=True)
        files[b"type-change/sub/y"] = b"y"
    for rel, data in files.items():
        with open(r + b"/" + rel, "wb") as f:
            f.write(data)
    os.link(r + b"/a", r + b"/d/a-hardlink")
    if variant:
        os.link(r + b"/a", r + b"/a-second-link")
    os.symlink(b"a" if variant == 0 else b"d/b", r + b"/link")
    os.symlink(b"/abs/dangling", r + b"/dangling")
    os.chmod(r + b"/d/b", 0o600 if variant else 0o644)
    os.chmod(r + b"/d/e/c", 0o755)
    for rel, mt in ((b"a", 1), (b"d/b", 2), (b"d/e/c", 3), (b"link", 4)):
        os.utime(r + b"/" + rel, ns=(MT, MT + mt + variant), follow_symlinks=False)
    os.chmod(r + b"/ro", 0o555)
    for rel in (b"d/e", b"d", b"ro"):
        os.utime(r + b"/" + rel, ns=(MT, MT + 100 + variant))


@dataclass
class RoundTrip:
    name: str
    dst_variant: int | None  # None: empty mirror
    src_variant: int
    checksum: bool = False


ROUND_TRIPS = [
    RoundTrip("into an empty mirror", None, 0),
    RoundTrip("old mirror to new source", 0, 1),
    RoundTrip("new mirror back to old source", 1, 0),
    RoundTrip("old mirror to new source, checksum", 0, 1, checksum=True),
    RoundTrip("identical", 1, 1),
]


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=lambda c: c.name)
def test_plan_round_trip(tmp_path: Path, case: RoundTrip, use_openat2: bool) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, case.src_variant)
    dst.mkdir()
    if case.dst_variant is not None:
        make_tree(dst, case.dst_variant)
        os.chmod(dst / "ro", 0o755)  # so make_tree may write there; the plan restores it
    bs, bd = os.fsencode(src), os.fsencode(dst)
    plan = diff(scan(bs, checksum=case.checksum), scan(bd, checksum=case.checksum), delete=True,
                checksum=case.checksum)
    with Receiver(bd, use_openat2=use_openat2) as rx:
        errors = apply_plan(rx, plan, bs)
    assert errors == []
    assert_trees_equal(src, dst)
    assert diff(scan(bs), scan(bd), delete=True, checksum=False).empty


def test_round_trip_as_unprivileged_user(tmp_path: Path) -> None:
    """Read-only directories get their mode after their contents, so a non-root receiver can fill them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch user")
    base = tempfile.mkdtemp(prefix="kwatch-rx-user-")
    try:
        os.chmod(base, 0o755)
        src = Path(base) / "src"
        make_tree(src, 1)
        os.chmod(src / "ro", 0o755)
        subprocess.run(["chown", "-R", "65534:65534", base], check=True)
        os.chmod(src / "ro", 0o555)
        os.utime(src / "ro", ns=(MT, MT + 101))
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.mkdir(base + "/dst")
                plan = diff(scan(os.fsencode(src)), scan(os.fsencode(base + "/dst")), delete=True, checksum=False)
                with Receiver(os.fsencode(base + "/dst")) as rx:
                    code = 0 if apply_plan(rx, plan, os.fsencode(src)) == [] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert_trees_equal(src, base + "/dst")
    finally:
        subprocess.run(["rm", "-rf", base], check=True)


def test_delete_read_only_tree_as_unprivileged_user() -> None:
    """A mirror copies read-only directories (0555, even 0000); a non-root receiver must still delete them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch user")
    base = tempfile.mkdtemp(prefix="kwatch-rx-del-")
    try:
        os.chmod(base, 0o755)
        os.makedirs(base + "/t/ro/deeper")
        os.makedirs(base + "/t/closed/inner")
        for p in ("/t/ro/f", "/t/ro/deeper/g", "/t/closed/inner/h"):
            Path(base + p).write_bytes(b"x")
        subprocess.run(["chown", "-R", "65534:65534", base], check=True)
        os.chmod(base + "/t/ro/deeper", 0o555)
        os.chmod(base + "/t/ro", 0o555)
        os.chmod(base + "/t/closed", 0o000)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                with Receiver(os.fsencode(base)) as rx:
                    code = 0 if rx.delete(b"t") else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.listdir(base) == []
    finally:
        subprocess.run(["rm", "-rf", base], check=True)


def test_apply_plan_collects_per_path_errors(env: Env) -> None:
    src = env.base / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    (src / "g").write_bytes(b"y")
    plan = diff(scan(os.fsencode(src)), scan(env.root), delete=True, checksum=False)
    Path(os.fsdecode(env.root + b"/d")).write_bytes(b"a file where the plan expects nothing")  # raced in
    errors = apply_plan(env.rx, plan, os.fsencode(src))
    assert {e.path for e in errors} == {b"d", b"d/f"}  # mkdir refused, put under it failed; g still done
    assert Path(os.fsdecode(env.root + b"/g")).read_bytes() == b"y"


def test_treecmp_reports_differences(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 0)
    shutil.copytree(a, b, symlinks=True, copy_function=shutil.copy2)  # copy2 loses hard links
    os.chmod(b / "ro", 0o755)
    (b / "extra").write_bytes(b"")
    (b / "d" / "b").write_bytes(b"betb")
    os.remove(b / "link")
    os.symlink("elsewhere", b / "link")
    diffs = tree_differences(a, b)
    text = "\n".join(diffs)
    for needle in ("only in", "extra", "d/b: content differs", "link: symlink target", "ro: mode 0555 != 0755",
                   "hard links only in", "mtime_ns"):
        assert needle in text, (needle, text)
    with pytest.raises(AssertionError, match="trees differ"):
        assert_trees_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# hostile paths: refused, and nothing outside the root changes


@dataclass
class Hostile:
    name: str
    run: Callable[[Receiver], object]
    match: str


def _put(path: bytes) -> Callable[[Receiver], object]:
    return lambda rx: rx.put(path, [b"pwned"])


def _put_files(path: bytes) -> Callable[[Receiver], object]:
    """put_files of ``path`` after a harmless file in the same directory (so a resolved parent is cached)."""

    def run(rx: Receiver) -> None:
        parent = path.rpartition(b"/")[0]
        first = [(parent + b"/ok", 0o644, None, b"ok")] if parent and not parent.startswith(b"/") else []
        errors = rx.put_files([*first, (path, 0o777, None, b"pwned")], replace_dirs=True)
        if errors:
            raise errors[-1]

    return run


HOSTILE = [
    Hostile("put ../../etc/passwd", _put(b"../../etc/passwd"), "'..'"),
    Hostile("put /etc/passwd", _put(b"/etc/passwd"), "absolute"),
    Hostile("put a/../../b", _put(b"a/../../b"), "'..'"),
    Hostile("put x NUL y", _put(b"x\0y"), "NUL"),
    Hostile("put through symlinked dir", _put(b"esc/file"), "esc is a symlink"),
    Hostile("put through relative symlink ..", _put(b"up/outside/file"), "up is a symlink"),
    Hostile("put through symlink deeper", _put(b"a/esc2/dir/inner"), "a/esc2 is a symlink"),
    Hostile("mkdir through symlink", lambda rx: rx.mkdir(b"esc/newdir"), "symlink"),
    Hostile("rename into a symlinked dir", lambda rx: rx.rename(b"a/f", b"esc/f"), "symlink"),
    Hostile("rename out of a symlinked dir", lambda rx: rx.rename(b"esc/file", b"stolen"), "symlink"),
    Hostile("delete through a symlink", lambda rx: rx.delete(b"esc/file"), "symlink"),
    Hostile("delete a tree through a symlink", lambda rx: rx.delete(b"esc/dir"), "symlink"),
    Hostile("symlink placed through a symlink", lambda rx: rx.symlink(b"esc/l", b"x"), "symlink"),
    Hostile("hardlink out of the root", lambda rx: rx.hardlink(b"h", b"esc/file"), "symlink"),
    Hostile("hardlink into a symlinked dir", lambda rx: rx.hardlink(b"esc/h", b"a/f"), "symlink"),
    Hostile("setattr through a symlink", lambda rx: rx.setattr(b"esc/file", mode=0o777), "symlink"),
    Hostile("delta basis through a symlink", lambda rx: rx.open_read(b"esc/file"), "symlink"),
    Hostile("put through a file used as a dir", _put(b"a/f/x"), "not a directory"),
    Hostile("put_files ../../etc/passwd", _put_files(b"../../etc/passwd"), "'..'"),
    Hostile("put_files /etc/passwd", _put_files(b"/etc/passwd"), "absolute"),
    Hostile("put_files through symlinked dir", _put_files(b"esc/file"), "esc is a symlink"),
    Hostile("put_files through symlink deeper", _put_files(b"a/esc2/dir/inner"), "a/esc2 is a symlink"),
    Hostile("put_files through a file used as a dir", _put_files(b"a/f/x"), "not a directory"),
]


def _hostile_setup(e: Env) -> None:
    r = e.root
    os.mkdir(r + b"/a")
    Path(os.fsdecode(r + b"/a/f")).write_bytes(b"inside")
    os.symlink(e.outside, r + b"/esc")
    os.symlink(e.outside, r + b"/a/esc2")
    os.symlink(e.outside + b"/file", r + b"/esc-file")
    os.symlink(b"..", r + b"/up")


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_path_refused(env: Env, case: Hostile) -> None:
    _hostile_setup(env)
    before_out = snapshot(env.outside)
    before_base = sorted(os.listdir(env.base))
    with pytest.raises(ReceiverError, match=case.match):
        case.run(env.rx)
    assert snapshot(env.outside) == before_out
    assert sorted(os.listdir(env.base)) == before_base
    assert not any(is_temp_name(n) for n in os.listdir(env.root) + os.listdir(env.root + b"/a"))


SAFE_ON_LINKS = [
    Hostile("delete a symlink to outside removes the link only", lambda rx: rx.delete(b"esc"), ""),
    Hostile("put over a symlink replaces the link", _put(b"esc-file"), ""),
    Hostile("put_files over a symlink replaces the link", _put_files(b"esc-file"), ""),
    Hostile("put_files over a dir symlink replaces the link", _put_files(b"a/esc2"), ""),
    Hostile("rename a symlink moves the link", lambda rx: rx.rename(b"esc", b"a/moved"), ""),
    Hostile("setattr of a symlink touches the link", lambda rx: rx.setattr(b"esc-file", mode=0o600, mtime_ns=MT), ""),
    Hostile("hardlink to a symlink links the link", lambda rx: rx.hardlink(b"h", b"esc-file"), ""),
]


@pytest.mark.parametrize("case", SAFE_ON_LINKS, ids=lambda c: c.name)
def test_final_symlink_component_is_never_followed(env: Env, case: Hostile) -> None:
    _hostile_setup(env)
    before_out = snapshot(env.outside)
    case.run(env.rx)
    assert snapshot(env.outside) == before_out


# ---------------------------------------------------------------------------------------------------------------
# property: random paths (with .., ., empty and symlink components) never change anything outside the root

COMPONENTS = [b"a", b"b", b"f", b"esc", b"up", b"esc-file", b"..", b".", b"", b"x\0y", b"outside", b"file"]
paths = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4).map(b"/".join) | st.lists(
    st.sampled_from(COMPONENTS), min_size=1, max_size=3
).map(lambda parts: b"/" + b"/".join(parts))
OPS = st.lists(
    st.tuples(st.sampled_from(["put", "mkdir", "delete", "rename", "symlink", "hardlink", "setattr", "delta",
                               "put_files"]),
              paths, paths),
    min_size=1,
    max_size=6,
)


def _run_op(rx: Receiver, op: str, p: bytes, q: bytes) -> None:
    if op == "put":
        rx.put(p, [b"pwned"], mode=0o777)
    elif op == "mkdir":
        rx.mkdir(p, 0o777)
    elif op == "delete":
        rx.delete(p)
    elif op == "rename":
        rx.rename(p, q)
    elif op == "symlink":
        rx.symlink(p, q or b"t")
    elif op == "hardlink":
        rx.hardlink(p, q)
    elif op == "setattr":
        rx.setattr(p, mode=0o777, mtime_ns=MT)
    elif op == "put_files":
        rx.put_files([(p, 0o777, MT, b"pwned"), (q, 0o777, None, b"pwned"), (p + b"/x", 0o777, MT, b"pwned")],
                     replace_dirs=True)
    else:  # a delta: the basis is opened for reading, the new content put
        fd = rx.open_read(p)
        if fd is not None:
            os.close(fd)
        rx.put(p, [b"pwned"], mode=0o777)


@pytest.mark.parametrize("resolver", RESOLVERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_property_nothing_outside_changes(resolver: bool, ops: list[tuple[str, bytes, bytes]]) -> None:
    if resolver and not have_openat2():
        pytest.skip("openat2 not available")
    with tempfile.TemporaryDirectory(prefix="kwatch-rx-prop-") as tmp:
        for e in _make_env(Path(tmp), resolver):
            _hostile_setup(e)
            before_out = snapshot(e.outside)
            before_base = sorted(os.listdir(e.base))
            for op, p, q in ops:
                with contextlib.suppress(ReceiverError):
                    _run_op(e.rx, op, p, q)
            assert snapshot(e.outside) == before_out
            assert sorted(os.listdir(e.base)) == before_base
            assert e.rx.cleanup_temps() == []  # every failure path removed its temporary


# ---------------------------------------------------------------------------------------------------------------
# full disk


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[bytes]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kwatch-test", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield os.fsencode(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_put_leaves_nothing(tiny_fs: bytes, use_openat2: bool) -> None:
    with Receiver(tiny_fs, use_openat2=use_openat2) as rx:
        rx.put(b"keep", [b"old content"])
        chunk = os.urandom(64 * 1024)
        with pytest.raises(ReceiverError) as ei:
            rx.put(b"big", [chunk] * 32)  # 2 MiB into 1 MiB
        assert ei.value.errno == errno.ENOSPC and "nothing was put" in str(ei.value)
        assert _files(tiny_fs) == [b"keep"]
        with pytest.raises(ReceiverError) as ei:
            rx.put(b"keep", [chunk] * 32)  # replacing: the old file stays whole
        assert ei.value.errno == errno.ENOSPC
        assert _files(tiny_fs) == [b"keep"] and Path(os.fsdecode(tiny_fs + b"/keep")).read_bytes() == b"old content"
        rx.put(b"small", [b"fits"])  # the space was given back
        assert sorted(_files(tiny_fs)) == [b"keep", b"small"]
        errors = rx.put_files([(b"keep", 0o644, None, chunk * 32), (b"many", 0o644, None, b"fits too")])
        assert [(e.path, e.errno) for e in errors] == [(b"keep", errno.ENOSPC)]
        assert "nothing was put" in str(errors[0])
        assert sorted(_files(tiny_fs)) == [b"keep", b"many", b"small"]
        assert Path(os.fsdecode(tiny_fs + b"/keep")).read_bytes() == b"old content"


def test_full_disk_delta_leaves_old_file(tiny_fs: bytes) -> None:
    with Receiver(tiny_fs) as rx:
        rx.put(b"f", [b"basis"])
        errors = _delta_via_agent(rx, b"f", os.urandom(40 * 65536))
        assert [(e.relpath, e.code) for e in errors] == [(b"f", "ENOSPC")], errors
        assert _files(tiny_fs) == [b"f"] and Path(os.fsdecode(tiny_fs + b"/f")).read_bytes() == b"basis"


@pytest.mark.parametrize("how", ["PutFile", "PutFiles", "PutEnd"])
def test_agent_refuses_content_that_does_not_match_its_digest(env: Env, how: str) -> None:
    """Every way a sender puts a whole file carries an xxh3-128 digest; the agent checks it before anything is put,
    reports digest-mismatch for that path and goes on with the rest."""
    env.rx.put(b"f", [b"old"])
    server = AgentServer(env.rx)
    sender = ap.AgentConnection(ap.Role.SENDER)
    hello = sender.send(sender.hello())
    sender.receive_data(server.start())
    assert isinstance(sender.next_event(), ap.Hello)
    wrong = b"\1" * 16
    ok = xxhash.xxh3_128_digest(b"fine")
    if how == "PutFile":
        frames = sender.send(ap.PutFile(b"f", 0o644, MT, b"new", wrong))
    elif how == "PutFiles":
        frames = sender.send(ap.PutFiles((ap.PutFile(b"f", 0o644, MT, b"new", wrong),
                                          ap.PutFile(b"g", 0o644, MT, b"fine", ok))))
    else:
        frames = (sender.send(ap.PutBegin(b"f", 3, 0o644)) + sender.send(ap.PutChunk(b"new"))
                  + sender.send(ap.PutEnd(wrong)))
    sender.receive_data(server.feed(hello + frames + sender.send(ap.Commit(1))))
    events = []
    while not isinstance(ev := sender.next_event(), ap.NeedData):
        events.append(ev)
    (ack,) = [e for e in events if isinstance(e, ap.Ack)]
    assert [(e.relpath, e.code) for e in ack.errors] == [(b"f", "digest-mismatch")]
    assert Path(os.fsdecode(env.root + b"/f")).read_bytes() == b"old"
    assert sorted(_files(env.root)) == ([b"f", b"g"] if how == "PutFiles" else [b"f"])


def _agent_session(env: Env, *frames_of: ap.Message) -> ap.Ack:
    """Feed ``frames_of`` and a Commit to an AgentServer over ``env``'s receiver; its Ack."""
    server = AgentServer(env.rx)
    sender = ap.AgentConnection(ap.Role.SENDER)
    hello = sender.send(sender.hello())
    sender.receive_data(server.start())
    assert isinstance(sender.next_event(), ap.Hello)
    data = hello + b"".join(sender.send(m) for m in frames_of) + sender.send(ap.Commit(1))
    for i in range(0, len(data), 4096):  # byte pieces as a pipe gives them
        if reply := server.feed(data[i:i + 4096]):
            sender.receive_data(reply)
    events = []
    while not isinstance(ev := sender.next_event(), ap.NeedData):
        events.append(ev)
    (ack,) = [e for e in events if isinstance(e, ap.Ack)]
    server.close()
    return ack


def _pf(path: bytes, data: bytes) -> ap.PutFile:
    return ap.PutFile(path, 0o644, MT, data, xxhash.xxh3_128_digest(data))


def test_agent_lands_putfiles_frames_before_what_follows_them(env: Env) -> None:
    """What comes after PutFiles frames (a delete of their directory, a setattr, a hard link to one of their files)
    finds them landed, and a file that could not land is in the batch's Ack (a guard for any reordering of the
    agent's work: landing them in worker threads was tried, and lost to the GIL)."""
    frames: list[ap.Message] = [ap.Mkdir(b"d", 0o755), ap.Mkdir(b"gone", 0o755)]
    frames += [ap.PutFiles(tuple(_pf(b"d/f%d" % i, b"%d" % i) for i in range(j, j + 100))) for j in range(0, 500, 100)]
    frames += [ap.PutFiles((_pf(b"gone/a", b"a"), _pf(b"nodir/x", b"x"))),
               ap.Delete(b"gone", recursive=True),
               ap.Hardlink(b"d/link", b"d/f499", 3, MT),
               ap.SetAttr(b"d", 0o750, MT)]
    ack = _agent_session(env, *frames)
    assert [(e.relpath, e.code) for e in ack.errors] == [(b"nodir/x", "ENOENT")]
    assert _files(env.root) == [b"d"]  # "gone" and what landed in it were deleted after the landing
    assert _files(env.root + b"/d") == sorted([b"link", *(b"f%d" % i for i in range(500))])
    st = os.stat(os.fsdecode(env.root + b"/d/link"))
    assert st.st_ino == os.stat(os.fsdecode(env.root + b"/d/f499")).st_ino
    d = os.stat(os.fsdecode(env.root + b"/d"))
    assert (d.st_mode & 0o7777, d.st_mtime_ns) == (0o750, MT)

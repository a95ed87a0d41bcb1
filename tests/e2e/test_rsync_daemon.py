"""Integration: the native rsync client pushing to the real Debian ``rsync --daemon`` on 127.0.0.1 (and to a
local ``rsync --server`` over a pipe, the ssh code path). After each push the module tree must equal the source.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from rsyncd import RsyncDaemon
from treecmp import tree_differences

from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError
from kwatch.replicate.rsync_transport import BURST, _Channel, _Pacer, push

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs the rsync binary")

MTIME_NS = 1_650_000_000_123_456_789


def snapshot(root: Path, nsec: bool = True) -> dict[bytes, tuple[object, ...]]:
    out: dict[bytes, tuple[object, ...]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, broot)
            st = os.lstat(p)
            mt = st.st_mtime_ns if nsec else st.st_mtime_ns // 10**9
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), mt)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), mt)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), mt, f.read())
    return out


def make_tree(src: Path) -> None:
    b = os.fsencode(src)
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "empty").write_bytes(b"")
    (src / "exec.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "exec.sh", 0o750)
    (src / "sub" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (src / "sub" / "deep" / "x").write_bytes(b"x" * 100000)
    os.symlink("../a.txt", src / "sub" / "link")
    os.symlink("no/such/target", src / "dangling")  # the daemon (use chroot = no) strips a leading "/"
    with open(os.path.join(b, b"caf\xe9 latin1 \xff"), "wb") as f:
        f.write(b"non-utf8\n")
    os.chmod(src / "sub", 0o711)
    touch_all(src)


def touch_all(src: Path, ns: int = MTIME_NS) -> None:
    b = os.fsencode(src)
    for dirpath, dirnames, filenames in os.walk(b, topdown=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(ns, ns), follow_symlinks=False)
    os.utime(b, ns=(ns, ns))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RsyncDaemon]:
    with RsyncDaemon(tmp_path_factory.mktemp("rsyncd")) as d:
        yield d


@pytest.fixture
def module(daemon: RsyncDaemon) -> Iterator[Path]:
    m = daemon.module_path("push")
    for p in m.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    yield m


def assert_same(src: Path, dst: Path, nsec: bool = True) -> None:
    a, b = snapshot(src, nsec), snapshot(dst, nsec)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k


@pytest.mark.parametrize("protocol", [30, 31])
def test_push_tree_modify_delete(tmp_path: Path, daemon: RsyncDaemon, module: Path, protocol: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    r = push(os.fsencode(src), daemon.url("push"), delete=True, protocol=protocol)
    assert r.protocol == protocol and r.checksum == "xxh128" and not r.errors
    assert_same(src, module, nsec=protocol >= 31)
    assert r.literal_bytes >= 3 * 1024 * 1024

    # Modify 10 bytes in the middle of the big file: a delta, not the whole file.
    big = src / "sub" / "big.bin"
    with open(big, "r+b") as f:
        f.seek(1_500_000)
        f.write(b"0123456789")
    (src / "a.txt").write_bytes(b"hello again\n")
    touch_all(src, MTIME_NS + 10**9)
    r2 = push(os.fsencode(src), daemon.url("push"), delete=True, protocol=protocol)
    assert_same(src, module, nsec=protocol >= 31)
    assert r2.files >= 2  # every file with a new mtime is checked; unchanged ones go as all-match deltas
    assert r2.literal_bytes < 64 * 1024, r2
    assert r2.matched_bytes > 3 * 1024 * 1024 - 64 * 1024
    assert r2.bytes_sent < 100 * 1024, r2

    # Deletions: a file, a symlink and a whole directory.
    (src / "empty").unlink()
    (src / "sub" / "link").unlink()
    shutil.rmtree(src / "sub" / "deep")
    touch_all(src)
    push(os.fsencode(src), daemon.url("push"), delete=True, protocol=protocol)
    assert_same(src, module, nsec=protocol >= 31)


def test_push_paths_batch_with_delete(tmp_path: Path, daemon: RsyncDaemon, module: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    push(os.fsencode(src), daemon.url("push"), delete=True)
    # A batch: one changed file, one new file in a new dir, one deleted file, one deleted dir.
    (src / "sub" / "deep" / "x").write_bytes(b"y" * 100000)
    (src / "newdir").mkdir()
    (src / "newdir" / "n").write_bytes(b"new")
    (src / "a.txt").unlink()
    shutil.rmtree(src / "sub" / "deep")
    (src / "sub" / "deep").mkdir()
    (src / "sub" / "deep" / "x").write_bytes(b"z")
    (src / "exec.sh").rename(src / "renamed.sh")
    touch_all(src)
    r = push(os.fsencode(src), daemon.url("push"),
             paths=[b"sub/deep/x", b"newdir/n", b"a.txt", b"exec.sh", b"renamed.sh"], delete=True)
    assert not r.errors, r
    assert_same(src, module)


def test_fuzzy_rename_reuses_data(tmp_path: Path, daemon: RsyncDaemon, module: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "d").mkdir()
    (src / "d" / "old.bin").write_bytes(os.urandom(1 << 20))
    touch_all(src)
    push(os.fsencode(src), daemon.url("push"), delete=True)
    (src / "d" / "old.bin").rename(src / "d" / "new.bin")
    r = push(os.fsencode(src), daemon.url("push"), delete=True, fuzzy=True)
    # --delete-after removes old.bin before the final touch_up_dirs (generator.c generate_files), so d's mtime
    # is right too.
    assert_same(src, module)
    assert r.matched_bytes == 1 << 20 and r.literal_bytes == 0, r


@pytest.mark.parametrize(("old", "new"), [("m.bin", "a.bin"), ("m.bin", "z.bin")],
                         ids=["new-sorts-first", "old-sorts-first"])
def test_fuzzy_rename_in_path_batch(tmp_path: Path, daemon: RsyncDaemon, module: Path, old: str, new: str) -> None:
    """A live batch with a rename inside a directory: the old name is the fuzzy basis of the new one, so it must
    still be there when the receiver process opens it (a --delete-missing-args entry would delete it in the
    generator first and the receiver would abort with "got a block match with no basis file")."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "d").mkdir()
    (src / "d" / old).write_bytes(os.urandom(1 << 20))
    (src / "d" / "keep").write_bytes(b"keep")
    push(os.fsencode(src), daemon.url("push"), delete=True, fuzzy=True)
    (src / "d" / old).rename(src / "d" / new)
    paths = [os.fsencode(f"d/{old}"), os.fsencode(f"d/{new}")]
    r = push(os.fsencode(src), daemon.url("push"), paths=paths, delete=True, fuzzy=True)
    assert not r.errors, r
    assert r.matched_bytes == 1 << 20 and r.literal_bytes == 0, r
    assert tree_differences(src, module, hardlinks=False) == []


@pytest.mark.parametrize("fuzzy", [False, True], ids=["plain", "fuzzy"])
def test_paths_batch_new_nested_dirs_files_symlinks(tmp_path: Path, daemon: RsyncDaemon, module: Path,
                                                    fuzzy: bool) -> None:
    """The live-batch case: directories, files and symlinks made just now, so the receiver creates its copies in
    the same second as the source mtimes; directories, files and symlinks must all end with the source's mtime."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "seed").write_bytes(b"seed")
    push(os.fsencode(src), daemon.url("push"), delete=True, fuzzy=fuzzy)
    (src / "d" / "e" / "g").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"x" * 5000)
    (src / "d" / "sp ace").write_bytes(b"")
    os.symlink("e/f", src / "d" / "link")
    os.symlink("../../d", src / "d" / "e" / "g" / "up")
    os.symlink("nowhere", src / "dangling")
    (src / "seed").rename(src / "d" / "e" / "seed2")
    paths = [b"d", b"d/e", b"d/e/f", b"d/e/g", b"d/e/g/up", b"d/sp ace", b"d/link", b"dangling", b"seed",
             b"d/e/seed2"]
    r = push(os.fsencode(src), daemon.url("push"), paths=paths, delete=True, fuzzy=fuzzy)
    assert not r.errors, r
    assert tree_differences(src, module, hardlinks=False) == []
    # A second batch touching only a file deep inside: its ancestors go along as non-content dirs.
    (src / "d" / "e" / "g" / "new").write_bytes(b"new")
    r = push(os.fsencode(src), daemon.url("push"), paths=[b"d/e/g/new"], delete=True, fuzzy=fuzzy)
    assert not r.errors, r
    assert tree_differences(src, module, hardlinks=False) == []


def test_whole_push_with_fresh_symlinks(tmp_path: Path, daemon: RsyncDaemon, module: Path) -> None:
    """A whole-tree push of symlinks (to files, to directories, dangling) in new directories, made just now: the
    mtime of each symlink itself (lutimes) and of each directory must be the source's."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(b"data")
    os.symlink("b/file", src / "a" / "to-file")
    os.symlink("b", src / "a" / "to-dir")
    os.symlink("../missing", src / "a" / "b" / "dangling")
    os.symlink("a/to-dir", src / "chain")
    r = push(os.fsencode(src), daemon.url("push"), delete=True)
    assert not r.errors, r
    assert tree_differences(src, module, hardlinks=False) == []


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "paths"])
def test_subsecond_mtime_differences(tmp_path: Path, daemon: RsyncDaemon, module: Path, whole: bool) -> None:
    """Mirror mtimes that differ from the source only in the nanoseconds (a directory, a symlink) and a same-size
    file rewritten within the same second are all brought in line: the receiver compares with -@-1."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"aaaa")
    os.symlink("f", src / "d" / "link")
    touch_all(src)
    push(os.fsencode(src), daemon.url("push"), delete=True)
    assert tree_differences(src, module, hardlinks=False) == []
    for rel in ("d", "d/link"):
        os.utime(module / rel, ns=(MTIME_NS + 1, MTIME_NS + 1), follow_symlinks=False)
    (src / "d" / "f").write_bytes(b"bbbb")
    os.utime(src / "d" / "f", ns=(MTIME_NS + 2, MTIME_NS + 2))
    r = push(os.fsencode(src), daemon.url("push"), paths=None if whole else [b"d/f", b"d/link"], delete=True)
    assert not r.errors, r
    assert tree_differences(src, module, hardlinks=False) == []


@pytest.mark.parametrize("fuzzy", [False, True], ids=["plain", "fuzzy"])
def test_paths_batch_below_removed_or_retyped_dir(tmp_path: Path, daemon: RsyncDaemon, module: Path,
                                                  fuzzy: bool) -> None:
    """Batch paths whose parent is gone (deleted at the topmost missing component) or is now a file (that file is
    sent in their place)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c").write_bytes(b"c")
    (src / "x").mkdir()
    (src / "x" / "y").write_bytes(b"y")
    (src / "keep").write_bytes(b"keep")
    push(os.fsencode(src), daemon.url("push"), delete=True, fuzzy=fuzzy)
    shutil.rmtree(src / "a")
    shutil.rmtree(src / "x")
    (src / "x").write_bytes(b"now a file")
    r = push(os.fsencode(src), daemon.url("push"), paths=[b"a/b/c", b"a/b", b"x/y"], delete=True, fuzzy=fuzzy)
    assert not r.errors, r
    assert tree_differences(src, module, hardlinks=False) == []


def test_md5_without_negotiation(tmp_path: Path, daemon: RsyncDaemon, module: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    r = push(os.fsencode(src), daemon.url("push"), delete=True, negotiate=False)
    assert r.checksum == "md5"
    assert_same(src, module)
    with open(src / "sub" / "big.bin", "r+b") as f:
        f.write(b"changed")
    touch_all(src, MTIME_NS + 10**9)
    r = push(os.fsencode(src), daemon.url("push"), delete=True, negotiate=False)
    assert r.literal_bytes < 64 * 1024
    assert_same(src, module)


def test_auth_success_and_failure(tmp_path: Path, daemon: RsyncDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"secret data")
    url = daemon.url("auth", user=daemon.user)
    r = push(os.fsencode(src), url, password=daemon.password)
    assert (daemon.module_path("auth") / "f").read_bytes() == b"secret data" and not r.errors
    monkeypatch.setenv("RSYNC_PASSWORD", daemon.password)
    push(os.fsencode(src), url)
    pwfile = tmp_path / "pw"
    pwfile.write_text(daemon.password + "\n")
    push(os.fsencode(src), url, password_file=str(pwfile))
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        push(os.fsencode(src), url, password="wrong")
    monkeypatch.delenv("RSYNC_PASSWORD")
    with pytest.raises(LocalProtocolError, match="needs a password"):
        push(os.fsencode(src), url)


def test_read_only_and_unknown_module(tmp_path: Path, daemon: RsyncDaemon) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    with pytest.raises(RemoteProtocolError, match="read only"):
        push(os.fsencode(src), daemon.url("ro"))
    with pytest.raises(RemoteProtocolError, match="unknown module"):
        push(os.fsencode(src), daemon.url("nosuchmodule"))


def _fake_server(script: bytes) -> tuple[int, threading.Thread]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(10)

    def serve() -> None:
        with ls:
            c, _ = ls.accept()
            with c:
                c.settimeout(5)
                c.sendall(script)
                with contextlib.suppress(OSError):
                    c.recv(4096)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return int(ls.getsockname()[1]), t


@pytest.mark.parametrize(
    ("name", "script", "match"),
    [
        ("protocol 29", b"@RSYNCD: 29\n", "protocol mismatch"),
        ("not rsync", b"SSH-2.0-OpenSSH_9.2\n", "not an rsync daemon greeting"),
        ("closes after greeting", b"@RSYNCD: 31.0 md5\n", "closed the connection early"),
        ("closes mid-setup", b"@RSYNCD: 31.0 md5\n@RSYNCD: OK\n\x81", "closed the connection early"),
    ],
)
def test_bad_daemons(tmp_path: Path, name: str, script: bytes, match: str) -> None:
    port, t = _fake_server(script)
    with pytest.raises(RemoteProtocolError, match=match):
        push(os.fsencode(tmp_path), f"rsync://127.0.0.1:{port}/m/", timeout=10)
    t.join(10)


def _shell_mode_round_trip(tmp_path: Path, url_host: str, rsh: list[str]) -> None:
    """Push a tree over the ssh transport (to a mirror holding a stale file), then an edit: a delta, not the file."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src)
    (dst / "stale").write_bytes(b"old")
    r = push(os.fsencode(src), f"ssh://{url_host}{dst}/", delete=True, rsh=rsh)
    assert not r.errors
    assert_same(src, dst)
    with open(src / "sub" / "big.bin", "r+b") as f:
        f.write(b"changed")
    touch_all(src, MTIME_NS + 10**9)
    r = push(os.fsencode(src), f"ssh://{url_host}{dst}/", delete=True, rsh=rsh)
    assert r.literal_bytes < 64 * 1024  # a delta, not the whole file
    assert_same(src, dst)


def test_shell_mode_local_server(tmp_path: Path) -> None:
    """The ssh path: `rsync --server` on the other end of a pipe (here run locally instead of via ssh)."""
    _shell_mode_round_trip(tmp_path, "localhost", [])


@pytest.mark.root
def test_shell_mode_through_real_sshd(tmp_path: Path) -> None:
    """The ssh path for real: `rsync --server` started by a real sshd on 127.0.0.1 (tests/support/sshd.py)."""
    import shlex

    from sshd import Sshd

    with Sshd(tmp_path / "sshd") as d:
        _shell_mode_round_trip(tmp_path, "127.0.0.1", [*shlex.split(d.ssh_command), f"{d.user}@127.0.0.1"])


# --- the bwlimit token bucket (a fake clock) ---------------------------------------------------------------------

PACER_CASES: list[tuple[str, list[tuple[float, int]], list[int]]] = [
    # (name, steps of (seconds passed, bytes written), the allowance before each write)
    ("starts with a bucketful", [(0.0, BURST)], [BURST]),
    ("empty after a bucketful, refills at the rate", [(0.0, BURST), (0.5, 500)], [BURST, 500]),
    ("an idle spell saves up no more than a bucketful", [(0.0, BURST), (3600.0, BURST)], [BURST, BURST]),
    ("partial writes", [(0.0, 1000), (0.0, 1000), (0.1, 0)], [BURST, BURST - 1000, BURST - 2000 + 100]),
]


@pytest.mark.parametrize(("steps", "allowances"), [c[1:] for c in PACER_CASES], ids=[c[0] for c in PACER_CASES])
def test_pacer(steps: list[tuple[float, int]], allowances: list[int]) -> None:
    now = [0.0]
    pacer = _Pacer(1000, clock=lambda: now[0])
    got = []
    for dt, n in steps:
        now[0] += dt
        got.append(pacer.allowance())
        pacer.spent(n)
    assert got == allowances
    assert pacer.delay(BURST) == pytest.approx((BURST - pacer.allowance()) / 1000, abs=1e-3)
    assert _Pacer(None).allowance() > 1 << 40 and _Pacer(None).delay(1 << 30) == 0.0


def test_weak_checksum_is_the_one_real_rsync_sends(tmp_path: Path, daemon: RsyncDaemon, module: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real rsync daemon, as the receiver of a push, sends the block checksums of its copy: the first one is
    get_checksum1 over signed chars. kwatch's one weak checksum, used by the rsync client and by its own delta
    engine (the signature a kwatch agent sends), must give the same value: the delta engine summed unsigned bytes
    (0xaa807f80 for bytes(range(256)) where rsync gives 0x6a80ff80)."""
    from kwatch.protocols.rsync import client
    from kwatch.protocols.rsync.weak import checksum1
    from kwatch.replicate.delta import signature

    basis = bytes(range(256))
    (module / "f").write_bytes(basis)
    os.utime(module / "f", ns=(MTIME_NS, MTIME_NS))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(basis + b"changed")
    seen: list[client.SumHead] = []
    real = client._read_sums

    def spy(r: client.Reader, checksum: str) -> client.SumHead:
        sums = real(r, checksum)
        seen.append(sums)
        return sums

    monkeypatch.setattr(client, "_read_sums", spy)
    push(os.fsencode(src), daemon.url("push"))
    assert (module / "f").read_bytes() == basis + b"changed"
    assert [(s.count, s.remainder) for s in seen] == [(1, 256)]
    rsync_value = seen[0].sum1[0]
    assert rsync_value == 0x6A80FF80
    assert checksum1(basis) == rsync_value
    assert int(signature(basis).weak[0]) == rsync_value


@pytest.mark.parametrize("negotiate", [True, False], ids=["varint", "no_negotiation"])
def test_list_sent_with_the_greeting(tmp_path: Path, daemon: RsyncDaemon, module: Path, negotiate: bool) -> None:
    """With the negotiation of an earlier session (``expect``), the checksum names and the file list go in the
    first write, with the greeting, module and arguments; the daemon takes them so, also for a delta."""
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    first = push(os.fsencode(src), daemon.url("push"), delete=True, negotiate=negotiate)
    assert first.protocol == 31
    with open(src / "sub" / "big.bin", "r+b") as f:
        f.write(b"changed")
    (src / "new").write_bytes(b"new file")
    touch_all(src, MTIME_NS + 10**9)
    writes: list[bytes] = []
    real_write = _Channel.write

    def write(self: _Channel, data: memoryview) -> int:
        writes.append(bytes(data))
        return real_write(self, data)

    with mock.patch.object(_Channel, "write", write):
        r = push(os.fsencode(src), daemon.url("push"), delete=True, negotiate=negotiate,
                 expect=(first.protocol, first.compat_flags))
    assert not r.errors
    assert (r.protocol, r.compat_flags) == (first.protocol, first.compat_flags)
    assert r.literal_bytes < 64 * 1024
    assert_same(src, module)
    assert b"big.bin" in writes[0], "the file list waited for the daemon's replies"


@pytest.mark.parametrize(
    ("name", "script", "expect", "match"),
    [
        ("older protocol", b"@RSYNCD: 30.0\n@RSYNCD: OK\n", (31, 0x81), "protocol changed"),
        ("other flags", b"@RSYNCD: 31.0 md5\n@RSYNCD: OK\n\x02", (31, 0x80), "compat flags changed"),
    ],
)
def test_a_daemon_that_changed_since_the_expected_negotiation(tmp_path: Path, name: str, script: bytes,
                                                              expect: tuple[int, int], match: str) -> None:
    port, t = _fake_server(script)
    with pytest.raises(RemoteProtocolError, match=match):
        push(os.fsencode(tmp_path), f"rsync://127.0.0.1:{port}/m/", timeout=10, expect=expect)
    t.join(10)

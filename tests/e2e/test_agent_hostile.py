"""A hostile sender against the real ``kwatch agent --root``: escaping paths, symlink escapes, oversize frames,
garbage bytes. Each is refused with a clear error and nothing outside the root changes.

Frames are built with the protocol's own ``encode_frame`` (valid ones) and then tampered with at the msgpack level,
so the agent sees exactly what a malicious peer could send. The table runs the agent as a subprocess (as ssh would
start it); the hypothesis properties drive :class:`AgentServer` in-process for speed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treecmp import snapshot

from kwatch.mirror.receiver import Receiver
from kwatch.mirror.server import AgentServer
from kwatch.protocols.agent import (
    CAPABILITIES,
    MAX_FRAME,
    TYPE_CODES,
    Ack,
    Commit,
    Copy,
    Delete,
    DeltaBegin,
    DeltaChunk,
    DeltaEnd,
    Error,
    Hardlink,
    Hello,
    Literal,
    ManifestEntries,
    ManifestRequest,
    Mkdir,
    PutBegin,
    PutChunk,
    PutEnd,
    PutFile,
    PutFiles,
    Rename,
    Role,
    SetAttr,
    Signature,
    SigRequest,
    Symlink,
    UnsafePathError,
    check_relpath,
    decode_frame_body,
    encode_frame,
)
from kwatch.protocols.errors import RemoteProtocolError

P = b"PLACEHOLDER-PATH"  # replaced in the encoded frame by the hostile path
HELLO = encode_frame(Hello(1, CAPABILITIES, Role.SENDER))
SECRET = b"root:x:0:0:canary secret\n"


def tamper(msg: Any, **subst: bytes) -> bytes:
    """``msg`` encoded, then every field equal to a placeholder replaced: ``tamper(Mkdir(P, 0o755), P=b"../x")``."""
    body = msgpack.unpackb(encode_frame(msg)[4:], raw=False)
    table = {P: subst.get("P"), b"PLACEHOLDER-2": subst.get("P2")}
    body = [table[v] if isinstance(v, bytes) and table.get(v) is not None else v for v in body]
    data = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


def put_frames(path: bytes, data: bytes = b"evil\n") -> bytes:
    return tamper(PutBegin(P, len(data), 0o644), P=path) + encode_frame(PutChunk(data)) + encode_frame(PutEnd(None))


def _raw(code: int, *fields: Any) -> bytes:
    data = msgpack.packb([code, *fields], use_bin_type=True)
    return struct.pack(">I", len(data)) + data


def put_files_frame(path: bytes, data: bytes = b"evil\n") -> bytes:
    """A PutFiles frame of a harmless file then ``path`` (unchecked: built by hand, as a hostile sender would)."""
    ok = b"dir/ok"
    files = [[ok, 0o644, None, 2, None], [path, 0o644, None, len(data), None]]
    return _raw(TYPE_CODES[PutFiles], files, b"ok" + data, None)


@dataclass
class World:
    """A mirror root with a symlink ``esc`` pointing at a canary directory outside it."""

    base: Path
    root: Path
    canary: Path

    @classmethod
    def make(cls, base: Path) -> World:
        root, canary = base / "root", base / "canary"
        root.mkdir()
        canary.mkdir()
        (canary / "secret").write_bytes(SECRET)
        os.chmod(canary / "secret", 0o600)
        (canary / "sub").mkdir()
        os.symlink(canary, root / "esc")  # planted: a symlink inside the root leading out of it
        os.symlink(canary / "secret", root / "esc-file")
        os.symlink("../canary", root / "esc-rel")
        (root / "plain").write_bytes(b"plain file\n")
        (root / "dir").mkdir()
        return cls(base, root, canary)

    def outside(self) -> dict[bytes, Any]:
        """Everything outside the root that a hostile peer could reach: the canary tree and the base listing."""
        return {b"canary": snapshot(self.canary), b"base": tuple(sorted(os.listdir(self.base)))}


def run_agent(root: Path, payload: bytes, timeout: float = 30) -> tuple[int, list[Any], str]:
    """Run ``kwatch agent --root`` with ``payload`` (our Hello first) on stdin; its replies decoded."""
    proc = subprocess.run([sys.executable, "-m", "kwatch", "agent", "--root", str(root)], input=payload,
                          capture_output=True, timeout=timeout)
    # frame by frame without a conversation state: the tests send out-of-order frames on purpose
    events: list[Any] = []
    out = proc.stdout
    while len(out) >= 4:
        (n,) = struct.unpack(">I", out[:4])
        events.append(decode_frame_body(out[4 : 4 + n]))
        out = out[4 + n :]
    return proc.returncode, events, proc.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# protocol-level refusals: the agent answers Error and exits 2 before touching anything


PROTOCOL_CASES: list[tuple[str, bytes, str]] = [
    ("put ../../etc/passwd", put_frames(b"../../etc/passwd"), "'..' component"),
    ("put absolute /etc/passwd", put_frames(b"/etc/passwd"), "absolute path"),
    ("mkdir ../outside", tamper(Mkdir(P, 0o755), P=b"../outside"), "'..' component"),
    ("mkdir dir/../../x", tamper(Mkdir(P, 0o755), P=b"dir/../../x"), "'..' component"),
    ("mkdir with NUL", tamper(Mkdir(P, 0o755), P=b"dir\0/../../x"), "NUL"),
    ("delete a//b", tamper(Delete(P, True), P=b"dir//b"), "empty component"),
    ("delete .", tamper(Delete(P, True), P=b"."), "'.' component"),
    ("delete ..", tamper(Delete(P, True), P=b".."), "'..' component"),
    ("rename into ..", tamper(Rename(b"plain", P), P=b"../stolen"), "'..' component"),
    ("rename from absolute", tamper(Rename(P, b"in"), P=os.fsencode("/etc/hostname")), "absolute path"),
    ("hardlink to /etc/passwd", tamper(Hardlink(b"h", P), P=b"/etc/passwd"), "absolute path"),
    ("hardlink to ../canary/secret", tamper(Hardlink(b"h", P), P=b"../canary/secret"), "'..' component"),
    ("symlink at ../x", tamper(Symlink(P, b"t"), P=b"../x"), "'..' component"),
    ("setattr ../canary", tamper(SetAttr(P, 0o777, None), P=b"../canary"), "'..' component"),
    ("sig request ../canary/secret", tamper(SigRequest(7, P), P=b"../canary/secret"), "'..' component"),
    ("manifest of ..", tamper(ManifestRequest(1, P), P=b".."), "'..' component"),
    ("path longer than PATH_MAX", tamper(Mkdir(P, 0o755), P=b"a/" * 2100 + b"a"), "PATH_MAX"),
    ("component longer than NAME_MAX", tamper(Mkdir(P, 0o755), P=b"n" * 256), "NAME_MAX"),
    ("oversize frame", struct.pack(">I", MAX_FRAME + 1) + b"\x93" * 64, "exceeds the limit"),
    ("4 GiB frame length", b"\xff\xff\xff\xff" + b"x" * 16, "exceeds the limit"),
    ("garbage bytes", struct.pack(">I", 16) + bytes(range(0xC1, 0xD1)), "not valid msgpack"),
    ("not an array", struct.pack(">I", 1) + b"\x07", "non-empty msgpack array"),
    ("unknown type", struct.pack(">I", 3) + msgpack.packb([99, 1]), "unknown message type"),
    ("receiver message from sender", encode_frame(Ack(1, ())), "must not send"),
    ("put larger than announced", tamper(PutBegin(P, 2, 0o644), P=b"f") + encode_frame(PutChunk(b"xyz")),
     "more data than"),
    ("delta against an unrequested signature", tamper(DeltaBegin(P, 99, 4, 0o644), P=b"plain"), "signature"),
    ("commit seq going backwards", encode_frame(Commit(5)) + encode_frame(Commit(5)), "does not increase"),
    ("put files ../../etc/passwd", put_files_frame(b"../../etc/passwd"), "'..' component"),
    ("put files absolute /etc/passwd", put_files_frame(b"/etc/passwd"), "absolute path"),
    ("put files sizes not matching the data", _raw(TYPE_CODES[PutFiles], [[b"f", 0o644, None, 1, None]], b"xy", None),
     "add up to 1"),
]


@pytest.mark.parametrize(("name", "frames", "message"), PROTOCOL_CASES, ids=[c[0] for c in PROTOCOL_CASES])
def test_protocol_refusals(name: str, frames: bytes, message: str, tmp_path: Path) -> None:
    w = World.make(tmp_path)
    before, root_before = w.outside(), snapshot(w.root)
    code, events, stderr = run_agent(w.root, HELLO + frames)
    errors = [e for e in events if isinstance(e, Error)]
    assert code == 2, (code, events, stderr)
    assert errors and errors[-1].code == "protocol", events
    assert message in errors[-1].message, errors[-1].message
    assert message in stderr, stderr  # the operator sees the reason too
    assert w.outside() == before
    after = snapshot(w.root)
    after.pop(b""), root_before.pop(b"")  # the root's mtime moves if a valid PutBegin made a temporary first
    assert after == root_before, "a refused frame must not change the mirror either"


def test_frame_before_hello_is_refused(tmp_path: Path) -> None:
    w = World.make(tmp_path)
    before = w.outside()
    code, events, _ = run_agent(w.root, put_frames(b"x"))
    assert code == 2
    assert any(isinstance(e, Error) and "before Hello" in e.message for e in events), events
    assert w.outside() == before


def test_truncated_stream_is_refused(tmp_path: Path) -> None:
    w = World.make(tmp_path)
    code, events, stderr = run_agent(w.root, HELLO + encode_frame(Mkdir(b"d", 0o755))[:-2])
    assert code == 2 and "inside a frame" in stderr, (code, events, stderr)


# ---------------------------------------------------------------------------------------------------------------
# per-path refusals: lexically fine paths that would go through a symlink out of the root


SYMLINK_CASES: list[tuple[str, bytes, bytes]] = [
    # (name, frames, path whose Ack error is expected or b"" when the op is allowed but must stay inside)
    ("put through a dir symlink", put_frames(b"esc/secret"), b"esc/secret"),
    ("put new file through a dir symlink", put_frames(b"esc/new"), b"esc/new"),
    ("put through a relative dir symlink", put_frames(b"esc-rel/secret"), b"esc-rel/secret"),
    ("mkdir through a symlink", tamper(Mkdir(P, 0o777), P=b"esc/made"), b"esc/made"),
    ("mkdir deep through a symlink", tamper(Mkdir(P, 0o777), P=b"esc/sub/made"), b"esc/sub/made"),
    ("symlink through a symlink", tamper(Symlink(P, b"/"), P=b"esc/link"), b"esc/link"),
    ("rename a mirror file out", tamper(Rename(b"plain", P), P=b"esc/plain"), b"plain"),
    ("rename the secret in", tamper(Rename(P, b"stolen"), P=b"esc/secret"), b"esc/secret"),
    ("delete through a symlink", tamper(Delete(P, True), P=b"esc/secret"), b"esc/secret"),
    ("delete a tree through a symlink", tamper(Delete(P, True), P=b"esc/sub"), b"esc/sub"),
    ("chmod through a symlink", tamper(SetAttr(P, 0o777, 0), P=b"esc/secret"), b"esc/secret"),
    ("hardlink to a file behind a symlink", tamper(Hardlink(b"h", P), P=b"esc/secret"), b"h"),
    ("hardlink placed behind a symlink", tamper(Hardlink(P, b"plain"), P=b"esc/h"), b"esc/h"),
    ("put files through a dir symlink", put_files_frame(b"esc/secret"), b"esc/secret"),
    ("put files new file through a dir symlink", put_files_frame(b"esc/new"), b"esc/new"),
    ("put files through a relative dir symlink", put_files_frame(b"esc-rel/secret"), b"esc-rel/secret"),
    # allowed, but applied to the link itself, never to what it points at
    ("chmod and utime of the symlink itself", tamper(SetAttr(P, 0o777, 0), P=b"esc"), b""),
    ("chmod of a file symlink itself", tamper(SetAttr(P, 0o666, 1), P=b"esc-file"), b""),
    ("put replacing a file symlink", put_frames(b"esc-file"), b""),
    ("put files replacing a file symlink", put_files_frame(b"esc-file"), b""),
    ("put files replacing a dir symlink", put_files_frame(b"esc"), b""),
    ("delete of the symlink itself", tamper(Delete(P, True), P=b"esc"), b""),
    ("hardlink of the symlink itself", tamper(Hardlink(b"h2", P), P=b"esc-file"), b""),
    ("rename of the symlink itself", tamper(Rename(P, b"dir/moved-link"), P=b"esc"), b""),
]


@pytest.mark.parametrize(("name", "frames", "failing"), SYMLINK_CASES, ids=[c[0] for c in SYMLINK_CASES])
def test_symlink_escapes_are_refused_per_path(name: str, frames: bytes, failing: bytes, tmp_path: Path) -> None:
    w = World.make(tmp_path)
    before = w.outside()
    code, events, stderr = run_agent(w.root, HELLO + frames + encode_frame(Commit(1)))
    assert code == 0, (code, events, stderr)
    acks = [e for e in events if isinstance(e, Ack)]
    assert len(acks) == 1, events
    errs = {e.relpath: e for e in acks[0].errors}
    if failing:
        assert failing in errs, acks[0]
        assert errs[failing].code in ("ELOOP", "EXDEV", "EPERM", "ENOTDIR"), errs[failing]
        assert "symlink" in errs[failing].message or "outside" in errs[failing].message, errs[failing]
    else:
        assert not errs, acks[0]
    assert w.outside() == before
    assert os.readlink(w.root / "esc-rel") == "../canary"  # untouched by the others
    assert not list(w.root.rglob("*.kwatch-tmp-*")), "no temporary left behind"


def test_signatures_and_manifests_do_not_read_through_symlinks(tmp_path: Path) -> None:
    w = World.make(tmp_path)
    frames = (encode_frame(SigRequest(1, b"esc/secret")) + encode_frame(SigRequest(2, b"esc-file"))
              + encode_frame(ManifestRequest(3, b"esc")) + encode_frame(ManifestRequest(4, None))
              + encode_frame(Commit(1)))
    code, events, stderr = run_agent(w.root, HELLO + frames)
    assert code == 0, (events, stderr)
    sigs = [e for e in events if isinstance(e, Signature)]
    assert {s.id for s in sigs} == {1, 2}
    assert all(s.file_size == 0 and not s.weak for s in sigs), "a signature of a file outside the root leaked"
    mans = {e.id: e for e in events if isinstance(e, ManifestEntries)}
    assert mans[3].entries == () and mans[3].done
    listed = {e.relpath for e in mans[4].entries}
    assert b"esc" in listed and not any(p.startswith(b"esc/") for p in listed)
    assert not any(b"secret" in p for p in listed)


def test_a_link_to_a_non_utf8_name_that_failed_is_refused_in_a_readable_ack(tmp_path: Path) -> None:
    """A put of a non-UTF-8 name that fails (its parent is missing), then a link to that name in the same batch:
    the link is refused (ESTALE) with the name shown as \\xNN. The agent built that message with os.fsdecode, whose
    surrogate could not be encoded, so the whole Ack failed and the agent died (found by the property test below)."""
    w = World.make(tmp_path)
    name = b"no-such-dir/x\xff"
    frames = put_frames(name) + encode_frame(Hardlink(b"dir/h", name)) + encode_frame(Commit(1))
    code, events, stderr = run_agent(w.root, HELLO + frames)
    assert code == 0, (events, stderr)
    acks = [e for e in events if isinstance(e, Ack)]
    assert len(acks) == 1, (events, stderr)
    errors = {e.relpath: e for e in acks[0].errors}
    assert errors[name].code == "ENOENT"
    assert errors[b"dir/h"].code == "ESTALE"
    assert "x\\xff" in errors[b"dir/h"].message, errors
    assert not (w.root / "dir" / "h").exists()


def test_delta_cannot_copy_blocks_from_outside(tmp_path: Path) -> None:
    """A delta against ``esc-file`` (a link to the secret) has no basis: its copy ops are refused, nothing leaks."""
    w = World.make(tmp_path)
    before = w.outside()
    frames = (encode_frame(SigRequest(1, b"esc-file", 512))
              + tamper(DeltaBegin(P, 1, 8, 0o644), P=b"esc-file"))
    # handcrafted chunk: copy block 0 (the secret's first bytes, had the basis been followed) + a literal
    body = msgpack.packb([11, [[0, 1], 4], b"tail", None], use_bin_type=True)
    frames += struct.pack(">I", len(body)) + body
    frames += encode_frame(DeltaEnd(None)) + encode_frame(Commit(1))
    code, events, stderr = run_agent(w.root, HELLO + frames)
    assert snapshot(w.canary) == before[b"canary"]
    data = (w.root / "esc-file").read_bytes() if not (w.root / "esc-file").is_symlink() else b""
    assert SECRET[:4] not in data, "bytes of a file outside the root were copied into the mirror"
    assert (w.canary / "secret").read_bytes() == SECRET
    if code == 0:
        acks = [e for e in events if isinstance(e, Ack)]
        assert acks and any(e.relpath == b"esc-file" for e in acks[0].errors), events
    else:
        assert any(isinstance(e, Error) for e in events), (events, stderr)


# ---------------------------------------------------------------------------------------------------------------
# property tests (in-process AgentServer): random paths with '..', '.', '/', NUL and symlink components


COMPONENTS = st.sampled_from([b"..", b".", b"", b"a", b"esc", b"esc-rel", b"esc-file", b"dir", b"x\xff", b"\0",
                              b"canary", b"secret", b"...", b"plain"])
PATHS = st.builds(lambda lead, parts: lead + b"/".join(parts), st.sampled_from([b"", b"/", b"//"]),
                  st.lists(COMPONENTS, min_size=1, max_size=6))
OPS = st.sampled_from(["put", "put-files", "mkdir", "symlink", "rename-to", "rename-from", "delete", "setattr", "hardlink-to",
                       "hardlink-at", "sig", "manifest"])


def hostile_frames(op: str, path: bytes, rid: int = 1) -> bytes:
    if op == "put":
        return put_frames(path) if path else b""
    if op == "put-files":
        return put_files_frame(path) if path else b""
    return {
        "mkdir": lambda: tamper(Mkdir(P, 0o777), P=path),
        "symlink": lambda: tamper(Symlink(P, b"/etc"), P=path),
        "rename-to": lambda: tamper(Rename(b"plain", P), P=path),
        "rename-from": lambda: tamper(Rename(P, b"dir/got"), P=path),
        "delete": lambda: tamper(Delete(P, True), P=path),
        "setattr": lambda: tamper(SetAttr(P, 0o777, 0), P=path),
        "hardlink-to": lambda: tamper(Hardlink(b"dir/h", P), P=path),
        "hardlink-at": lambda: tamper(Hardlink(P, b"plain"), P=path),
        "sig": lambda: tamper(SigRequest(rid, P), P=path),
        "manifest": lambda: tamper(ManifestRequest(rid, P), P=path),
    }[op]()


@pytest.fixture(scope="module")
def prop_base() -> Any:
    with tempfile.TemporaryDirectory(prefix="kwatch-hostile-") as d:
        yield Path(d)


_counter = [0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(OPS, PATHS), min_size=1, max_size=4))
def test_property_nothing_outside_the_root_changes(ops: list[tuple[str, bytes]], prop_base: Path) -> None:
    _counter[0] += 1
    base = prop_base / str(_counter[0])
    base.mkdir()
    w = World.make(base)
    before = w.outside()
    server = AgentServer(Receiver(os.fsencode(w.root)))
    server.start()
    server.feed(HELLO)
    try:
        for rid, (op, path) in enumerate(ops, 1):
            frames = hostile_frames(op, path, rid)
            if not frames:
                continue
            try:
                lexically_safe = check_relpath(path) is not None
            except UnsafePathError:
                lexically_safe = False
            try:
                server.feed(frames)
            except RemoteProtocolError as e:
                # only a lexically unsafe path (or an op the state forbids) may end the connection
                assert not lexically_safe or "into itself" in str(e) or "request id" in str(e), (op, path, e)
                assert str(e), "the refusal must say why"
                break
            assert lexically_safe, f"{op} {path!r} reached the receiver"
        else:
            reply = server.feed(encode_frame(Commit(1)))
            assert reply  # an Ack
        assert w.outside() == before, ops
        for dirpath, _dirs, files in os.walk(w.root):
            for f in files:
                assert not f.endswith(".kwatch-tmp-") and ".kwatch-tmp-" not in f, "temporary left behind"
            assert os.path.realpath(dirpath).startswith(os.path.realpath(w.root))
    finally:
        server.close()


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(min_size=1, max_size=300))
def test_property_byte_soup_is_refused_cleanly(junk: bytes, prop_base: Path) -> None:
    """Random bytes after a valid Hello: a RemoteProtocolError with a message, or bytes still awaited; never a crash."""
    _counter[0] += 1
    base = prop_base / f"soup{_counter[0]}"
    base.mkdir()
    w = World.make(base)
    before = w.outside()
    server = AgentServer(Receiver(os.fsencode(w.root)))
    server.start()
    try:
        try:
            server.feed(HELLO + junk)
            server.feed(b"")  # EOF
        except RemoteProtocolError as e:
            assert str(e)
        assert w.outside() == before
    finally:
        server.close()


def test_literal_helper_is_the_protocol_literal() -> None:
    assert Literal(b"x").data == b"x"  # the handcrafted delta chunk above relies on the op layout staying simple
    assert DeltaChunk((Literal(b"x"),)).ops[0] == Literal(b"x")


# ---------------------------------------------------------------------------------------------------------------
# delta copies against a basis that changes under the agent (in-process AgentServer, real Receiver)


def _delta_session(root: Path, basis_change: Any, length: int) -> tuple[list[Any], bytes]:
    """Ask for the signature of ``big`` (blocks of 4 KiB) and begin a delta, let ``basis_change`` act on the mirror's
    copy, then send ops copying all its ``length`` bytes (one run, several agent reads) plus a literal; returns the replies and
    the bytes the mirror then holds under ``big``."""
    server = AgentServer(Receiver(os.fsencode(root)))
    server.start()
    nblocks = -(-length // 4096)
    replies = decode_all(server.feed(HELLO + encode_frame(SigRequest(1, b"big", 4096))
                                     + encode_frame(DeltaBegin(b"big", 1, length + 4, 0o644))))
    basis_change()  # the agent has opened the basis and begun the put
    frames = (encode_frame(DeltaChunk((Copy(0, nblocks),))) + encode_frame(DeltaChunk((Literal(b"tail"),)))
              + encode_frame(DeltaEnd(None)) + encode_frame(Commit(1)))
    replies += decode_all(server.feed(frames))
    server.close()
    return replies, (root / "big").read_bytes()


def decode_all(out: bytes) -> list[Any]:
    events: list[Any] = []
    while len(out) >= 4:
        (n,) = struct.unpack(">I", out[:4])
        events.append(decode_frame_body(out[4 : 4 + n]))
        out = out[4 + n :]
    return events


def test_delta_copy_run_longer_than_one_read(tmp_path: Path) -> None:
    basis = os.urandom(3 * (1 << 20) + 1000)  # a run of 769 blocks, read in several pieces
    (tmp_path / "big").write_bytes(basis)
    replies, data = _delta_session(tmp_path, lambda: None, len(basis))
    assert data == basis + b"tail"
    assert [a.errors for a in replies if isinstance(a, Ack)] == [()]
    assert sorted(os.listdir(tmp_path)) == ["big"]


def test_delta_basis_shrinking_while_patched_keeps_the_old_file(tmp_path: Path) -> None:
    basis = os.urandom(3 * (1 << 20) + 1000)
    (tmp_path / "big").write_bytes(basis)
    replies, data = _delta_session(tmp_path, lambda: os.truncate(tmp_path / "big", 1 << 20), len(basis))
    assert data == basis[: 1 << 20], "the mirror's file was replaced by a partial one"
    (errors,) = [a.errors for a in replies if isinstance(a, Ack)]
    assert [e.relpath for e in errors] == [b"big"] and "shrank" in errors[0].message, errors
    assert sorted(os.listdir(tmp_path)) == ["big"], "a temporary was left behind"


# ---------------------------------------------------------------------------------------------------------------
# setuid/setgid: the mirror never holds such a file unless owner and group were set from the source (--owner),
# whatever the sender's frames ask for (in-process AgentServer, real Receiver; the tests run as root)

SETID = stat.S_ISUID | stat.S_ISGID


def _setid_frames(path: bytes, mode: int, owner: tuple[int, int] | None) -> bytes:
    """Frames putting ``path`` with ``mode`` by every way a sender has, then a SetAttr with ``owner``."""
    uid, gid = owner if owner is not None else (None, None)
    return {
        b"putfile": encode_frame(PutFile(path, mode, None, b"#!/bin/sh\n", None)),
        b"putbegin": encode_frame(PutBegin(path, 3, mode)) + encode_frame(PutChunk(b"abc")) + encode_frame(PutEnd(None)),
        b"putfiles": encode_frame(PutFiles((PutFile(path, mode, None, b"x", None),))),
    }[path.split(b"-")[0]] + encode_frame(SetAttr(path, mode, None, uid, gid))


SETID_CASES: list[tuple[str, bool, int, tuple[int, int] | None, int]] = [
    # (name, agent --owner, mode sent, owner sent in SetAttr, mode the mirror must hold)
    ("04755 without --owner", False, 0o4755, None, 0o755),
    ("06755 and owner root:root without --owner", False, 0o6755, (0, 0), 0o755),
    ("02750 without --owner", False, 0o2750, None, 0o750),
    ("04755 with --owner but no owner sent", True, 0o4755, None, 0o755),
    ("04755 with --owner and owner 1000:1000", True, 0o4755, (1000, 1000), 0o4755),
    ("06755 with --owner and owner 0:0", True, 0o6755, (0, 0), 0o6755),
    ("01777 sticky is kept", False, 0o1777, None, 0o1777),
]


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent's rule matters (and chown works) as root")
@pytest.mark.parametrize(("name", "owner_opt", "mode", "owner", "want"), SETID_CASES, ids=[c[0] for c in SETID_CASES])
def test_setid_bits_need_the_sources_owner_and_group(name: str, owner_opt: bool, mode: int,
                                                      owner: tuple[int, int] | None, want: int,
                                                      tmp_path: Path) -> None:
    server = AgentServer(Receiver(os.fsencode(tmp_path), preserve_owner=owner_opt))
    server.start()
    paths = [b"putfile-a", b"putbegin-a", b"putfiles-a"]
    frames = HELLO + b"".join(_setid_frames(p, mode, owner) for p in paths)
    # a file put without owner, then only a mode: its setuid bits must not come back later either
    frames += encode_frame(PutFile(b"putfile-late", 0o755, None, b"x", None))
    frames += encode_frame(SetAttr(b"putfile-late", mode, None, None, None))
    replies = decode_all(server.feed(frames + encode_frame(Commit(1))))
    server.close()
    assert [a.errors for a in replies if isinstance(a, Ack)] == [()], replies
    for p in paths:
        st = os.lstat(tmp_path / os.fsdecode(p))
        assert stat.S_IMODE(st.st_mode) == want, (p, oct(st.st_mode))
        if owner is not None and owner_opt:
            assert (st.st_uid, st.st_gid) == owner
    late = stat.S_IMODE(os.lstat(tmp_path / "putfile-late").st_mode)
    assert not late & SETID, oct(late)


def test_setid_bits_on_directories_and_chown_alone(tmp_path: Path) -> None:
    """A directory keeps setgid (it only picks the group of new entries); a chown alone clears a file's bits."""
    server = AgentServer(Receiver(os.fsencode(tmp_path), preserve_owner=True))
    server.start()
    frames = HELLO + encode_frame(Mkdir(b"d", 0o2775)) + encode_frame(SetAttr(b"d", 0o2775, None, None, None))
    frames += encode_frame(PutFile(b"f", 0o4755, None, b"x", None)) + encode_frame(SetAttr(b"f", 0o4755, None, 7, 7))
    frames += encode_frame(SetAttr(b"f", None, None, 0, 0))  # now root's: the kernel drops setuid on chown
    replies = decode_all(server.feed(frames + encode_frame(Commit(1))))
    server.close()
    assert [a.errors for a in replies if isinstance(a, Ack)] == [()], replies
    assert stat.S_IMODE(os.lstat(tmp_path / "d").st_mode) == 0o2775
    st = os.lstat(tmp_path / "f")
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0) and not st.st_mode & stat.S_ISUID, oct(st.st_mode)


# ---------------------------------------------------------------------------------------------------------------
# memory from a hostile peer: each attack against the real agent (and the real sender) under a 512 MiB address
# space limit ends in an Error frame or throttles; never MemoryError, never the kernel's OOM killer

AS_LIMIT = 512 << 20
F_GETPIPE_SZ = 1032


@dataclass
class Limited:
    code: int
    out: bytes
    err: str


def run_limited(argv: list[str], payload: bytes, timeout: float = 120) -> Limited:
    """Run ``argv`` under ``prlimit --as`` with ``payload`` on stdin (one pid: prlimit execs it)."""
    proc = subprocess.Popen(["prlimit", f"--as={AS_LIMIT}", "--", *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # prlimit execs: one pid
    assert proc.stdin and proc.stdout and proc.stderr
    out: list[bytes] = []
    err: list[bytes] = []

    def write() -> None:
        assert proc.stdin
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(payload)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()

    threads = [threading.Thread(target=write), threading.Thread(target=lambda: out.append(proc.stdout.read())),
               threading.Thread(target=lambda: err.append(proc.stderr.read()))]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    for t in threads:
        t.join()
    return Limited(proc.returncode, b"".join(out), b"".join(err).decode(errors="replace"))


def empty_arrays_frame(size: int = 8 << 20) -> bytes:
    """One frame of ``size`` bytes that is nothing but empty msgpack arrays (1 byte each on the wire)."""
    per = (size - 1) // 8 - 5
    inner = b"\xdd" + struct.pack(">I", per) + b"\x90" * per  # array32 of ``per`` empty arrays
    body = b"\x98" + inner * 8
    return struct.pack(">I", len(body)) + body


# ``python -m kwatch`` with one addition: at exit, its own peak RSS (VmHWM, per address space: not the forking
# parent's, which wait4's ru_maxrss would include) goes to stderr.
_PEAK = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    with open('/proc/self/status') as f:\n"
         "        sys.stderr.write(next(x for x in f if x.startswith('VmHWM:')))\n"
         "atexit.register(peak)\n"
         "sys.argv[0] = 'kwatch'\n"
         "runpy.run_module('kwatch', run_name='__main__', alter_sys=True)\n")


def agent_argv(root: Path) -> list[str]:
    return [sys.executable, "-c", _PEAK, "agent", "--root", str(root)]


def peak_rss(stderr: str) -> int:
    """The VmHWM line _PEAK wrote, in bytes."""
    lines = [x for x in stderr.splitlines() if x.startswith("VmHWM:")]
    assert lines, f"no peak RSS reported: {stderr[-2000:]}"
    return int(lines[-1].split()[1]) << 10


def _sig_request_block_1(root: Path) -> bytes:
    (root / "big").write_bytes(os.urandom(4 << 20))
    return _raw(TYPE_CODES[SigRequest], 1, b"big", 1)


AGENT_ATTACKS: list[tuple[str, Any, str]] = [
    ("8 MiB frame of empty arrays", lambda root: empty_arrays_frame(), "msgpack objects"),
    ("signature of a 4 MiB file in blocks of 1", _sig_request_block_1, "block size 1 outside"),
    ("signature in blocks of 16 MiB", lambda root: _raw(TYPE_CODES[SigRequest], 1, b"big", 1 << 24),
     "block size 16777216 outside"),
]


@pytest.mark.parametrize(("name", "make", "message"), AGENT_ATTACKS, ids=[c[0] for c in AGENT_ATTACKS])
def test_agent_memory_attacks_get_an_error_frame(name: str, make: Any, message: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    r = run_limited(agent_argv(root), HELLO + make(root))
    assert "MemoryError" not in r.err and r.code != -9, (r.code, r.err[-2000:])
    events = decode_all(r.out)
    errors = [e for e in events if isinstance(e, Error)]
    assert r.code == 2 and errors and message in errors[-1].message, (r.code, events[-3:], r.err[-2000:])
    peak = peak_rss(r.err)
    assert peak < 160 << 20, f"peak RSS {peak >> 20} MiB"
    print(f"{name}: agent peak RSS {peak >> 20} MiB")


def _pipe_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def test_agent_stops_reading_while_its_replies_are_not_read(tmp_path: Path) -> None:
    """Many ManifestRequests of the root in a small input (each about 9 bytes, each answered with the whole tree):
    the agent answers while its output is read and stops reading its input while it is not, with flat memory."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(300):
        (root / f"file-with-a-longish-name-{i:05d}").write_bytes(b"x")
    n = 600_000
    payload = HELLO + b"".join(encode_frame(ManifestRequest(i, None, False)) for i in range(1, n + 1))
    proc = subprocess.Popen(["prlimit", f"--as={AS_LIMIT}", "--", *agent_argv(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin and proc.stdout and proc.stderr
    written = threading.Event()

    def write() -> None:
        assert proc.stdin
        with contextlib.suppress(BrokenPipeError, ValueError):
            proc.stdin.write(payload)
            proc.stdin.flush()
            written.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        out_fd = proc.stdout.fileno()
        full = fcntl.fcntl(out_fd, F_GETPIPE_SZ)
        deadline = time.monotonic() + 120
        # the condition: the agent has filled its output pipe (it now blocks in write), or it died
        while _pipe_bytes(out_fd) < full and proc.poll() is None:
            assert time.monotonic() < deadline, "the agent neither filled its output nor exited"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
        status = (Path("/proc") / str(proc.pid) / "status").read_text()
        hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) << 10
        assert hwm < 200 << 20, f"agent peak RSS {hwm >> 20} MiB while its output was not read"
        assert not written.is_set(), "the agent took all its input although it could not write its replies"
        print(f"many ManifestRequests: agent peak RSS {hwm >> 20} MiB with its output blocked")
        # it still answers, in order, once read
        data = os.read(out_fd, full)
        got = []
        while len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:  # the complete frames
            (size,) = struct.unpack(">I", data[:4])
            got.append(decode_frame_body(data[4 : 4 + size]))
            data = data[4 + size :]
        manifests = [e for e in got if isinstance(e, ManifestEntries)]
        assert manifests and manifests[0].id == 1 and len(manifests[0].entries) == 300, got[:2]
    finally:
        proc.kill()
        proc.wait()
        writer.join(10)


# The sender against a hostile agent: a fake agent (its Hello, then the attack) on the other end of the real
# AgentLink, the real Replicator taking a signature from it, all under the same limit.
_HOSTILE_AGENT = """
import os, sys, threading
from kwatch.protocols.agent import CAPABILITIES, Hello, Role, Signature, encode_frame
out = sys.stdout.buffer
out.write(encode_frame(Hello(1, CAPABILITIES, Role.RECEIVER)))
out.flush()
buf = b""
def frames(b):
    n = 0
    while len(b) >= 4 and len(b) >= 4 + int.from_bytes(b[:4], "big"):
        b, n = b[4 + int.from_bytes(b[:4], "big"):], n + 1
    return n
while frames(buf) < 2:  # the sender's Hello and its SigRequest
    buf += os.read(0, 1 << 16)
threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(0, 1 << 20), b"")], daemon=True).start()
if sys.argv[1] == "manifest":  # a manifest that never ends: frames of 2,000 entries, never done
    from kwatch.protocols.agent import Entry, EntryType, ManifestEntries
    n = 0
    while True:
        ents = tuple(Entry(EntryType.FILE, b"x%012d" % (n + i) + b"y" * 100, 0, 0, 0o644, 0, 0)
                     for i in range(2000))
        out.write(encode_frame(ManifestEntries(1, ents, False)))
        n += 2000
elif sys.argv[1] == "arrays":
    per = (8 << 20) // 8 - 5
    body = b"\\x98" + (b"\\xdd" + per.to_bytes(4, "big") + b"\\x90" * per) * 8
    out.write(len(body).to_bytes(4, "big") + body)
else:  # a signature of 2^40 bytes in blocks of 1, streamed for as long as the sender reads it
    piece = encode_frame(Signature(1, 1, 1 << 40, 0, b"w" * 4 * 8192, b"s" * 16 * 8192, False))
    while True:
        out.write(piece)
out.flush()
"""

_SENDER = """
import sys
from kwatch.protocols import agent as ap
from kwatch.replicate.agent_transport import AgentTransport
from kwatch.replicate.engine import Replicator, Target
from kwatch.replicate.link import AgentLink, LinkError
src, mirror, agent, attack = sys.argv[2:]  # argv[1] is this code
rep = Replicator(src.encode(), Target.parse(mirror))
t = rep.transport
assert isinstance(t, AgentTransport)
t.link = AgentLink([sys.executable, "-c", agent, attack], timeout=60)
t._ids = 1
try:
    if attack == "manifest":
        # the floor lowered so the refusal shows within this test's memory limit (it is 2^20 entries otherwise)
        import kwatch.replicate.agent_transport as at
        at.MANIFEST_MIN_CAP = 100_000
        t._ids = 0  # the fake agent answers request id 1
        t._reconcile_inputs(b"")  # what a rescan of the root fetches: the source's scan and the mirror's manifest
    else:
        t.link.send(ap.SigRequest(1, b"f"))
        t.sender._take_signature(1)
except LinkError as e:
    print("refused:", e)
t.link.kill()
"""


@pytest.mark.parametrize(("attack", "message"), [("arrays", "msgpack objects"), ("signature", "blocks"),
                                                 ("manifest", "manifest of the root passed")])
def test_sender_memory_against_a_hostile_agent(attack: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "m").mkdir()
    argv = [sys.executable, "-c", _PEAK.replace("runpy.run_module('kwatch', run_name='__main__', alter_sys=True)",
                                                 "exec(compile(sys.argv[1], 'sender', 'exec'))"),
            _SENDER, str(tmp_path / "src"), str(tmp_path / "m"), _HOSTILE_AGENT, attack]
    r = run_limited(argv, b"", timeout=300)
    assert "MemoryError" not in r.err and r.code == 0, (r.code, r.err[-2000:])
    assert b"refused:" in r.out and message.encode() in r.out, r.out[-2000:]
    peak = peak_rss(r.err)
    assert peak < 200 << 20, f"sender peak RSS {peak >> 20} MiB"
    print(f"sender vs agent sending {attack}: peak RSS {peak >> 20} MiB")

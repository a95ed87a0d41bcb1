"""Tests of the sans-IO kwatch agent protocol: round trips, byte-by-byte feeding, hostile frames, property tests."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwatch.protocols.agent import (
    MAX_FILES_PER_FRAME,
    MAX_FRAME,
    NEED_DATA,
    SIG_BLOCK_MAX,
    SIG_BLOCK_MIN,
    TYPE_CODES,
    Ack,
    AgentConnection,
    Commit,
    ConnectionClosed,
    Copy,
    Delete,
    DeltaBegin,
    DeltaChunk,
    DeltaEnd,
    Entry,
    EntryType,
    Error,
    Hardlink,
    Hello,
    Literal,
    ManifestEntries,
    ManifestRequest,
    Message,
    Mkdir,
    PathError,
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
    State,
    Symlink,
    UnsafePathError,
    check_relpath,
    decode_frame_body,
    encode_frame,
)
from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError
from kwatch.replicate import delta as deltamod

DIGEST = bytes(range(16))


def drain(conn: AgentConnection) -> list[Any]:
    out: list[Any] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def pair(caps: frozenset[str] | None = None) -> tuple[AgentConnection, AgentConnection]:
    s = AgentConnection(Role.SENDER) if caps is None else AgentConnection(Role.SENDER, caps)
    r = AgentConnection(Role.RECEIVER)
    r.receive_data(s.send(s.hello()))
    s.receive_data(r.send(r.hello()))
    assert isinstance(drain(r)[0], Hello) and isinstance(drain(s)[0], Hello)
    assert s.ready and r.ready
    return s, r


# A full conversation: (who sends, message). Sequenced so every correlation rule is satisfied.
CONVERSATION: list[tuple[str, Message]] = [
    ("s", ManifestRequest(1, None, True)),
    ("r", ManifestEntries(1, (Entry(EntryType.DIR, b"d", 0, 5, 0o755, 0, 0),), False)),
    (
        "r",
        ManifestEntries(
            1,
            (
                Entry(EntryType.FILE, b"d/f\xff", 10, -3, 0o644, 1000, 1000, None, DIGEST),
                Entry(EntryType.SYMLINK, b"d/l", 3, 7, 0o777, 0, 0, b"/abs/../x"),
            ),
            True,
        ),
    ),
    ("s", Mkdir(b"new dir", 0o700)),
    ("s", PutBegin(b"new dir/file", 6000, 0o644)),
    ("s", PutChunk(b"a" * 5000)),
    ("s", PutChunk(bytes(range(256)) * 3 + b"x" * 232)),
    ("s", PutEnd(DIGEST)),
    ("s", PutFile(b"small \n\xff", 0o640, 1_700_000_000_123_456_789, b"q" * 3000, DIGEST)),
    ("s", PutFile(b"empty", 0o600, None, b"", None)),
    ("s", PutFiles((PutFile(b"d/a\xff", 0o644, 5, b"a" * 3000, DIGEST), PutFile(b"d/empty", 0o600, None, b""),
                    PutFile(b"b", 0o755, -7, bytes(range(256)) * 4, None)))),
    ("s", PutFiles(())),
    ("s", SigRequest(7, b"d/f\xff", None)),
    ("r", Signature(7, 4, 10, 99, b"\1\2\3\4" * 2, b"s" * 32, False)),
    ("r", Signature(7, 4, 10, 99, b"\5\6\7\x08", b"t" * 16, True)),
    ("s", DeltaBegin(b"d/f\xff", 7, 12, 0o600)),
    ("s", DeltaChunk((Copy(0, 2), Literal(b"hello"), Copy(2, 1)))),
    ("s", DeltaChunk((Literal(b"z" * 4000),))),
    ("s", DeltaEnd(None)),
    ("s", Rename(b"a", b"b/c")),
    ("s", Delete(b"old", True)),
    ("s", Symlink(b"link", b"../../outside/is/fine/as/content")),
    ("s", Hardlink(b"h2", b"h1")),
    ("s", SetAttr(b"x", 0o4755, 1_700_000_000_123_456_789, 0, 4294967295)),
    ("s", SetAttr(b"y")),
    ("s", Commit(1)),
    ("s", Commit(5)),
    ("r", Ack(1, ())),
    ("r", Ack(5, (PathError(b"x", "EPERM", "operation not permitted"),))),
    ("s", Error("bye", "sender shutting down", b"some/path")),
]


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "plain"])
def test_conversation_round_trips(compress: bool) -> None:
    caps = None if compress else frozenset({"delta"})
    s, r = pair(caps)
    assert ("zstd" in s.capabilities) is compress
    for who, msg in CONVERSATION:
        src, dst = (s, r) if who == "s" else (r, s)
        dst.receive_data(src.send(msg))
        assert drain(dst) == [msg]
    assert s.our_state is State.CLOSED and r.their_state is State.CLOSED


def test_zstd_actually_compresses() -> None:
    s, _ = pair()
    frame = s.send(PutBegin(b"f", 1 << 20, 0o644)) and s.send(PutChunk(b"\0" * (1 << 20)))
    assert len(frame) < 1000


def fresh_receiver() -> AgentConnection:
    r = AgentConnection(Role.RECEIVER)
    s = AgentConnection(Role.SENDER)
    hello = s.send(s.hello())
    r.send(r.hello())
    r.receive_data(hello)
    assert isinstance(drain(r)[0], Hello)
    return r


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
def test_whole_and_byte_by_byte_give_same_events(bytewise: bool) -> None:
    """Replay the conversation into a receiver, feeding the sender's frames whole or one byte at a time."""
    s, _ = pair()
    r = fresh_receiver()
    expected: list[Message] = []
    events: list[Any] = []
    for who, msg in CONVERSATION[:-1]:
        if who == "r":
            s.receive_data(r.send(msg))  # the receiver's own replies, so ids and sequence numbers line up
            drain(s)
            continue
        data = s.send(msg)
        expected.append(msg)
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for c in chunks:
            r.receive_data(c)
            events.extend(drain(r))
    assert events == expected
    r.receive_data(b"")
    assert drain(r) == [ConnectionClosed()]


# --- hostile frames -----------------------------------------------------------------------------------------------


def frame(*items: Any) -> bytes:
    body: bytes = msgpack.packb(list(items), use_bin_type=True)
    return struct.pack(">I", len(body)) + body


MK = TYPE_CODES[Mkdir]
HOSTILE: list[tuple[str, bytes, str]] = [
    ("dotdot escape", frame(MK, b"../../etc/passwd", 0o755), "'..' component"),
    ("absolute", frame(MK, b"/etc/passwd", 0o755), "absolute path"),
    ("dotdot in middle", frame(MK, b"a/../../b", 0o755), "'..' component"),
    ("dot component", frame(MK, b"a/./b", 0o755), "'.' component"),
    ("dot only", frame(MK, b".", 0o755), "'.' component"),
    ("empty path", frame(MK, b"", 0o755), "empty path"),
    ("double slash", frame(MK, b"a//b", 0o755), "empty component"),
    ("trailing slash", frame(MK, b"a/", 0o755), "empty component"),
    ("NUL in path", frame(MK, b"a\0b", 0o755), "NUL"),
    ("path as str", frame(MK, "a", 0o755), "must be bytes"),
    ("long component", frame(MK, b"a" * 256, 0o755), "NAME_MAX"),
    ("oversize length", struct.pack(">I", MAX_FRAME + 1) + b"x", "exceeds the limit"),
    ("garbage bytes", struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1", "not valid msgpack"),
    ("trailing bytes in frame", struct.pack(">I", 3) + b"\x91\x04\x00", "not valid msgpack"),
    ("not an array", struct.pack(">I", 1) + b"\x05", "msgpack array"),
    ("empty array", struct.pack(">I", 1) + b"\x90", "msgpack array"),
    ("map body", struct.pack(">I", 3) + b"\x81\x01\x02", "not valid msgpack"),
    ("unknown type", frame(999, b"a"), "unknown message type"),
    ("type as string", frame("Mkdir", b"a", 1), "unknown message type"),
    ("wrong field count", frame(MK, b"a"), "needs 2 fields"),
    ("mode as string", frame(MK, b"a", "0755"), "must be an integer"),
    ("mode as bool", frame(MK, b"a", True), "must be an integer"),
    ("mode out of range", frame(MK, b"a", 0o10000), "outside"),
    ("negative size", frame(TYPE_CODES[PutBegin], b"a", -1, 0o644), "outside"),
    ("rename into itself", frame(TYPE_CODES[Rename], b"a", b"a/b"), "into itself"),
    ("symlink target with NUL", frame(TYPE_CODES[Symlink], b"l", b"x\0y"), "NUL"),
    ("hardlink target escapes", frame(TYPE_CODES[Hardlink], b"l", b"../x"), "'..' component"),
    ("digest wrong length", frame(TYPE_CODES[PutEnd], b"123"), "16 bytes"),
    ("ext type", struct.pack(">I", 5) + b"\x92\x12\xd4\x01\x00", "not valid msgpack"),
    ("invalid utf-8 text", struct.pack(">I", 6) + b"\x94\x14\xa1\xff\xa1m\xc0", "not valid msgpack"),
    ("receiver-only message", frame(TYPE_CODES[Ack], 1, []), "must not send Ack"),
    ("manifest entries from sender", frame(TYPE_CODES[ManifestEntries], 1, [], True), "must not send"),
    ("chunk outside put", frame(TYPE_CODES[PutChunk], b"x", None), "not allowed in state ready"),
    ("put end outside put", frame(TYPE_CODES[PutEnd], None), "not allowed in state ready"),
    ("delta without signature", frame(TYPE_CODES[DeltaBegin], b"f", 3, 10, 0o644), "not complete"),
    ("second hello", frame(TYPE_CODES[Hello], 1, [], "sender"), "not allowed in state ready"),
    (
        "zstd garbage",
        frame(TYPE_CODES[PutChunk], b"\x28\xb5\x2f\xfd" + b"\0" * 20, 10),
        "decompress",
    ),
    (
        "zstd bomb",
        frame(TYPE_CODES[PutChunk], zstandard.ZstdCompressor().compress(bytes(10 << 20)), 10),
        "more",
    ),
    ("deep nesting", struct.pack(">I", 2000) + b"\x91" * 2000, "not valid msgpack"),
    ("files sizes short of the data", frame(TYPE_CODES[PutFiles], [[b"a", 0o644, None, 2, None]], b"abc", None),
     "add up to 2"),
    ("files size beyond the data", frame(TYPE_CODES[PutFiles], [[b"a", 0o644, None, 4, None]], b"abc", None),
     "outside"),
    ("files path escapes", frame(TYPE_CODES[PutFiles], [[b"ok", 0o644, None, 1, None],
                                                        [b"../x", 0o644, None, 1, None]], b"ab", None),
     "'..' component"),
    ("files entry too short", frame(TYPE_CODES[PutFiles], [[b"a", 0o644, None, 1]], b"a", None), "5 fields"),
    ("files too many", frame(TYPE_CODES[PutFiles], [[b"a", 0o644, None, 0, None]] * (MAX_FILES_PER_FRAME + 1),
                             b"", None), "at most"),
    ("files digest wrong length", frame(TYPE_CODES[PutFiles], [[b"a", 0o644, None, 1, b"x"]], b"a", None),
     "16 bytes"),
]


@pytest.mark.parametrize(("data", "reason"), [(d, r) for _, d, r in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_hostile_frames_are_remote_errors(data: bytes, reason: str) -> None:
    r = fresh_receiver()
    r.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(r)
    assert reason in str(info.value)
    with pytest.raises(RemoteProtocolError):  # and the connection stays failed
        r.next_event()


def test_message_before_hello() -> None:
    r = AgentConnection(Role.RECEIVER)
    r.receive_data(frame(MK, b"a", 0o755))
    with pytest.raises(RemoteProtocolError, match="before Hello"):
        r.next_event()


def test_hello_with_wrong_role_or_old_version() -> None:
    r = AgentConnection(Role.RECEIVER)
    r.receive_data(frame(TYPE_CODES[Hello], 1, [], "receiver"))
    with pytest.raises(RemoteProtocolError, match="says it is a receiver"):
        r.next_event()
    r = AgentConnection(Role.RECEIVER)
    r.send(r.hello())
    r.receive_data(frame(TYPE_CODES[Hello], 0, [], "sender"))
    with pytest.raises(RemoteProtocolError, match="version 0"):
        r.next_event()


def test_oversize_prefix_rejected_before_body() -> None:
    r = fresh_receiver()
    r.receive_data(struct.pack(">I", 0xFFFFFFFF))  # no body at all: must not wait for 4 GiB
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        r.next_event()


def test_eof_inside_frame_or_transfer() -> None:
    r = fresh_receiver()
    r.receive_data(frame(MK, b"a", 0o755)[:5])
    r.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        drain(r)
    s, r = pair()
    r.receive_data(s.send(PutBegin(b"f", 10, 0o644)))
    r.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a transfer"):
        drain(r)


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ([PutBegin(b"f", 3, 0o644), PutChunk(b"four")], "more data"),
        ([PutBegin(b"f", 3, 0o644), PutChunk(b"ab"), PutEnd()], "short"),
        ([Commit(2), Commit(2)], "does not increase"),
        ([SigRequest(1, b"f"), SigRequest(1, b"g")], "used already"),
        ([ManifestRequest(1), ManifestRequest(1)], "already open"),
    ],
)
def test_conversation_rules_local_and_remote(steps: list[Message], reason: str) -> None:
    """The same rule rejects a bad sequence when we would send it (Local) and when the peer sends it (Remote)."""
    s, _ = pair()
    with pytest.raises(LocalProtocolError, match=reason):
        for m in steps:
            s.send(m)
    _, r = pair()
    r.receive_data(
        b"".join(encode_frame(m) for m in steps)
    )  # frames built directly, past the sender's checks
    with pytest.raises(RemoteProtocolError, match=reason):
        drain(r)


# --- inode identities in manifests ("inodes") and checked hard links ("linkcheck") ---------------------------------

def _linked(path: bytes, link: int = 1, nlink: int = 2, size: int = 10) -> Entry:
    return Entry(EntryType.FILE, path, size, 5, 0o644, 0, 0, None, None, nlink, link)


CAPS_ALL = frozenset({"delta", "zstd", "hardlink", "putfiles", "xxh3", "inodes", "linkcheck"})
IDENTITY_CASES: list[tuple[str, frozenset[str], list[Message], str | None]] = [
    ("names of one inode, over two frames", CAPS_ALL,
     [ManifestEntries(1, (_linked(b"a"), Entry(EntryType.DIR, b"d", 0, 5, 0o755, 0, 0)), False),
      ManifestEntries(1, (_linked(b"d/b"), _linked(b"c", link=2, nlink=3)), True)], None),
    ("the same link id in another manifest is another inode", CAPS_ALL,
     [ManifestEntries(1, (_linked(b"a"), _linked(b"b")), True),
      ManifestEntries(2, (_linked(b"a", size=99), _linked(b"b", size=99)), True)], None),
    ("identity without inodes negotiated", CAPS_ALL - {"inodes"},
     [ManifestEntries(1, (_linked(b"a"),), True)], "inodes was not negotiated"),
    ("names of one link id disagree on the size", CAPS_ALL,
     [ManifestEntries(1, (_linked(b"a"), _linked(b"b", size=11)), True)], "differ from another name"),
    ("names of one link id disagree on nlink, across frames", CAPS_ALL,
     [ManifestEntries(1, (_linked(b"a"),), False), ManifestEntries(1, (_linked(b"b", nlink=3),), True)],
     "differ from another name"),
    ("more names than nlink", CAPS_ALL,
     [ManifestEntries(1, (_linked(b"a"), _linked(b"b"), _linked(b"c")), True)], "more names of link id 1"),
    ("checked hard link", CAPS_ALL, [Hardlink(b"b", b"a", 10, -5)], None),
    ("checked hard link without linkcheck negotiated", CAPS_ALL - {"linkcheck"},
     [Hardlink(b"b", b"a", 10, 5)], "linkcheck was not negotiated"),
]


@pytest.mark.parametrize(("caps", "msgs", "reason"), [c[1:] for c in IDENTITY_CASES],
                         ids=[c[0] for c in IDENTITY_CASES])
def test_inode_identity_and_linkcheck(caps: frozenset[str], msgs: list[Message], reason: str | None) -> None:
    """Each rule holds on both ends: refused when we would send it (Local), and when the peer does (Remote)."""
    for local in (True, False):
        s, r = pair(caps)
        for i in {m.id for m in msgs if isinstance(m, ManifestEntries)}:
            r.receive_data(s.send(ManifestRequest(i)))
            drain(r)
        with contextlib.ExitStack() as stack:
            if reason is not None:
                stack.enter_context(pytest.raises(LocalProtocolError if local else RemoteProtocolError,
                                                  match=reason))
            for m in msgs:
                by, to = (r, s) if isinstance(m, ManifestEntries) else (s, r)
                to.receive_data(by.send(m) if local else encode_frame(m))
                assert drain(to) == [m]


IDENTITY_FRAMES: list[tuple[str, list[Any], str]] = [
    ("identity on a directory", [2, b"d", 0, 5, 0o755, 0, 0, None, None, 2, 1], "only a regular file"),
    ("nlink 1 with a link id", [1, b"f", 0, 5, 0o644, 0, 0, None, None, 1, 1], "outside"),
    ("link id 0", [1, b"f", 0, 5, 0o644, 0, 0, None, None, 2, 0], "outside"),
    ("link id missing", [1, b"f", 0, 5, 0o644, 0, 0, None, None, 2, None], "must be an integer"),
    ("ten fields", [1, b"f", 0, 5, 0o644, 0, 0, None, None, 2], "needs 9 fields"),
]


@pytest.mark.parametrize(("entry", "reason"), [c[1:] for c in IDENTITY_FRAMES], ids=[c[0] for c in IDENTITY_FRAMES])
def test_malformed_identity_entries(entry: list[Any], reason: str) -> None:
    s, r = pair()
    r.receive_data(s.send(ManifestRequest(1)))
    drain(r)
    s.receive_data(frame(TYPE_CODES[ManifestEntries], 1, [entry], True))
    with pytest.raises(RemoteProtocolError, match=reason):
        drain(s)


@pytest.mark.parametrize("fields", [[b"b", b"a", 10], [b"b", b"a", 10, None], [b"b", b"a", -1, 5]],
                         ids=["three fields", "mtime missing", "negative size"])
def test_malformed_checked_hardlink(fields: list[Any]) -> None:
    r = fresh_receiver()
    r.receive_data(frame(TYPE_CODES[Hardlink], *fields))
    with pytest.raises(RemoteProtocolError):
        drain(r)


def test_ack_and_signature_correlation_on_sender() -> None:
    s, _ = pair()
    s.receive_data(encode_frame(Ack(3, ())))
    with pytest.raises(RemoteProtocolError, match="ack of seq 3"):
        drain(s)
    s, _ = pair()
    s.receive_data(encode_frame(Signature(9, 4, 4, 0, b"1234", b"x" * 16, True)))
    with pytest.raises(RemoteProtocolError, match="not requested"):
        drain(s)
    s, _ = pair()
    s.send(SigRequest(1, b"f"))
    s.receive_data(encode_frame(Signature(1, 4, 100, 0, b"1234", b"x" * 16, True)))
    with pytest.raises(RemoteProtocolError, match="expected 25"):
        drain(s)
    s, _r = pair()
    s.send(SigRequest(1, b"f"))
    s.receive_data(encode_frame(Signature(1, 4, 8, 0, b"12345678", b"x" * 32, True)))
    drain(s)
    s.send(DeltaBegin(b"f", 1, 8, 0o644))
    with pytest.raises(LocalProtocolError, match="basis of 2"):
        s.send(DeltaChunk((Copy(1, 2),)))


def test_local_misuse() -> None:
    s = AgentConnection(Role.SENDER)
    with pytest.raises(LocalProtocolError, match="before both Hellos"):
        s.send(Mkdir(b"a", 0o755))
    with pytest.raises(LocalProtocolError, match="does not send Ack"):
        s.send(Ack(1))
    s, _ = pair()
    with pytest.raises(LocalProtocolError, match=r"'\.\.' component"):
        s.send(Mkdir(b"../x", 0o755))
    with pytest.raises(LocalProtocolError, match=r"not allowed|cannot send"):
        s.send(PutChunk(b"x"))
    s.send(Error("x", "y"))
    with pytest.raises(LocalProtocolError, match="closed"):
        s.send(Mkdir(b"a", 0o755))


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (b"a", True),
        (b"a/b/c", True),
        (b"..a/b..", True),
        (b"\xff\xfe name with spaces\nand newline", True),
        (b"...", True),
        (b"", False),
        (b"/", False),
        (b".", False),
        (b"..", False),
        (b"a/..", False),
        (b"./a", False),
        (b"a\0", False),
        (b"a" * 4096, False),
        ("a", False),
    ],
)
def test_check_relpath(path: Any, ok: bool) -> None:
    if ok:
        assert check_relpath(path) == path
    else:
        with pytest.raises(UnsafePathError):
            check_relpath(path)


def test_delta_engine_over_the_protocol() -> None:
    """The intended use end to end: signature -> Signature pieces -> delta ops in DeltaChunks -> patch."""
    import io
    import os

    basis = os.urandom(300_000)
    new = basis[:1000] + b"INSERT" + basis[1000:200_000] + os.urandom(5000) + basis[205_000:]
    s, r = pair()
    r.receive_data(s.send(SigRequest(1, b"big")))
    (req,) = drain(r)
    sig = deltamod.signature(basis, seed=42)
    weak, strong = sig.weak_bytes(), sig.strong
    half = sig.count // 2
    s.receive_data(
        r.send(
            Signature(
                req.id, sig.block_size, sig.file_size, sig.seed, weak[: 4 * half], strong[: 16 * half], False
            )
        )
        + r.send(
            Signature(
                req.id, sig.block_size, sig.file_size, sig.seed, weak[4 * half :], strong[16 * half :], True
            )
        )
    )
    pieces = drain(s)
    their_sig = deltamod.Signature.from_wire(
        pieces[0].block_size,
        pieces[0].file_size,
        b"".join(p.weak for p in pieces),
        b"".join(p.strong for p in pieces),
        pieces[0].seed,
    )
    stream = deltamod.delta(their_sig, new)
    wire = s.send(DeltaBegin(b"big", 1, len(new), 0o644))
    batch: list[Copy | Literal] = []
    for op in stream:
        batch.append(op)
        if len(batch) == 3:
            wire += s.send(DeltaChunk(tuple(batch)))
            batch = []
    if batch:
        wire += s.send(DeltaChunk(tuple(batch)))
    wire += s.send(DeltaEnd(stream.stats.digest))
    r.receive_data(wire)
    events = drain(r)
    assert isinstance(events[0], DeltaBegin) and isinstance(events[-1], DeltaEnd)
    ops = [op for ev in events[1:-1] for op in ev.ops]
    out = io.BytesIO()
    result = deltamod.patch(io.BytesIO(basis), ops, out, sig.block_size, seed=sig.seed)
    assert out.getvalue() == new and result.digest == events[-1].digest


# --- property tests ------------------------------------------------------------------------------------------------

seg = st.binary(min_size=1, max_size=12).filter(
    lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b
)
relpaths = st.lists(seg, min_size=1, max_size=4).map(b"/".join)
u32 = st.integers(0, 2**32 - 1)
u63 = st.integers(0, 2**63 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
modes = st.integers(0, 0o7777)
digests = st.none() | st.binary(min_size=16, max_size=16)
text = st.text(max_size=40)
entries = st.builds(
    lambda t, p, size, mt, mode, uid, gid, tgt, h, ident: Entry(
        t, p, size, mt, mode, uid, gid, (tgt if t is EntryType.SYMLINK else None), h,
        *(ident if t is EntryType.FILE and ident is not None else (1, None)),
    ),
    st.sampled_from(EntryType),
    relpaths,
    u63,
    i64,
    modes,
    u32,
    u32,
    st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b),
    digests,
    st.none() | st.tuples(st.integers(2, 2**32 - 1), st.integers(1, 2**64 - 1)),
)
ops = st.lists(
    st.one_of(
        st.builds(Copy, u63, st.integers(1, 2**62)), st.builds(Literal, st.binary(min_size=1, max_size=100))
    ),
    max_size=8,
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, u32, st.frozensets(text, max_size=5), st.sampled_from(Role)),
    st.builds(ManifestRequest, u63, st.none() | relpaths, st.booleans()),
    st.builds(ManifestEntries, u63, st.lists(entries, max_size=4).map(tuple), st.booleans()),
    st.builds(Mkdir, relpaths, modes),
    st.builds(PutBegin, relpaths, u63, modes),
    st.builds(PutChunk, st.binary(max_size=3000)),
    st.builds(PutEnd, digests),
    st.builds(PutFile, relpaths, modes, st.none() | i64, st.binary(max_size=3000), digests),
    st.builds(lambda fs: PutFiles(tuple(fs)),
              st.lists(st.builds(PutFile, relpaths, modes, st.none() | i64, st.binary(max_size=300), digests),
                       max_size=4)),
    st.builds(SigRequest, u63, relpaths, st.none() | st.integers(SIG_BLOCK_MIN, SIG_BLOCK_MAX)),
    st.builds(
        lambda i, bs, fs, seed, n, done: Signature(i, bs, fs, seed, b"w" * 4 * n, b"s" * 16 * n, done),
        u63,
        st.integers(1, 1 << 24),
        u63,
        st.integers(0, 2**64 - 1),
        st.integers(0, 5),
        st.booleans(),
    ),
    st.builds(DeltaBegin, relpaths, u63, u63, modes),
    st.builds(lambda o: DeltaChunk(tuple(o)), ops),
    st.builds(DeltaEnd, digests),
    st.builds(Rename, relpaths.map(lambda p: b"src/" + p), relpaths.map(lambda p: b"dst/" + p)),
    st.builds(Delete, relpaths, st.booleans()),
    st.builds(Symlink, relpaths, st.binary(min_size=1, max_size=50).filter(lambda b: b"\0" not in b)),
    st.builds(Hardlink, relpaths, relpaths),
    st.builds(Hardlink, relpaths, relpaths, u63, i64),
    st.builds(SetAttr, relpaths, st.none() | modes, st.none() | i64, st.none() | u32, st.none() | u32),
    st.builds(Commit, u63),
    st.builds(Ack, u63, st.lists(st.builds(PathError, relpaths, text, text), max_size=3).map(tuple)),
    st.builds(Error, text, text, st.none() | relpaths),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_property_codec_round_trip(msg: Message) -> None:
    data = encode_frame(msg)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert decode_frame_body(data[4:]) == msg


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_property_byte_soup_only_remote_errors(soup: bytes) -> None:
    for conn in (fresh_receiver(), AgentConnection(Role.SENDER)):
        conn.receive_data(soup)
        with contextlib.suppress(RemoteProtocolError):
            drain(conn)
        with contextlib.suppress(RemoteProtocolError):
            decode_frame_body(soup)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_property_mutated_frames_only_remote_errors(msg: Message, where: int, junk: bytes) -> None:
    data = bytearray(encode_frame(msg))
    at = 4 + where % max(1, len(data) - 4)
    data[at : at + len(junk)] = junk
    r = fresh_receiver()
    r.receive_data(bytes(data))
    with contextlib.suppress(RemoteProtocolError):
        drain(r)


def test_chunk_data_is_compressed_when_negotiated() -> None:
    s, r = pair(None)
    data = b"int main(void) { return 0; }\n" * 400
    r.receive_data(s.send(PutBegin(b"f.c", len(data), 0o644)))
    assert drain(r) == [PutBegin(b"f.c", len(data), 0o644)]
    wire = s.send(PutChunk(data))
    assert len(wire) < len(data) // 4
    r.receive_data(wire)
    assert drain(r) == [PutChunk(data)]


@pytest.mark.parametrize("sizes", [[], [0], [1, 254], [255], [256], [65535], [65536], [3, 100_000], [10] * 1000,
                                   [70_000] * 10], ids=str)
def test_put_files_frame_is_what_msgpack_makes_of_it(sizes: list[int]) -> None:
    """PutFiles frames are assembled without msgpack copying the data; the bytes must be packb's, exactly (the bin
    header's three sizes included)."""
    files = tuple(PutFile(b"d/f%d" % i, 0o644, 1_600_000_000_123_456_789 + i, bytes([i % 256]) * n,
                          bytes(16) if i % 2 else None) for i, n in enumerate(sizes))
    msg = PutFiles(files)
    body = msgpack.packb([TYPE_CODES[PutFiles], [[f.relpath, f.mode, f.mtime_ns, len(f.data), f.digest]
                                                 for f in files], b"".join(f.data for f in files), None],
                         use_bin_type=True)
    assert encode_frame(msg) == len(body).to_bytes(4, "big") + body
    assert decode_frame_body(body) == msg


@pytest.mark.parametrize("path", [b"a", b"a/b.c", b".hidden/x", b"a/..b/c.", b"...", b"a/.../b", b"x" * 255,
                                  b"./a", b"a/.", b"a/../b", b"..", b".", b"a//b", b"/a", b"a/", b"a\0b", b"",
                                  b"d/" + b"x" * 256, b"y/" * 200 + b"z"])
def test_check_relpath_fast_path_agrees_with_the_component_check(path: bytes) -> None:
    """The whole-path scans accept only what the component-by-component check accepts."""
    from kwatch.protocols.agent import plain_relpath

    parts = path.split(b"/")
    full_ok = (0 < len(path) < 4096 and b"\0" not in path and not path.startswith(b"/")
               and all(p not in (b"", b".", b"..") and len(p) <= 255 for p in parts))
    if plain_relpath(path):
        assert full_ok
    if full_ok:
        assert check_relpath(path) == path
    else:
        with pytest.raises(UnsafePathError):
            check_relpath(path)

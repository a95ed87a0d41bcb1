"""kwatch.protocols.rsync.client.PushSession answering the generator's file requests, as a sans-IO object: a server
stream made here from the wire primitives (shell mode: version, compat flags, checksum names, seed, then
multiplexed requests), fed whole and byte by byte, and the bytes the session writes for each file checked against
the same primitives (index, iflags, sum head, literal tokens of at most CHUNK_SIZE, end token, file checksum).

A new file's request (one-byte index delta, plain transfer flags, all-zero sum head) takes a path of its own in
the session, and a small file's answer is written in one piece; every other request shape goes through the
general parser. Both must agree with the primitives, and a request the session must refuse is refused whichever
shape it has.
"""

from __future__ import annotations

import os
import stat

import pytest

from kwatch.protocols.errors import RemoteProtocolError
from kwatch.protocols.rsync import codec
from kwatch.protocols.rsync.checksum import file_checksum
from kwatch.protocols.rsync.client import (
    CF_VARINT_FLIST_FLAGS,
    ITEM_BASIS_TYPE_FOLLOWS,
    ITEM_TRANSFER,
    NEED_DATA,
    FileRequested,
    Mode,
    PushOptions,
    PushSession,
)
from kwatch.protocols.rsync.codec import Msg
from kwatch.protocols.rsync.flist import FileEntry, sort_key

PROTOCOL = 31
ITEM_IS_NEW = 1 << 13  # rsync.h ITEM_IS_NEW: what the generator sets for a file the receiver does not have
REG, DIR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755
# In list order: ".", then files before the directory "d" and its content.
ENTRIES = [FileEntry(b".", DIR, top_dir=True), FileEntry(b"a", REG, 5), FileEntry(b"big", REG, 70_000),
           FileEntry(b"empty", REG, 0), FileEntry(b"d", DIR), FileEntry(b"d/x", REG, 3)]
CONTENT = {b"a": b"hello", b"big": os.urandom(70_000), b"empty": b"", b"d/x": b"xyz"}
NDX = {e.name: i for i, e in enumerate(sorted(ENTRIES, key=sort_key))}
NEW = ITEM_TRANSFER | ITEM_IS_NEW
NO_SUMS = codec.enc_int(0) * 4


def server_start() -> bytes:
    """What ``rsync --server`` writes before its first request: version, compat flags, checksum names, seed."""
    return (codec.enc_int(PROTOCOL) + codec.enc_varint(CF_VARINT_FLIST_FLAGS) + codec.enc_vstring(b"xxh128")
            + codec.enc_int(1234))


def request(ndx_out: codec.NdxCodec, ndx: int, iflags: int = NEW, extra: bytes = b"", sums: bytes = NO_SUMS) -> bytes:
    return ndx_out.encode(ndx) + codec.enc_shortint(iflags) + extra + sums


def answer(ndx_out: codec.NdxCodec, ndx: int, data: bytes, iflags: int = NEW, extra: bytes = b"",
           sums: bytes = NO_SUMS) -> bytes:
    """The payload the session must send for a file the receiver has no blocks of."""
    tokens = b"".join(codec.enc_int(len(data[s : s + codec.CHUNK_SIZE])) + data[s : s + codec.CHUNK_SIZE]
                      for s in range(0, len(data), codec.CHUNK_SIZE))
    return (ndx_out.encode(ndx) + codec.enc_shortint(iflags) + extra + sums + tokens + codec.enc_int(0)
            + file_checksum("xxh128", data))


def run(stream: bytes, *, bytewise: bool) -> tuple[list[FileRequested], bytes]:
    """Feed ``stream`` to a fresh session, answer each request with the file's content; the requests and the
    MSG_DATA payload the session wrote after its file list."""
    s = PushSession(ENTRIES, PushOptions(), Mode.SHELL)
    got: list[FileRequested] = []
    out = bytearray(s.data_to_send())
    pieces = [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]
    for piece in pieces:
        s.receive_data(piece)
        while True:
            ev = s.next_event()
            if isinstance(ev, FileRequested):
                got.append(ev)
                s.send_file(ev.ndx, CONTENT[ev.entry.name])
            elif ev is NEED_DATA:
                break
        out += s.data_to_send()
    # what a session writes before any request (its version, checksum names and file list), then the answers
    before = PushSession(ENTRIES, PushOptions(), Mode.SHELL)
    before.receive_data(server_start())
    while before.next_event() is not NEED_DATA:
        pass
    head = bytes(before.data_to_send())
    assert out.startswith(head)
    frames = codec.Demux().feed(bytes(out[len(head) :]))
    assert all(code == Msg.DATA for code, _ in frames)
    return got, b"".join(p for _, p in frames)


def frames_of(payload: bytes) -> bytes:
    return codec.enc_frame(Msg.DATA, payload)


# (name, requests as (entry name, iflags, extra bytes after iflags, sum head)): each answered with the file's content
CASES = [
    ("new files in list order", [(b"a", NEW, b"", NO_SUMS), (b"big", NEW, b"", NO_SUMS),
                                 (b"empty", NEW, b"", NO_SUMS), (b"d/x", NEW, b"", NO_SUMS)]),
    ("a file skipped over (delta of two)", [(b"big", NEW, b"", NO_SUMS), (b"d/x", NEW, b"", NO_SUMS)]),
    ("a basis type follows the flags", [(b"a", NEW | ITEM_BASIS_TYPE_FOLLOWS, b"\x00", NO_SUMS)]),
    ("a sum head with a block length but no blocks", [(b"d/x", NEW, b"", codec.enc_int(0) + codec.enc_int(700)
                                                       + codec.enc_int(2) + codec.enc_int(3))]),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("name", "reqs"), CASES, ids=[c[0] for c in CASES])
def test_requests_are_answered_with_the_files_tokens_and_checksum(
        name: str, reqs: list[tuple[bytes, int, bytes, bytes]], bytewise: bool) -> None:
    enc_req, enc_ans = codec.NdxCodec(PROTOCOL), codec.NdxCodec(PROTOCOL)
    stream = server_start()
    want = b""
    for fname, iflags, extra, sums in reqs:
        stream += frames_of(request(enc_req, NDX[fname], iflags, extra, sums))
        want += answer(enc_ans, NDX[fname], CONTENT[fname], iflags, extra, sums)
    got, payload = run(stream, bytewise=bytewise)
    assert [ev.entry.name for ev in got] == [r[0] for r in reqs]
    assert payload == want


REFUSED = [
    ("an index past the list", lambda enc: enc.encode(len(ENTRIES) + 3), "invalid file index"),
    ("a directory", lambda enc: enc.encode(NDX[b"d"]), "non-file"),
]


@pytest.mark.parametrize(("name", "ndx", "match"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_request_for_what_cannot_be_sent_is_refused(name: str, ndx: object, match: str) -> None:
    enc = codec.NdxCodec(PROTOCOL)
    stream = server_start() + frames_of(ndx(enc) + codec.enc_shortint(NEW) + NO_SUMS)  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError, match=match):
        run(stream, bytewise=False)

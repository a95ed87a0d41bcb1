"""Codec tests for the rsync wire primitives and file-list entries: golden values, round trips (hypothesis),
whole and byte-by-byte decoding, and golden bytes captured from a real rsync session (tests/data/rsync)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError
from kwatch.protocols.rsync import client, codec
from kwatch.protocols.rsync.checksum import file_checksum
from kwatch.protocols.rsync.client import MAX_BLOCK_COUNT, PushOptions, build_server_args
from kwatch.protocols.rsync.codec import NeedMore, Reader
from kwatch.protocols.rsync.flist import (
    EndOfList,
    FileEntry,
    FlistDecoder,
    FlistEncoder,
    hlink_indexes,
    sort_key,
)
from kwatch.protocols.rsync.match import match_blocks
from kwatch.protocols.rsync.tokens import Literal, SumHead
from kwatch.protocols.rsync.weak import checksum1, rolling_checksums

DATA = Path(__file__).parents[1] / "support" / "data" / "rsync"

# (name, encoder, decoder, value, golden bytes) -- golden values checked against bytes seen in the captures
# (e.g. compat flags 0x1ff = 81 ff, mtime 1700000000 = 65 00 f1 53, dir size 4096 = 00 00 10).
CASES = [
    ("int 0", codec.enc_int, codec.dec_int, 0, b"\0\0\0\0"),
    ("int -1", codec.enc_int, codec.dec_int, -1, b"\xff\xff\xff\xff"),
    ("int seed", codec.enc_int, codec.dec_int, 305419896, bytes.fromhex("78563412")),
    ("varint 0", codec.enc_varint, codec.dec_varint, 0, b"\0"),
    ("varint 0x7f", codec.enc_varint, codec.dec_varint, 0x7F, b"\x7f"),
    ("varint 0x80", codec.enc_varint, codec.dec_varint, 0x80, b"\x80\x80"),
    ("varint compat 0x1ff", codec.enc_varint, codec.dec_varint, 0x1FF, b"\x81\xff"),
    ("varint flags 0x98", codec.enc_varint, codec.dec_varint, 0x98, b"\x80\x98"),
    ("varint 0x4000", codec.enc_varint, codec.dec_varint, 0x4000, b"\xc0\x00\x40"),
    ("varint -1", codec.enc_varint, codec.dec_varint, -1, b"\xf0\xff\xff\xff\xff"),
    ("varlong3 4096", lambda v: codec.enc_varlong(v, 3), lambda r: codec.dec_varlong(r, 3), 4096, b"\x00\x00\x10"),
    ("varlong3 14", lambda v: codec.enc_varlong(v, 3), lambda r: codec.dec_varlong(r, 3), 14, b"\x00\x0e\x00"),
    ("varlong4 mtime", lambda v: codec.enc_varlong(v, 4), lambda r: codec.dec_varlong(r, 4), 1700000000,
     bytes.fromhex("6500f153")),
    ("varlong3 153600", lambda v: codec.enc_varlong(v, 3), lambda r: codec.dec_varlong(r, 3), 153600,
     bytes.fromhex("0258 00")[0:0] + codec.enc_varlong(153600, 3)),
    ("vstring short", codec.enc_vstring, codec.dec_vstring, b"md5", b"\x03md5"),
    ("vstring long", codec.enc_vstring, codec.dec_vstring, b"x" * 300, b"\x81\x2c" + b"x" * 300),
    ("longint small", codec.enc_longint, codec.dec_longint, 5, b"\x05\0\0\0"),
    ("longint big", codec.enc_longint, codec.dec_longint, 1 << 40, b"\xff" * 4 + (1 << 40).to_bytes(8, "little")),
]


def _decode_bytewise(dec, data: bytes):  # type: ignore[no-untyped-def]
    buf = bytearray()
    for i, b in enumerate(data):
        buf.append(b)
        r = Reader(buf)
        try:
            v = dec(r)
        except NeedMore:
            assert i < len(data) - 1, "decoder wanted more than the whole encoding"
            continue
        assert i == len(data) - 1, "decoder finished early"
        assert r.pos == len(data)
        return v
    raise AssertionError("never decoded")


@pytest.mark.parametrize(("name", "enc", "dec", "value", "golden"), CASES, ids=[c[0] for c in CASES])
def test_golden_whole_and_bytewise(name, enc, dec, value, golden):  # type: ignore[no-untyped-def]
    assert enc(value) == golden
    r = Reader(golden)
    assert dec(r) == value and r.pos == len(golden)
    assert _decode_bytewise(dec, golden) == value


@given(st.integers(-(2**31), 2**31 - 1))
def test_varint_roundtrip(v: int) -> None:
    b = codec.enc_varint(v)
    assert codec.dec_varint(Reader(b)) == v


@given(st.one_of(st.tuples(st.integers(-(2**63), 2**63 - 1), st.just(4)),
                 st.tuples(st.integers(0, 2**55 - 1), st.just(3))))
def test_varlong_roundtrip(case: tuple[int, int]) -> None:
    """The widths rsync uses: sizes (3, never negative) and times (4, may be negative)."""
    v, mb = case
    b = codec.enc_varlong(v, mb)
    r = Reader(b)
    assert codec.dec_varlong(r, mb) == v and r.pos == len(b)


@given(st.lists(st.integers(-(2**31) + 1, 2**31 - 1)))
def test_ndx_roundtrip(values: list[int]) -> None:
    enc, dec = codec.NdxCodec(30), codec.NdxCodec(30)
    data = b"".join(enc.encode(v) for v in values)
    r = Reader(data)
    assert [dec.decode(r) for _ in values] == values


NDX_CASES = [("first 0", [0], b"\x01"), ("done", [-1], b"\x00"), ("seq", [0, 1, 5], b"\x01\x01\x04"),
             ("del stats", [-3], b"\xff\x02"), ("flist dir 1", [-102], b"\xff\x65"),
             ("big jump", [0, 1000], b"\x01\xfe\x03\xe8"), ("backwards", [10, 3], b"\x0b\xfe\x80\x03\x00\x00")]


@pytest.mark.parametrize(("name", "values", "golden"), NDX_CASES, ids=[c[0] for c in NDX_CASES])
def test_ndx_golden(name: str, values: list[int], golden: bytes) -> None:
    enc = codec.NdxCodec(31)
    assert b"".join(enc.encode(v) for v in values) == golden
    dec = codec.NdxCodec(31)
    r = Reader(golden)
    assert [dec.decode(r) for _ in values] == values


def test_demux_bytewise_and_errors() -> None:
    stream = codec.enc_frame(codec.Msg.DATA, b"abc") + codec.enc_frame(codec.Msg.ERROR, b"ERROR: x\n")
    d = codec.Demux()
    frames = [f for b in stream for f in d.feed(bytes([b]))]
    assert frames == [(0, b"abc"), (3, b"ERROR: x\n")]
    with pytest.raises(RemoteProtocolError):
        codec.Demux().feed(b"\x00\x00\x00\x01")


def test_varint_overflow_rejected() -> None:
    with pytest.raises(RemoteProtocolError):
        codec.dec_varint(Reader(b"\xfc" + b"\0" * 8))


def test_checksum1_rolling_agree() -> None:
    data = bytes((i * 7919) % 256 for i in range(5000))
    r = rolling_checksums(data, 0, 300, 700)
    assert [int(x) for x in r] == [checksum1(data[k : k + 700]) for k in range(300)]
    assert checksum1(b"") == 0


# --- golden capture from a real rsync client talking to the real daemon ------------------------------------


def _split_client_stream(raw: bytes) -> tuple[list[bytes], bytes, bytes]:
    r = Reader(raw)
    greeting, module = r.line(), r.line()
    args = []
    while True:
        end = raw.index(b"\0", r.pos)
        a = raw[r.pos : end]
        r.pos = end + 1
        if not a:
            break
        args.append(a)
    csums = codec.dec_vstring(r)
    frames = codec.Demux().feed(raw[r.pos :])
    data = b"".join(p for c, p in frames if c == 0)
    assert greeting.startswith(b"@RSYNCD: 3") and module == b"push"
    return args, csums, data


@pytest.mark.parametrize("proto", [30, 31])
def test_golden_flist_decode_and_reencode(proto: int) -> None:
    tree = json.loads((DATA / "tree.json").read_text())
    raw = (DATA / f"push-p{proto}.c2s").read_bytes()
    args, csums, data = _split_client_stream(raw)
    assert args[0] == b"--server" and b"--delete" in args
    assert csums.split()[0] == b"xxh128"
    r = Reader(data)
    assert codec.dec_int(r) == 0  # the (empty) filter list
    dec = FlistDecoder(proto, varint_flags=True)
    start = r.pos
    entries = []
    while not isinstance(e := dec.decode(r), EndOfList):
        entries.append(e)
    flist_bytes = data[start : r.pos]
    top = {bytes.fromhex(t["name"]): t for t in tree["entries"] if b"/" not in bytes.fromhex(t["name"])}
    assert {e.name for e in entries} == set(top) | {b"."}
    for e in entries:
        if e.name == b".":
            assert e.is_dir and e.top_dir
            continue
        t = top[e.name]
        assert e.mtime == tree["mtime"]
        if t["kind"] == "file":
            assert e.is_reg and e.mode & 0o7777 == t["mode"] and e.size == t["size"]
    # Our encoder produces the very same bytes for the same entries in the same order.
    enc = FlistEncoder(proto, varint_flags=True)
    again = b"".join(enc.encode(e) for e in entries) + enc.end(0)
    assert again == flist_bytes
    # And decoding byte by byte gives the same entries.
    dec2 = FlistDecoder(proto, varint_flags=True)
    buf = bytearray()
    got = []
    for b in flist_bytes:
        buf.append(b)
        rr = Reader(buf)
        try:
            item = dec2.decode(rr)
        except NeedMore:
            continue
        del buf[: rr.pos]
        got.append(item)
    assert got[:-1] == entries and isinstance(got[-1], EndOfList)


@pytest.mark.parametrize("proto", [30, 31])
def test_golden_hard_link_flist(proto: int) -> None:
    """The real client's ``-H --no-inc-recursive`` file list (capture.py HLINK_TREE): decoded, the names of each
    inode form one group; re-encoded from those entries, our encoder gives the very same bytes."""
    args, _csums, data = _split_client_stream((DATA / f"hlink-p{proto}.c2s").read_bytes())
    assert b"H" in args[1]
    r = Reader(data)
    assert codec.dec_int(r) == 0
    dec = FlistDecoder(proto, varint_flags=True, hard_links=True)
    start = r.pos
    entries = []
    while not isinstance(e := dec.decode(r), EndOfList):
        entries.append(e)
    flist_bytes = data[start : r.pos]
    groups: dict[tuple[int, int], set[bytes]] = {}
    for e in entries:
        if e.inode is not None:
            groups.setdefault(e.inode, set()).add(e.name)
    assert sorted(map(sorted, groups.values())) == [[b"a", b"b", b"d/c"], [b"x", b"y"]]
    assert {e.name: e.size for e in entries if e.inode}[b"d/c"] == len(b"first inode\n")
    enc = FlistEncoder(proto, varint_flags=True)
    again = bytearray()
    for i, e in enumerate(entries):
        hlink = None if e.inode is None else (-1 if e.inode[1] == i else e.inode[1])
        again += enc.encode(e, hlink)
    assert bytes(again + enc.end(0)) == flist_bytes


# (name, entries as (name, inode or None), the hard-link index each is encoded with: -1 first, None none)
HLINK_CASES: list[tuple[str, list[tuple[bytes, int | None]], list[int | None]]] = [
    ("no links", [(b"a", None), (b"b", None)], [None, None]),
    ("one group", [(b"a", 1), (b"b", 1), (b"c", None), (b"d", 1)], [-1, 0, None, 0]),
    ("two groups interleaved", [(b"a", 1), (b"b", 2), (b"c", 1), (b"d", 2)], [-1, -1, 0, 1]),
    ("a group of one name", [(b"a", 1), (b"b", None)], [-1, None]),
]


@pytest.mark.parametrize(("entries", "expect"), [c[1:] for c in HLINK_CASES], ids=[c[0] for c in HLINK_CASES])
def test_push_session_hard_link_indexes(entries: list[tuple[bytes, int | None]], expect: list[int | None]) -> None:
    """hlink_indexes (what PushSession encodes with) marks the first name of each inode (in list order) as XMIT_HLINK_FIRST and the others with its
    index; decoded back, the groups are the same, whole and byte by byte."""
    files = [FileEntry(b".", 0o40755, top_dir=True)] + [
        FileEntry(n, 0o100644, 5, 7, 0, inode=None if ino is None else (9, ino)) for n, ino in entries]
    files = sorted(files, key=sort_key)
    enc = FlistEncoder(31, varint_flags=True)
    used = hlink_indexes(files)
    blob = b"".join(enc.encode(f, h) for f, h in zip(files, used, strict=True)) + enc.end(0)
    assert [None if h is None else (h if h < 0 else h - 1) for h in used[1:]] == expect
    for bytewise in (False, True):
        dec = FlistDecoder(31, varint_flags=True, hard_links=True)
        got: list[FileEntry] = []
        buf = bytearray()
        for chunk in ([blob[i:i + 1] for i in range(len(blob))] if bytewise else [blob]):
            buf += chunk
            while True:
                rr = Reader(buf)
                try:
                    item = dec.decode(rr)
                except NeedMore:
                    break
                del buf[: rr.pos]
                if isinstance(item, EndOfList):
                    break
                got.append(item)
        assert [g.name for g in got] == [f.name for f in files]
        same = {(a.name, b.name) for a in got for b in got if a.inode is not None and a.inode == b.inode}
        want = {(a.name, b.name) for a in files for b in files if a.inode is not None and a.inode == b.inode}
        assert same == want


def test_hard_link_to_a_later_or_unknown_index_is_refused() -> None:
    enc = FlistEncoder(31, varint_flags=True)
    with pytest.raises(LocalProtocolError):
        enc.encode(FileEntry(b"a", 0o100644, 1, 1), 0)  # index 0 is this entry, not an earlier first name
    first = FlistEncoder(31, varint_flags=True).encode(FileEntry(b"a", 0o100644, 1, 1), -1)
    # a follower that names itself / a later index: the decoder refuses it
    bad = first + codec.enc_varint(0x18 | (1 << 9)) + bytes([1]) + b"b" + codec.enc_varint(5)
    dec = FlistDecoder(31, varint_flags=True, hard_links=True)
    r = Reader(bad)
    dec.decode(r)
    with pytest.raises(RemoteProtocolError, match="not the first name"):
        dec.decode(r)


def test_golden_file_checksum() -> None:
    """The whole-file xxh128 of a.txt as the real client sent it after its token stream."""
    raw = (DATA / "push-p31.c2s").read_bytes()
    i = raw.index(b"hello rsync\n")
    assert raw[i + 12 : i + 16] == b"\0\0\0\0"  # end of tokens
    assert raw[i + 16 : i + 32] == file_checksum("xxh128", b"hello rsync\n")


def test_golden_server_stream() -> None:
    raw = (DATA / "push-p31.s2c").read_bytes()
    r = Reader(raw)
    assert r.line().startswith(b"@RSYNCD: 32.0 ")
    assert r.line() == b"@RSYNCD: OK"
    assert codec.dec_varint(r) == 0x1FF
    assert codec.dec_vstring(r).split()[0] == b"xxh128"
    assert codec.dec_int(r) == 305419896
    frames = codec.Demux().feed(raw[r.pos :])
    assert frames and all(c == 0 for c, _ in frames)


SORT_CASES = [
    ("files before dirs", [b"b", b"a/"], [b"b", b"a"]),
    ("dir slash order", [b"a-", b"a/"], [b"a-", b"a"]),
    ("dir before its content", [b"a/", b"a/x"], [b"a", b"a/x"]),
]


@pytest.mark.parametrize(("name", "names", "expect"), SORT_CASES, ids=[c[0] for c in SORT_CASES])
def test_sort_order(name: str, names: list[bytes], expect: list[bytes]) -> None:
    ents = [FileEntry(n.rstrip(b"/"), 0o40755 if n.endswith(b"/") else 0o100644) for n in reversed(names)]
    ents.append(FileEntry(b".", 0o40755))
    assert [e.name for e in sorted(ents, key=sort_key)] == [b".", *expect]


@pytest.mark.parametrize("bad", [b"../x", b"/etc/passwd", b"a/../b", b"a//b", b""])
def test_decoder_rejects_unsafe_names(bad: bytes) -> None:
    data = codec.enc_varint(0x18) + bytes([len(bad)]) + bad + codec.enc_varlong(0, 3) + codec.enc_varlong(
        1, 4) + codec.enc_int(0o100644)
    with pytest.raises(RemoteProtocolError):
        FlistDecoder(31, True).decode(Reader(data))


# (name, options, argv the daemon gets before the destination) -- options.c server_options order for a sender.
SERVER_ARGS_CASES = [
    ("plain", PushOptions(), [b"--server", b"-lptre.LsfxCIvu", b"-@-1", b"."]),
    ("delete", PushOptions(delete=True), [b"--server", b"-lptre.LsfxCIvu", b"--delete", b"-@-1", b"."]),
    ("fuzzy delete", PushOptions(delete=True, fuzzy=True),
     [b"--server", b"-lptrye.LsfxCIvu", b"--delete-after", b"-@-1", b"."]),
    ("missing args", PushOptions(delete=True, delete_missing=True),
     [b"--server", b"-lptre.LsfxCIvu", b"--delete", b"--delete-missing-args", b"-@-1", b"."]),
    ("no negotiation", PushOptions(negotiate=False), [b"--server", b"-lptre.LsfxCIu", b"-@-1", b"."]),
    ("hard links", PushOptions(hard_links=True), [b"--server", b"-lHptre.LsfxCIvu", b"-@-1", b"."]),
]


@pytest.mark.parametrize(("name", "opts", "expect"), SERVER_ARGS_CASES, ids=[c[0] for c in SERVER_ARGS_CASES])
def test_server_args(name: str, opts: PushOptions, expect: list[bytes]) -> None:
    # -@-1 always: without it the receiver compares whole seconds and leaves a directory, a symlink or a
    # same-size file whose mtime differs only in nanoseconds untouched (util1.c same_time).
    assert build_server_args(opts) == expect


# ---------------------------------------------------------------------------------------------------------------
# what a hostile daemon sends: block checksums are bounded before they are buffered, and equal weak sums do not
# make matching quadratic


def _sum_head(count: int, blength: int = 1024, s2length: int = 16) -> bytes:
    return codec.enc_int(count) + codec.enc_int(blength) + codec.enc_int(s2length) + codec.enc_int(0)


@pytest.mark.parametrize(("count", "refused"), [(MAX_BLOCK_COUNT, False), (MAX_BLOCK_COUNT + 1, True),
                                                 ((1 << 29), True)])
def test_block_checksum_count_is_bounded_before_buffering(count: int, refused: bool) -> None:
    r = Reader(_sum_head(count))
    if refused:
        with pytest.raises(RemoteProtocolError, match="block count"):
            client._read_sums(r, "md5")
    else:
        with pytest.raises(NeedMore):  # waits for the sums themselves: count * 20 bytes at most
            client._read_sums(r, "md5")


class _Counted(bytes):
    """A strong sum that counts the comparisons made against it (and stops a quadratic run early)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Counted.compared += 1
        if _Counted.compared > 2_000_000:
            raise AssertionError("matching compares every block with every offset")
        return bytes.__eq__(self, other)

    __hash__ = bytes.__hash__


def test_equal_weak_sums_do_not_make_matching_quadratic() -> None:
    """100000 blocks with one weak sum (that of every window of the data) and strong sums that never match."""
    blength = 512
    data = bytes(16 << 10)
    weak = checksum1(bytes(blength))
    n = 100_000
    sums = SumHead(n, blength, 16, 0, (weak,) * n, tuple(_Counted(i.to_bytes(16, "big")) for i in range(n)))
    _Counted.compared = 0
    tokens = list(match_blocks(data, sums, lambda b: b"\xff" * 16))
    assert tokens == [Literal(0, len(data))]
    assert _Counted.compared <= 4 * len(data), _Counted.compared  # a few strong checks per offset at most

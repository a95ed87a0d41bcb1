"""The C file-list encoder (kwatch/protocols/rsync/_flistc.c) writes what the Python FlistEncoder writes, byte for
byte, and declines (None) what it does not do, so the Python encoder handles it (with its reasons)."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kwatch.protocols.rsync.flist import FileEntry, FlistEncoder, flistc, sort_key

pytestmark = pytest.mark.skipif(flistc is None, reason="the C encoder is not built (make ext)")

REG, DIR, LNK = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777


def python(entries: list[FileEntry], protocol: int) -> bytes:
    enc = FlistEncoder(protocol, True)
    return b"".join(enc.encode(e) for e in entries)


CASES = [
    ("root_and_files", [FileEntry(b".", DIR, 4096, 10, top_dir=True), FileEntry(b"a", REG, 5, 10),
                        FileEntry(b"b", REG, 1 << 40, 11, 999_999_999)]),
    ("same_mode_time_name", [FileEntry(b"dir/" + b"x" * 250 + b"%d" % i, REG, i, 7, 3) for i in range(5)]),
    ("long_name_suffix", [FileEntry(b"a" * 255 + b"/" + b"b" * 255, REG, 1, 2)]),
    ("dirs_of_each_kind", [FileEntry(b"d1", DIR, content_dir=False), FileEntry(b"d2", DIR, top_dir=True),
                           FileEntry(b"d3", DIR, top_dir=True, content_dir=False), FileEntry(b"d4", DIR)]),
    ("symlinks", [FileEntry(b"l", LNK, 3, link_target=b"t/x"), FileEntry(b"m", LNK, 0, link_target=None)]),
    ("delete_entry_and_negative_mtime", [FileEntry(b"gone", 0), FileEntry(b"old", REG, 1, -5)]),
    ("odd_bytes", [FileEntry(b"n\xff\n sp", REG, 0, 2**33)]),
]


@pytest.mark.parametrize(("name", "entries"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("protocol", [30, 31])
def test_c_encoder_writes_what_python_writes(name: str, entries: list[FileEntry], protocol: int) -> None:
    assert flistc.encode(entries, protocol) == python(entries, protocol)


DECLINED = [
    ("hard_link", [FileEntry(b"a", REG, inode=(1, 2))]),
    ("unsafe_name", [FileEntry(b"../x", REG)]),
    ("empty_component", [FileEntry(b"a//b", REG)]),
    ("absolute", [FileEntry(b"/etc", REG)]),
    ("device", [FileEntry(b"dev", stat.S_IFCHR | 0o600)]),
    ("bad_nsec", [FileEntry(b"a", REG, mtime_nsec=10**9)]),
]


@pytest.mark.parametrize(("name", "entries"), DECLINED, ids=[c[0] for c in DECLINED])
def test_c_encoder_declines(name: str, entries: list[FileEntry]) -> None:
    assert flistc.encode(entries, 31) is None
    assert flistc.encode([FileEntry(b"a", REG)], 29) is None


names = st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b
                                                             and b not in (b".", b"..")), min_size=1, max_size=3)
entry = st.builds(
    lambda parts, kind, size, mtime, nsec, target, top, content: FileEntry(
        b"/".join(parts), kind, size, mtime, nsec, target if kind == LNK else None, top, content),
    names, st.sampled_from([REG, DIR, LNK, 0, stat.S_IFREG | 0o755]), st.integers(0, 2**62),
    st.integers(-(2**40), 2**40), st.integers(0, 10**9 - 1), st.binary(max_size=20), st.booleans(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(entry, max_size=30, unique_by=lambda e: e.name), st.sampled_from([30, 31]))
def test_c_encoder_matches_on_random_lists(entries: list[FileEntry], protocol: int) -> None:
    entries = sorted(entries, key=sort_key)
    assert flistc.encode(entries, protocol) == python(entries, protocol)

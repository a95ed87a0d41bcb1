"""Tests of the delta engine: round trips (named cases and hypothesis), weak-sum agreement, bounded literals."""

from __future__ import annotations

import io
import itertools
import os
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwatch.protocols.rsync.weak import as_schar
from kwatch.protocols.rsync.weak import block_checksums as _block_weak
from kwatch.protocols.rsync.weak import window_checksums as _window_weak
from kwatch.replicate.delta import (
    BLOCK_MAX,
    BLOCK_MIN,
    COPY_RUN_MAX,
    LITERAL_MAX,
    Copy,
    DeltaOp,
    DeltaStats,
    Literal,
    PatchError,
    Signature,
    block_size_for,
    delta,
    patch,
    signature,
)


def rsync_checksum1(block: bytes) -> int:
    """Reference of rsync's checksum.c get_checksum1 (schar, CHAR_OFFSET 0), one byte at a time (tests only)."""
    x = [v - 256 if v > 127 else v for v in block]
    a = sum(x) & 0xFFFF
    n = len(x)
    b = sum((n - i) * v for i, v in enumerate(x)) & 0xFFFF
    return a | (b << 16)


def roundtrip(
    basis: bytes, new: bytes, block_size: int | None = None, chunk_size: int = 1 << 16, seed: int = 0
) -> tuple[list[DeltaOp], DeltaStats, Signature]:
    sig = signature(basis, block_size, seed=seed)
    stream = delta(sig, io.BytesIO(new), chunk_size=chunk_size)
    ops = list(stream)
    out = io.BytesIO()
    result = patch(io.BytesIO(basis), ops, out, sig.block_size, seed=seed)
    assert out.getvalue() == new
    assert result.size == len(new) == stream.stats.new_size
    assert result.digest == stream.stats.digest
    assert stream.stats.literal_bytes == sum(len(op.data) for op in ops if isinstance(op, Literal))
    assert stream.stats.literal_bytes + stream.stats.copied_bytes == len(new)
    for a, b in itertools.pairwise(ops):  # coalescing: no two adjacent ops that could have been one
        if isinstance(a, Copy) and isinstance(b, Copy):
            assert b.start != a.start + a.count or a.count == max(1, COPY_RUN_MAX // sig.block_size)
        if isinstance(a, Literal) and isinstance(b, Literal):
            assert len(a.data) == LITERAL_MAX
    return ops, stream.stats, sig


R = random.Random(4242)
BASE = R.randbytes(50_000)
B = 1024  # block size used by the named cases

NAMED: list[tuple[str, bytes, bytes]] = [
    ("both empty", b"", b""),
    ("empty basis", b"", b"hello"),
    ("empty new", b"hello", b""),
    ("tiny identical", b"abc", b"abc"),
    ("tiny different", b"abc", b"abd"),
    ("one byte", b"x", b"y"),
    ("identical", BASE, BASE),
    ("appended", BASE, BASE + b"tail" * 100),
    ("prepended", BASE, b"head" * 100 + BASE),
    ("shifted by 1 byte", BASE, b"!" + BASE),
    ("deleted 1 byte", BASE, BASE[:1] + BASE[2:]),
    ("inserted in the middle", BASE, BASE[:25_000] + b"ins" + BASE[25_000:]),
    ("all different", BASE, R.randbytes(50_000)),
    ("truncated", BASE, BASE[:12_345]),
    ("exactly one block", BASE[:B], BASE[:B]),
    ("block minus one", BASE[: B - 1], BASE[: B - 1]),
    ("block plus one", BASE[: B + 1], BASE[: B + 1]),
    ("multiple of block", BASE[: 8 * B], BASE[: 8 * B]),
    ("short last block moved to end", BASE[: 3 * B + 10], BASE[:B] + BASE[3 * B : 3 * B + 10]),
    ("blocks reordered", BASE[: 4 * B], BASE[2 * B : 4 * B] + BASE[: 2 * B]),
    ("duplicate blocks", b"\0" * (8 * B), b"\0" * (9 * B + 17)),
    ("zeros shifted", b"\0" * (8 * B) + BASE[:B], b"\1" + b"\0" * (8 * B) + BASE[:B]),
]


@pytest.mark.parametrize(("basis", "new"), [(b, n) for _, b, n in NAMED], ids=[name for name, _, _ in NAMED])
def test_named_roundtrip(basis: bytes, new: bytes) -> None:
    roundtrip(basis, new, B)
    roundtrip(basis, new)  # automatic block size


def test_identical_is_one_copy_run() -> None:
    ops, stats, sig = roundtrip(BASE, BASE, B)
    assert ops == [Copy(0, sig.count)]
    assert stats.literal_bytes == 0


def test_shift_by_one_byte_found_by_rolling() -> None:
    ops, stats, sig = roundtrip(BASE, b"!" + BASE, B)
    assert stats.literal_bytes == 1
    assert ops == [Literal(b"!"), Copy(0, sig.count)]


def test_insertion_in_the_middle_costs_about_one_block() -> None:
    _, stats, _ = roundtrip(BASE, BASE[:25_000] + b"ins" + BASE[25_000:], B)
    assert stats.literal_bytes <= B + 3


def test_prefers_next_block_for_duplicates() -> None:
    # all blocks identical: hash_search-style preference of prev + 1 keeps this one run, not N copies of block 0
    ops, _, sig = roundtrip(b"\0" * (8 * B), b"\0" * (8 * B), B)
    assert ops == [Copy(0, sig.count)]


def test_chunk_boundaries_do_not_matter() -> None:
    new = b"!" + BASE[:30_000] + b"??" + BASE[30_000:]
    results = [roundtrip(BASE, new, B, chunk_size=cs)[0] for cs in (B, 3 * B, 1 << 20)]
    assert results[0] == results[1] == results[2]


def test_copy_runs_are_capped() -> None:
    # an unchanged stretch longer than COPY_RUN_MAX comes out as consecutive runs of at most COPY_RUN_MAX bytes
    bs = 64 << 10
    basis = random.Random(3).randbytes(2 * COPY_RUN_MAX + 5 * bs + 100)
    ops, _, sig = roundtrip(basis, basis, bs, chunk_size=1 << 20)
    per = COPY_RUN_MAX // bs
    assert ops == [Copy(0, per), Copy(per, per), Copy(2 * per, sig.count - 2 * per)]


class _CountingReader(io.RawIOBase):
    """A file that records how far it has been read (to see when the delta stream hands out its ops)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_copies_come_out_while_the_new_file_is_read() -> None:
    # a receiver can copy unchanged blocks while the sender still scans: the first copy op is out long before EOF
    bs = 64 << 10
    basis = random.Random(4).randbytes(4 * COPY_RUN_MAX)
    new = basis[:100] + b"edit" + basis[104:]
    reader = _CountingReader(new)
    stream = delta(signature(basis, bs), reader, chunk_size=1 << 20)
    ops: list[DeltaOp] = []
    read_at_first_copy = -1
    for op in stream:
        if isinstance(op, Copy) and read_at_first_copy < 0:
            read_at_first_copy = reader.pos
        ops.append(op)
    assert 0 < read_at_first_copy <= COPY_RUN_MAX + 2 * (1 << 20) < len(new)
    out = io.BytesIO()
    patch(io.BytesIO(basis), ops, out, bs)
    assert out.getvalue() == new


def test_literal_ops_are_capped() -> None:
    new = os.urandom(LITERAL_MAX * 2 + 5)
    ops, _, _ = roundtrip(b"x" * 4096, new, B)
    assert [len(op.data) for op in ops if isinstance(op, Literal)] == [LITERAL_MAX, LITERAL_MAX, 5]


def test_seed_changes_strong_hashes() -> None:
    assert signature(BASE, B, seed=1).strong != signature(BASE, B, seed=2).strong
    roundtrip(BASE, b"!" + BASE, B, seed=12345)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 255, 256, 700, 1024, 4096])
def test_weak_sums_match_rsync_reference(length: int) -> None:
    data = random.Random(length).randbytes(length * 4 + 5)
    arr = as_schar(data)
    windows = _window_weak(arr, length)
    assert [int(w) for w in windows] == [rsync_checksum1(data[k : k + length]) for k in range(len(windows))]
    blocks = _block_weak(arr[: 4 * length], length)
    assert [int(w) for w in blocks] == [
        rsync_checksum1(data[i * length : (i + 1) * length]) for i in range(4)
    ]


def _weak_reference(data: bytes, length: int) -> list[int]:
    """get_checksum1 of each full block with plain int64 arithmetic (the definition, vectorised per block)."""
    rows = as_schar(data)[: len(data) // length * length].reshape(-1, length).astype(np.int64)
    a = rows.sum(axis=1)
    b = (rows * np.arange(length, 0, -1, dtype=np.int64)).sum(axis=1)
    return [int(x) for x in (a & 0xFFFF) | ((b & 0xFFFF) << 16)]


@pytest.mark.parametrize(
    ("name", "length", "blocks"),
    [
        ("pieces, partial last piece", 32768, 70),  # 32 blocks per 1 MiB piece: 32 + 32 + 6
        ("one block per piece", 1 << 20, 3),
        ("block larger than a piece", BLOCK_MAX * 16, 2),
        ("small aligned blocks, many pieces", 1024, 2500),
        ("unaligned block size", 700 * 3, 900),
    ],
)
def test_block_weak_sums_equal_definition(name: str, length: int, blocks: int) -> None:
    data = random.Random(length).randbytes(length * blocks)
    assert [int(w) for w in _block_weak(as_schar(data), length)] == _weak_reference(
        data, length
    ), name


def test_weak_sums_high_bytes_wrap_like_rsync() -> None:
    data = b"\xff" * 131072
    arr = as_schar(data)
    assert int(_block_weak(arr, len(data))[0]) == rsync_checksum1(data)
    assert int(_window_weak(arr, len(data))[0]) == rsync_checksum1(data)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, BLOCK_MIN),
        (1, BLOCK_MIN),
        (700 * 700, BLOCK_MIN),
        (4 << 20, 2048),
        (64 << 20, 8192),
        (256 << 20, 16384),
        (1 << 30, 32768),
        (1 << 40, BLOCK_MAX),
    ],
)
def test_block_size_is_about_sqrt(size: int, expected: int) -> None:
    assert block_size_for(size) == expected


def test_signature_streams_from_file_and_counts_blocks() -> None:
    data = BASE[: 5 * B + 7]
    sig = signature(io.BytesIO(data), B)
    assert sig.count == 6 and sig.last_len == 7 and sig.file_size == len(data)
    assert sig.wire_size == 6 * 20
    again = Signature.from_wire(sig.block_size, sig.file_size, sig.weak_bytes(), sig.strong, sig.seed)
    assert (again.weak == sig.weak).all() and again.strong == sig.strong


@pytest.mark.parametrize(
    ("block_size", "file_size", "weak", "strong"),
    [
        (0, 10, b"\0" * 4, b"\0" * 16),  # zero block size
        (1 << 30, 10, b"\0" * 4, b"\0" * 16),  # absurd block size
        (4, -1, b"", b""),  # negative size
        (4, 10, b"\0" * 4, b"\0" * 16),  # 10 bytes in blocks of 4 need 3 blocks
        (4, 8, b"\0" * 8, b"\0" * 31),  # strong hashes truncated
    ],
)
def test_signature_from_wire_rejects_inconsistent(
    block_size: int, file_size: int, weak: bytes, strong: bytes
) -> None:
    with pytest.raises(ValueError):
        Signature.from_wire(block_size, file_size, weak, strong)


@pytest.mark.parametrize("op", [Copy(0, 4), Copy(-1, 1), Copy(2, 0), Copy(3, 1)])
def test_patch_rejects_copies_outside_basis(op: Copy) -> None:
    basis = io.BytesIO(b"x" * (3 * B - 5))  # 3 blocks, the last short
    with pytest.raises(PatchError):
        patch(basis, [op], io.BytesIO(), B)


def test_patch_copies_short_last_block() -> None:
    basis = b"a" * B + b"b" * 10
    out = io.BytesIO()
    patch(io.BytesIO(basis), [Copy(0, 2)], out, B)
    assert out.getvalue() == basis


def test_four_kib_edit_in_64_mib_is_bounded() -> None:
    """A 4 KiB overwrite in a 64 MiB file: literal + signature well under 0.5% of the file (bytes, not time)."""
    size = 64 << 20
    rng = np.random.default_rng(7)
    basis = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    new = bytearray(basis)
    off = 33_333_333  # not block-aligned: the edit straddles two blocks
    new[off : off + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    sig = signature(basis)
    stream = delta(sig, bytes(new))
    ops = list(stream)
    assert stream.stats.literal_bytes <= 2 * sig.block_size
    assert sig.wire_size + stream.stats.literal_bytes < 0.005 * size
    out = io.BytesIO()
    patch(io.BytesIO(basis), ops, out, sig.block_size)
    assert out.getvalue() == new
    # and an insertion (shift) of 4 KiB is found by the rolling search, not sent as the rest of the file
    shifted = basis[:off] + bytes(4096) + basis[off:]
    stream = delta(sig, shifted)
    for _ in stream:
        pass
    assert stream.stats.literal_bytes <= 4096 + sig.block_size


# --- property tests ---------------------------------------------------------------------------------------------

edits = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "replace"]),
        st.integers(min_value=0, max_value=1 << 16),
        st.binary(min_size=0, max_size=300),
    ),
    max_size=6,
)


def apply_edits(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, where, payload in ops:
        at = where % (len(buf) + 1)
        if kind == "insert":
            buf[at:at] = payload
        elif kind == "delete":
            del buf[at : at + len(payload)]
        else:
            buf[at : at + len(payload)] = payload
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    basis=st.binary(max_size=5000),
    new=st.binary(max_size=5000),
    block_size=st.sampled_from([1, 2, 3, 16, 64, 256, 1000]),
)
def test_property_arbitrary_pairs(basis: bytes, new: bytes, block_size: int) -> None:
    roundtrip(basis, new, block_size, chunk_size=max(block_size, 512))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    basis=st.binary(min_size=0, max_size=20_000) | st.just(BASE[:20_000]),
    changes=edits,
    block_size=st.sampled_from([7, 64, 256, 512, 1024]),
    chunk_size=st.sampled_from([1, 1000, 4096, 1 << 20]),
)
def test_property_edited_versions(
    basis: bytes, changes: list[tuple[str, int, bytes]], block_size: int, chunk_size: int
) -> None:
    roundtrip(basis, apply_edits(basis, changes), block_size, chunk_size=chunk_size)


def test_weak_checksum_is_rsyncs_over_signed_chars() -> None:
    """rsync sums ``schar``: bytes(range(256)) gives 0x6a80ff80 (the value a real rsync daemon sends: see
    test_rsync_daemon.py); summed unsigned it would be 0xaa807f80. The delta engine's signature uses it."""
    data = bytes(range(256))
    assert rsync_checksum1(data) == 0x6A80FF80
    assert int(signature(data).weak[0]) == 0x6A80FF80
    assert int(_window_weak(as_schar(data), 256)[0]) == 0x6A80FF80

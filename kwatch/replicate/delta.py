"""The delta engine: the rsync algorithm (signature, delta, patch), done in bulk with numpy and xxhash.

This module owns the three pure steps of a delta transfer and nothing else (no sockets, no clocks, no paths):

- :func:`signature` (run by the side that holds the *old* copy, the receiver): per block of the basis file a 32-bit
  weak rolling checksum and a 128-bit strong hash.
- :func:`delta` (run by the side that holds the *new* file, the sender): a stream of :class:`Copy` runs (blocks of
  the basis, by index) and :class:`Literal` bytes that rebuild the new file.
- :func:`patch` (the receiver again): apply the ops to the basis, writing the new file to an output file object.

All three stream: memory is bounded by a few chunks of :data:`CHUNK_SIZE` plus the signature itself (20 bytes per
block, i.e. ~640 KiB for a 1 GiB file), never by the file size. Nothing loops in Python per byte: weak sums come
from vectorised block sums and prefix sums, Python loops run per block or per weak-sum candidate only.

The weak checksum is rsync's (``checksum.c: get_checksum1``, over signed chars), the one implementation in
:mod:`kwatch.protocols.rsync.weak` that the rsync client also uses, so that its known behaviour (and
weaknesses on low-entropy data) are the well-studied ones.

Why xxh3_128 is a strong enough block hash: the strong hash only has to separate blocks that already share a 32-bit
weak sum, and the threat is *accidental* collision (the sender already controls the new file's content, so it gains
nothing by forging one). With 128 bits the chance that any verification in the lifetime of a deployment yields a
false match is far below the chance of undetected disk or RAM corruption; rsync gets by with MD4/MD5 *truncated* to
2..16 bytes (``generator.c: sum_sizes_sqroot`` sizes ``s2length`` by file size) plus a whole-file check. We keep all
16 bytes for every block, the length is implied by the block index, and :func:`delta` also reports a whole-file
xxh3_128 of the new file (:attr:`DeltaStats.digest`) that :func:`patch` recomputes over its output
(:attr:`PatchResult.digest`), so the receiver can verify end to end, as rsync's receiver does with its file sum.
A per-transfer ``seed`` (chosen by the receiver) can be given to make precomputed collisions useless.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt
import xxhash

from kwatch.protocols.agent.messages import Copy, DeltaOp, Literal
from kwatch.protocols.rsync.match import BlockIndex, MatchCounters, scan
from kwatch.protocols.rsync.weak import as_schar, block_checksums

__all__ = [
    "BLOCK_MAX",
    "BLOCK_MIN",
    "CHUNK_SIZE",
    "COPY_RUN_MAX",
    "LITERAL_MAX",
    "STRONG_LEN",
    "Copy",
    "DeltaOp",
    "DeltaStats",
    "DeltaStream",
    "Literal",
    "PatchError",
    "PatchResult",
    "Signature",
    "block_size_for",
    "delta",
    "patch",
    "signature",
]

#: Smallest block chosen automatically. rsync uses 700 (``BLOCK_SIZE``) for files up to 700^2 bytes; we round that
#: up to a multiple of :data:`_ALIGN` so the fast per-block sum path applies.
BLOCK_MIN: Final = 1024
#: Largest block chosen automatically: rsync's ``MAX_BLOCK_SIZE`` for protocol >= 30 (128 KiB). Above 16 GiB the
#: block count grows instead, so the signature stays ~20 bytes per 128 KiB (160 MiB for 1 TiB).
BLOCK_MAX: Final = 1 << 17
#: Largest block size accepted from a peer (a hostile signature must not make us allocate unbounded windows).
BLOCK_LIMIT: Final = 1 << 24
#: Bytes read per step by all three functions; bounds memory.
CHUNK_SIZE: Final = 8 << 20
#: Literal ops are cut at this size so a transport can frame each one.
LITERAL_MAX: Final = 1 << 20
#: Copy runs are cut at about this many bytes, so a stream consumer can hand the patcher work while the scan goes
#: on: an unchanged GiB would otherwise come out as one op at the very end, and the receiver's copying (as long as
#: the scan itself) could only start after it.
COPY_RUN_MAX: Final = CHUNK_SIZE
#: Length of one strong hash (xxh3_128 digest).
STRONG_LEN: Final = 16

# Block sizes are multiples of _ALIGN: the weak checksum's fast path (rsync/weak.py block_checksums) works on
# 256-byte sub-blocks.
_ALIGN: Final = 256
# Blocks of 8 KiB and more are rounded to a multiple of the 4 KiB page: writers (databases, VM images, editors
# saving in place) dirty whole pages, and a page-aligned 4 KiB write then dirties exactly one block, not two.
_PAGE: Final = 4096

U32 = npt.NDArray[np.uint32]


def block_size_for(size: int) -> int:
    """The block size for a basis of ``size`` bytes: about sqrt(size), like rsync's ``generator.c: sum_sizes_sqroot``.

    Why sqrt: for one edit the cost is the signature (~20 bytes per block, ``size / L`` blocks) plus about one block
    of literal data (``L``); ``size / L + L`` is smallest near ``L = sqrt(size)``, and the curve is flat there, so
    rounding down to an alignment costs little. Clamped to [:data:`BLOCK_MIN`, :data:`BLOCK_MAX`].
    """
    if size < 0:
        raise ValueError(f"negative file size {size}")
    length = math.isqrt(size)
    align = _PAGE if length >= 2 * _PAGE else _ALIGN
    length -= length % align
    return max(BLOCK_MIN, min(BLOCK_MAX, length))


# ---------------------------------------------------------------------------------------------------------------
# Signature
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Signature:
    """Block checksums of a basis file.

    ``weak[i]`` is the rsync weak sum of block ``i`` and ``strong[16*i:16*i+16]`` its xxh3_128 digest (with ``seed``).
    Every block is ``block_size`` bytes except the last, which is ``file_size - (count-1) * block_size``.
    """

    block_size: int
    file_size: int
    weak: U32
    strong: bytes
    seed: int = 0

    @property
    def count(self) -> int:
        return int(self.weak.size)

    @property
    def last_len(self) -> int:
        """Length of the last block (``block_size`` when the file size is a multiple of it; 0 for an empty file)."""
        if self.count == 0:
            return 0
        return self.file_size - (self.count - 1) * self.block_size

    def digest(self, index: int) -> bytes:
        return self.strong[index * STRONG_LEN : (index + 1) * STRONG_LEN]

    @property
    def wire_size(self) -> int:
        """Bytes this signature costs on the wire (weak + strong per block)."""
        return self.count * (4 + STRONG_LEN)

    def weak_bytes(self) -> bytes:
        """The weak sums as little-endian uint32, for the wire."""
        return self.weak.astype("<u4").tobytes()

    @classmethod
    def from_wire(
        cls, block_size: int, file_size: int, weak: bytes, strong: bytes, seed: int = 0
    ) -> Signature:
        """Rebuild a signature received from a peer, checking that every size agrees (ValueError if not)."""
        if not 1 <= block_size <= BLOCK_LIMIT:
            raise ValueError(f"signature block size {block_size} outside 1..{BLOCK_LIMIT}")
        if file_size < 0:
            raise ValueError(f"signature file size {file_size} is negative")
        count = -(-file_size // block_size)
        if len(weak) != 4 * count or len(strong) != STRONG_LEN * count:
            raise ValueError(
                f"signature of {file_size} bytes in blocks of {block_size} needs {count} blocks, got "
                f"{len(weak)} bytes of weak sums and {len(strong)} bytes of strong hashes"
            )
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"signature seed {seed} is not a 64-bit unsigned integer")
        arr = np.frombuffer(weak, dtype="<u4").astype(np.uint32)
        return cls(block_size, file_size, arr, bytes(strong), seed)


Source = BinaryIO | bytes | bytearray | memoryview


def _as_file(src: Source) -> BinaryIO:
    if isinstance(src, bytes | bytearray | memoryview):
        return io.BytesIO(src)
    return src


def _read_full(f: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes unless EOF comes first (pipes and sockets may return short reads)."""
    data = f.read(size)
    if data is None:
        raise BlockingIOError("non-blocking file returned no data; the delta engine needs blocking reads")
    if len(data) == size or not data:
        return bytes(data)
    parts = [data]
    got = len(data)
    while got < size:
        more = f.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _size_of(src: Source) -> int | None:
    if isinstance(src, bytes | bytearray | memoryview):
        return len(src)
    try:
        if not src.seekable():
            return None
        here = src.tell()
        end = src.seek(0, io.SEEK_END)
        src.seek(here)
        return end - here
    except (OSError, ValueError):
        return None


def signature(
    src: Source, block_size: int | None = None, *, size: int | None = None, seed: int = 0
) -> Signature:
    """Compute the signature of a basis (bytes, or a binary file object read from its current position to EOF).

    ``block_size`` defaults to :func:`block_size_for` of the size (taken from ``size``, the bytes' length, or by
    seeking; a non-seekable file needs ``size`` or ``block_size``). Reads :data:`CHUNK_SIZE` at a time.
    """
    if block_size is None:
        known = size if size is not None else _size_of(src)
        if known is None:
            raise ValueError("signature() of a non-seekable file needs block_size= or size=")
        block_size = block_size_for(known)
    if not 1 <= block_size <= BLOCK_LIMIT:
        raise ValueError(f"block size {block_size} outside 1..{BLOCK_LIMIT}")
    f = _as_file(src)
    chunk = max(1, CHUNK_SIZE // block_size) * block_size
    weaks: list[U32] = []
    strong = bytearray()
    total = 0
    while True:
        data = _read_full(f, chunk)
        if not data:
            break
        total += len(data)
        arr = as_schar(data)
        full = len(data) // block_size
        weaks.append(block_checksums(arr[: full * block_size], block_size))
        view = memoryview(data)
        for off in range(0, len(data), block_size):
            strong += xxhash.xxh3_128_digest(view[off : off + block_size], seed)
        if full * block_size < len(data):  # the short last block; only possible at EOF
            weaks.append(block_checksums(arr[full * block_size :], len(data) - full * block_size))
            break
    weak = np.concatenate(weaks) if weaks else np.zeros(0, dtype=np.uint32)
    return Signature(block_size, total, weak, bytes(strong), seed)


# ---------------------------------------------------------------------------------------------------------------
# Delta
# ---------------------------------------------------------------------------------------------------------------




@dataclass(slots=True)
class DeltaStats(MatchCounters):
    """Filled in while a :class:`DeltaStream` is consumed; complete once it is exhausted (with the matcher's
    counters: weak_candidates, false_candidates, gave_up_regions)."""

    new_size: int = 0
    literal_bytes: int = 0
    copied_bytes: int = 0
    copy_ops: int = 0
    literal_ops: int = 0
    digest: bytes = b""  # xxh3_128 (with the signature's seed) of the whole new file


class _Emitter:
    """Coalesces adjacent copies into runs of up to :data:`COPY_RUN_MAX` bytes and adjacent literals into ops of
    up to :data:`LITERAL_MAX` bytes."""

    def __init__(self, stats: DeltaStats, block_size: int = 1) -> None:
        self.stats = stats
        self.view = memoryview(b"")  # the buffer being scanned: offsets given to literal() point into it
        self.run_max = max(1, COPY_RUN_MAX // block_size)  # blocks per copy run
        self.run_start = -1
        self.run_count = 0
        self.lit = bytearray()
        self.out: list[DeltaOp] = []

    def literal(self, start: int, end: int) -> None:
        self.literal_bytes(self.view[start:end])

    def literal_bytes(self, data: bytes | memoryview) -> None:
        if not len(data):
            return
        self._flush_copy()
        self.lit += data
        self.stats.literal_bytes += len(data)
        while len(self.lit) >= LITERAL_MAX:
            self.out.append(Literal(bytes(self.lit[:LITERAL_MAX])))
            self.stats.literal_ops += 1
            del self.lit[:LITERAL_MAX]

    def copy(self, block: int, offset: int, nbytes: int) -> None:
        self._flush_lit()
        self.stats.copied_bytes += nbytes
        if self.run_count and block == self.run_start + self.run_count and self.run_count < self.run_max:
            self.run_count += 1
            return
        self._flush_copy()
        self.run_start, self.run_count = block, 1

    def _flush_lit(self) -> None:
        if self.lit:
            self.out.append(Literal(bytes(self.lit)))
            self.stats.literal_ops += 1
            self.lit.clear()

    def _flush_copy(self) -> None:
        if self.run_count:
            self.out.append(Copy(self.run_start, self.run_count))
            self.stats.copy_ops += 1
            self.run_count = 0

    def flush(self) -> None:
        self._flush_lit()
        self._flush_copy()

    def take(self) -> list[DeltaOp]:
        out, self.out = self.out, []
        return out


class DeltaStream(Iterator[DeltaOp]):
    """Iterator of delta ops; :attr:`stats` is complete (with the whole-file digest) once it is exhausted."""

    def __init__(self, sig: Signature, new: Source, chunk_size: int = CHUNK_SIZE) -> None:
        self.sig = sig
        self.stats = DeltaStats()
        self._file = _as_file(new)
        length = sig.block_size
        self._chunk = max(1, chunk_size // length) * length
        self._gen = self._run()

    def __iter__(self) -> DeltaStream:
        return self

    def __next__(self) -> DeltaOp:
        return next(self._gen)

    def _run(self) -> Iterator[DeltaOp]:
        sig, stats = self.sig, self.stats
        hasher = xxhash.xxh3_128(seed=sig.seed)
        emit = _Emitter(stats, sig.block_size)
        if sig.count == 0:  # empty basis: everything is literal
            while data := _read_full(self._file, self._chunk):
                hasher.update(data)
                stats.new_size += len(data)
                emit.literal_bytes(data)
                yield from emit.take()
        else:
            index = BlockIndex(sig.weak, sig.digest, sig.block_size, sig.last_len, check_weak=False)
            seed = sig.seed

            def strong(window: memoryview) -> bytes:
                return xxhash.xxh3_128_digest(window, seed)

            carry = b""
            prev = -1  # last matched block, for hash_search-style preference of prev + 1
            while True:
                data = _read_full(self._file, self._chunk)
                hasher.update(data)
                stats.new_size += len(data)
                eof = not data
                buf = carry + data if carry else data
                emit.view = memoryview(buf)
                consumed, prev = scan(index, buf, eof, prev, emit, strong, stats)
                carry = buf[consumed:]
                yield from emit.take()
                if eof:
                    break
        emit.flush()
        stats.digest = hasher.digest()
        yield from emit.take()


def delta(sig: Signature, new: Source, *, chunk_size: int = CHUNK_SIZE) -> DeltaStream:
    """Ops that turn the basis described by ``sig`` into ``new`` (bytes, or a binary file read to EOF).

    Consumes ``new`` lazily while the returned stream is iterated; adjacent copies come out as one :class:`Copy`
    run of at most :data:`COPY_RUN_MAX` bytes, so ops keep coming out while ``new`` is read (about a chunk and a
    run behind the read), not all at its end. Memory: about two chunks of ``chunk_size`` plus the signature's index.
    """
    return DeltaStream(sig, new, chunk_size)


# ---------------------------------------------------------------------------------------------------------------
# Patch
# ---------------------------------------------------------------------------------------------------------------


class PatchError(ValueError):
    """The ops do not fit the basis (a copy beyond its end, a negative count): the delta was for another file."""


@dataclass(frozen=True, slots=True)
class PatchResult:
    size: int
    digest: bytes  # xxh3_128 of the output, with the seed given to patch(); compare with DeltaStats.digest
    copied_bytes: int = 0
    literal_bytes: int = 0


class Patcher:
    """Applies delta ops to a basis, giving the new file's bytes in order: what the mirror runs (the agent writes
    them into the put's temporary as they come) and what :func:`patch` writes to a file object.

    The basis is read with ``pread`` where it has a descriptor (the agent's case), into one buffer reused for the
    whole file: a copy run is up to :data:`COPY_RUN_MAX` bytes and a large file's delta is almost all copies. So a
    piece handed out is valid only until the next one is asked for. Every copy is checked against the basis size
    before any byte of it is given out (ops come from a peer), and a basis that ends early (it shrank while being
    patched) stops the patch: :class:`PatchError` either way.
    """

    def __init__(self, basis: BinaryIO | None, block_size: int) -> None:
        self.block_size = block_size
        self._basis = basis
        self.basis_size = 0 if basis is None else basis.seek(0, io.SEEK_END)
        self.blocks = -(-self.basis_size // block_size) if 1 <= block_size <= BLOCK_LIMIT else 0
        try:
            self._fd: int | None = None if basis is None else basis.fileno()
        except (OSError, io.UnsupportedOperation):
            self._fd = None
        self._buf: memoryview | None = None
        self.copied = 0  # bytes given out from the basis
        self.literal = 0  # bytes given out from literals

    def apply(self, ops: Iterable[DeltaOp]) -> Iterator[bytes | memoryview]:
        for op in ops:
            if isinstance(op, Literal):
                self.literal += len(op.data)
                yield op.data
            elif isinstance(op, Copy):
                yield from self._copy(op)
            else:
                raise PatchError(f"not a delta op: {op!r}")

    def _copy(self, op: Copy) -> Iterator[memoryview]:
        if op.start < 0 or op.count < 1 or op.start + op.count > self.blocks:
            raise PatchError(
                f"delta copies blocks {op.start}..{op.start + op.count - 1}, which the mirror's copy does not have "
                f"({self.basis_size} bytes in blocks of {self.block_size}): it was computed against another file"
            )
        offset = op.start * self.block_size
        remaining = min(op.count * self.block_size, self.basis_size - offset)
        if self._buf is None:
            self._buf = memoryview(bytearray(min(CHUNK_SIZE, max(remaining, 1 << 16))))
        buf = self._buf
        while remaining > 0:
            n = self._read_at(buf[: min(len(buf), remaining)], offset)
            if not n:
                raise PatchError(f"the mirror's copy shrank while being patched (it ended at offset {offset})")
            remaining -= n
            offset += n
            self.copied += n
            yield buf[:n]

    def _read_at(self, into: memoryview, offset: int) -> int:
        if self._fd is not None:
            return os.preadv(self._fd, [into], offset)
        assert self._basis is not None
        self._basis.seek(offset)
        data = self._basis.read(len(into))
        into[: len(data)] = data
        return len(data)


def patch(
    basis: BinaryIO, ops: Iterable[DeltaOp], out: BinaryIO, block_size: int, *, seed: int = 0
) -> PatchResult:
    """Write the file described by ``ops`` to ``out``, copying blocks from the seekable ``basis`` (a
    :class:`Patcher`). ``block_size`` is the signature's. ``out`` must not be ``basis``.
    """
    if not 1 <= block_size <= BLOCK_LIMIT:
        raise PatchError(f"block size {block_size} outside 1..{BLOCK_LIMIT}")
    hasher = xxhash.xxh3_128(seed=seed)
    patcher = Patcher(basis, block_size)
    for piece in patcher.apply(ops):
        out.write(piece)
        hasher.update(piece)
    return PatchResult(patcher.copied + patcher.literal, hasher.digest(), patcher.copied, patcher.literal)

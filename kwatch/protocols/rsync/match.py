"""Block matching, the sender's half of the rsync algorithm: find the receiver's blocks in our data; the rest is
literal. The one matcher: the rsync client (:func:`match_blocks`, against the block sums an rsync receiver sends)
and kwatch's own delta engine (``kwatch.replicate.delta``, against an agent's signature) both run :func:`scan`.

Pure (numpy). Same result as rsync's match.c ``hash_search``/``matched``: literal runs and block matches, greedily
left to right, preferring the block after the last match (``want_i``) so that runs of equal blocks stay runs. It is
computed in bulk rather than byte by byte, alternating two phases:

(A) block-aligned from the current position: look the whole block up by its strong sum (an unchanged or
    in-place-edited file is matched here, one hash per block, no rolling);
(B) at the first miss, roll: compute the weak sums of all windows of the next region at once, keep those that are
    some block's weak sum (a bit filter, then an exact search: rsync's 16-bit tag table, ``build_hash_table``), check
    those with the strong sum in order, and go back to (A) right after the first match.

A block matches when its strong sum does, and, where strong sums are short (rsync truncates them to 2..16 bytes,
``generator.c sum_sizes_sqroot``), its weak sum too. A budget of strong checks that fail bounds the work per region,
so low-entropy data whose weak sums collide all the time cannot make matching quadratic. The receiver's last block
may be short; like rsync, it can only match at the very end of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from kwatch.protocols.rsync.tokens import Literal, Match, SumHead, Token
from kwatch.protocols.rsync.weak import U32, as_schar, checksum1, window_checksums

#: Largest region whose window sums are computed at once: the prefix sums stay in cache (bench/delta_bench.py)
#: while the per-call overhead stays negligible.
ROLL_MAX = 1 << 20


@dataclass(slots=True)
class MatchCounters:
    """What :func:`scan` did, for statistics and tests."""

    weak_candidates: int = 0
    false_candidates: int = 0  # weak sum matched, strong sum did not
    gave_up_regions: int = 0  # regions where the failed-check budget ran out (then sent as literal)


class BlockIndex:
    """The receiver's blocks: a bit filter and a sorted array over their weak sums, and a table from strong sum
    (with the weak sum, when ``check_weak``) to the first block that has it."""

    def __init__(self, weak: U32, digest: Callable[[int], bytes], block_size: int, last_len: int, *,
                 check_weak: bool) -> None:
        self.block_size = block_size
        self.count = len(weak)
        self.last_len = last_len
        self.weak = weak
        self.digest = digest
        self.check_weak = check_weak
        full = self.count if last_len == block_size else self.count - 1
        self.full = full
        by_key: dict[object, int] = {}
        for i in range(full):
            by_key.setdefault(self._key(int(weak[i]), digest(i)), i)
        self.by_key = by_key
        weak_full = weak[:full]
        self.sorted_weak = np.unique(weak_full)
        bits = max(12, min(26, (max(1, full) * 32 - 1).bit_length()))
        self.shift = np.uint32(32 - bits)
        self.filter = np.zeros(1 << bits, dtype=np.bool_)
        self.filter[self._slot(weak_full)] = True

    def _key(self, weak: int, digest: bytes) -> object:
        return (weak, digest) if self.check_weak else digest

    def _slot(self, weak: U32) -> U32:
        # Fibonacci hashing: multiply by 2^32/phi and keep the top bits, so structured weak sums spread evenly.
        slot = weak * np.uint32(0x9E3779B1)
        slot >>= self.shift
        return slot

    def candidates(self, weak: U32) -> npt.NDArray[np.intp]:
        """Offsets into ``weak`` whose value is the weak sum of some full block."""
        maybe = np.flatnonzero(np.take(self.filter, self._slot(weak)))
        if maybe.size == 0 or self.sorted_weak.size == 0:
            return maybe
        vals = weak[maybe]
        pos = np.searchsorted(self.sorted_weak, vals)
        pos[pos == self.sorted_weak.size] = 0
        hits: npt.NDArray[np.intp] = maybe[self.sorted_weak[pos] == vals]
        return hits

    def lookup(self, window: memoryview, strong: Callable[[memoryview], bytes], prefer: int, weak: int = -1) -> int:
        """The full block equal to ``window``, preferring block ``prefer``; -1 if none. ``weak``: the window's weak
        sum when already known."""
        digest = strong(window)
        if self.check_weak and weak < 0:
            weak = checksum1(window)
        if 0 <= prefer < self.full and self.digest(prefer) == digest and (
            not self.check_weak or int(self.weak[prefer]) == weak
        ):
            return prefer
        return self.by_key.get(self._key(weak, digest), -1)

    def last_block_is(self, tail: memoryview, strong: Callable[[memoryview], bytes]) -> bool:
        last = self.count - 1
        if strong(tail) != self.digest(last):
            return False
        return not self.check_weak or checksum1(tail) == int(self.weak[last])


class Emit(Protocol):
    """Where :func:`scan` puts its result, as offsets into the buffer it scans."""

    def literal(self, start: int, end: int) -> None: ...

    def copy(self, block: int, offset: int, nbytes: int) -> None: ...


def scan(index: BlockIndex, buf: bytes | memoryview, eof: bool, prev: int, emit: Emit,
         strong: Callable[[memoryview], bytes], counters: MatchCounters) -> tuple[int, int]:
    """Match what can be decided in ``buf``; return (bytes consumed, last matched block).

    Unless at ``eof``, the last ``block_size - 1`` bytes are left for the next call (a window may cross the end of
    a buffer); ``prev`` carries the last matched block over.
    """
    length = index.block_size
    view = memoryview(buf)
    arr = as_schar(buf)
    n = len(buf)
    lit_start = 0  # first byte not yet emitted
    pos = 0  # first window start not yet examined
    piece = 2 * length  # rolling region size; doubles on consecutive misses
    failures = 0
    budget = 256
    while n - pos >= length:
        # (A) aligned blocks from pos
        while n - pos >= length:
            blk = index.lookup(view[pos : pos + length], strong, prev + 1)
            if blk < 0:
                break
            emit.literal(lit_start, pos)
            emit.copy(blk, pos, length)
            prev, pos = blk, pos + length
            lit_start = pos
            piece = 2 * length
        if n - pos < length:
            break
        # (B) rolling search over windows [pos, end)
        end = min(n - length + 1, pos + piece)
        weak = window_checksums(arr[pos : end + length - 1], length)
        cands = index.candidates(weak)
        counters.weak_candidates += int(cands.size)
        # the failed-check budget: a few strong checks per window of the region, at most
        budget += 4 * (end - pos) // length + 16
        found = -1
        for c in cands.tolist():
            if failures >= budget:
                counters.gave_up_regions += 1
                break
            k = pos + c
            blk = index.lookup(view[k : k + length], strong, prev + 1, int(weak[c]))
            if blk >= 0:
                found = k
                break
            failures += 1
            counters.false_candidates += 1
        if found >= 0:
            emit.literal(lit_start, found)
            emit.copy(blk, found, length)
            prev, pos = blk, found + length
            lit_start = pos
            piece = 2 * length
        else:
            pos = end
            piece = min(piece * 2, ROLL_MAX)
    if not eof:
        # Windows starting before pos were all examined; bytes before pos that are not copied are literal.
        keep = min(pos, n)
        emit.literal(lit_start, keep)
        return keep, prev
    # At the end: the remaining tail may be the basis's short last block.
    tail = index.last_len
    if index.count and tail < length and n - lit_start >= tail > 0:
        start = n - tail
        if index.last_block_is(view[start:n], strong):
            emit.literal(lit_start, start)
            emit.copy(index.count - 1, start, tail)
            return n, index.count - 1
    emit.literal(lit_start, n)
    return n, prev


# ---------------------------------------------------------------------------------------------------------------
# The rsync client's use of it


class _Tokens:
    def __init__(self) -> None:
        self.out: list[Token] = []

    def literal(self, start: int, end: int) -> None:
        if end > start:
            self.out.append(Literal(start, end))

    def copy(self, block: int, offset: int, nbytes: int) -> None:
        self.out.append(Match(block, offset, nbytes))


def match_blocks(data: bytes | memoryview, sums: SumHead, strong: Callable[[bytes], bytes]) -> Iterator[Token]:
    """Literals and matches covering ``data`` in order; ``strong`` is the negotiated block hash (its first
    ``s2length`` bytes are compared)."""
    n = len(data)
    if sums.count == 0 or sums.blength == 0 or n == 0:
        if n:
            yield Literal(0, n)
        return
    s2len = sums.s2length
    index = BlockIndex(np.array(sums.sum1, dtype=np.uint32), sums.sum2.__getitem__, sums.blength,
                       sums.remainder or sums.blength, check_weak=True)
    tokens = _Tokens()
    scan(index, data, True, -1, tokens, lambda w: strong(bytes(w))[:s2len], MatchCounters())
    yield from tokens.out

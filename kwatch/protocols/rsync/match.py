"""The sender side of rsync's block matching: find the receiver's blocks in our data; the rest is literal.

Pure (numpy). Same result shape as rsync's match.c ``hash_search``/``matched``: a sequence of literal runs and
block matches that the token stream carries. It is computed in bulk rather than byte by byte:

1. every block-aligned window is checked first (an unchanged or appended file matches here, no rolling);
2. the rolling weak checksum is then computed with numpy for a whole chunk of offsets at once, and only the
   offsets whose weak sum is one of the receiver's are checked with the strong sum (xxhash/md5), greedily left
   to right, resuming after each match as rsync does.

The receiver's last block may be short (``remainder``); like rsync it can only match at the very end of our data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kwatch.protocols.rsync.checksum import checksum1, rolling_checksums

SCAN_CHUNK = 1 << 20  # offsets per numpy pass
#: Blocks kept per weak sum. Every offset whose weak sum hits is compared with each block of that sum: a receiver
#: sending one weak sum for all its blocks would make that quadratic. Blocks beyond these still match as long as
#: one of the kept ones has the same strong sum (equal blocks: the usual reason for equal weak sums).
MAX_SAME_WEAK = 64


@dataclass(frozen=True, slots=True)
class SumHead:
    """The receiver's block checksums for one file (sender.c receive_sums)."""

    count: int
    blength: int
    s2length: int
    remainder: int
    sum1: tuple[int, ...]
    sum2: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Literal:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Match:
    block: int
    offset: int
    length: int


Token = Literal | Match


def match_blocks(data: bytes | memoryview, sums: SumHead, strong: Callable[[bytes], bytes]) -> Iterator[Token]:
    """Yield literals and matches covering ``data`` in order."""
    n = len(data)
    mv = memoryview(data)
    if sums.count == 0 or sums.blength == 0 or n == 0:
        if n:
            yield Literal(0, n)
        return
    blen = sums.blength
    s2len = sums.s2length
    by_weak: dict[int, list[int]] = {}
    full_blocks = sums.count - (1 if sums.remainder else 0)
    for i in range(full_blocks):
        same = by_weak.setdefault(sums.sum1[i], [])
        if len(same) < MAX_SAME_WEAK:
            same.append(i)
    weak_keys = np.fromiter(by_weak.keys(), dtype=np.uint32, count=len(by_weak))
    weak_keys.sort()

    def find(k: int, length: int, weak: int, candidates: list[int] | None) -> int:
        if not candidates:
            return -1
        digest = strong(bytes(mv[k : k + length]))[:s2len]
        want_next = -1
        for i in candidates:
            if sums.sum2[i] == digest:
                if want_next < 0:
                    want_next = i
                if i == k // blen:  # prefer the block at the same position (match.c want_i)
                    return i
        return want_next

    lit_start = 0
    p = 0
    last_full = n - blen  # last offset where a whole block fits
    while p <= last_full:
        # Fast path: the window right here matches (unchanged or shifted-by-whole-blocks data); no rolling.
        w0 = checksum1(bytes(mv[p : p + blen]))
        i0 = find(p, blen, w0, by_weak.get(w0))
        if i0 >= 0:
            if p > lit_start:
                yield Literal(lit_start, p)
            yield Match(i0, p, blen)
            p = lit_start = p + blen
            continue
        stop = min(last_full + 1, p + SCAN_CHUNK)
        weaks = rolling_checksums(mv, p, stop, blen)
        hits = np.flatnonzero(np.isin(weaks, weak_keys, assume_unique=False))
        base = p
        resume = p
        for h in hits:
            k = base + int(h)
            if k < resume:
                continue
            w = int(weaks[h])
            i = find(k, blen, w, by_weak.get(w))
            if i < 0:
                continue
            if k > lit_start:
                yield Literal(lit_start, k)
            yield Match(i, k, blen)
            resume = lit_start = k + blen
        p = max(stop, resume)
    # rsync's window shrinks at the end of the data: the short last block can match only there.
    if sums.remainder and n - sums.remainder >= lit_start:
        k = n - sums.remainder
        last = sums.count - 1
        tail = bytes(mv[k:n])
        if checksum1(tail) == sums.sum1[last] and strong(tail)[:s2len] == sums.sum2[last]:
            if k > lit_start:
                yield Literal(lit_start, k)
            yield Match(last, k, sums.remainder)
            lit_start = n
    if lit_start < n:
        yield Literal(lit_start, n)

"""rsync's weak (rolling) checksum, checksum.c ``get_checksum1``, in bulk with numpy.

Pure (numpy). One implementation, used by the rsync client's block matching (match.py) and by kwatch's own delta
engine (kwatch/replicate/delta.py); only a file that has a basis to match against needs it, so it is kept apart
from checksum.py (numpy is most of the import time of either).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

# checksum.c get_checksum1 sums ``schar`` values (signed bytes, -128..127; CHAR_OFFSET 0): for a window x[0..L),
# a = sum x_i and b = sum (L - i) * x_i, both mod 2^16, packed a | b << 16. Nothing here loops per byte in Python.

I8 = npt.NDArray[np.int8]
U32 = npt.NDArray[np.uint32]
# Blocks whose length is a multiple of _SUB take the fast path: the per-block weighted sum is computed as float32
# dot products over 256-byte sub-blocks, exact because 128 * (0 + 1 + ... + 255) < 2^24.
_SUB: Final = 256
_SUB_WEIGHTS: Final = np.arange(_SUB, dtype=np.float32)
# Bytes per numpy pass over whole blocks: small enough for the float32 temporaries to stay in cache.
_PIECE: Final = 1 << 20


def as_schar(data: bytes | bytearray | memoryview) -> I8:
    """The bytes as rsync's checksum sees them: signed chars."""
    return np.frombuffer(data, dtype=np.int8)


def _pack(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> U32:
    """Pack the two 16-bit halves as get_checksum1 does: ``a`` low, ``b`` high."""
    out: U32 = ((a & 0xFFFF) | ((b & 0xFFFF) << 16)).astype(np.uint32)
    return out


def block_checksums(blocks: I8, length: int) -> U32:
    """checksum1 of consecutive blocks of ``length``: ``blocks`` is a 1-D array whose size is a multiple of it."""
    count = blocks.size // length
    if count == 0:
        return np.zeros(0, dtype=np.uint32)
    out = np.empty(count, dtype=np.uint32)
    per = max(1, _PIECE // length)
    aligned = length % _SUB == 0
    if aligned:
        m = length // _SUB
        wsub = length - _SUB * np.arange(m, dtype=np.int64)
        # One float32 buffer reused for every piece: converting into it (copyto) costs no allocation and no page
        # faults, and both sums below read it while it is still in cache.
        buf = np.empty((min(count, per) * m, _SUB), dtype=np.float32)
    else:
        ramp = np.arange(length, 0, -1, dtype=np.int64)  # weight L - i for byte i
    for first in range(0, count, per):
        last = min(count, first + per)
        piece = blocks[first * length : last * length]
        n = last - first
        if aligned:
            subs = buf[: n * m]
            np.copyto(subs, piece.reshape(-1, _SUB), casting="unsafe")
            # Per 256-byte sub-block j: t_j = sum_t t * x_{j,t} and s_j = sum_t x_{j,t}, both exact in float32.
            # einsum for both, not ``@``: matmul goes to OpenBLAS, whose worker threads spin and collapse
            # throughput when the other CPUs are busy; an integer reduction along the 256-long axis is slower
            # (bench/delta_bench.py).
            t = np.einsum("ij,j->i", subs, _SUB_WEIGHTS).astype(np.int64).reshape(n, m)
            s = np.einsum("ij->i", subs).astype(np.int64).reshape(n, m)
            # For byte i = j*SUB + t the weight is L - j*SUB - t: the sub-block sum times (L - j*SUB) minus the
            # in-sub-block weighted sum. Exact in int64 for any block size a peer may ask for.
            a = s.sum(axis=1)
            b = np.einsum("ij,j->i", s, wsub) - t.sum(axis=1)
        else:
            rows = piece.reshape(n, length).astype(np.int64)
            a = rows.sum(axis=1)
            b = rows @ ramp
        out[first:last] = _pack(a, b)
    return out


def window_checksums(seg: I8, length: int) -> U32:
    """checksum1 of every window ``seg[k:k+length]``, all at once (what match.c's rolling update produces).

    With prefix sums ``C[j] = sum_{i<j} x_i`` and ``E[j] = sum_{m<=j} C[m]``: ``a_k = C[k+L] - C[k]`` and
    ``b_k = E[k+L] - E[k] - L*C[k]``. Everything is taken mod 2^32 by uint32 wrap-around (a negative byte enters
    as its two's complement), which is consistent with the final mod 2^16.
    """
    n = seg.size - length + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint32)
    c = np.empty(seg.size + 1, dtype=np.uint32)
    c[0] = 0
    np.cumsum(seg, dtype=np.uint32, out=c[1:])
    e = np.cumsum(c, dtype=np.uint32)
    # In place: this runs over every byte of unmatched regions, so temporaries cost real time.
    a = np.subtract(c[length:], c[:-length])
    b = np.subtract(e[length:], e[:-length])
    np.multiply(c[:-length], np.uint32(length & 0xFFFFFFFF), out=e[:n])
    b -= e[:n]
    a &= np.uint32(0xFFFF)
    b <<= np.uint32(16)
    a |= b
    return a


def checksum1(data: bytes | memoryview) -> int:
    """rsync checksum.c get_checksum1 of one block."""
    arr = as_schar(data)
    return int(block_checksums(arr, arr.size)[0]) if arr.size else 0


def rolling_checksums(data: bytes | memoryview, start: int, stop: int, blen: int) -> U32:
    """checksum1 of ``data[k:k+blen]`` for every ``k`` in ``[start, stop)`` (each window must fit in ``data``)."""
    if stop <= start:
        return np.zeros(0, dtype=np.uint32)
    return window_checksums(np.frombuffer(data, dtype=np.int8, count=stop - start + blen - 1, offset=start), blen)

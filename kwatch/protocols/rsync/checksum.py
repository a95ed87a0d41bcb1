"""rsync checksums: the rolling weak checksum1, the negotiated strong checksums, name negotiation, daemon auth.

Pure (hashlib, xxhash, numpy). Follows rsync's checksum.c: ``get_checksum1`` (sums of *signed* bytes,
``CHAR_OFFSET`` 0), ``get_checksum2`` (per-block strong sum with the session seed: xxh64/xxh3 take it as the
hash seed, md5 with the ``C`` compat flag or OpenSSL gets it as 4 little-endian bytes before the data),
``sum_init``/``sum_end`` for the whole-file sum (unseeded for md5/xxh*), and authenticate.c ``generate_hash``
(base64 without padding of digest(password + challenge)).

rsync 3.2.7+ offers, strongest first: ``xxh128 xxh3 xxh64 md5 md4 sha1 none``; each side picks its own most
preferred name that the peer also lists (compat.c ``negotiate_the_strings``). Without negotiation (no ``v`` in
the client's capability letters) protocol 30+ uses md5. MD4 is not offered here: OpenSSL 3 disables it.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash

from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError

# Names we can compute, strongest first (compat.c valid_checksums order, minus md4/none).
CHECKSUM_NAMES: tuple[str, ...] = ("xxh128", "xxh3", "xxh64", "md5", "sha1")
AUTH_NAMES: tuple[str, ...] = ("sha512", "sha256", "sha1", "md5")
COMPRESS_NAMES: tuple[str, ...] = ("none",)
_ALIASES = {"xxhash": "xxh64"}

DIGEST_LEN = {"xxh128": 16, "xxh3": 8, "xxh64": 8, "md5": 16, "sha1": 20, "md4": 16}


def parse_name_list(raw: bytes, what: str) -> list[str]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} list from the peer is not ASCII: {raw!r}") from None
    return [_ALIASES.get(n, n) for n in text.split()]


def choose(ours: tuple[str, ...], theirs: list[str], what: str) -> str:
    """Our most preferred name that the peer also lists (compat.c recv_negotiate_str)."""
    for name in ours:
        if name in theirs:
            return name
    raise RemoteProtocolError(f"no common {what}: we offer {' '.join(ours)}, the peer offers {' '.join(theirs)}")


# --- weak checksum -------------------------------------------------------------------------------------------
# One implementation, used by the rsync client (match.py) and by kwatch's own delta engine (replicate/delta.py).
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


# --- strong checksums ----------------------------------------------------------------------------------------


def _seed64(seed: int) -> int:
    # checksum_seed is a C int handed to an unsigned 64-bit seed parameter: sign-extend.
    return seed & 0xFFFFFFFFFFFFFFFF


def block_hasher(name: str, seed: int) -> Callable[[bytes], bytes]:
    """checksum.c get_checksum2: the per-block strong sum (full length; the wire uses a prefix)."""
    s4 = struct.pack("<i", seed) if seed else b""
    if name == "xxh64":
        return lambda b: xxhash.xxh64_intdigest(b, seed=_seed64(seed)).to_bytes(8, "little")
    if name == "xxh3":
        return lambda b: xxhash.xxh3_64_intdigest(b, seed=_seed64(seed)).to_bytes(8, "little")
    if name == "xxh128":
        def h128(b: bytes) -> bytes:
            v = xxhash.xxh3_128_intdigest(b, seed=_seed64(seed))
            return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + (v >> 64).to_bytes(8, "little")
        return h128
    if name in ("md5", "sha1"):
        algo = name
        return lambda b: hashlib.new(algo, s4 + b).digest()
    raise LocalProtocolError(f"unsupported transfer checksum {name!r}")


class FileHasher:
    """checksum.c sum_init/sum_update/sum_end for the whole-file sum sent after each file's tokens."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._h: object
        if name == "xxh64":
            self._h = xxhash.xxh64(seed=0)
        elif name == "xxh3":
            self._h = xxhash.xxh3_64(seed=0)
        elif name == "xxh128":
            self._h = xxhash.xxh3_128(seed=0)
        elif name in ("md5", "sha1"):
            self._h = hashlib.new(name)
        else:
            raise LocalProtocolError(f"unsupported file checksum {name!r}")

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)  # type: ignore[attr-defined]

    def digest(self) -> bytes:
        if self.name in ("xxh64", "xxh3"):
            return int(self._h.intdigest()).to_bytes(8, "little")  # type: ignore[attr-defined]
        if self.name == "xxh128":
            v = int(self._h.intdigest())  # type: ignore[attr-defined]
            return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + (v >> 64).to_bytes(8, "little")
        return bytes(self._h.digest())  # type: ignore[attr-defined]


def file_checksum(name: str, data: bytes | memoryview) -> bytes:
    """The whole-file sum of ``data`` in one call (FileHasher's digest, without a hasher object for xxh*)."""
    if name == "xxh128":
        # rsync writes the low 64 bits, then the high 64, each little endian: the canonical (big-endian) digest
        # reversed, without the int round trip
        return xxhash.xxh3_128_digest(data)[::-1]
    if name == "xxh3":
        return xxhash.xxh3_64_intdigest(data).to_bytes(8, "little")
    if name == "xxh64":
        return xxhash.xxh64_intdigest(data).to_bytes(8, "little")
    h = FileHasher(name)
    h.update(data)
    return h.digest()


# --- daemon authentication -----------------------------------------------------------------------------------


def auth_response(digest: str, password: bytes, challenge: bytes) -> bytes:
    """authenticate.c generate_hash: base64 (no padding) of digest(password + challenge)."""
    if digest not in AUTH_NAMES:
        raise LocalProtocolError(f"unsupported auth digest {digest!r}")
    raw = hashlib.new(digest, password + challenge).digest()
    return base64.b64encode(raw).rstrip(b"=")

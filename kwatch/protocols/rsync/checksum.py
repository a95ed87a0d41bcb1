"""rsync checksums: the negotiated strong checksums, name negotiation, daemon auth (the weak one: weak.py).

Pure (hashlib, xxhash; no numpy, so that a transfer that sends whole files does not import it). Follows rsync's checksum.c: ``get_checksum1`` (sums of *signed* bytes,
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

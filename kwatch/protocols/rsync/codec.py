"""rsync wire primitives: fixed ints, varint/varlong, vstrings, file-list indexes and the multiplex framing.

Pure: encoders return bytes; decoders read from a :class:`Reader` over bytes already received and raise
:class:`NeedMore` when the message is not complete yet, so a caller can retry after more bytes arrive (that is
how every parser here is fed byte by byte). Values from the peer that cannot be valid raise
:class:`~kwatch.protocols.errors.RemoteProtocolError`.

Wire facts follow rsync's io.c (``write_int``, ``write_varint``, ``write_varlong``, ``write_vstring``,
``write_ndx``/``read_ndx``) and rsync.h (``MPLEX_BASE``, ``MSG_*``, ``NDX_*``). All integers are little endian.
"""

from __future__ import annotations

import enum
import struct

from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError

MPLEX_BASE = 7
MAX_FRAME = 0xFFFFFF
CHUNK_SIZE = 32 * 1024  # rsync.h CHUNK_SIZE: largest literal run per token header

NDX_DONE = -1
NDX_FLIST_EOF = -2
NDX_DEL_STATS = -3
NDX_FLIST_OFFSET = -101


class Msg(enum.IntEnum):
    """Multiplexed message codes (rsync.h ``enum msgcode``)."""

    DATA = 0
    ERROR_XFER = 1
    INFO = 2
    ERROR = 3
    WARNING = 4
    ERROR_SOCKET = 5
    LOG = 6
    CLIENT = 7
    ERROR_UTF8 = 8
    REDO = 9
    STATS = 10
    IO_ERROR = 22
    IO_TIMEOUT = 33
    NOOP = 42
    ERROR_EXIT = 86
    SUCCESS = 100
    DELETED = 101
    NO_SEND = 102


class NeedMore(Exception):
    """The buffer ends before the value does; retry once more bytes have arrived."""


class Reader:
    """A cursor over received bytes. Reads past the end raise :class:`NeedMore` without consuming."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | bytearray, pos: int = 0) -> None:
        self.buf = buf  # not copied: the caller drops the consumed prefix only after parsing
        self.pos = pos

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0:
            raise RemoteProtocolError(f"negative length {n} on the wire")
        if self.pos + n > len(self.buf):
            raise NeedMore
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise NeedMore
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        """``fmt`` read in place (no copy of the bytes)."""
        if self.pos + fmt.size > len(self.buf):
            raise NeedMore
        out = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return out

    def line(self, limit: int = 4096) -> bytes:
        """A ``\\n``-terminated line without the newline (carriage returns stripped, as read_line_old does)."""
        end = self.buf.find(b"\n", self.pos)
        if end < 0:
            if len(self.buf) - self.pos > limit:
                raise RemoteProtocolError(f"line longer than {limit} bytes from the peer")
            raise NeedMore
        if end - self.pos > limit:
            raise RemoteProtocolError(f"line longer than {limit} bytes from the peer")
        out = bytes(self.buf[self.pos : end])
        self.pos = end + 1
        return out.replace(b"\r", b"")


# --- fixed-size integers -------------------------------------------------------------------------------------


def enc_int(x: int) -> bytes:
    """A signed 32-bit int (io.c write_int)."""
    if not -(2**31) <= x < 2**31:
        raise LocalProtocolError(f"int32 out of range: {x}")
    return struct.pack("<i", x)


_I32 = struct.Struct("<i")
_BYTES = tuple(bytes((i,)) for i in range(256))
_U16 = struct.Struct("<H")


def dec_int(r: Reader) -> int:
    return int(r.unpack(_I32)[0])


def enc_shortint(x: int) -> bytes:
    if not 0 <= x <= 0xFFFF:
        raise LocalProtocolError(f"uint16 out of range: {x}")
    return struct.pack("<H", x)


def dec_shortint(r: Reader) -> int:
    return int(r.unpack(_U16)[0])


def enc_longint(x: int) -> bytes:
    """io.c write_longint (protocol < 30 sizes): 4 bytes, or 0xFFFFFFFF then 8 bytes."""
    if 0 <= x <= 0x7FFFFFFF:
        return struct.pack("<i", x)
    return b"\xff\xff\xff\xff" + struct.pack("<q", x)


def dec_longint(r: Reader) -> int:
    x = dec_int(r)
    if x != -1:
        return x
    return int(struct.unpack("<q", r.take(8))[0])


# --- variable-length integers --------------------------------------------------------------------------------

# io.c int_byte_extra: how many bytes follow, indexed by the first byte / 4.
_INT_BYTE_EXTRA = bytes([0] * 32 + [1] * 16 + [2] * 8 + [3] * 4 + [4, 4, 5, 6])


def enc_varlong(x: int, min_bytes: int) -> bytes:
    """io.c write_varlong: the low ``min_bytes - 1`` bytes verbatim after a lead byte whose high bits count the
    extra bytes; values are 64-bit two's complement."""
    if not 1 <= min_bytes <= 8:
        raise LocalProtocolError(f"bad varlong min_bytes {min_bytes}")
    if not -(2**63) <= x < 2**63:
        raise LocalProtocolError(f"int64 out of range: {x}")
    b = bytearray(1) + bytearray((x & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
    cnt = 8
    while cnt > min_bytes and b[cnt] == 0:
        cnt -= 1
    bit = 1 << (7 - cnt + min_bytes)
    if b[cnt] >= bit:
        cnt += 1
        b[0] = ~(bit - 1) & 0xFF
    elif cnt > min_bytes:
        b[0] = (b[cnt] | ~(bit * 2 - 1)) & 0xFF
    else:
        b[0] = b[cnt]
    return bytes(b[:cnt])


def dec_varlong(r: Reader, min_bytes: int) -> int:
    head = r.take(min_bytes)
    extra = _INT_BYTE_EXTRA[head[0] // 4]
    if min_bytes + extra > 9:
        raise RemoteProtocolError("varlong overflow from the peer")
    body = bytearray(head[1:])
    if extra:
        bit = 1 << (8 - extra)
        body += r.take(extra)
        body.append(head[0] & (bit - 1))
    else:
        body.append(head[0])
    body = body[:8] + bytearray(max(0, 8 - len(body)))
    return int.from_bytes(bytes(body[:8]), "little", signed=True)


def enc_varint(x: int) -> bytes:
    """io.c write_varint: like a varlong with min_bytes 1 over a 32-bit value."""
    if not -(2**31) <= x < 2**31:
        raise LocalProtocolError(f"int32 out of range: {x}")
    b = bytearray(1) + bytearray((x & 0xFFFFFFFF).to_bytes(4, "little"))
    cnt = 4
    while cnt > 1 and b[cnt] == 0:
        cnt -= 1
    bit = 1 << (8 - cnt)
    if b[cnt] >= bit:
        cnt += 1
        b[0] = ~(bit - 1) & 0xFF
    elif cnt > 1:
        b[0] = (b[cnt] | ~(bit * 2 - 1)) & 0xFF
    else:
        b[0] = b[1]
    return bytes(b[:cnt])


def dec_varint(r: Reader) -> int:
    ch = r.byte()
    extra = _INT_BYTE_EXTRA[ch // 4]
    if extra >= 5:
        raise RemoteProtocolError("varint overflow from the peer")
    body = bytearray(5)
    if extra:
        bit = 1 << (8 - extra)
        body[:extra] = r.take(extra)
        body[extra] = ch & (bit - 1)
    else:
        body[0] = ch
    return int.from_bytes(bytes(body[:4]), "little", signed=True)


def dec_varint_bounded(r: Reader, lo: int, hi: int, what: str) -> int:
    v = dec_varint(r)
    if not lo <= v <= hi:
        raise RemoteProtocolError(f"{what} out of range from the peer: {v} not in [{lo}, {hi}]")
    return v


def dec_int_bounded(r: Reader, lo: int, hi: int, what: str) -> int:
    v = dec_int(r)
    if not lo <= v <= hi:
        raise RemoteProtocolError(f"{what} out of range from the peer: {v} not in [{lo}, {hi}]")
    return v


def enc_varint30(x: int, protocol: int) -> bytes:
    return enc_int(x) if protocol < 30 else enc_varint(x)


def enc_varlong30(x: int, min_bytes: int, protocol: int) -> bytes:
    return enc_longint(x) if protocol < 30 else enc_varlong(x, min_bytes)


def dec_varint30(r: Reader, protocol: int) -> int:
    return dec_int(r) if protocol < 30 else dec_varint(r)


def dec_varlong30(r: Reader, min_bytes: int, protocol: int) -> int:
    return dec_longint(r) if protocol < 30 else dec_varlong(r, min_bytes)


# --- strings -------------------------------------------------------------------------------------------------


def enc_vstring(s: bytes) -> bytes:
    """io.c write_vstring: 1 length byte, or 2 (high byte | 0x80 first) for 128..32767 bytes."""
    n = len(s)
    if n > 0x7FFF:
        raise LocalProtocolError(f"vstring too long ({n} > 32767)")
    if n > 0x7F:
        return bytes([n // 0x100 + 0x80, n & 0xFF]) + s
    return bytes([n]) + s


def dec_vstring(r: Reader, limit: int = 0x7FFF) -> bytes:
    n = r.byte()
    if n & 0x80:
        n = (n & 0x7F) * 0x100 + r.byte()
    if n > limit:
        raise RemoteProtocolError(f"vstring of {n} bytes exceeds the limit {limit}")
    return r.take(n)


# --- file-list indexes ---------------------------------------------------------------------------------------


class NdxCodec:
    """io.c write_ndx/read_ndx for protocol >= 30: deltas against the previous positive / negative index.

    Each direction of a connection keeps its own state, so a session has one codec per direction.
    """

    def __init__(self, protocol: int) -> None:
        self.protocol = protocol
        self.prev_positive = -1
        self.prev_negative = 1

    def encode(self, ndx: int) -> bytes:
        if self.protocol < 30:
            return enc_int(ndx)
        diff = ndx - self.prev_positive
        if 0 < diff < 0xFE and ndx >= 0:  # the usual case, one byte: the next file of the list, or one a few on
            self.prev_positive = ndx
            return _BYTES[diff]
        if ndx == NDX_DONE:
            return b"\x00"
        out = bytearray()
        if ndx >= 0:
            diff = ndx - self.prev_positive
            self.prev_positive = ndx
        else:
            out.append(0xFF)
            ndx = -ndx
            diff = ndx - self.prev_negative
            self.prev_negative = ndx
        if 0 < diff < 0xFE:
            out.append(diff)
        elif diff < 0 or diff > 0x7FFF:
            out += bytes([0xFE, (ndx >> 24) | 0x80, ndx & 0xFF, (ndx >> 8) & 0xFF, (ndx >> 16) & 0xFF])
        else:
            out += bytes([0xFE, diff >> 8, diff & 0xFF])
        return bytes(out)

    def decode(self, r: Reader) -> int:
        """Decode one index. State only changes once the whole index was available."""
        if self.protocol < 30:
            return dec_int(r)
        b = r.byte()
        negative = False
        if b == 0xFF:
            b = r.byte()
            negative = True
        elif b == 0:
            return NDX_DONE
        prev = self.prev_negative if negative else self.prev_positive
        if b == 0xFE:
            hi, lo = r.take(2)
            if hi & 0x80:
                rest = r.take(2)
                num = (hi & 0x7F) << 24 | lo | rest[0] << 8 | rest[1] << 16
            else:
                num = (hi << 8) + lo + prev
        else:
            num = b + prev
        if num > 0x7FFFFFFF or num < 0:
            raise RemoteProtocolError(f"invalid file index {num} from the peer")
        if negative:
            self.prev_negative = num
            return -num
        self.prev_positive = num
        return num


# --- multiplex framing ---------------------------------------------------------------------------------------


def enc_frame(code: int, payload: bytes) -> bytes:
    """One multiplexed frame (io.c mplex_write): 4-byte header ``(MPLEX_BASE + code) << 24 | len``."""
    if len(payload) > MAX_FRAME:
        raise LocalProtocolError(f"frame payload too long: {len(payload)}")
    return struct.pack("<I", ((MPLEX_BASE + code) << 24) | len(payload)) + payload


def enc_data(payload: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """MSG_DATA frames carrying ``payload`` (split so no frame exceeds ``max_frame``)."""
    if not payload:
        return b""
    return b"".join(enc_frame(Msg.DATA, payload[i : i + max_frame]) for i in range(0, len(payload), max_frame))


class Demux:
    """Splits the multiplexed stream from the peer into (code, payload) frames; feed any number of bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 4:
            (head,) = struct.unpack_from("<I", buf, pos)
            tag = head >> 24
            length = head & 0xFFFFFF
            if tag < MPLEX_BASE:
                raise RemoteProtocolError(f"unexpected multiplex tag {tag} (header {head:#010x}) from the peer")
            if len(buf) - pos - 4 < length:
                break
            out.append((tag - MPLEX_BASE, bytes(buf[pos + 4 : pos + 4 + length])))
            pos += 4 + length
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)

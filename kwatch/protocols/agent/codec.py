"""Frames of the agent protocol: a 4-byte big-endian length, then msgpack ``[type code, *fields]``. Pure.

:func:`decode_frame_body` turns a frame body from the peer into a validated message (msgpack with limits first:
a frame is decoded whole before its type is known, so the decoder itself must be bounded); :func:`encode_frame`
checks our own message with the very checks the peer will run, then packs it.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from kwatch.protocols.agent.fields import MAX_FRAME, MAX_FRAME_OBJECTS, MAX_ITEMS, MAX_TEXT, Invalid
from kwatch.protocols.agent.messages import TYPE_CODES, TYPES_BY_CODE, Message, Pack, PutFiles, plain
from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["HEADER", "decode_frame_body", "encode_frame"]

HEADER: Final = struct.Struct(">I")


def _unpack(body: bytes) -> object:
    def no_ext(code: int, data: bytes) -> object:
        raise Invalid(f"msgpack extension type {code} is not used by this protocol")

    # unpackb reads one buffer, the frame, whose size MAX_FRAME bounds before any of it is read (what
    # max_buffer_size does for a streaming Unpacker); the per-type limits below bound each object.
    count = 0

    def budget(items: list[Any]) -> list[Any]:
        # Called as each array is complete: its elements and itself count. What is built before the limit trips is
        # bounded by MAX_FRAME_OBJECTS plus one array of max_array_len elements.
        nonlocal count
        count += len(items) + 1
        if count > MAX_FRAME_OBJECTS:
            raise Invalid(f"frame holds more than {MAX_FRAME_OBJECTS} msgpack objects")
        return items

    return msgpack.unpackb(
        body,
        raw=False,
        use_list=True,
        list_hook=budget,
        strict_map_key=True,
        max_bin_len=MAX_FRAME,
        max_str_len=MAX_TEXT,
        max_array_len=MAX_ITEMS,
        max_map_len=0,
        max_ext_len=0,
        ext_hook=no_ext,
    )


def decode_frame_body(body: bytes) -> Message:
    """Decode and validate one frame body (without its length prefix). Raises :class:`RemoteProtocolError`."""
    try:
        obj = _unpack(body)
    except Invalid as e:
        raise RemoteProtocolError(str(e)) from None
    except Exception as e:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError, ...)
        raise RemoteProtocolError(f"frame is not valid msgpack: {type(e).__name__}: {e}") from None
    if type(obj) is not list or not obj:
        raise RemoteProtocolError(f"frame must be a non-empty msgpack array, got {type(obj).__name__}")
    code = obj[0]
    cls = TYPES_BY_CODE.get(code) if type(code) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {code!r}")
    try:
        msg: Message = cls.from_wire(obj[1:])
    except Invalid as e:
        raise RemoteProtocolError(f"bad {cls.__name__}: {e}") from None
    return msg


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of ``n`` bytes (the smallest form, as msgpack.packb writes it)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _put_files_frame(code: int, msg: PutFiles) -> bytes:
    """The frame of a plain PutFiles, byte for byte what msgpack.packb makes of ``[code, files, data, None]``, with
    the files' data copied once, into the frame: packb would copy a frame's megabyte of data several times (joined,
    into its growing buffer, out of it, behind the length prefix), a large part of the sender's cost per byte."""
    head = msgpack.packb([code, msg.heads()], use_bin_type=True)
    size = sum(len(p.data) for p in msg.files)
    binh = _bin_header(size)
    # head is a 2-element array: make it a 4-element one (fixarray 0x92 -> 0x94), then the data, then nil (raw)
    length = len(head) + len(binh) + size + 1
    if length > MAX_FRAME:
        raise LocalProtocolError(f"PutFiles frame of {length} bytes exceeds {MAX_FRAME}; send smaller chunks")
    return b"".join((HEADER.pack(length), b"\x94", memoryview(head)[1:], binh, *(p.data for p in msg.files),
                     b"\xc0"))


def encode_frame(msg: Message, pack: Pack | None = None) -> bytes:
    """Validate ``msg`` exactly as a peer would and return its frame; ``pack`` compresses payloads (None: plain).
    Raises :class:`LocalProtocolError`."""
    cls = type(msg)
    code = TYPE_CODES.get(cls)
    if code is None:
        raise LocalProtocolError(f"not an agent protocol message: {msg!r}")
    try:
        if isinstance(msg, PutFiles):
            msg.check()  # the checks of from_wire, without joining and slicing the data
            if pack is None:
                return _put_files_frame(code, msg)
            fields = msg.to_wire(pack)
        else:
            fields = msg.to_wire(plain)
            cls.from_wire(fields)  # the same checks the peer will run: never send what it must reject
            if pack is not None:
                fields = msg.to_wire(pack)
        body = msgpack.packb([code, *fields], use_bin_type=True)
    except Invalid as e:
        raise LocalProtocolError(f"invalid {cls.__name__}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: {e}") from None
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(
            f"{cls.__name__} frame of {len(body)} bytes exceeds {MAX_FRAME}; send smaller chunks"
        )
    return HEADER.pack(len(body)) + bytes(body)

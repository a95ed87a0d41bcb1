"""The agent protocol's limits and the checks of single wire fields. Pure.

Each check takes a value as msgpack decoded it and returns it typed, or raises :class:`Invalid` (which the codec
turns into a Remote or Local protocol error, depending on whose message it was). The factories (:func:`integer`,
:func:`relpath`, ...) make the per-field checks that the messages list beside their field names.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import zstandard

from kwatch.paths import PATH_MAX, UnsafePathError, check_relpath

#: Largest frame body accepted or sent. A length prefix above it is rejected before any of the body is buffered.
MAX_FRAME: Final = 64 << 20
#: Largest decompressed payload of one chunk (a zstd frame claiming more is rejected while decompressing).
MAX_CHUNK: Final = 64 << 20
#: Most files one PutFiles frame may carry.
MAX_FILES_PER_FRAME: Final = 4096
U64: Final = (1 << 64) - 1
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1
U32: Final = (1 << 32) - 1
#: Block sizes a SigRequest may ask for. rsync's receiver never picks blocks under 700 bytes (BLOCK_SIZE) nor over
#: 128 KiB (MAX_BLOCK_SIZE, protocol >= 30); 512 keeps a peer from asking for a signature that is a byte-by-byte
#: image of the file (20 bytes of sums per byte: blocks of 1 would make a reply 20 times the file's size).
SIG_BLOCK_MIN: Final = 512
SIG_BLOCK_MAX: Final = 1 << 17
#: Most blocks one signature may have (20 bytes each on the wire and in memory: 40 MiB). A receiver with a larger
#: file answers with larger blocks (Signature's block size may go up to 16 MiB).
MAX_SIG_BLOCKS: Final = 1 << 21
#: Most signature ids requested and not yet used by a DeltaBegin: each one is state kept on both ends.
MAX_OPEN_SIGS: Final = 1 << 18
MAX_TEXT: Final = 64 << 10
MAX_ITEMS: Final = 1 << 20
#: Most msgpack objects one frame may decode to. A frame is decoded whole before its type is known, and an object
#: costs far more in memory than on the wire (an empty array: 1 byte, about 64 in Python: a frame of MAX_FRAME
#: bytes of them would be gigabytes). The largest legitimate frames (an Ack listing many failed paths, a
#: ManifestEntries chunk, a PutFiles or DeltaChunk frame) stay well under this.
MAX_FRAME_OBJECTS: Final = 1 << 20

Check: TypeAlias = Callable[[object], Any]


class Invalid(ValueError):
    """A field failed validation; turned into a Remote or Local protocol error by the caller."""


def check_int(v: object, name: str, lo: int = 0, hi: int = U64) -> int:
    if type(v) is not int:  # bool is an int subclass; msgpack booleans are not integers here
        raise Invalid(f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise Invalid(f"{name} {v} outside {lo}..{hi}")
    return v


def check_opt_int(v: object, name: str, lo: int = 0, hi: int = U64) -> int | None:
    return None if v is None else check_int(v, name, lo, hi)


def check_bytes(v: object, name: str, max_len: int = MAX_FRAME) -> bytes:
    if type(v) is not bytes:
        raise Invalid(f"{name} must be bytes, got {type(v).__name__}")
    if len(v) > max_len:
        raise Invalid(f"{name} of {len(v)} bytes exceeds {max_len}")
    return v


def check_text(v: object, name: str) -> str:
    if type(v) is not str:
        raise Invalid(f"{name} must be a string, got {type(v).__name__}")
    if len(v) > MAX_TEXT:
        raise Invalid(f"{name} longer than {MAX_TEXT} characters")
    return v


def check_path(v: object, name: str = "path") -> bytes:
    try:
        return check_relpath(v)
    except UnsafePathError as e:
        raise Invalid(f"{name}: {e}") from None


def check_digest(v: object, name: str = "digest") -> bytes | None:
    if v is None:
        return None
    d = check_bytes(v, name, 64)
    if len(d) != 16:
        raise Invalid(f"{name} must be 16 bytes (xxh3_128), got {len(d)}")
    return d


def check_mode(v: object, name: str = "mode") -> int:
    return check_int(v, name, 0, 0o7777)


def check_list(v: object, name: str) -> list[Any]:
    if type(v) is not list:
        raise Invalid(f"{name} must be an array, got {type(v).__name__}")
    return v


def check_symlink_target(v: object) -> bytes:
    t = check_bytes(v, "symlink target", PATH_MAX)
    if not t or b"\0" in t:
        raise Invalid(f"symlink target must be non-empty without NUL, got {t!r}")
    return t


def check_fields(f: list[Any], n: int, name: str) -> None:
    if len(f) != n:
        raise Invalid(f"{name} needs {n} fields, got {len(f)}")


# The factories the messages use to declare their fields: each returns the check of one named field.


def integer(name: str, lo: int = 0, hi: int = U64) -> Check:
    return lambda v: check_int(v, name, lo, hi)


def opt_integer(name: str, lo: int = 0, hi: int = U64) -> Check:
    return lambda v: check_opt_int(v, name, lo, hi)


def boolean(name: str) -> Check:
    def check(v: object) -> bool:
        if type(v) is not bool:
            raise Invalid(f"{name} must be a boolean, got {type(v).__name__}")
        return v

    return check


def text(name: str) -> Check:
    return lambda v: check_text(v, name)


def relpath(name: str = "path") -> Check:
    return lambda v: check_path(v, name)


def opt_relpath(name: str) -> Check:
    return lambda v: None if v is None else check_path(v, name)


def digest(name: str = "digest") -> Check:
    return lambda v: check_digest(v, name)


def mode(name: str = "mode") -> Check:
    return lambda v: check_mode(v, name)


def opt_mode(name: str = "mode") -> Check:
    return lambda v: None if v is None else check_mode(v, name)


def raw_bytes(name: str, max_len: int = MAX_FRAME) -> Check:
    return lambda v: check_bytes(v, name, max_len)


def symlink_target() -> Check:
    return check_symlink_target


def _decompress(blob: bytes, raw_len: int) -> bytes:
    # Read at most raw_len + 1 bytes so a zstd bomb cannot make us allocate more than the declared size.
    try:
        out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read(raw_len + 1)
    except zstandard.ZstdError as e:
        raise Invalid(f"zstd data does not decompress: {e}") from None
    if len(out) != raw_len:
        raise Invalid(
            f"zstd data decompresses to {'more' if len(out) > raw_len else len(out)} bytes, declared {raw_len}"
        )
    return out


def check_payload(data: object, raw_len: object, name: str) -> bytes:
    """A payload is two wire fields: the bytes, and their length before zstd (None: sent plain)."""
    blob = check_bytes(data, name)
    if raw_len is None:
        return blob
    return _decompress(blob, check_int(raw_len, f"{name} raw length", 0, MAX_CHUNK))

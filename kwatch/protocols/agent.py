"""The kwatch agent protocol, sans-IO: length-prefixed msgpack frames between a sender and a receiver (mirror agent).

This module owns the wire format, the message types, their validation, and the per-connection state machine. It
does no I/O: feed received bytes to :meth:`AgentConnection.receive_data`, pull typed messages from
:meth:`AgentConnection.next_event`, and turn messages into bytes to write with :meth:`AgentConnection.send`
(modelled on h11). Compression (zstd) of file data is done here because it is part of the wire format; applying
operations to a filesystem is the receiver's job (which should use :func:`check_relpath` again before any syscall).

Wire format: each frame is a 4-byte big-endian length, then that many bytes of msgpack: an array whose first item is
the message type code and whose other items are the message's fields, in order. Paths are msgpack ``bin`` (bytes),
relative to the target root; text (codes, messages, capabilities) is ``str``.

Conversation (the *sender* holds the source tree, the *receiver* is the mirror)::

    both:      Hello(version, capabilities, role)                       -> negotiated: min version, common caps
    sender:    ManifestRequest(id)            receiver: ManifestEntries(id, entries, done) ... (streamed)
    sender:    SigRequest(id, path)           receiver: Signature(id, ..., done) ...         (streamed)
    sender:    Mkdir | PutFile | PutBegin PutChunk* PutEnd | DeltaBegin(sig_id) DeltaChunk* DeltaEnd | Rename | Delete
               | Symlink | Hardlink | SetAttr ...  Commit(seq)
    receiver:  Ack(seq, per-path errors)      (commits are acknowledged in order; several may be in flight)
    either:    Error(code, message, path)     fatal: the connection is closed after it

Every frame from the peer is checked before it becomes an event: length cap before the body is read, msgpack with
limits, exact field types and ranges, relative-path safety, message direction, state, and request/response
correlation. Anything wrong is a :class:`~kwatch.protocols.errors.RemoteProtocolError`; misuse on our side is a
:class:`~kwatch.protocols.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, TypeAlias

import msgpack
import zstandard

from kwatch.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from kwatch.replicate.delta import Copy, Literal

__all__ = [
    "CAPABILITIES",
    "MAX_FILES_PER_FRAME",
    "MAX_FRAME",
    "MAX_FRAME_OBJECTS",
    "MAX_OPEN_SIGS",
    "MAX_SIG_BLOCKS",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SIG_BLOCK_MAX",
    "SIG_BLOCK_MIN",
    "Ack",
    "AgentConnection",
    "Commit",
    "ConnectionClosed",
    "Copy",
    "Delete",
    "DeltaBegin",
    "DeltaChunk",
    "DeltaEnd",
    "Entry",
    "EntryType",
    "Error",
    "Hardlink",
    "Hello",
    "Literal",
    "ManifestEntries",
    "ManifestRequest",
    "Message",
    "Mkdir",
    "NeedData",
    "PathError",
    "PutBegin",
    "PutChunk",
    "PutEnd",
    "PutFile",
    "PutFiles",
    "Rename",
    "Role",
    "SetAttr",
    "SigRequest",
    "Signature",
    "State",
    "Symlink",
    "UnsafePathError",
    "check_relpath",
    "decode_frame_body",
    "encode_frame",
]

PROTOCOL_VERSION: Final = 1
MIN_VERSION: Final = 1
#: Capabilities this implementation understands; the negotiated set is the intersection of both Hellos.
#: ``inodes``: manifest entries say which paths are one inode (``nlink`` and a link id), so a reconcile can keep and
#: break hard links; ``linkcheck``: a Hardlink may carry the size and mtime its existing name must have.
CAPABILITIES: Final = frozenset({"zstd", "delta", "hardlink", "xxh3", "putfiles", "inodes", "linkcheck"})
#: Largest frame body accepted or sent. A length prefix above it is rejected before any of the body is buffered.
MAX_FRAME: Final = 64 << 20
#: Largest decompressed payload of one chunk (a zstd frame claiming more is rejected while decompressing).
MAX_CHUNK: Final = 64 << 20
#: Most files one PutFiles frame may carry.
MAX_FILES_PER_FRAME: Final = 4096
PATH_MAX: Final = 4096  # Linux PATH_MAX, including the terminating NUL the kernel counts
NAME_MAX: Final = 255
_U64: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_U32: Final = (1 << 32) - 1
#: Block sizes a SigRequest may ask for. rsync's receiver never picks blocks under 700 bytes (BLOCK_SIZE) nor over
#: 128 KiB (MAX_BLOCK_SIZE, protocol >= 30); 512 keeps a peer from asking for a signature that is a byte-by-byte
#: image of the file (20 bytes of sums per byte: a 4 MiB file became an 80 MiB reply with blocks of 1).
SIG_BLOCK_MIN: Final = 512
SIG_BLOCK_MAX: Final = 1 << 17
#: Most blocks one signature may have (20 bytes each on the wire and in memory: 40 MiB). A receiver with a larger
#: file answers with larger blocks (Signature's block size may go up to 16 MiB).
MAX_SIG_BLOCKS: Final = 1 << 21
#: Most signature ids requested and not yet used by a DeltaBegin: each one is state kept on both ends.
MAX_OPEN_SIGS: Final = 1 << 18
_MAX_TEXT: Final = 64 << 10
_MAX_ITEMS: Final = 1 << 20
#: Most msgpack objects one frame may decode to. A frame is decoded whole before its type is known, and an object
#: costs far more in memory than on the wire (an empty array: 1 byte, about 64 in Python; an 8 MiB frame of them
#: took 643 MiB). The largest legitimate frames (an Ack listing many failed paths, a ManifestEntries chunk, a
#: PutFiles or DeltaChunk frame) stay well under this.
MAX_FRAME_OBJECTS: Final = 1 << 20
_HEADER = struct.Struct(">I")


class UnsafePathError(ValueError):
    """A relative path that could escape or confuse the target root."""


def plain_relpath(path: bytes) -> bool:
    """The common case of :func:`check_relpath` in a few scans of the whole path instead of a loop over its
    components (it ran for every file on both ends of a tar extraction): True only for a path that the full check
    accepts; anything else (including every path longer than NAME_MAX) goes through the full check.
    """
    if not 0 < len(path) <= NAME_MAX or path[0] == 0x2F or path[-1] == 0x2F or b"\0" in path or b"//" in path:
        return False
    if b"." not in path:
        return True
    wrapped = b"/" + path + b"/"
    return b"/./" not in wrapped and b"/../" not in wrapped


def check_relpath(path: object) -> bytes:
    """Return ``path`` if it is a safe path relative to the target root, else raise :class:`UnsafePathError`.

    Safe means: ``bytes``; not empty; not absolute; no NUL; no empty component (``a//b``, trailing ``/``); no ``.``
    or ``..`` component; each component at most NAME_MAX bytes and the whole under PATH_MAX. This is lexical only:
    the receiver must still refuse to follow symlinks inside the root when it resolves the path (O_NOFOLLOW /
    openat2 RESOLVE_BENEATH), which no byte check can do for it.
    """
    if type(path) is bytes and plain_relpath(path):
        return path
    if not isinstance(path, bytes):
        raise UnsafePathError(f"path must be bytes, not {type(path).__name__}")
    if not path:
        raise UnsafePathError("empty path")
    if len(path) >= PATH_MAX:
        raise UnsafePathError(f"path of {len(path)} bytes is longer than PATH_MAX: {path[:64]!r}...")
    if b"\0" in path:
        raise UnsafePathError(f"NUL byte in path {path!r}")
    if path.startswith(b"/"):
        raise UnsafePathError(f"absolute path {path!r} (paths are relative to the target root)")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            what = "empty component" if not part else f"{part.decode()!r} component"
            raise UnsafePathError(f"{what} in path {path!r}")
        if len(part) > NAME_MAX:
            raise UnsafePathError(f"component longer than NAME_MAX in path {path[:64]!r}...")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------------


class Role(enum.StrEnum):
    SENDER = "sender"  # holds the source tree, drives the conversation
    RECEIVER = "receiver"  # the mirror agent, applies operations


class EntryType(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    OTHER = 4  # device, fifo, socket: reported so a scan can say it skipped them


@dataclass(frozen=True, slots=True)
class Entry:
    """One object of a manifest (a scan of the receiver's tree). ``target`` only for symlinks.

    With the ``inodes`` capability a regular file with several names has ``nlink`` > 1 and a ``link`` id, the same
    for every name of that inode within one manifest (ids mean nothing across manifests); the entries of one id
    agree on size, mtime, mode, owner and nlink, and there are at most ``nlink`` of them. Otherwise ``nlink`` is 1
    and ``link`` None. On the wire the two fields follow ``hash`` only when ``nlink`` is not 1.
    """

    type: EntryType
    relpath: bytes
    size: int
    mtime_ns: int
    mode: int  # permission bits (st_mode & 0o7777)
    uid: int
    gid: int
    target: bytes | None = None
    hash: bytes | None = None  # xxh3_128 of the content when the request asked for hashes
    nlink: int = 1
    link: int | None = None


@dataclass(frozen=True, slots=True)
class PathError:
    """A per-path failure reported in an :class:`Ack` (the batch went on without it)."""

    relpath: bytes
    code: str  # errno name such as "EACCES", or a kwatch code such as "digest-mismatch"
    message: str


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    capabilities: frozenset[str]
    role: Role


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    id: int
    relpath: bytes | None = None  # None: the whole target root
    hashes: bool = False


@dataclass(frozen=True, slots=True)
class ManifestEntries:
    id: int
    entries: tuple[Entry, ...]
    done: bool


@dataclass(frozen=True, slots=True)
class Mkdir:
    relpath: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class PutBegin:
    """A whole file follows in :class:`PutChunk` s; the receiver writes it under a temporary name."""

    relpath: bytes
    size: int
    mode: int


@dataclass(frozen=True, slots=True)
class PutChunk:
    data: bytes  # always the plain bytes in events; zstd on the wire when negotiated and worthwhile


@dataclass(frozen=True, slots=True)
class PutEnd:
    digest: bytes | None = None  # xxh3_128 of the whole content


@dataclass(frozen=True, slots=True)
class PutFile:
    """A whole small file in one frame, with its mode and mtime: one frame instead of begin/chunk/end/setattr, which
    is most of the per-file cost when thousands of small files arrive (a tar extraction)."""

    relpath: bytes
    mode: int
    mtime_ns: int | None
    data: bytes  # plain bytes in events; zstd on the wire when negotiated and worthwhile
    digest: bytes | None = None  # xxh3_128 of data


@dataclass(frozen=True, slots=True)
class PutFiles:
    """Many small files in one frame (capability ``putfiles``): a tar extraction is thousands of small files, and
    one frame each (with its header, state check and decode) was a large part of the cost per file on both ends.

    On the wire: a list of ``[relpath, mode, mtime_ns, size, digest]`` and one payload holding every file's data
    back to back (a payload as in PutChunk: the receiver accepts zstd there, our sender sends it plain)."""

    files: tuple[PutFile, ...]


@dataclass(frozen=True, slots=True)
class SigRequest:
    id: int
    relpath: bytes
    block_size: int | None = None  # None: the receiver chooses (about sqrt of its file size)


@dataclass(frozen=True, slots=True)
class Signature:
    """A piece of the block signature of the receiver's copy; pieces of one ``id`` arrive in order.

    ``weak`` is little-endian uint32 per block and ``strong`` 16 bytes per block (see
    :meth:`kwatch.replicate.delta.Signature.from_wire`). An absent file is a signature of ``file_size`` 0.
    """

    id: int
    block_size: int
    file_size: int
    seed: int
    weak: bytes
    strong: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class DeltaBegin:
    """A delta against the receiver's copy whose signature was ``sig_id`` follows in :class:`DeltaChunk` s."""

    relpath: bytes
    sig_id: int
    size: int
    mode: int


@dataclass(frozen=True, slots=True)
class DeltaChunk:
    ops: tuple[Copy | Literal, ...]


@dataclass(frozen=True, slots=True)
class DeltaEnd:
    digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Rename:
    src: bytes
    dst: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    relpath: bytes
    recursive: bool = False  # a whole tree


@dataclass(frozen=True, slots=True)
class Symlink:
    relpath: bytes
    target: bytes  # the link's content, stored as is (it may be absolute or hold ..; it is never followed)


@dataclass(frozen=True, slots=True)
class Hardlink:
    """Make ``relpath`` another name of ``target``. With ``size``/``mtime_ns`` (capability ``linkcheck``; both or
    neither) the receiver links only when ``target`` is a regular file of that size and mtime, else it reports
    ``ESTALE`` for ``relpath`` and changes nothing: the sender's belief about what the mirror holds is checked
    where the mirror is."""

    relpath: bytes  # the new name
    target: bytes  # an existing path under the root
    size: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class SetAttr:
    relpath: bytes
    mode: int | None = None
    mtime_ns: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    seq: int


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    errors: tuple[PathError, ...] = ()


@dataclass(frozen=True, slots=True)
class Error:
    """Fatal error; the connection is closed after it is sent or received."""

    code: str
    message: str
    path: bytes | None = None


Message: TypeAlias = (
    Hello
    | ManifestRequest
    | ManifestEntries
    | Mkdir
    | PutBegin
    | PutChunk
    | PutEnd
    | PutFile
    | PutFiles
    | SigRequest
    | Signature
    | DeltaBegin
    | DeltaChunk
    | DeltaEnd
    | Rename
    | Delete
    | Symlink
    | Hardlink
    | SetAttr
    | Commit
    | Ack
    | Error
)

TYPE_CODES: Final[dict[type[Any], int]] = {
    Hello: 1,
    ManifestRequest: 2,
    ManifestEntries: 3,
    Mkdir: 4,
    PutBegin: 5,
    PutChunk: 6,
    PutEnd: 7,
    SigRequest: 8,
    Signature: 9,
    DeltaBegin: 10,
    DeltaChunk: 11,
    DeltaEnd: 12,
    Rename: 13,
    Delete: 14,
    Symlink: 15,
    Hardlink: 16,
    SetAttr: 17,
    Commit: 18,
    Ack: 19,
    Error: 20,
    PutFile: 21,
    PutFiles: 22,
}
TYPES_BY_CODE: Final = {code: cls for cls, code in TYPE_CODES.items()}

#: Which role may send which message.
SENDER_MESSAGES: Final = frozenset(
    {Hello, ManifestRequest, Mkdir, PutBegin, PutChunk, PutEnd, PutFile, PutFiles, SigRequest, DeltaBegin}
    | {DeltaChunk}
    | {DeltaEnd}
    | {Rename, Delete, Symlink, Hardlink, SetAttr, Commit, Error}
)
RECEIVER_MESSAGES: Final = frozenset({Hello, ManifestEntries, Signature, Ack, Error})


@dataclass(frozen=True, slots=True)
class NeedData:
    """``next_event`` needs more bytes."""


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream cleanly (EOF at a frame boundary)."""


# ---------------------------------------------------------------------------------------------------------------
# State machine: one state per direction, transitions as a table (as h11 does)
# ---------------------------------------------------------------------------------------------------------------


class State(enum.Enum):
    START = "start"  # no Hello yet
    READY = "ready"
    PUT = "put"  # inside PutBegin .. PutEnd
    DELTA = "delta"  # inside DeltaBegin .. DeltaEnd
    CLOSED = "closed"  # after Error or EOF
    ERROR = "error"  # after a protocol violation; nothing more is accepted


_SIMPLE: Final = (ManifestRequest, ManifestEntries, Mkdir, SigRequest, Signature, Rename, Delete, Symlink)
_SIMPLE2: Final = (Hardlink, SetAttr, Commit, Ack, PutFile, PutFiles)
TRANSITIONS: Final[dict[tuple[State, type[Any]], State]] = {
    (State.START, Hello): State.READY,
    **{(State.READY, cls): State.READY for cls in (*_SIMPLE, *_SIMPLE2)},
    (State.READY, PutBegin): State.PUT,
    (State.PUT, PutChunk): State.PUT,
    (State.PUT, PutEnd): State.READY,
    (State.READY, DeltaBegin): State.DELTA,
    (State.DELTA, DeltaChunk): State.DELTA,
    (State.DELTA, DeltaEnd): State.READY,
    **{(s, Error): State.CLOSED for s in (State.START, State.READY, State.PUT, State.DELTA)},
}


# ---------------------------------------------------------------------------------------------------------------
# Field validation and the codec
# ---------------------------------------------------------------------------------------------------------------


class _Invalid(ValueError):
    """A field failed validation; turned into a Remote or Local protocol error by the caller."""


def _int(v: object, name: str, lo: int = 0, hi: int = _U64) -> int:
    if type(v) is not int:  # bool is an int subclass; msgpack booleans are not integers here
        raise _Invalid(f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _Invalid(f"{name} {v} outside {lo}..{hi}")
    return v


def _opt_int(v: object, name: str, lo: int = 0, hi: int = _U64) -> int | None:
    return None if v is None else _int(v, name, lo, hi)


def _bool(v: object, name: str) -> bool:
    if type(v) is not bool:
        raise _Invalid(f"{name} must be a boolean, got {type(v).__name__}")
    return v


def _bytes(v: object, name: str, max_len: int = MAX_FRAME) -> bytes:
    if type(v) is not bytes:
        raise _Invalid(f"{name} must be bytes, got {type(v).__name__}")
    if len(v) > max_len:
        raise _Invalid(f"{name} of {len(v)} bytes exceeds {max_len}")
    return v


def _text(v: object, name: str) -> str:
    if type(v) is not str:
        raise _Invalid(f"{name} must be a string, got {type(v).__name__}")
    if len(v) > _MAX_TEXT:
        raise _Invalid(f"{name} longer than {_MAX_TEXT} characters")
    return v


def _path(v: object, name: str = "path") -> bytes:
    try:
        return check_relpath(v)
    except UnsafePathError as e:
        raise _Invalid(f"{name}: {e}") from None


def _opt_path(v: object, name: str) -> bytes | None:
    return None if v is None else _path(v, name)


def _digest(v: object, name: str = "digest") -> bytes | None:
    if v is None:
        return None
    d = _bytes(v, name, 64)
    if len(d) != 16:
        raise _Invalid(f"{name} must be 16 bytes (xxh3_128), got {len(d)}")
    return d


def _mode(v: object, name: str = "mode") -> int:
    return _int(v, name, 0, 0o7777)


def _list(v: object, name: str) -> list[Any]:
    if type(v) is not list:
        raise _Invalid(f"{name} must be an array, got {type(v).__name__}")
    return v


def _symlink_target(v: object) -> bytes:
    t = _bytes(v, "symlink target", PATH_MAX)
    if not t or b"\0" in t:
        raise _Invalid(f"symlink target must be non-empty without NUL, got {t!r}")
    return t


def _entry(v: object) -> Entry:
    f = _list(v, "manifest entry")
    if len(f) not in (9, 11):
        raise _Invalid(f"manifest entry needs 9 fields (11 with inode identity), got {len(f)}")
    code = _int(f[0], "entry type", 1, max(EntryType))
    kind = EntryType(code)
    target = None if f[7] is None else _symlink_target(f[7])
    if (kind is EntryType.SYMLINK) != (target is not None):
        raise _Invalid(
            f"manifest entry {f[1]!r}: a symlink target is required for symlinks and only for them"
        )
    nlink, link = 1, None
    if len(f) == 11:
        nlink = _int(f[9], "entry nlink", 2, _U32)
        link = _int(f[10], "entry link id", 1, _U64)
        if kind is not EntryType.FILE:
            raise _Invalid(f"manifest entry {f[1]!r}: only a regular file has an inode identity (nlink {nlink})")
    return Entry(
        kind,
        _path(f[1], "entry path"),
        _int(f[2], "entry size", 0, _I64_MAX),
        _int(f[3], "entry mtime_ns", _I64_MIN, _I64_MAX),
        _mode(f[4], "entry mode"),
        _int(f[5], "entry uid", 0, _U32),
        _int(f[6], "entry gid", 0, _U32),
        target,
        _digest(f[8], "entry hash"),
        nlink,
        link,
    )


def _path_error(v: object) -> PathError:
    f = _list(v, "path error")
    if len(f) != 3:
        raise _Invalid(f"path error needs 3 fields, got {len(f)}")
    return PathError(_path(f[0], "error path"), _text(f[1], "error code"), _text(f[2], "error message"))


def _decompress(blob: bytes, raw_len: int) -> bytes:
    # Read at most raw_len + 1 bytes so a zstd bomb cannot make us allocate more than the declared size.
    try:
        out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read(raw_len + 1)
    except zstandard.ZstdError as e:
        raise _Invalid(f"zstd data does not decompress: {e}") from None
    if len(out) != raw_len:
        raise _Invalid(
            f"zstd data decompresses to {'more' if len(out) > raw_len else len(out)} bytes, declared {raw_len}"
        )
    return out


def _payload(data: object, raw_len: object, name: str) -> bytes:
    blob = _bytes(data, name)
    if raw_len is None:
        return blob
    return _decompress(blob, _int(raw_len, f"{name} raw length", 0, MAX_CHUNK))


def _delta_ops(ops_v: object, blob: bytes) -> tuple[Copy | Literal, ...]:
    items = _list(ops_v, "delta ops")
    out: list[Copy | Literal] = []
    used = 0
    for item in items:
        if type(item) is int:
            n = _int(item, "literal length", 1, len(blob) - used)
            out.append(Literal(blob[used : used + n]))
            used += n
        else:
            pair = _list(item, "delta op")
            if len(pair) != 2:
                raise _Invalid(f"copy op needs [start, count], got {len(pair)} items")
            out.append(
                Copy(_int(pair[0], "copy start", 0, _I64_MAX), _int(pair[1], "copy count", 1, _I64_MAX))
            )
    if used != len(blob):
        raise _Invalid(f"delta literal lengths add up to {used}, but the chunk carries {len(blob)} bytes")
    return tuple(out)


def _put_files(items_v: object, blob: bytes) -> tuple[PutFile, ...]:
    items = _list(items_v, "files")
    if len(items) > MAX_FILES_PER_FRAME:
        raise _Invalid(f"{len(items)} files in one frame, at most {MAX_FILES_PER_FRAME}")
    out: list[PutFile] = []
    used = 0
    total = len(blob)
    for item in items:
        f = _list(item, "file")
        if len(f) != 5:
            raise _Invalid(f"a file of PutFiles needs 5 fields, got {len(f)}")
        path, mode, mtime, n, digest = f
        # the usual file passes inline tests; anything else gets the field checks (and their error messages)
        if not (
            type(path) is bytes and plain_relpath(path)
            and type(mode) is int and 0 <= mode <= 0o7777
            and type(mtime) is int and _I64_MIN <= mtime <= _I64_MAX
            and type(n) is int and 0 <= n <= total - used
            and type(digest) is bytes and len(digest) == 16
        ):
            n = _int(n, "file size", 0, total - used)
            path, mode = _path(path), _mode(mode)
            mtime = _opt_int(mtime, "mtime_ns", _I64_MIN, _I64_MAX)
            digest = _digest(digest)
        out.append(PutFile(path, mode, mtime, blob[used : used + n], digest))
        used += n
    if used != len(blob):
        raise _Invalid(f"file sizes add up to {used}, but the frame carries {len(blob)} bytes")
    return tuple(out)


def _check_put_files(msg: PutFiles) -> None:
    """What :func:`_put_files` checks on the peer, run on the sender's own message before it is encoded."""
    if len(msg.files) > MAX_FILES_PER_FRAME:
        raise _Invalid(f"{len(msg.files)} files in one frame, at most {MAX_FILES_PER_FRAME}")
    total = 0
    for p in msg.files:
        # the usual file passes inline tests; anything else gets the field checks (and their error messages)
        path, mode, mtime, digest, data = p.relpath, p.mode, p.mtime_ns, p.digest, p.data
        if not (
            type(path) is bytes and plain_relpath(path)
            and type(mode) is int and 0 <= mode <= 0o7777
            and type(mtime) is int and _I64_MIN <= mtime <= _I64_MAX
            and type(digest) is bytes and len(digest) == 16
            and type(data) is bytes
        ):
            _path(path)
            _mode(mode)
            _opt_int(mtime, "mtime_ns", _I64_MIN, _I64_MAX)
            _digest(digest)
            _bytes(data, "file data")
        total += len(data)
    if total > MAX_CHUNK:
        raise _Invalid(f"{total} bytes of file data in one frame, at most {MAX_CHUNK}")


def _need(f: list[Any], n: int, name: str) -> None:
    if len(f) != n:
        raise _Invalid(f"{name} needs {n} fields, got {len(f)}")


def _decode_hello(f: list[Any]) -> Hello:
    _need(f, 3, "Hello")
    caps = _list(f[1], "capabilities")
    if len(caps) > 256:
        raise _Invalid("too many capabilities")
    role = _text(f[2], "role")
    if role not in (Role.SENDER.value, Role.RECEIVER.value):
        raise _Invalid(f"unknown role {role!r}")
    return Hello(_int(f[0], "version", 0, _U32), frozenset(_text(c, "capability") for c in caps), Role(role))


def _decode(cls: type[Any], f: list[Any]) -> Message:
    name = cls.__name__
    if cls is Hello:
        return _decode_hello(f)
    if cls is ManifestRequest:
        _need(f, 3, name)
        return ManifestRequest(_int(f[0], "id"), _opt_path(f[1], "manifest path"), _bool(f[2], "hashes"))
    if cls is ManifestEntries:
        _need(f, 3, name)
        entries = _list(f[1], "entries")
        return ManifestEntries(_int(f[0], "id"), tuple(_entry(e) for e in entries), _bool(f[2], "done"))
    if cls is Mkdir:
        _need(f, 2, name)
        return Mkdir(_path(f[0]), _mode(f[1]))
    if cls is PutBegin:
        _need(f, 3, name)
        return PutBegin(_path(f[0]), _int(f[1], "size", 0, _I64_MAX), _mode(f[2]))
    if cls is PutFile:
        _need(f, 6, name)
        return PutFile(
            _path(f[0]),
            _mode(f[1]),
            _opt_int(f[2], "mtime_ns", _I64_MIN, _I64_MAX),
            _payload(f[3], f[4], "file data"),
            _digest(f[5]),
        )
    if cls is PutFiles:
        _need(f, 3, name)
        return PutFiles(_put_files(f[0], _payload(f[1], f[2], "files data")))
    if cls is PutChunk:
        _need(f, 2, name)
        return PutChunk(_payload(f[0], f[1], "chunk data"))
    if cls is PutEnd:
        _need(f, 1, name)
        return PutEnd(_digest(f[0]))
    if cls is SigRequest:
        _need(f, 3, name)
        return SigRequest(_int(f[0], "id"), _path(f[1]), _opt_int(f[2], "block size", SIG_BLOCK_MIN, SIG_BLOCK_MAX))
    if cls is Signature:
        _need(f, 7, name)
        weak = _bytes(f[4], "weak sums")
        strong = _bytes(f[5], "strong hashes")
        if len(weak) % 4 or len(strong) != 4 * len(weak):
            raise _Invalid(
                f"signature piece has {len(weak)} bytes of weak sums and {len(strong)} of strong hashes"
            )
        return Signature(
            _int(f[0], "id"),
            _int(f[1], "block size", 1, 1 << 24),
            _int(f[2], "file size", 0, _I64_MAX),
            _int(f[3], "seed"),
            weak,
            strong,
            _bool(f[6], "done"),
        )
    if cls is DeltaBegin:
        _need(f, 4, name)
        return DeltaBegin(
            _path(f[0]), _int(f[1], "signature id"), _int(f[2], "size", 0, _I64_MAX), _mode(f[3])
        )
    if cls is DeltaChunk:
        _need(f, 3, name)
        return DeltaChunk(_delta_ops(f[0], _payload(f[1], f[2], "delta literals")))
    if cls is DeltaEnd:
        _need(f, 1, name)
        return DeltaEnd(_digest(f[0]))
    if cls is Rename:
        _need(f, 2, name)
        src, dst = _path(f[0], "rename source"), _path(f[1], "rename destination")
        if dst == src or dst.startswith(src + b"/"):
            raise _Invalid(f"cannot rename {src!r} into itself ({dst!r})")
        return Rename(src, dst)
    if cls is Delete:
        _need(f, 2, name)
        return Delete(_path(f[0]), _bool(f[1], "recursive"))
    if cls is Symlink:
        _need(f, 2, name)
        return Symlink(_path(f[0]), _symlink_target(f[1]))
    if cls is Hardlink:
        if len(f) == 4:
            return Hardlink(_path(f[0], "link path"), _path(f[1], "link target"),
                            _int(f[2], "link size", 0, _I64_MAX), _int(f[3], "link mtime_ns", _I64_MIN, _I64_MAX))
        _need(f, 2, name)
        return Hardlink(_path(f[0], "link path"), _path(f[1], "link target"))
    if cls is SetAttr:
        _need(f, 5, name)
        return SetAttr(
            _path(f[0]),
            None if f[1] is None else _mode(f[1]),
            _opt_int(f[2], "mtime_ns", _I64_MIN, _I64_MAX),
            _opt_int(f[3], "uid", 0, _U32),
            _opt_int(f[4], "gid", 0, _U32),
        )
    if cls is Commit:
        _need(f, 1, name)
        return Commit(_int(f[0], "seq"))
    if cls is Ack:
        _need(f, 2, name)
        errors = _list(f[1], "errors")
        return Ack(_int(f[0], "seq"), tuple(_path_error(e) for e in errors))
    if cls is Error:
        _need(f, 3, name)
        return Error(_text(f[0], "error code"), _text(f[1], "error message"), _opt_path(f[2], "error path"))
    raise AssertionError(f"no decoder for {name}")  # pragma: no cover - TYPE_CODES and this function agree


def _fields(msg: Message, compress: Callable[[bytes], tuple[bytes, int | None]] | None) -> list[Any]:
    """The wire fields of ``msg`` (after the type code). ``compress`` packs chunk payloads when negotiated."""

    def payload(data: bytes) -> list[Any]:
        if compress is None:
            return [data, None]
        blob, raw = compress(data)
        return [blob, raw]

    if isinstance(msg, Hello):
        return [msg.version, sorted(msg.capabilities), str(msg.role)]
    if isinstance(msg, ManifestEntries):
        return [
            msg.id,
            [
                [int(e.type), e.relpath, e.size, e.mtime_ns, e.mode, e.uid, e.gid, e.target, e.hash]
                + ([] if e.nlink == 1 and e.link is None else [e.nlink, e.link])
                for e in msg.entries
            ],
            msg.done,
        ]
    if isinstance(msg, Hardlink):
        if msg.size is None and msg.mtime_ns is None:
            return [msg.relpath, msg.target]
        return [msg.relpath, msg.target, msg.size, msg.mtime_ns]
    if isinstance(msg, PutChunk):
        return payload(msg.data)
    if isinstance(msg, PutFile):
        return [msg.relpath, msg.mode, msg.mtime_ns, *payload(msg.data), msg.digest]
    if isinstance(msg, PutFiles):
        return [
            [[p.relpath, p.mode, p.mtime_ns, len(p.data), p.digest] for p in msg.files],
            *payload(b"".join(p.data for p in msg.files)),
        ]
    if isinstance(msg, DeltaChunk):
        ops: list[Any] = []
        lits: list[bytes] = []
        for op in msg.ops:
            if isinstance(op, Copy):
                ops.append([op.start, op.count])
            else:
                ops.append(len(op.data))
                lits.append(op.data)
        return [ops, *payload(b"".join(lits))]
    if isinstance(msg, Ack):
        return [msg.seq, [[e.relpath, e.code, e.message] for e in msg.errors]]
    out: list[Any] = []
    for fld in fields(msg):
        v = getattr(msg, fld.name)
        out.append(int(v) if isinstance(v, enum.IntEnum) else v)
    return out


def _unpack(body: bytes) -> object:
    def no_ext(code: int, data: bytes) -> object:
        raise _Invalid(f"msgpack extension type {code} is not used by this protocol")

    # unpackb reads one buffer, the frame, whose size MAX_FRAME bounds before any of it is read (what
    # max_buffer_size does for a streaming Unpacker); the per-type limits below bound each object.
    count = 0

    def budget(items: list[Any]) -> list[Any]:
        # Called as each array is complete: its elements and itself count. What is built before the limit trips is
        # bounded by MAX_FRAME_OBJECTS plus one array of max_array_len elements.
        nonlocal count
        count += len(items) + 1
        if count > MAX_FRAME_OBJECTS:
            raise _Invalid(f"frame holds more than {MAX_FRAME_OBJECTS} msgpack objects")
        return items

    return msgpack.unpackb(
        body,
        raw=False,
        use_list=True,
        list_hook=budget,
        strict_map_key=True,
        max_bin_len=MAX_FRAME,
        max_str_len=_MAX_TEXT,
        max_array_len=_MAX_ITEMS,
        max_map_len=0,
        max_ext_len=0,
        ext_hook=no_ext,
    )


def decode_frame_body(body: bytes) -> Message:
    """Decode and validate one frame body (without its length prefix). Raises :class:`RemoteProtocolError`."""
    try:
        obj = _unpack(body)
    except _Invalid as e:
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
        return _decode(cls, obj[1:])
    except _Invalid as e:
        raise RemoteProtocolError(f"bad {cls.__name__}: {e}") from None


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of ``n`` bytes (the smallest form, as msgpack.packb writes it)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _put_files_frame(code: int, msg: PutFiles) -> bytes:
    """The frame of a plain PutFiles, byte for byte what msgpack.packb makes of ``[code, files, data, None]``, with
    the files' data copied once, into the frame: packb copied a frame's megabyte of data several times (joined,
    into its growing buffer, out of it, behind the length prefix), a large part of the sender's cost per byte."""
    head = msgpack.packb([code, [[p.relpath, p.mode, p.mtime_ns, len(p.data), p.digest] for p in msg.files]],
                         use_bin_type=True)
    size = sum(len(p.data) for p in msg.files)
    binh = _bin_header(size)
    # head is a 2-element array: make it a 4-element one (fixarray 0x92 -> 0x94), then the data, then nil (raw)
    length = len(head) + len(binh) + size + 1
    if length > MAX_FRAME:
        raise LocalProtocolError(f"PutFiles frame of {length} bytes exceeds {MAX_FRAME}; send smaller chunks")
    return b"".join((_HEADER.pack(length), b"\x94", memoryview(head)[1:], binh, *(p.data for p in msg.files),
                     b"\xc0"))


def encode_frame(msg: Message, compress: Callable[[bytes], tuple[bytes, int | None]] | None = None) -> bytes:
    """Validate ``msg`` exactly as a peer would and return its frame. Raises :class:`LocalProtocolError`."""
    cls = type(msg)
    code = TYPE_CODES.get(cls)
    if code is None:
        raise LocalProtocolError(f"not an agent protocol message: {msg!r}")
    try:
        if isinstance(msg, PutFiles):
            _check_put_files(msg)  # the checks of _put_files, without joining and slicing the data
            if compress is None:
                return _put_files_frame(code, msg)
            plain = None
        else:
            plain = _fields(msg, None)
            _decode(cls, plain)  # the same checks the peer will run: never send what it must reject
        body = msgpack.packb(
            [code, *(_fields(msg, compress) if compress or plain is None else plain)], use_bin_type=True
        )
    except _Invalid as e:
        raise LocalProtocolError(f"invalid {cls.__name__}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: {e}") from None
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(
            f"{cls.__name__} frame of {len(body)} bytes exceeds {MAX_FRAME}; send smaller chunks"
        )
    return _HEADER.pack(len(body)) + bytes(body)


# ---------------------------------------------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _SigProgress:
    block_size: int
    file_size: int
    seed: int
    blocks: int = 0
    done: bool = False


class AgentConnection:
    """One side of an agent protocol connection. Pure: bytes in, events out; messages in, bytes out.

    ``our_state`` / ``their_state`` follow :data:`TRANSITIONS` for the messages each side sends. Request/response
    correlation (manifest and signature ids, commit sequence numbers) is tracked here too, so an event handed out
    by :meth:`next_event` has been checked against the whole conversation, not only against its own frame.
    """

    def __init__(
        self,
        role: Role,
        capabilities: frozenset[str] = CAPABILITIES,
        *,
        max_frame: int = MAX_FRAME,
        compress_level: int = 3,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self.our_role = role
        self.their_role = Role.RECEIVER if role is Role.SENDER else Role.SENDER
        self.our_capabilities = frozenset(capabilities)
        self.our_version = version
        self.max_frame = min(max_frame, MAX_FRAME)
        self.our_state = State.START
        self.their_state = State.START
        self.version: int | None = None  # negotiated, once both Hellos are through
        self.capabilities: frozenset[str] = frozenset()
        self._their_hello: Hello | None = None
        self._buf = bytearray()
        self._eof = False
        self._compressor = zstandard.ZstdCompressor(level=compress_level)
        # correlation, from the sender's point of view (the receiver mirrors it for its own sends)
        self._manifests: set[int] = set()  # open manifest requests
        # per open manifest: link id -> (size, mtime_ns, mode, uid, gid, nlink) of its inode, and names seen
        self._inodes: dict[int, dict[int, tuple[tuple[int, ...], int]]] = {}
        self._sigs: dict[int, _SigProgress | None] = {}  # requested (None) or answered signature ids
        self._commits: list[int] = []  # commits not yet acknowledged, in order
        self._last_commit = -1
        self._put_left: int | None = None  # bytes still expected in the current put
        self._delta_blocks: int = 0  # basis blocks of the signature the current delta refers to

    # -- helpers -----------------------------------------------------------------------------------------------

    def hello(self) -> Hello:
        """Our Hello, to pass to :meth:`send` first."""
        return Hello(self.our_version, self.our_capabilities, self.our_role)

    @property
    def ready(self) -> bool:
        return (
            self.version is not None
            and self.our_state is not State.CLOSED
            and self.their_state is not State.CLOSED
        )

    @property
    def outstanding_commits(self) -> tuple[int, ...]:
        return tuple(self._commits)

    def _compress(self, data: bytes) -> tuple[bytes, int | None]:
        if len(data) < 512:
            return data, None
        blob = self._compressor.compress(data)
        # Only worth it when it saves at least 1/16: incompressible data is sent plain, saving the peer the work.
        return (blob, len(data)) if len(blob) < len(data) - len(data) // 16 else (data, None)

    def _negotiate(self) -> None:
        theirs = self._their_hello
        if theirs is None or self.our_state is State.START:
            return
        version = min(self.our_version, theirs.version)
        if version < MIN_VERSION:
            raise RemoteProtocolError(
                f"peer speaks agent protocol version {theirs.version}, we need >= {MIN_VERSION}"
            )
        self.version = version
        self.capabilities = self.our_capabilities & theirs.capabilities

    # -- sending -----------------------------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Validate ``msg`` against the protocol and our state, update the state, and return the bytes to write."""
        if self.our_state in (State.CLOSED, State.ERROR):
            raise LocalProtocolError(
                f"cannot send {type(msg).__name__}: connection is {self.our_state.value}"
            )
        allowed = SENDER_MESSAGES if self.our_role is Role.SENDER else RECEIVER_MESSAGES
        if type(msg) not in allowed:
            raise LocalProtocolError(f"a {self.our_role.value} does not send {type(msg).__name__}")
        if not isinstance(msg, Hello | Error) and self.version is None:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} before both Hellos are exchanged")
        new = TRANSITIONS.get((self.our_state, type(msg)))
        if new is None:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} in state {self.our_state.value}")
        if isinstance(msg, Hello) and msg.role is not self.our_role:
            raise LocalProtocolError(
                f"Hello says role {msg.role.value} but this connection is the {self.our_role.value}"
            )
        # Small-file frames stay plain: compressing PutFile one by one slowed a burst of small-file rewrites so much
        # that the mirror fell far behind (tests/test_replicate_crash.py), and even one zstd call per 1 MiB PutFiles
        # frame made the untar benchmark over ssh slower (5.9 s vs 4.1 s after the burst, 80 vs 181 MB on a
        # loopback wire): the sender is the busy end of a burst. Only chunked data is compressed.
        compress = (
            self._compress if "zstd" in self.capabilities and isinstance(msg, PutChunk | DeltaChunk) else None
        )
        frame = encode_frame(msg, compress)  # validates the fields first, with no side effects
        try:
            self._track(msg, outgoing=True)
        except _Invalid as e:
            raise LocalProtocolError(str(e)) from None
        self.our_state = new
        if isinstance(msg, Hello):
            self._negotiate()
        return frame

    # -- receiving ---------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed its end (EOF)."""
        if self._eof and data:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        self._buf += data

    def next_event(self) -> Message | NeedData | ConnectionClosed:
        """The next validated message, :data:`NEED_DATA`, or :class:`ConnectionClosed` after a clean EOF.

        Raises :class:`RemoteProtocolError` for anything the peer got wrong; the connection is then unusable.
        """
        if self.their_state is State.ERROR:
            raise RemoteProtocolError("connection already failed with a protocol error")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.their_state = State.ERROR
            raise

    def _next_event(self) -> Message | NeedData | ConnectionClosed:
        buf = self._buf
        if len(buf) < 4:
            if self._eof:
                if buf:
                    raise RemoteProtocolError(
                        f"peer closed the stream inside a frame header ({len(buf)} of 4 bytes)"
                    )
                if self.their_state in (State.PUT, State.DELTA):
                    raise RemoteProtocolError(
                        f"peer closed the stream in the middle of a transfer ({self.their_state.value})"
                    )
                self.their_state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        (length,) = _HEADER.unpack_from(buf)
        if (
            length > self.max_frame
        ):  # before buffering the body: a hostile prefix must not make us wait for 4 GiB
            raise RemoteProtocolError(f"frame length {length} exceeds the limit of {self.max_frame} bytes")
        if len(buf) < 4 + length:
            if self._eof:
                raise RemoteProtocolError(
                    f"peer closed the stream inside a frame ({len(buf) - 4} of {length} bytes)"
                )
            return NEED_DATA
        body = bytes(buf[4 : 4 + length])
        del buf[: 4 + length]
        msg = decode_frame_body(body)
        self._accept(msg)
        return msg

    def _accept(self, msg: Message) -> None:
        name = type(msg).__name__
        allowed = SENDER_MESSAGES if self.their_role is Role.SENDER else RECEIVER_MESSAGES
        if type(msg) not in allowed:
            raise RemoteProtocolError(f"a {self.their_role.value} must not send {name}")
        if self.their_state is State.CLOSED:
            raise RemoteProtocolError(f"{name} after the peer closed the connection")
        if not isinstance(msg, Hello | Error):
            if self.their_state is State.START:
                raise RemoteProtocolError(f"{name} before Hello")
            if self.our_state is State.START:
                raise RemoteProtocolError(f"{name} before we sent our Hello (nothing was negotiated yet)")
        new = TRANSITIONS.get((self.their_state, type(msg)))
        if new is None:
            raise RemoteProtocolError(f"{name} not allowed in state {self.their_state.value}")
        if isinstance(msg, Hello):
            if msg.role is not self.their_role:
                raise RemoteProtocolError(
                    f"peer says it is a {msg.role.value}, but we are the {self.our_role.value}"
                )
            self._their_hello = msg
        try:
            self._track(msg, outgoing=False)
        except _Invalid as e:
            raise RemoteProtocolError(str(e)) from None
        self.their_state = new
        if isinstance(msg, Hello):
            self._negotiate()
        if isinstance(msg, Error):
            self.our_state = State.CLOSED if self.our_state is not State.ERROR else self.our_state

    # -- conversation-level checks -------------------------------------------------------------------------------

    def _track_inodes(self, msg: ManifestEntries) -> None:
        """Entries with an inode identity: only with ``inodes`` negotiated, and the names of one link id must
        describe one inode (same size, mtime, mode, owner, nlink; no more names than nlink)."""
        seen: dict[int, tuple[tuple[int, ...], int]] | None = None
        for e in msg.entries:
            if e.link is None:
                continue
            if "inodes" not in self.capabilities:
                raise _Invalid(f"manifest entry {e.relpath!r} has an inode identity, but inodes was not negotiated")
            if seen is None:
                seen = self._inodes.setdefault(msg.id, {})
            attrs = (e.size, e.mtime_ns, e.mode, e.uid, e.gid, e.nlink)
            prev = seen.get(e.link)
            if prev is None:
                seen[e.link] = (attrs, 1)
                continue
            if prev[0] != attrs:
                raise _Invalid(f"manifest entry {e.relpath!r}: link id {e.link} names one inode, but its size, "
                               "mtime, mode, owner or nlink differ from another name's")
            if prev[1] + 1 > e.nlink:
                raise _Invalid(f"manifest entry {e.relpath!r}: more names of link id {e.link} than its nlink "
                               f"{e.nlink}")
            seen[e.link] = (attrs, prev[1] + 1)

    def _track(self, msg: Message, *, outgoing: bool) -> None:
        """Check and record ids and sequence numbers; raises _Invalid (mapped to the right error by the caller).

        The same rules run on both sides, so the sender refuses to send what the receiver would reject.
        """
        if isinstance(msg, ManifestRequest):
            if msg.id in self._manifests:
                raise _Invalid(f"manifest request id {msg.id} is already open")
            self._manifests.add(msg.id)
        elif isinstance(msg, ManifestEntries):
            if msg.id not in self._manifests:
                raise _Invalid(f"manifest entries for id {msg.id}, which was not requested or is finished")
            self._track_inodes(msg)
            if msg.done:
                self._manifests.discard(msg.id)
                self._inodes.pop(msg.id, None)
        elif isinstance(msg, Hardlink):
            if msg.size is not None and "linkcheck" not in self.capabilities:
                raise _Invalid(f"Hardlink of {msg.relpath!r} with an expected size and mtime, but linkcheck "
                               "was not negotiated")
        elif isinstance(msg, SigRequest):
            if msg.id in self._sigs:
                raise _Invalid(f"signature id {msg.id} was used already")
            if len(self._sigs) >= MAX_OPEN_SIGS:
                raise _Invalid(f"more than {MAX_OPEN_SIGS} signature requests open (not yet used by a delta)")
            self._sigs[msg.id] = None
        elif isinstance(msg, Signature):
            if msg.id not in self._sigs:
                raise _Invalid(f"signature for id {msg.id}, which was not requested")
            prog = self._sigs[msg.id]
            if prog is None:
                if -(-msg.file_size // msg.block_size) > MAX_SIG_BLOCKS:
                    raise _Invalid(f"signature id {msg.id}: {msg.file_size} bytes in blocks of {msg.block_size} "
                                   f"is more than {MAX_SIG_BLOCKS} blocks")
                prog = self._sigs[msg.id] = _SigProgress(msg.block_size, msg.file_size, msg.seed)
            elif prog.done:
                raise _Invalid(f"signature id {msg.id} is already complete")
            elif (prog.block_size, prog.file_size, prog.seed) != (msg.block_size, msg.file_size, msg.seed):
                raise _Invalid(f"signature id {msg.id} changed block size, file size or seed between pieces")
            prog.blocks += len(msg.weak) // 4
            expected = -(-prog.file_size // prog.block_size)
            if prog.blocks > expected or (msg.done and prog.blocks != expected):
                raise _Invalid(
                    f"signature id {msg.id}: {prog.blocks} blocks for {prog.file_size} bytes in blocks of "
                    f"{prog.block_size} (expected {expected})"
                )
            prog.done = msg.done
        elif isinstance(msg, DeltaBegin):
            prog = self._sigs.pop(msg.sig_id, None)
            if prog is None or not prog.done:
                raise _Invalid(
                    f"delta for {msg.relpath!r} refers to signature id {msg.sig_id}, which is not complete"
                )
            self._delta_blocks = -(-prog.file_size // prog.block_size)
            self._put_left = msg.size
        elif isinstance(msg, DeltaChunk):
            for op in msg.ops:
                if isinstance(op, Copy) and op.start + op.count > self._delta_blocks:
                    raise _Invalid(
                        f"delta copies blocks {op.start}..{op.start + op.count - 1} of a basis of {self._delta_blocks}"
                    )
        elif isinstance(msg, PutBegin):
            self._put_left = msg.size
        elif isinstance(msg, PutChunk):
            left = self._put_left or 0
            if len(msg.data) > left:
                raise _Invalid(f"put carries more data than the {left} bytes announced")
            self._put_left = left - len(msg.data)
        elif isinstance(msg, PutEnd):
            if self._put_left:
                raise _Invalid(f"put ended {self._put_left} bytes short of the size announced")
            self._put_left = None
        elif isinstance(msg, DeltaEnd):
            self._put_left = None
        elif isinstance(msg, Commit):
            if msg.seq <= self._last_commit:
                raise _Invalid(f"commit seq {msg.seq} does not increase (last was {self._last_commit})")
            self._last_commit = msg.seq
            self._commits.append(msg.seq)
        elif isinstance(msg, Ack):
            if not self._commits or self._commits[0] != msg.seq:
                want = self._commits[0] if self._commits else "none outstanding"
                raise _Invalid(f"ack of seq {msg.seq}, expected {want} (acks come in commit order)")
            self._commits.pop(0)


def error_for(exc: ProtocolError) -> Error:
    """The :class:`Error` to send to the peer before closing, for a protocol error we hit."""
    code = "protocol" if isinstance(exc, RemoteProtocolError) else "internal"
    return Error(code, str(exc)[:_MAX_TEXT], None)

"""The agent protocol's messages: each one declares, once, its type code, which role sends it, and its wire fields
in order with the check of each (the codec builds both directions from that). Pure.

A message with a fixed list of fields declares :attr:`Message.WIRE`; the few whose wire form is not one value per
field (a payload that may be compressed, a list of entries, optional trailing fields) say so in their own
``from_wire``/``to_wire``, next to their fields.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias

from kwatch.paths import is_under, plain_relpath
from kwatch.protocols.agent import fields as fd
from kwatch.protocols.agent.fields import I64_MAX, I64_MIN, MAX_CHUNK, MAX_FILES_PER_FRAME, U32, U64, Invalid

#: Turns a payload into its two wire fields ``[blob, raw length or None]`` (zstd when negotiated and worthwhile).
Pack: TypeAlias = Callable[[bytes], list[Any]]


def plain(data: bytes) -> list[Any]:
    """The :data:`Pack` of an uncompressed payload."""
    return [data, None]


class Role(enum.StrEnum):
    SENDER = "sender"  # holds the source tree, drives the conversation
    RECEIVER = "receiver"  # the mirror agent, applies operations


_S: Final = frozenset({Role.SENDER})
_R: Final = frozenset({Role.RECEIVER})
_BOTH: Final = frozenset(Role)


class EntryType(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    OTHER = 4  # device, fifo, socket: reported so a scan can say it skipped them


# ---------------------------------------------------------------------------------------------------------------
# Delta operations (what the delta engine produces and a DeltaChunk carries)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy ``count`` consecutive basis blocks starting at block ``start`` (the last one may be short)."""

    start: int
    count: int


@dataclass(frozen=True, slots=True)
class Literal:
    """Bytes of the new file that are not in the basis."""

    data: bytes


DeltaOp: TypeAlias = Copy | Literal


# ---------------------------------------------------------------------------------------------------------------
# Parts of messages
# ---------------------------------------------------------------------------------------------------------------


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

    @classmethod
    def from_wire(cls, v: object) -> Entry:
        f = fd.check_list(v, "manifest entry")
        if len(f) not in (9, 11):
            raise Invalid(f"manifest entry needs 9 fields (11 with inode identity), got {len(f)}")
        kind = EntryType(fd.check_int(f[0], "entry type", 1, max(EntryType)))
        target = None if f[7] is None else fd.check_symlink_target(f[7])
        if (kind is EntryType.SYMLINK) != (target is not None):
            raise Invalid(f"manifest entry {f[1]!r}: a symlink target is required for symlinks and only for them")
        nlink, link = 1, None
        if len(f) == 11:
            nlink = fd.check_int(f[9], "entry nlink", 2, U32)
            link = fd.check_int(f[10], "entry link id", 1, U64)
            if kind is not EntryType.FILE:
                raise Invalid(f"manifest entry {f[1]!r}: only a regular file has an inode identity (nlink {nlink})")
        return cls(
            kind,
            fd.check_path(f[1], "entry path"),
            fd.check_int(f[2], "entry size", 0, I64_MAX),
            fd.check_int(f[3], "entry mtime_ns", I64_MIN, I64_MAX),
            fd.check_mode(f[4], "entry mode"),
            fd.check_int(f[5], "entry uid", 0, U32),
            fd.check_int(f[6], "entry gid", 0, U32),
            target,
            fd.check_digest(f[8], "entry hash"),
            nlink,
            link,
        )

    def to_wire(self) -> list[Any]:
        out = [int(self.type), self.relpath, self.size, self.mtime_ns, self.mode, self.uid, self.gid, self.target,
               self.hash]
        return out if self.nlink == 1 and self.link is None else [*out, self.nlink, self.link]


@dataclass(frozen=True, slots=True)
class PathError:
    """A per-path failure reported in an :class:`Ack` (the batch went on without it)."""

    relpath: bytes
    code: str  # errno name such as "EACCES", or a kwatch code such as "digest-mismatch"
    message: str

    @classmethod
    def from_wire(cls, v: object) -> PathError:
        f = fd.check_list(v, "path error")
        if len(f) != 3:
            raise Invalid(f"path error needs 3 fields, got {len(f)}")
        return cls(fd.check_path(f[0], "error path"), fd.check_text(f[1], "error code"),
                   fd.check_text(f[2], "error message"))


# ---------------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------------


def _from_spec(cls: type[Any], f: list[Any]) -> Any:
    # A function, not a method the subclasses call through super(): dataclass(slots=True) makes a new class,
    # which breaks zero-argument super().
    spec = cls.WIRE
    if len(f) != len(spec):
        raise Invalid(f"{cls.__name__} needs {len(spec)} fields, got {len(f)}")
    return cls(*[check(v) for (_, check), v in zip(spec, f, strict=True)])


class _Message:
    """What every message declares: its type code, who may send it, and its wire fields with their checks."""

    __slots__ = ()
    CODE: ClassVar[int]
    FROM: ClassVar[frozenset[Role]]
    #: (field name, check) in wire order; the default from_wire/to_wire use it.
    WIRE: ClassVar[tuple[tuple[str, fd.Check], ...]] = ()

    @classmethod
    def from_wire(cls, f: list[Any]) -> Any:
        """The message from its wire fields (after the type code); raises :class:`Invalid`."""
        return _from_spec(cls, f)

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        """The wire fields of this message (after the type code); ``pack`` turns a payload into its two fields."""
        return [getattr(self, name) for name, _ in self.WIRE]


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    CODE = 1
    FROM = _BOTH
    version: int
    capabilities: frozenset[str]
    role: Role

    @classmethod
    def from_wire(cls, f: list[Any]) -> Hello:
        fd.check_fields(f, 3, "Hello")
        caps = fd.check_list(f[1], "capabilities")
        if len(caps) > 256:
            raise Invalid("too many capabilities")
        role = fd.check_text(f[2], "role")
        if role not in (Role.SENDER.value, Role.RECEIVER.value):
            raise Invalid(f"unknown role {role!r}")
        return cls(fd.check_int(f[0], "version", 0, U32), frozenset(fd.check_text(c, "capability") for c in caps),
                   Role(role))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        return [self.version, sorted(self.capabilities), str(self.role)]


@dataclass(frozen=True, slots=True)
class ManifestRequest(_Message):
    CODE = 2
    FROM = _S
    WIRE = (("id", fd.integer("id")), ("relpath", fd.opt_relpath("manifest path")), ("hashes", fd.boolean("hashes")))
    id: int
    relpath: bytes | None = None  # None: the whole target root
    hashes: bool = False


@dataclass(frozen=True, slots=True)
class ManifestEntries(_Message):
    CODE = 3
    FROM = _R
    id: int
    entries: tuple[Entry, ...]
    done: bool

    @classmethod
    def from_wire(cls, f: list[Any]) -> ManifestEntries:
        fd.check_fields(f, 3, "ManifestEntries")
        entries = fd.check_list(f[1], "entries")
        return cls(fd.check_int(f[0], "id"), tuple(Entry.from_wire(e) for e in entries), _DONE(f[2]))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        return [self.id, [e.to_wire() for e in self.entries], self.done]


_DONE: Final = fd.boolean("done")


@dataclass(frozen=True, slots=True)
class Mkdir(_Message):
    CODE = 4
    FROM = _S
    WIRE = (("relpath", fd.relpath()), ("mode", fd.mode()))
    relpath: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class PutBegin(_Message):
    """A whole file follows in :class:`PutChunk` s; the receiver writes it under a temporary name."""

    CODE = 5
    FROM = _S
    WIRE = (("relpath", fd.relpath()), ("size", fd.integer("size", 0, I64_MAX)), ("mode", fd.mode()))
    relpath: bytes
    size: int
    mode: int


@dataclass(frozen=True, slots=True)
class PutChunk(_Message):
    CODE = 6
    FROM = _S
    data: bytes  # always the plain bytes in events; zstd on the wire when negotiated and worthwhile

    @classmethod
    def from_wire(cls, f: list[Any]) -> PutChunk:
        fd.check_fields(f, 2, "PutChunk")
        return cls(fd.check_payload(f[0], f[1], "chunk data"))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        return pack(self.data)


@dataclass(frozen=True, slots=True)
class PutEnd(_Message):
    CODE = 7
    FROM = _S
    WIRE = (("digest", fd.digest()),)
    digest: bytes | None = None  # xxh3_128 of the whole content


_MTIME: Final = fd.opt_integer("mtime_ns", I64_MIN, I64_MAX)


@dataclass(frozen=True, slots=True)
class PutFile(_Message):
    """A whole small file in one frame, with its mode and mtime: one frame instead of begin/chunk/end/setattr, which
    is most of the per-file cost when thousands of small files arrive (a tar extraction)."""

    CODE = 21
    FROM = _S
    relpath: bytes
    mode: int
    mtime_ns: int | None
    data: bytes  # plain bytes in events; zstd on the wire when negotiated and worthwhile
    digest: bytes | None = None  # xxh3_128 of data

    @classmethod
    def from_wire(cls, f: list[Any]) -> PutFile:
        fd.check_fields(f, 6, "PutFile")
        return cls(fd.check_path(f[0]), fd.check_mode(f[1]), _MTIME(f[2]), fd.check_payload(f[3], f[4], "file data"),
                   fd.check_digest(f[5]))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        return [self.relpath, self.mode, self.mtime_ns, *pack(self.data), self.digest]


def _usual_file(path: object, mode: object, mtime: object, digest: object) -> bool:
    """A PutFiles entry every check accepts, tested inline: the checks one by one cost more than the rest of the
    decode for a frame of small files; anything else gets the field checks (and their error messages)."""
    return (
        type(path) is bytes and plain_relpath(path)
        and type(mode) is int and 0 <= mode <= 0o7777
        and type(mtime) is int and I64_MIN <= mtime <= I64_MAX
        and type(digest) is bytes and len(digest) == 16
    )


@dataclass(frozen=True, slots=True)
class PutFiles(_Message):
    """Many small files in one frame (capability ``putfiles``): one frame each (with its header, state check and
    decode) is a large part of the cost per file on both ends when thousands of small files arrive.

    On the wire: a list of ``[relpath, mode, mtime_ns, size, digest]`` and one payload holding every file's data
    back to back (a payload as in PutChunk: the receiver accepts zstd there, our sender sends it plain)."""

    CODE = 22
    FROM = _S
    files: tuple[PutFile, ...]

    @classmethod
    def from_wire(cls, f: list[Any]) -> PutFiles:
        fd.check_fields(f, 3, "PutFiles")
        blob = fd.check_payload(f[1], f[2], "files data")
        items = fd.check_list(f[0], "files")
        if len(items) > MAX_FILES_PER_FRAME:
            raise Invalid(f"{len(items)} files in one frame, at most {MAX_FILES_PER_FRAME}")
        out: list[PutFile] = []
        used = 0
        total = len(blob)
        for item in items:
            g = fd.check_list(item, "file")
            if len(g) != 5:
                raise Invalid(f"a file of PutFiles needs 5 fields, got {len(g)}")
            path, mode, mtime, n, digest = g
            if not (_usual_file(path, mode, mtime, digest) and type(n) is int and 0 <= n <= total - used):
                n = fd.check_int(n, "file size", 0, total - used)
                path, mode = fd.check_path(path), fd.check_mode(mode)
                mtime = _MTIME(mtime)
                digest = fd.check_digest(digest)
            out.append(PutFile(path, mode, mtime, blob[used : used + n], digest))
            used += n
        if used != total:
            raise Invalid(f"file sizes add up to {used}, but the frame carries {total} bytes")
        return cls(tuple(out))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        return [self.heads(), *pack(b"".join(p.data for p in self.files))]

    def heads(self) -> list[list[Any]]:
        """The per-file part of the wire form (the data follows as one payload)."""
        return [[p.relpath, p.mode, p.mtime_ns, len(p.data), p.digest] for p in self.files]

    def check(self) -> None:
        """What :meth:`from_wire` checks on the peer, run on our own message without joining and slicing the
        data."""
        if len(self.files) > MAX_FILES_PER_FRAME:
            raise Invalid(f"{len(self.files)} files in one frame, at most {MAX_FILES_PER_FRAME}")
        total = 0
        for p in self.files:
            path, mode, mtime, digest, data = p.relpath, p.mode, p.mtime_ns, p.digest, p.data
            if not (_usual_file(path, mode, mtime, digest) and type(data) is bytes):
                fd.check_path(path)
                fd.check_mode(mode)
                _MTIME(mtime)
                fd.check_digest(digest)
                fd.check_bytes(data, "file data")
            total += len(data)
        if total > MAX_CHUNK:
            raise Invalid(f"{total} bytes of file data in one frame, at most {MAX_CHUNK}")


@dataclass(frozen=True, slots=True)
class SigRequest(_Message):
    CODE = 8
    FROM = _S
    WIRE = (
        ("id", fd.integer("id")),
        ("relpath", fd.relpath()),
        ("block_size", fd.opt_integer("block size", fd.SIG_BLOCK_MIN, fd.SIG_BLOCK_MAX)),
    )
    id: int
    relpath: bytes
    block_size: int | None = None  # None: the receiver chooses (about sqrt of its file size)


@dataclass(frozen=True, slots=True)
class Signature(_Message):
    """A piece of the block signature of the receiver's copy; pieces of one ``id`` arrive in order.

    ``weak`` is little-endian uint32 per block and ``strong`` 16 bytes per block (see
    :meth:`kwatch.replicate.delta.Signature.from_wire`). An absent file is a signature of ``file_size`` 0.
    """

    CODE = 9
    FROM = _R
    WIRE = (
        ("id", fd.integer("id")),
        ("block_size", fd.integer("block size", 1, 1 << 24)),
        ("file_size", fd.integer("file size", 0, I64_MAX)),
        ("seed", fd.integer("seed")),
        ("weak", fd.raw_bytes("weak sums")),
        ("strong", fd.raw_bytes("strong hashes")),
        ("done", _DONE),
    )
    id: int
    block_size: int
    file_size: int
    seed: int
    weak: bytes
    strong: bytes
    done: bool

    @classmethod
    def from_wire(cls, f: list[Any]) -> Signature:
        sig: Signature = _from_spec(cls, f)
        if len(sig.weak) % 4 or len(sig.strong) != 4 * len(sig.weak):
            raise Invalid(
                f"signature piece has {len(sig.weak)} bytes of weak sums and {len(sig.strong)} of strong hashes"
            )
        return sig


@dataclass(frozen=True, slots=True)
class DeltaBegin(_Message):
    """A delta against the receiver's copy whose signature was ``sig_id`` follows in :class:`DeltaChunk` s."""

    CODE = 10
    FROM = _S
    WIRE = (
        ("relpath", fd.relpath()),
        ("sig_id", fd.integer("signature id")),
        ("size", fd.integer("size", 0, I64_MAX)),
        ("mode", fd.mode()),
    )
    relpath: bytes
    sig_id: int
    size: int
    mode: int


@dataclass(frozen=True, slots=True)
class DeltaChunk(_Message):
    """Delta ops; on the wire a list (a Copy as ``[start, count]``, a Literal as its length) and one payload with
    the literals' bytes back to back."""

    CODE = 11
    FROM = _S
    ops: tuple[DeltaOp, ...]

    @classmethod
    def from_wire(cls, f: list[Any]) -> DeltaChunk:
        fd.check_fields(f, 3, "DeltaChunk")
        blob = fd.check_payload(f[1], f[2], "delta literals")
        items = fd.check_list(f[0], "delta ops")
        out: list[DeltaOp] = []
        used = 0
        for item in items:
            if type(item) is int:
                n = fd.check_int(item, "literal length", 1, len(blob) - used)
                out.append(Literal(blob[used : used + n]))
                used += n
            else:
                pair = fd.check_list(item, "delta op")
                if len(pair) != 2:
                    raise Invalid(f"copy op needs [start, count], got {len(pair)} items")
                out.append(
                    Copy(fd.check_int(pair[0], "copy start", 0, I64_MAX), fd.check_int(pair[1], "copy count", 1, I64_MAX))
                )
        if used != len(blob):
            raise Invalid(f"delta literal lengths add up to {used}, but the chunk carries {len(blob)} bytes")
        return cls(tuple(out))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        ops: list[Any] = []
        lits: list[bytes] = []
        for op in self.ops:
            if isinstance(op, Copy):
                ops.append([op.start, op.count])
            else:
                ops.append(len(op.data))
                lits.append(op.data)
        return [ops, *pack(b"".join(lits))]


@dataclass(frozen=True, slots=True)
class DeltaEnd(_Message):
    CODE = 12
    FROM = _S
    WIRE = (("digest", fd.digest()),)
    digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Rename(_Message):
    CODE = 13
    FROM = _S
    WIRE = (("src", fd.relpath("rename source")), ("dst", fd.relpath("rename destination")))
    src: bytes
    dst: bytes

    @classmethod
    def from_wire(cls, f: list[Any]) -> Rename:
        msg: Rename = _from_spec(cls, f)
        if is_under(msg.dst, msg.src):
            raise Invalid(f"cannot rename {msg.src!r} into itself ({msg.dst!r})")
        return msg


@dataclass(frozen=True, slots=True)
class Delete(_Message):
    CODE = 14
    FROM = _S
    WIRE = (("relpath", fd.relpath()), ("recursive", fd.boolean("recursive")))
    relpath: bytes
    recursive: bool = False  # a whole tree


@dataclass(frozen=True, slots=True)
class Symlink(_Message):
    CODE = 15
    FROM = _S
    WIRE = (("relpath", fd.relpath()), ("target", fd.symlink_target()))
    relpath: bytes
    target: bytes  # the link's content, stored as is (it may be absolute or hold ..; it is never followed)


@dataclass(frozen=True, slots=True)
class Hardlink(_Message):
    """Make ``relpath`` another name of ``target``. With ``size``/``mtime_ns`` (capability ``linkcheck``; both or
    neither, as two trailing wire fields) the receiver links only when ``target`` is a regular file of that size and
    mtime, else it reports ``ESTALE`` for ``relpath`` and changes nothing: the sender's belief about what the mirror
    holds is checked where the mirror is."""

    CODE = 16
    FROM = _S
    WIRE = (
        ("relpath", fd.relpath("link path")),
        ("target", fd.relpath("link target")),
        ("size", fd.integer("link size", 0, I64_MAX)),
        ("mtime_ns", fd.integer("link mtime_ns", I64_MIN, I64_MAX)),
    )
    relpath: bytes  # the new name
    target: bytes  # an existing path under the root
    size: int | None = None
    mtime_ns: int | None = None

    @classmethod
    def from_wire(cls, f: list[Any]) -> Hardlink:
        if len(f) == 2:  # without the linkcheck fields
            return cls(*[check(v) for (_, check), v in zip(cls.WIRE[:2], f, strict=True)])
        if len(f) != 4:
            raise Invalid(f"Hardlink needs 2 fields (4 with linkcheck), got {len(f)}")
        msg: Hardlink = _from_spec(cls, f)
        return msg

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        if self.size is None and self.mtime_ns is None:
            return [self.relpath, self.target]
        return [self.relpath, self.target, self.size, self.mtime_ns]


@dataclass(frozen=True, slots=True)
class SetAttr(_Message):
    CODE = 17
    FROM = _S
    WIRE = (
        ("relpath", fd.relpath()),
        ("mode", fd.opt_mode()),
        ("mtime_ns", _MTIME),
        ("uid", fd.opt_integer("uid", 0, U32)),
        ("gid", fd.opt_integer("gid", 0, U32)),
    )
    relpath: bytes
    mode: int | None = None
    mtime_ns: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class Commit(_Message):
    CODE = 18
    FROM = _S
    WIRE = (("seq", fd.integer("seq")),)
    seq: int


@dataclass(frozen=True, slots=True)
class Ack(_Message):
    CODE = 19
    FROM = _R
    seq: int
    errors: tuple[PathError, ...] = ()

    @classmethod
    def from_wire(cls, f: list[Any]) -> Ack:
        fd.check_fields(f, 2, "Ack")
        errors = fd.check_list(f[1], "errors")
        return cls(fd.check_int(f[0], "seq"), tuple(PathError.from_wire(e) for e in errors))

    def to_wire(self, pack: Pack = plain) -> list[Any]:
        return [self.seq, [[e.relpath, e.code, e.message] for e in self.errors]]


@dataclass(frozen=True, slots=True)
class Error(_Message):
    """Fatal error; the connection is closed after it is sent or received."""

    CODE = 20
    FROM = _BOTH
    WIRE = (
        ("code", fd.text("error code")),
        ("message", fd.text("error message")),
        ("path", fd.opt_relpath("error path")),
    )
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

_ALL: Final[tuple[type[Message], ...]] = (
    Hello, ManifestRequest, ManifestEntries, Mkdir, PutBegin, PutChunk, PutEnd, PutFile, PutFiles, SigRequest,
    Signature, DeltaBegin, DeltaChunk, DeltaEnd, Rename, Delete, Symlink, Hardlink, SetAttr, Commit, Ack, Error,
)  # fmt: skip
TYPE_CODES: Final[dict[type[Any], int]] = {cls: cls.CODE for cls in _ALL}
TYPES_BY_CODE: Final[dict[int, type[Message]]] = {cls.CODE: cls for cls in _ALL}
#: Which role may send which message.
SENDER_MESSAGES: Final = frozenset(cls for cls in _ALL if Role.SENDER in cls.FROM)
RECEIVER_MESSAGES: Final = frozenset(cls for cls in _ALL if Role.RECEIVER in cls.FROM)
assert len(TYPES_BY_CODE) == len(_ALL), "two messages share a type code"

"""The sans-IO rsync client session for a push (we are the sender, the daemon or ``rsync --server`` receives).

Feed the peer's bytes with :meth:`PushSession.receive_data` (``b""`` means EOF), pull events with
:meth:`PushSession.next_event`, answer each :class:`FileRequested` with :meth:`PushSession.send_file`, and
write out :meth:`PushSession.data_to_send`. No sockets, files or clocks here.

Session order (rsync clientserver.c ``start_inband_exchange``, compat.c ``setup_protocol``, main.c
``client_run``, sender.c ``send_files``, main.c ``read_final_goodbye``):

daemon only: greeting lines ``@RSYNCD: <ver>.<sub> <auth digests>`` both ways; module name; MOTD lines;
``@RSYNCD: AUTHREQD <challenge>`` answered by ``<user> <base64 digest>``; ``@RSYNCD: OK``; the server
arguments, each NUL-terminated, then an empty one. (Over ssh the arguments are the remote command line and each
side writes its protocol version as an int instead.)

then: compat flags (varint, from the server); checksum name lists (vstrings, both ways) when the ``v``
capability was agreed; the checksum seed (int, from the server). From here both directions are multiplexed.
We send the filter list (only with ``--delete``: the protect rules of :attr:`PushOptions.protect`, then the
terminator), the file list (sorted as both sides index
it) and its end marker. The receiver's generator then sends, per file: index, item flags and, when it wants
data, the block checksums of its basis; we answer with the same index/flags, the checksum header, the token
stream (literal runs and block references, then 0) and the whole-file checksum. Three NDX_DONE rounds end
the phases; the goodbye exchange ends the session.
"""

from __future__ import annotations

import enum
import itertools
import re
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError
from kwatch.protocols.rsync import codec
from kwatch.protocols.rsync.checksum import (
    AUTH_NAMES,
    CHECKSUM_NAMES,
    COMPRESS_NAMES,
    DIGEST_LEN,
    FileHasher,
    auth_response,
    block_hasher,
    choose,
    file_checksum,
    parse_name_list,
)
from kwatch.protocols.rsync.codec import Msg, NeedMore, Reader
from kwatch.protocols.rsync.flist import FileEntry, FlistEncoder, encode_list, hlink_indexes, sort_key
from kwatch.protocols.rsync.tokens import Literal, Match, SumHead

SUPPORTED_PROTOCOLS = (30, 31)
MAX_BASIS_DIRS = 20  # rsync.h MAX_BASIS_DIRS: --link-dest/--copy-dest/--compare-dest dirs a receiver takes
MAX_BLOCK_SIZE = 1 << 17  # rsync.h MAX_BLOCK_SIZE (protocol >= 30)
#: Most block checksums we take for one file. rsync's receiver sizes blocks at about sqrt(file size), up to
#: MAX_BLOCK_SIZE (generator.c sum_sizes_sqroot), so 2^20 covers a basis of 128 GiB; each costs about 100 bytes
#: here once parsed, and all of them are buffered before parsing: a daemon cannot make us hold gigabytes.
MAX_BLOCK_COUNT = 1 << 20

ITEM_BASIS_TYPE_FOLLOWS = 1 << 11
ITEM_XNAME_FOLLOWS = 1 << 12
ITEM_TRANSFER = 1 << 15

CF_INC_RECURSE = 1 << 0
CF_VARINT_FLIST_FLAGS = 1 << 7

_GREETING = re.compile(rb"^@RSYNCD: (\d+)(?:\.(-?\d+))?(?: (.*))?$")


class Mode(enum.Enum):
    DAEMON = "daemon"  # TCP to rsync --daemon: greeting, module, auth, args in band
    SHELL = "shell"  # a pipe to `rsync --server ...` (ssh): args on the command line


class State(enum.Enum):
    GREETING = "waiting for the daemon greeting"
    MODULE = "waiting for the module reply"
    COMPAT = "waiting for the compat flags"
    VERSION = "waiting for the server's protocol version"
    NEGOTIATE = "waiting for the checksum negotiation"
    SEED = "waiting for the checksum seed"
    TRANSFER = "transferring files"
    FILE = "waiting for send_file()"
    GOODBYE = "waiting for the end of the session"
    DONE = "done"
    ERROR = "failed"


@dataclass(frozen=True, slots=True)
class PushOptions:
    """What to ask the receiver for."""

    dest: bytes = b""  # path inside the module (daemon) or on the remote host (shell)
    delete: bool = False  # --delete: extraneous entries inside content dirs are removed
    delete_missing: bool = False  # --delete-missing-args: mode-0 entries delete that path
    fuzzy: bool = False  # --fuzzy (+ --delete-after): a renamed file's old copy can be the basis
    #: --link-dest dirs (relative to ``dest``): a file missing at ``dest`` whose copy in one of them has the same
    #: size, mtime and mode is hard-linked from there, else a copy there with the same size and mtime is copied
    #: locally, else any regular file there is the delta basis (generator.c try_dests_reg); at most 20
    link_dest: tuple[bytes, ...] = ()
    #: --fuzzy twice: the fuzzy search also looks in the matching directory of each ``link_dest`` dir (options.c:
    #: fuzzy_basis = basis_dir_cnt + 1), so a file renamed inside a moved tree still finds its old copy
    fuzzy_alt: bool = False
    mkpath: bool = False  # --mkpath: the receiver creates missing directories of ``dest`` (rsync >= 3.2.3)
    protocol: int = 31
    negotiate: bool = True  # the 'v' capability: negotiate checksum names and varint flist flags
    compress: bool = False  # negotiates compression (only "none" is implemented, so data is not compressed)
    checksums: tuple[str, ...] = CHECKSUM_NAMES
    hard_links: bool = False  # -H: entries with an ``inode`` are sent as hard links of each other (protocol >= 30)
    #: paths (relative to the transfer root) the receiver must not delete although the list leaves them out: sent
    #: as anchored protect rules ("P /path") with --delete or --delete-missing-args
    protect: tuple[bytes, ...] = ()
    user: bytes = b"nobody"
    password: bytes | None = None
    #: (protocol, compat flags) an earlier session with this daemon negotiated: the checksum names and the file
    #: list then go with the greeting (daemon mode without a password), before the daemon's replies, which must
    #: then match (else RemoteProtocolError; see PushSession)
    expect: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Motd:
    text: bytes


@dataclass(frozen=True, slots=True)
class Negotiated:
    protocol: int
    checksum: str
    compat_flags: int
    auth_digest: str | None


@dataclass(frozen=True, slots=True)
class RemoteMessage:
    code: Msg
    text: bytes


@dataclass(frozen=True, slots=True)
class FileRequested:
    ndx: int
    entry: FileEntry
    sums: SumHead


@dataclass(frozen=True, slots=True)
class DeleteStats:
    files: int
    dirs: int
    symlinks: int
    devices: int
    specials: int


@dataclass(frozen=True, slots=True)
class SessionDone:
    pass


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = Motd | Negotiated | RemoteMessage | FileRequested | DeleteStats | SessionDone


@dataclass
class Counters:
    literal_bytes: int = 0
    matched_bytes: int = 0
    files_sent: int = 0
    remote_errors: list[str] = field(default_factory=list)


def build_server_args(opts: PushOptions) -> list[bytes]:
    """The argument vector the remote ``rsync --server`` gets (options.c server_options, for a sender)."""
    flags = "-l" + ("H" if opts.hard_links else "") + "ptr"  # -H where options.c server_options puts it
    if opts.fuzzy or opts.fuzzy_alt:
        flags += "yy" if opts.fuzzy_alt else "y"
    if opts.compress:
        flags += "z"
    # -e.<capabilities>: no 'i' (no incremental recursion: one file list), 'v' only when negotiating.
    flags += "e." + ("LsfxCIvu" if opts.negotiate else "LsfxCIu")
    args = [b"--server", flags.encode()]
    if opts.delete:
        args.append(b"--delete-after" if opts.fuzzy or opts.fuzzy_alt else b"--delete")
    if opts.delete_missing:
        args.append(b"--delete-missing-args")
    if len(opts.link_dest) > MAX_BASIS_DIRS:
        raise LocalProtocolError(f"{len(opts.link_dest)} --link-dest dirs (a receiver takes {MAX_BASIS_DIRS})")
    for d in opts.link_dest:
        if not d or b"\0" in d:
            raise LocalProtocolError(f"bad --link-dest dir {d!r}")
        args.append(b"--link-dest=" + d)
    if opts.mkpath:
        args.append(b"--mkpath")
    # -@-1 (--modify-window=-1, as options.c server_options spells a negative window): with the default window
    # of 0, util1.c same_time compares whole seconds only, so the receiver leaves a time alone when just the
    # nanoseconds differ. That skips set_file_attrs' utimes on a directory or symlink it has just created in the
    # same second as the source's mtime (rsync.c same_mtime without ATTRS_ACCURATE_TIME), touch_up_dirs'
    # re-touch after the directory's content was written (generator.c mtime_differs), and the quick check of a
    # file rewritten with the same size within the second (generator.c quick_check_ok). A negative window makes
    # every comparison exact to the nanosecond (receiver >= 3.1.3); with protocol 30 no nanoseconds are sent,
    # so the receiver sets and compares .0 consistently.
    args.append(b"-@-1")
    args.append(b".")
    return args


def protect_rule(path: bytes) -> bytes:
    """The filter rule that keeps the receiver from deleting ``path`` (relative to the transfer root) and nothing
    else: ``P`` (protect, a receiver-side exclude), anchored by a leading slash. A pattern with ``*``, ``?`` or ``[``
    is a wildcard pattern, in which a backslash escapes (exclude.c add_rule sets FILTRULE_WILD, wildmatch.c); one
    without is compared literally, backslashes included."""
    if any(c in path for c in (b"*", b"?", b"[")):
        path = re.sub(rb"([\\*?\[])", rb"\\\1", path)
    return b"P /" + path


_INT = struct.Struct("<i")
_SUM_HEAD = struct.Struct("<4i")
_FRAME_HEAD = struct.Struct("<I")
_END_TOKEN = _INT.pack(0)
# what the generator writes for a file it has no basis for (generator.c: write_sum_head with no sums)
_NO_SUMS = SumHead(0, 0, 0, 0, (), ())
_NO_SUMS_WIRE = _SUM_HEAD.pack(0, 0, 0, 0)
# iflags bits a plain transfer request has none of, so that its sum head follows them at once
_REQUEST_EXTRAS = ITEM_BASIS_TYPE_FOLLOWS | ITEM_XNAME_FOLLOWS
FRAME_DATA = 1 << 20  # MSG_DATA payload per frame a file's tokens are written in (at most codec.MAX_FRAME)


class _DataFrame:
    """MSG_DATA frames written in place at the end of ``buf``: a header reserved now, its length filled in when the
    frame closes (io.c mplex_write's framing, without copying the payload again)."""

    __slots__ = ("buf", "start")

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.start = len(buf)
        buf += b"\0\0\0\0"

    def roll(self) -> None:
        """Close the frame and open the next once it holds FRAME_DATA bytes."""
        if len(self.buf) - self.start - 4 >= FRAME_DATA:
            self.close()
            self.start = len(self.buf)
            self.buf += b"\0\0\0\0"

    def close(self) -> None:
        n = len(self.buf) - self.start - 4
        if n == 0:
            del self.buf[self.start:]
            return
        assert n <= codec.MAX_FRAME
        struct.pack_into("<I", self.buf, self.start, (codec.MPLEX_BASE + Msg.DATA) << 24 | n)


def _greeting(line: bytes, ours: int) -> tuple[int, list[str]]:
    """The daemon's ``@RSYNCD:`` greeting: (the protocol both speak, the daemon's auth digest names)."""
    m = _GREETING.match(line)
    if not m:
        raise RemoteProtocolError(f"not an rsync daemon greeting: {line[:200]!r}")
    remote = int(m.group(1))
    sub = int(m.group(2)) if m.group(2) is not None else -1
    if sub < 0 and remote >= 30:
        raise RemoteProtocolError(f"the daemon omitted the subprotocol value: {line!r}")
    if m.group(3) is not None:
        auth = parse_name_list(m.group(3), "auth digest")
    elif remote > 31:
        raise RemoteProtocolError(f"the daemon omitted the digest name list: {line!r}")
    else:
        auth = ["md5"]
    # clientserver.c exchange_protocols: a pre-release (sub != 0) of a newer protocol counts as one less.
    negotiated = min(ours, remote)
    if negotiated == remote and sub > 0:
        negotiated -= 1
    if negotiated not in SUPPORTED_PROTOCOLS:
        raise RemoteProtocolError(
            f"protocol mismatch: the daemon speaks {remote}.{max(sub, 0)}, this client supports "
            f"{SUPPORTED_PROTOCOLS[0]}..{SUPPORTED_PROTOCOLS[-1]}"
        )
    return negotiated, auth


def _module_refused(line: bytes, module: bytes) -> RemoteProtocolError:
    """The error for the daemon's ``@ERROR`` line in answer to the module name."""
    text = line.decode(errors="replace")
    low = text.lower()
    name = module.decode(errors="replace")
    if "unknown module" in low:
        return RemoteProtocolError(f"unknown module {name!r}: {text}")
    if "auth failed" in low:
        return RemoteProtocolError(f"authentication failed for module {name!r}: {text}")
    return RemoteProtocolError(f"the daemon refused the module: {text}")


def _in_list_order(entries: Sequence[FileEntry]) -> list[FileEntry]:
    """``entries`` sorted as rsync's file list (flist.sort_key); a name listed twice is our bug."""
    if len({e.name for e in entries}) != len(entries):
        names = sorted(e.name for e in entries)
        dup = next(a for a, b in itertools.pairwise(names) if a == b)
        raise LocalProtocolError(f"duplicate file-list entry {dup!r}")
    return [e for _, e in sorted((sort_key(e), e) for e in entries)]


def _read_sums(r: Reader, checksum: str) -> SumHead:
    """sender.c receive_sums / io.c read_sum_head, validated."""
    count, blength, s2length, remainder = r.unpack(_SUM_HEAD)
    for what, v, hi in (("block count", count, MAX_BLOCK_COUNT), ("block length", blength, MAX_BLOCK_SIZE),
                        ("checksum length", s2length, DIGEST_LEN.get(checksum, 16)),
                        ("remainder length", remainder, blength)):
        if not 0 <= v <= hi:
            raise RemoteProtocolError(f"{what} out of range from the peer: {v} not in [0, {hi}]")
    if count and not blength:
        raise RemoteProtocolError("block checksums with a zero block length")
    if not count:
        return SumHead(0, blength, s2length, remainder, (), ())
    step = 4 + s2length
    raw = r.take(count * step)
    sum1 = tuple(int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), step))
    sum2 = tuple(raw[i + 4 : i + step] for i in range(0, len(raw), step))
    return SumHead(count, blength, s2length, remainder, sum1, sum2)


def _literal(out: bytearray, frame: _DataFrame, mv: memoryview, start: int, end: int) -> None:
    """``mv[start:end]`` as literal tokens (a length, then the bytes) of at most CHUNK_SIZE bytes each."""
    pack_int = _INT.pack
    for s in range(start, end, codec.CHUNK_SIZE):
        e = min(end, s + codec.CHUNK_SIZE)
        out += pack_int(e - s)
        out += mv[s:e]
        frame.roll()


class PushSession:
    """One push session: a whole batch of files over one connection."""

    def __init__(self, entries: Sequence[FileEntry], opts: PushOptions, mode: Mode = Mode.DAEMON,
                 module: bytes = b"") -> None:
        if opts.protocol not in SUPPORTED_PROTOCOLS:
            raise LocalProtocolError(f"protocol {opts.protocol} not supported (supported: {SUPPORTED_PROTOCOLS})")
        if mode is Mode.DAEMON and (not module or b"/" in module or b"\n" in module):
            raise LocalProtocolError(f"bad module name {module!r}")
        self.opts = opts
        self.mode = mode
        self.module = module
        self.entries = _in_list_order(entries)
        self.protocol = opts.protocol
        self.counters = Counters()
        self.compat_flags = 0
        self.checksum = "md5"
        self.seed = 0
        self.auth_digest: str | None = None
        self._out = bytearray()
        self._raw = bytearray()  # unframed bytes (before multiplexing starts)
        self._data = bytearray()  # demultiplexed MSG_DATA payloads
        self._demux: codec.Demux | None = None
        self._events: list[Event] = []
        self._eof = False
        self._ndx_in: codec.NdxCodec | None = None
        self._ndx_out: codec.NdxCodec | None = None
        self._phase = 0
        self._pending: tuple[int, int, int, bytes | None, SumHead] | None = None
        self._server_auth: list[str] = []
        self._args_sent = False
        self._flist_sent = False
        self._early = False  # the list went with the greeting (opts.expect)
        self.state = State.GREETING if mode is Mode.DAEMON else State.VERSION
        if mode is Mode.DAEMON:
            # Each step the daemon reads in order is written at once, not after its reply: over a link of 200 ms
            # RTT every wait costs a round trip per session. The module name follows the greeting (the daemon reads
            # both before answering: clientserver.c exchange_protocols, rsync_module), and without a password the
            # arguments follow too: a module that wants one answers AUTHREQD first, which fails the session here
            # before the daemon reads them as a reply (with a password they wait for the challenge, see below).
            self._send_raw(f"@RSYNCD: {self.protocol}.0 {' '.join(AUTH_NAMES)}\n".encode())
            self._send_raw(self.module + b"\n")
            if opts.password is None:
                self._send_args()
                if opts.expect is not None and opts.expect[0] <= self.protocol:
                    # What the daemon reads after the arguments, written now too: its replies come in order (OK,
                    # compat flags, checksum names, seed), each small write held by its Nagle until our ack of the
                    # one before, and its generator's first request only after them; sent with the greeting the
                    # file list is read as soon as the seed is written. Only the encoding of the list depends on
                    # the replies: it is the one an earlier session got (checked when they come).
                    self.protocol, self.compat_flags = opts.expect
                    self._early = True
                    if self.compat_flags & CF_VARINT_FLIST_FLAGS:
                        self._send_negotiation()
                    self._send_flist()
        else:
            self._send_raw(codec.enc_int(self.protocol))

    # --- the public surface ----------------------------------------------------------------------------------

    def data_to_send(self) -> bytearray:
        """What to write to the peer; the caller owns the buffer (no copy is made)."""
        out = self._out
        self._out = bytearray()
        return out

    def pending_output(self) -> int:
        """How many bytes :meth:`data_to_send` would return now."""
        return len(self._out)

    def receive_data(self, data: bytes) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("session already failed")
        if not data:
            self._eof = True
            return
        if self._demux is None:
            self._raw += data
        else:
            self._take_frames(data)

    def next_event(self) -> Event | _NeedData:
        if self.state is State.FILE:
            raise LocalProtocolError("answer the FileRequested event with send_file() first")
        try:
            while not self._events:
                progressed = self._step()
                if self._events:
                    break
                if not progressed:
                    if self._eof and self.state is not State.DONE:
                        raise self._early_close()
                    return NEED_DATA
        except RemoteProtocolError:
            self.state = State.ERROR
            raise
        return self._events.pop(0)

    def send_file(self, ndx: int, data: bytes | memoryview) -> None:
        """Send the requested file's content as a delta against the receiver's block checksums."""
        # The file may have changed after the list was sent; rsync sends what it reads (the checksum covers it).
        mv = memoryview(data)
        pending = self._pending
        if (pending is not None and pending[0] == ndx and not pending[4].count and len(mv) <= codec.CHUNK_SIZE
                and self.state is State.FILE):
            self._send_small_new(pending, mv)
            return
        frame, sums = self._file_start(ndx, "send_file")
        out = self._out
        if sums.count == 0:
            # nothing to match against (a new file): the whole file as literal runs, no block matcher set up
            _literal(out, frame, mv, 0, len(mv))
            self.counters.literal_bytes += len(mv)
            self._file_end(frame, file_checksum(self.checksum, mv))
            return
        # numpy: imported by the first file that has a basis to match, never by a transfer of new files only
        from kwatch.protocols.rsync.match import match_blocks

        strong = block_hasher(self.checksum, self.seed)
        fsum = FileHasher(self.checksum)
        pack_int = _INT.pack
        for tok in match_blocks(mv, sums, strong):
            if isinstance(tok, Literal):
                _literal(out, frame, mv, tok.start, tok.end)
                self.counters.literal_bytes += tok.end - tok.start
            else:
                assert isinstance(tok, Match)
                out += pack_int(-(tok.block + 1))
                self.counters.matched_bytes += tok.length
                frame.roll()
        fsum.update(mv)
        self._file_end(frame, fsum.digest())

    def _send_small_new(self, pending: tuple[int, int, int, bytes | None, SumHead], mv: memoryview) -> None:
        """:meth:`send_file` of a file the receiver has no blocks of, in one literal token (at most CHUNK_SIZE):
        what :meth:`_file_start`, :func:`_literal` and :meth:`_file_end` write, in one MSG_DATA frame whose length
        is known before it is written. A first sync of small files sends nothing else, one call per file."""
        ndx, iflags, basis, xname, sums = pending
        self._pending = None
        head = self._ndx_and_attrs(ndx, iflags, basis, xname)
        digest = file_checksum(self.checksum, mv)
        n = len(mv)
        size = len(head) + _SUM_HEAD.size + (4 + n if n else 0) + 4 + len(digest)
        out = self._out
        out += _FRAME_HEAD.pack((codec.MPLEX_BASE + Msg.DATA) << 24 | size)
        out += head
        out += _SUM_HEAD.pack(sums.count, sums.blength, sums.s2length, sums.remainder)
        if n:
            out += _INT.pack(n)
            out += mv
        out += _END_TOKEN
        out += digest
        self.counters.literal_bytes += n
        self.counters.files_sent += 1
        self.state = State.TRANSFER

    def send_literal(self, ndx: int, chunks: Iterable[bytes]) -> None:
        """Send the requested file whole from ``chunks`` (its content in order), for a request without block sums
        (:attr:`FileRequested.sums` count 0: the receiver has no basis): no copy of the whole file is needed first."""
        if self._pending is not None and self._pending[0] == ndx and self._pending[4].count:
            raise LocalProtocolError(f"send_literal({ndx}) for a request with {self._pending[4].count} block sums")
        frame, _sums = self._file_start(ndx, "send_literal")
        out = self._out
        fsum = FileHasher(self.checksum)
        n = 0
        for chunk in chunks:
            mv = memoryview(chunk)
            fsum.update(mv)
            _literal(out, frame, mv, 0, len(mv))
            n += len(mv)
        self.counters.literal_bytes += n
        self._file_end(frame, fsum.digest())

    def _file_start(self, ndx: int, what: str) -> tuple[_DataFrame, SumHead]:
        """Take the pending request for ``ndx`` and write the file's index, attributes and sum head, in a MSG_DATA
        frame whose header is filled in as it closes: the tokens go straight into the output after them (the
        file's bytes are copied once, never re-framed)."""
        if self.state is not State.FILE or self._pending is None or self._pending[0] != ndx:
            raise LocalProtocolError(f"{what}({ndx}) without a matching FileRequested")
        _ndx, iflags, basis, xname, sums = self._pending
        self._pending = None
        out = self._out
        frame = _DataFrame(out)
        out += self._ndx_and_attrs(ndx, iflags, basis, xname)
        out += _SUM_HEAD.pack(sums.count, sums.blength, sums.s2length, sums.remainder)
        return frame, sums

    def _file_end(self, frame: _DataFrame, digest: bytes) -> None:
        """The end of a file's tokens and its whole-file checksum."""
        self._out += _INT.pack(0)
        self._out += digest
        frame.close()
        self.counters.files_sent += 1
        self.state = State.TRANSFER

    def skip_file(self, ndx: int) -> None:
        """The requested file cannot be read (vanished): tell the receiver (MSG_NO_SEND), as sender.c does."""
        if self.state is not State.FILE or self._pending is None or self._pending[0] != ndx:
            raise LocalProtocolError(f"skip_file({ndx}) without a matching FileRequested")
        self._pending = None
        self._out += codec.enc_frame(Msg.NO_SEND, codec.enc_int(ndx))
        self.state = State.TRANSFER

    # --- plumbing --------------------------------------------------------------------------------------------

    def _send_raw(self, b: bytes) -> None:
        self._out += b

    def _send_data(self, b: bytes | bytearray) -> None:
        frame = _DataFrame(self._out)
        self._out += b
        frame.close()

    def _early_close(self) -> RemoteProtocolError:
        msgs = "; ".join(self.counters.remote_errors)
        detail = f" (peer said: {msgs})" if msgs else ""
        return RemoteProtocolError(f"the rsync peer closed the connection early, {self.state.value}{detail}")

    def _take_frames(self, data: bytes) -> None:
        assert self._demux is not None
        for code, payload in self._demux.feed(data):
            self._on_frame(code, payload)

    def _on_frame(self, code: int, payload: bytes) -> None:
        try:
            msg = Msg(code)
        except ValueError:
            raise RemoteProtocolError(f"unknown multiplexed message code {code}") from None
        if msg is Msg.DATA:
            self._data += payload
        elif msg in (Msg.INFO, Msg.WARNING, Msg.LOG, Msg.CLIENT):
            self._events.append(RemoteMessage(msg, payload))
        elif msg in (Msg.ERROR, Msg.ERROR_XFER, Msg.ERROR_SOCKET, Msg.ERROR_UTF8):
            self.counters.remote_errors.append(payload.decode(errors="replace").strip())
            self._events.append(RemoteMessage(msg, payload))
        elif msg in (Msg.IO_ERROR, Msg.IO_TIMEOUT, Msg.SUCCESS, Msg.NO_SEND):
            if len(payload) != 4:
                raise RemoteProtocolError(f"{msg.name} with a {len(payload)}-byte payload")
        elif msg is Msg.DELETED:
            self._events.append(RemoteMessage(msg, payload))
        elif msg is Msg.NOOP:
            pass
        elif msg is Msg.ERROR_EXIT:
            detail = "; ".join(self.counters.remote_errors) or "no message"
            raise RemoteProtocolError(f"the rsync peer exited with an error: {detail}")
        else:
            raise RemoteProtocolError(f"unexpected {msg.name} message from the rsync peer")

    def _step(self) -> bool:
        """Parse one unit from the buffered input; True if something was consumed."""
        if self.state is State.TRANSFER and self._new_file_request():
            return True
        if self.state in (State.GREETING, State.MODULE, State.COMPAT, State.VERSION, State.NEGOTIATE, State.SEED):
            buf = self._raw
        elif self.state in (State.TRANSFER, State.GOODBYE):
            buf = self._data
        else:
            return False
        r = Reader(buf)
        saved = (self._ndx_in.prev_positive, self._ndx_in.prev_negative) if self._ndx_in else None
        try:
            self._parse(r)
        except NeedMore:
            if saved is not None and self._ndx_in is not None:
                self._ndx_in.prev_positive, self._ndx_in.prev_negative = saved
            return False
        del buf[: r.pos]
        if self._demux is None and self.state in (State.TRANSFER,):
            self._start_multiplex()
        return True

    def _parse(self, r: Reader) -> None:
        st = self.state
        if st is State.GREETING:
            self._on_greeting(r.line())
        elif st is State.MODULE:
            self._on_module_line(r.line())
        elif st is State.VERSION:
            self._on_version(codec.dec_int(r))
        elif st is State.COMPAT:
            self._on_compat(codec.dec_varint(r))
        elif st is State.NEGOTIATE:
            self._on_negotiate(r)
        elif st is State.SEED:
            self.seed = codec.dec_int(r)
            self._events.append(Negotiated(self.protocol, self.checksum, self.compat_flags, self.auth_digest))
            self.state = State.TRANSFER
        elif st is State.TRANSFER:
            self._on_transfer(r)
        elif st is State.GOODBYE:
            self._on_goodbye(r)

    def _on_greeting(self, line: bytes) -> None:
        negotiated, self._server_auth = _greeting(line, self.protocol)
        if self._early and negotiated != self.protocol:
            raise RemoteProtocolError(f"the daemon's protocol changed ({self.protocol} -> {negotiated}) since the "
                                      "session whose negotiation this one assumed")
        self.protocol = negotiated
        self.state = State.MODULE

    def _on_module_line(self, line: bytes) -> None:
        if line.startswith(b"@RSYNCD: AUTHREQD "):
            challenge = line[len(b"@RSYNCD: AUTHREQD ") :]
            if not challenge or len(challenge) > 256 or not re.fullmatch(rb"[A-Za-z0-9+/=]+", challenge):
                raise RemoteProtocolError(f"bad auth challenge from the daemon: {challenge[:80]!r}")
            if self.opts.password is None:
                raise LocalProtocolError(
                    f"module {self.module.decode(errors='replace')!r} needs a password: pass one or set "
                    "RSYNC_PASSWORD / a password file"
                )
            if self._args_sent:
                raise RemoteProtocolError("the daemon asked for a password after the arguments were sent")
            self.auth_digest = choose(AUTH_NAMES, self._server_auth, "daemon auth digest")
            resp = auth_response(self.auth_digest, self.opts.password, challenge)
            self._send_raw(self.opts.user + b" " + resp + b"\n")
            self._send_args()  # read after the daemon's OK, or never if the password is refused
        elif line == b"@RSYNCD: OK":
            self._send_args()
            self.state = State.COMPAT
        elif line == b"@RSYNCD: EXIT":
            raise RemoteProtocolError("the daemon ended the session before the transfer (@RSYNCD: EXIT)")
        elif line.startswith(b"@ERROR"):
            raise _module_refused(line, self.module)
        else:
            self._events.append(Motd(line))

    def _send_args(self) -> None:
        """The server arguments and the destination, each NUL-terminated, then an empty one (once)."""
        if self._args_sent:
            return
        self._args_sent = True
        args = build_server_args(self.opts)
        dest = self.module + b"/" + self.opts.dest.lstrip(b"/")
        for a in [*args, dest]:
            if b"\0" in a:
                raise LocalProtocolError(f"NUL byte in argument {a!r}")
            self._send_raw(a + b"\0")
        self._send_raw(b"\0")

    def _on_version(self, remote: int) -> None:
        if remote < 30:
            raise RemoteProtocolError(f"protocol mismatch: the remote rsync speaks {remote}, need >= 30")
        if remote > 40:
            raise RemoteProtocolError(f"protocol mismatch: the remote sent version {remote} (is the shell clean?)")
        self.protocol = min(self.protocol, remote)
        self.state = State.COMPAT

    def _on_compat(self, flags: int) -> None:
        if flags < 0 or flags >= 1 << 16:
            raise RemoteProtocolError(f"bad compat flags {flags:#x}")
        if flags & CF_INC_RECURSE:
            raise RemoteProtocolError("the server enabled incremental recursion although we did not offer it")
        if self._early and flags != self.compat_flags:
            raise RemoteProtocolError(f"the daemon's compat flags changed ({self.compat_flags:#x} -> {flags:#x}) "
                                      "since the session whose negotiation this one assumed")
        self.compat_flags = flags
        if flags & CF_VARINT_FLIST_FLAGS:
            if not self._early:
                self._send_negotiation()
            self.state = State.NEGOTIATE
        else:
            self.checksum = "md5"  # compat.c: protocol >= 30 without negotiation
            self.state = State.SEED
        # The filter list and the file list need neither the peer's checksum choice nor the seed, and the server
        # reads them only after writing its seed (compat.c setup_protocol, then main.c do_server_recv): written
        # now, they do not wait a round trip for the seed.
        self._send_flist()

    def _send_negotiation(self) -> None:
        self._send_raw(codec.enc_vstring(" ".join(self.opts.checksums).encode()))
        if self.opts.compress:
            self._send_raw(codec.enc_vstring(" ".join(COMPRESS_NAMES).encode()))

    def _on_negotiate(self, r: Reader) -> None:
        theirs = parse_name_list(codec.dec_vstring(r, 1024), "checksum")
        if self.opts.compress:
            zs = parse_name_list(codec.dec_vstring(r, 1024), "compress")
            choose(COMPRESS_NAMES, zs, "compression")
        self.checksum = choose(self.opts.checksums, theirs, "checksum")
        self.state = State.SEED

    def _start_multiplex(self) -> None:
        """From the seed on, the peer's output is multiplexed."""
        self._demux = codec.Demux()
        self._ndx_in = codec.NdxCodec(self.protocol)
        rest = bytes(self._raw)
        self._raw.clear()
        self._send_flist()
        if rest:
            self._take_frames(rest)

    def _send_flist(self) -> None:
        """The filter list and the file list, in MSG_DATA frames (our output is multiplexed from here), once."""
        if self._flist_sent:
            return
        self._flist_sent = True
        self._ndx_out = codec.NdxCodec(self.protocol)
        out = bytearray()
        if self.opts.delete or self.opts.delete_missing:
            # exclude.c send_filter_list / send_rules: each rule as an int length and its text, then 0
            for path in self.opts.protect:
                rule = protect_rule(path)
                out += codec.enc_int(len(rule)) + rule
            out += codec.enc_int(0)
        varint = bool(self.compat_flags & CF_VARINT_FLIST_FLAGS)
        enc = FlistEncoder(self.protocol, varint)
        linking = self.opts.hard_links and self.protocol >= 30
        hlinks = hlink_indexes(self.entries) if linking else [None] * len(self.entries)
        bulk = encode_list(self.entries, self.protocol) if varint and not any(h is not None for h in hlinks) else None
        if bulk is not None:
            out += bulk
        else:
            for e, hlink in zip(self.entries, hlinks, strict=True):
                out += enc.encode(e, hlink)
        out += enc.end(0)
        self._send_data(out)

    def _ndx_and_attrs(self, ndx: int, iflags: int, basis: int, xname: bytes | None) -> bytes:
        assert self._ndx_out is not None
        out = self._ndx_out.encode(ndx) + codec.enc_shortint(iflags)
        if iflags & ITEM_BASIS_TYPE_FOLLOWS:
            out += bytes((basis,))
        if iflags & ITEM_XNAME_FOLLOWS:
            out += codec.enc_vstring(xname or b"")
        return out

    def _read_ndx(self, r: Reader) -> int:
        """rsync.c read_ndx_and_attrs' index part; NDX_DEL_STATS is consumed here."""
        assert self._ndx_in is not None
        while True:
            ndx = self._ndx_in.decode(r)
            if ndx != codec.NDX_DEL_STATS:
                return ndx
            vals = [codec.dec_varint_bounded(r, 0, 1 << 30, "delete stats") for _ in range(5)]
            self._events.append(DeleteStats(*vals))

    def _on_transfer(self, r: Reader) -> None:
        assert self._ndx_out is not None
        ndx = self._read_ndx(r)
        if ndx == codec.NDX_DONE:
            self._phase += 1
            self._send_data(self._ndx_out.encode(codec.NDX_DONE))
            if self._phase > 2:
                self.state = State.GOODBYE
            return
        if ndx < 0 or ndx >= len(self.entries):
            raise RemoteProtocolError(f"invalid file index {ndx} (list has {len(self.entries)} entries)")
        iflags = codec.dec_shortint(r)
        basis = r.byte() if iflags & ITEM_BASIS_TYPE_FOLLOWS else 0
        xname = codec.dec_vstring(r, 4096) if iflags & ITEM_XNAME_FOLLOWS else None
        entry = self.entries[ndx]
        if not iflags & ITEM_TRANSFER:
            self._send_data(self._ndx_and_attrs(ndx, iflags, basis, xname))
            return
        if self._phase >= 2:
            raise RemoteProtocolError(f"transfer request for {entry.name!r} in the final phase")
        if not stat.S_ISREG(entry.mode):
            raise RemoteProtocolError(f"transfer request for non-file {entry.name!r}")
        sums = _read_sums(r, self.checksum)
        self._pending = (ndx, iflags, basis, xname, sums)
        self.state = State.FILE
        self._events.append(FileRequested(ndx, entry, sums))

    def _new_file_request(self) -> bool:
        """The generator's usual request, taken without the general parser: the next file or one a few on in the
        list (a one-byte index delta), plain transfer flags, and the all-zero sum head of a file the receiver has
        no copy of; True if one was taken. Anything else (or a request this one would refuse) is left to
        :meth:`_on_transfer`, which validates it and says what is wrong."""
        buf = self._data
        ndx_in = self._ndx_in
        if len(buf) < 19 or ndx_in is None or self.protocol < 30 or self._phase >= 2 or not 0 < buf[0] < 0xFE:
            return False
        iflags = buf[1] | buf[2] << 8
        if iflags & (ITEM_TRANSFER | _REQUEST_EXTRAS) != ITEM_TRANSFER or buf[3:19] != _NO_SUMS_WIRE:
            return False
        ndx = ndx_in.prev_positive + buf[0]
        if ndx >= len(self.entries):
            return False
        entry = self.entries[ndx]
        if not stat.S_ISREG(entry.mode):
            return False
        ndx_in.prev_positive = ndx
        del buf[:19]
        self._pending = (ndx, iflags, 0, None, _NO_SUMS)
        self.state = State.FILE
        self._events.append(FileRequested(ndx, entry, _NO_SUMS))
        return True

    def _on_goodbye(self, r: Reader) -> None:
        assert self._ndx_out is not None
        ndx = self._read_ndx(r)
        if ndx != codec.NDX_DONE:
            raise RemoteProtocolError(f"invalid packet at the end of the run ({ndx})")
        if self.protocol >= 31 and self._phase == 3:
            self._phase = 4
            self._send_data(self._ndx_out.encode(codec.NDX_DONE))
            return
        self.state = State.DONE
        self._events.append(SessionDone())

"""The agent protocol's per-connection state, sans-IO: :class:`AgentConnection` takes bytes and gives validated
messages, takes messages and gives bytes (modelled on h11). One state per direction, transitions as a table; the
conversation-level checks (request ids, signature sizes, commit order) run here on both sides, so we refuse to send
what the peer would reject. No I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import zstandard

from kwatch.protocols.agent.codec import HEADER, decode_frame_body, encode_frame
from kwatch.protocols.agent.fields import MAX_FRAME, MAX_OPEN_SIGS, MAX_SIG_BLOCKS, MAX_TEXT, Invalid
from kwatch.protocols.agent.messages import (
    RECEIVER_MESSAGES,
    SENDER_MESSAGES,
    Ack,
    Commit,
    Copy,
    Delete,
    DeltaBegin,
    DeltaChunk,
    DeltaEnd,
    Error,
    Hardlink,
    Hello,
    ManifestEntries,
    ManifestRequest,
    Message,
    Mkdir,
    PutBegin,
    PutChunk,
    PutEnd,
    PutFile,
    PutFiles,
    Rename,
    Role,
    SetAttr,
    Signature,
    SigRequest,
    Symlink,
)
from kwatch.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
MIN_VERSION: Final = 1
#: Capabilities this implementation understands; the negotiated set is the intersection of both Hellos.
#: ``inodes``: manifest entries say which paths are one inode (``nlink`` and a link id), so a reconcile can keep and
#: break hard links; ``linkcheck``: a Hardlink may carry the size and mtime its existing name must have.
#: ``oneshot`` is a hint, not a feature: a sender offers it when it closes the link after one reconcile (``kwatch
#: replicate --once``), and a receiver then prepares nothing for later batches (kwatch/replicate/preload.py). A peer
#: without it just does not see the hint.
CAPABILITIES: Final = frozenset({"zstd", "delta", "hardlink", "xxh3", "putfiles", "inodes", "linkcheck", "oneshot"})


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

    def _compress(self, data: bytes) -> list[Any]:
        """A payload's two wire fields, zstd when that is worth it."""
        if len(data) < 512:
            return [data, None]
        blob = self._compressor.compress(data)
        # Only worth it when it saves at least 1/16: incompressible data is sent plain, saving the peer the work.
        return [blob, len(data)] if len(blob) < len(data) - len(data) // 16 else [data, None]

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
        # Small-file frames stay plain: the sender is the busy end of a burst of small files, and compressing them
        # (one by one, or even once per PutFiles frame) costs it more time than the smaller frames save on the wire
        # (bench/: the untar benchmark over ssh). Only chunked data is compressed.
        compress = (
            self._compress if "zstd" in self.capabilities and isinstance(msg, PutChunk | DeltaChunk) else None
        )
        frame = encode_frame(msg, compress)  # validates the fields first, with no side effects
        try:
            self._track(msg)
        except Invalid as e:
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
        (length,) = HEADER.unpack_from(buf)
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
            self._track(msg)
        except Invalid as e:
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
                raise Invalid(f"manifest entry {e.relpath!r} has an inode identity, but inodes was not negotiated")
            if seen is None:
                seen = self._inodes.setdefault(msg.id, {})
            attrs = (e.size, e.mtime_ns, e.mode, e.uid, e.gid, e.nlink)
            prev = seen.get(e.link)
            if prev is None:
                seen[e.link] = (attrs, 1)
                continue
            if prev[0] != attrs:
                raise Invalid(f"manifest entry {e.relpath!r}: link id {e.link} names one inode, but its size, "
                               "mtime, mode, owner or nlink differ from another name's")
            if prev[1] + 1 > e.nlink:
                raise Invalid(f"manifest entry {e.relpath!r}: more names of link id {e.link} than its nlink "
                               f"{e.nlink}")
            seen[e.link] = (attrs, prev[1] + 1)

    def _track(self, msg: Message) -> None:
        """Check and record ids and sequence numbers; raises Invalid (mapped to the right error by the caller).

        The same rules run on both sides, so the sender refuses to send what the receiver would reject.
        """
        check = _TRACKERS.get(type(msg))
        if check is not None:
            check(self, msg)

    def _manifest_request(self, msg: ManifestRequest) -> None:
        if msg.id in self._manifests:
            raise Invalid(f"manifest request id {msg.id} is already open")
        self._manifests.add(msg.id)

    def _manifest_entries(self, msg: ManifestEntries) -> None:
        if msg.id not in self._manifests:
            raise Invalid(f"manifest entries for id {msg.id}, which was not requested or is finished")
        self._track_inodes(msg)
        if msg.done:
            self._manifests.discard(msg.id)
            self._inodes.pop(msg.id, None)

    def _hardlink(self, msg: Hardlink) -> None:
        if msg.size is not None and "linkcheck" not in self.capabilities:
            raise Invalid(f"Hardlink of {msg.relpath!r} with an expected size and mtime, but linkcheck "
                          "was not negotiated")

    def _sig_request(self, msg: SigRequest) -> None:
        if msg.id in self._sigs:
            raise Invalid(f"signature id {msg.id} was used already")
        if len(self._sigs) >= MAX_OPEN_SIGS:
            raise Invalid(f"more than {MAX_OPEN_SIGS} signature requests open (not yet used by a delta)")
        self._sigs[msg.id] = None

    def _signature(self, msg: Signature) -> None:
        if msg.id not in self._sigs:
            raise Invalid(f"signature for id {msg.id}, which was not requested")
        prog = self._sigs[msg.id]
        if prog is None:
            if -(-msg.file_size // msg.block_size) > MAX_SIG_BLOCKS:
                raise Invalid(f"signature id {msg.id}: {msg.file_size} bytes in blocks of {msg.block_size} "
                              f"is more than {MAX_SIG_BLOCKS} blocks")
            prog = self._sigs[msg.id] = _SigProgress(msg.block_size, msg.file_size, msg.seed)
        elif prog.done:
            raise Invalid(f"signature id {msg.id} is already complete")
        elif (prog.block_size, prog.file_size, prog.seed) != (msg.block_size, msg.file_size, msg.seed):
            raise Invalid(f"signature id {msg.id} changed block size, file size or seed between pieces")
        prog.blocks += len(msg.weak) // 4
        expected = -(-prog.file_size // prog.block_size)
        if prog.blocks > expected or (msg.done and prog.blocks != expected):
            raise Invalid(
                f"signature id {msg.id}: {prog.blocks} blocks for {prog.file_size} bytes in blocks of "
                f"{prog.block_size} (expected {expected})"
            )
        prog.done = msg.done

    def _delta_begin(self, msg: DeltaBegin) -> None:
        prog = self._sigs.pop(msg.sig_id, None)
        if prog is None or not prog.done:
            raise Invalid(f"delta for {msg.relpath!r} refers to signature id {msg.sig_id}, which is not complete")
        self._delta_blocks = -(-prog.file_size // prog.block_size)
        self._put_left = msg.size

    def _delta_chunk(self, msg: DeltaChunk) -> None:
        for op in msg.ops:
            if isinstance(op, Copy) and op.start + op.count > self._delta_blocks:
                raise Invalid(
                    f"delta copies blocks {op.start}..{op.start + op.count - 1} of a basis of {self._delta_blocks}"
                )

    def _put_begin(self, msg: PutBegin) -> None:
        self._put_left = msg.size

    def _put_chunk(self, msg: PutChunk) -> None:
        left = self._put_left or 0
        if len(msg.data) > left:
            raise Invalid(f"put carries more data than the {left} bytes announced")
        self._put_left = left - len(msg.data)

    def _put_end(self, msg: PutEnd) -> None:
        if self._put_left:
            raise Invalid(f"put ended {self._put_left} bytes short of the size announced")
        self._put_left = None

    def _delta_end(self, msg: DeltaEnd) -> None:
        self._put_left = None

    def _commit(self, msg: Commit) -> None:
        if msg.seq <= self._last_commit:
            raise Invalid(f"commit seq {msg.seq} does not increase (last was {self._last_commit})")
        self._last_commit = msg.seq
        self._commits.append(msg.seq)

    def _ack(self, msg: Ack) -> None:
        if not self._commits or self._commits[0] != msg.seq:
            want = self._commits[0] if self._commits else "none outstanding"
            raise Invalid(f"ack of seq {msg.seq}, expected {want} (acks come in commit order)")
        self._commits.pop(0)


#: The conversation-level check of each message that has one (the others are checked by their frame alone).
_TRACKERS: Final[dict[type[Any], Callable[[AgentConnection, Any], None]]] = {
    ManifestRequest: AgentConnection._manifest_request,
    ManifestEntries: AgentConnection._manifest_entries,
    Hardlink: AgentConnection._hardlink,
    SigRequest: AgentConnection._sig_request,
    Signature: AgentConnection._signature,
    DeltaBegin: AgentConnection._delta_begin,
    DeltaChunk: AgentConnection._delta_chunk,
    PutBegin: AgentConnection._put_begin,
    PutChunk: AgentConnection._put_chunk,
    PutEnd: AgentConnection._put_end,
    DeltaEnd: AgentConnection._delta_end,
    Commit: AgentConnection._commit,
    Ack: AgentConnection._ack,
}

def error_for(exc: ProtocolError) -> Error:
    """The :class:`Error` to send to the peer before closing, for a protocol error we hit."""
    code = "protocol" if isinstance(exc, RemoteProtocolError) else "internal"
    return Error(code, str(exc)[:MAX_TEXT], None)


"""The kwatch agent protocol, sans-IO: length-prefixed msgpack frames between a sender and a receiver (mirror agent).

This package owns the wire format, the message types, their validation, and the per-connection state machine
(:mod:`.messages`: each message with its fields; :mod:`.fields`: limits and field checks; :mod:`.codec`: frames;
:mod:`.state`: the connection). It does no I/O: feed received bytes to :meth:`AgentConnection.receive_data`, pull typed messages from
:meth:`AgentConnection.next_event`, and turn messages into bytes to write with :meth:`AgentConnection.send`
(modelled on h11). Compression (zstd) of file data is done here because it is part of the wire format; applying
operations to a filesystem is the mirror's job (which uses :func:`kwatch.paths.check_relpath` again before any
syscall).

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

from kwatch.paths import NAME_MAX, PATH_MAX, UnsafePathError, check_relpath, plain_relpath
from kwatch.protocols.agent.codec import decode_frame_body, encode_frame
from kwatch.protocols.agent.fields import (
    MAX_CHUNK,
    MAX_FILES_PER_FRAME,
    MAX_FRAME,
    MAX_FRAME_OBJECTS,
    MAX_OPEN_SIGS,
    MAX_SIG_BLOCKS,
    SIG_BLOCK_MAX,
    SIG_BLOCK_MIN,
)
from kwatch.protocols.agent.messages import (
    RECEIVER_MESSAGES,
    SENDER_MESSAGES,
    TYPE_CODES,
    TYPES_BY_CODE,
    Ack,
    Commit,
    Copy,
    Delete,
    DeltaBegin,
    DeltaChunk,
    DeltaEnd,
    DeltaOp,
    Entry,
    EntryType,
    Error,
    Hardlink,
    Hello,
    Literal,
    ManifestEntries,
    ManifestRequest,
    Message,
    Mkdir,
    PathError,
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
from kwatch.protocols.agent.state import (
    CAPABILITIES,
    MIN_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    TRANSITIONS,
    AgentConnection,
    ConnectionClosed,
    NeedData,
    State,
    error_for,
)

__all__ = [
    "CAPABILITIES",
    "MAX_CHUNK",
    "MAX_FILES_PER_FRAME",
    "MAX_FRAME",
    "MAX_FRAME_OBJECTS",
    "MAX_OPEN_SIGS",
    "MAX_SIG_BLOCKS",
    "MIN_VERSION",
    "NAME_MAX",
    "NEED_DATA",
    "PATH_MAX",
    "PROTOCOL_VERSION",
    "RECEIVER_MESSAGES",
    "SENDER_MESSAGES",
    "SIG_BLOCK_MAX",
    "SIG_BLOCK_MIN",
    "TRANSITIONS",
    "TYPES_BY_CODE",
    "TYPE_CODES",
    "Ack",
    "AgentConnection",
    "Commit",
    "ConnectionClosed",
    "Copy",
    "Delete",
    "DeltaBegin",
    "DeltaChunk",
    "DeltaEnd",
    "DeltaOp",
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
    "error_for",
    "plain_relpath",
]

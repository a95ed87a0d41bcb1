"""Protocol errors shared by every sans-IO protocol in :mod:`kwatch.protocols` (agent and rsync).

The split follows h11: a :class:`LocalProtocolError` means *we* misused the protocol object (sent a message the
state machine does not allow, built an invalid message); it is a bug on our side and the connection should be
torn down. A :class:`RemoteProtocolError` means the *peer* sent something malformed, hostile or out of order; the
bytes it sent are never acted on, and the transport should report the peer and close. Both carry a human message
that says what failed and, where known, which path.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of all protocol errors; catch this to handle both sides' mistakes alike."""


class LocalProtocolError(ProtocolError):
    """We used the protocol object wrongly (a bug in the caller, not in the peer)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are malformed, hostile, or not allowed in the current state."""

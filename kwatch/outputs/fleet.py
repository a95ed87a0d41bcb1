"""The fleet bus's wire format on NATS JetStream. Pure.

Each host publishes to the subject ``<prefix>.<host>``. One message carries a batch of consecutive records of one
host (their JSON lines, in order; the spool keeps batches of at most :data:`BATCH_BYTES`, and the publisher merges
consecutive ones into one message of up to 1 MiB), with headers:

- ``Nats-Msg-Id``: ``<host>:<boot id>:<first sequence number>``. JetStream drops a message whose id it has already
  stored within the stream's duplicate window (one window for the whole stream: hence the host in the id, as hosts
  cloned from one image, or two publishers on one machine, can share a boot id), so a batch sent again after a lost
  acknowledgement is stored once;
- ``Kwatch-Host``, ``Kwatch-Boot``, ``Kwatch-Seq`` (first record's sequence number), ``Kwatch-Count``.

Sequence numbers count a host's records from 1 within one boot id (the kernel's ``boot_id``), and go on across
restarts of the daemon (the spool keeps where they are). Only one batch is in flight at a time: a batch is sent
again until the server acknowledges it, and the next is sent only then, so a host's records are stored in order
even across a cluster's leader change. After a reconnect the publisher also asks the stream for the host's last
stored message: batches up to it are not sent again, whatever the duplicate window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BATCH_BYTES = 256 << 10  # under NATS's default 1 MiB max_payload, with room for headers
H_MSG_ID = "Nats-Msg-Id"
H_HOST = "Kwatch-Host"
H_BOOT = "Kwatch-Boot"
H_SEQ = "Kwatch-Seq"
H_COUNT = "Kwatch-Count"


@dataclass(frozen=True)
class Batch:
    boot: str  # the boot id as 32 hex digits
    first_seq: int
    count: int
    body: bytes  # ``count`` JSON lines

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1

    def msg_id(self, host: str) -> str:
        return f"{host}:{self.boot}:{self.first_seq}"

    def headers(self, host: str) -> dict[str, str]:
        return {H_MSG_ID: self.msg_id(host), H_HOST: host, H_BOOT: self.boot, H_SEQ: str(self.first_seq),
                H_COUNT: str(self.count)}


def subject(prefix: str, host: str) -> str:
    return f"{prefix}.{host}"


def chunk_lines(lines: Iterable[bytes], max_bytes: int = BATCH_BYTES) -> list[list[bytes]]:
    """Consecutive groups of whole lines of at most ``max_bytes`` each (a longer line alone)."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for line in lines:
        if cur and size + len(line) > max_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        out.append(cur)
    return out


def stored_upto(headers: Mapping[str, str] | None) -> tuple[str, int] | None:
    """(boot, last sequence number) of a stored message, from its headers; None when they are not ours."""
    if not headers:
        return None
    try:
        return headers[H_BOOT], int(headers[H_SEQ]) + int(headers[H_COUNT]) - 1
    except (KeyError, ValueError):
        return None


def already_stored(boot: str, last_seq: int, upto: tuple[str, int] | None) -> bool:
    """True when the stream's last message of this host shows that the batch of ``boot`` ending at ``last_seq`` was
    stored (same boot, not newer)."""
    return upto is not None and upto[0] == boot and last_seq <= upto[1]


def unpack(headers: Mapping[str, str] | None, body: bytes) -> tuple[str, str, int, list[bytes]] | None:
    """(host, boot, first seq, lines) of a message; None when it is not a kwatch batch."""
    if not headers or H_HOST not in headers:
        return None
    try:
        first = int(headers[H_SEQ])
        boot = headers[H_BOOT]
    except (KeyError, ValueError):
        return None
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return headers[H_HOST], boot, first, [ln + b"\n" for ln in lines]

"""The systemd journal as an output, over journald's native protocol; no libsystemd binding needed.

The protocol (systemd's "Native Journal Protocol" documentation): one ``AF_UNIX`` ``SOCK_DGRAM`` datagram per entry,
sent to ``/run/systemd/journal/socket``. An entry is a list of fields; a field whose value holds no newline is
``NAME=value\\n``; any other value (binary, multi-line) is ``NAME\\n``, its length as a little-endian 64-bit integer,
the value, ``\\n``. Names are upper-case letters, digits and ``_``, not starting with ``_`` (those are journald's own
trusted fields) or a digit, at most 64 characters. An entry too big for one datagram (``EMSGSIZE``) is written into a
sealed ``memfd`` whose descriptor is sent alone with ``SCM_RIGHTS``; journald reads the entry from it.

Fields of a record: ``MESSAGE`` (one readable line), ``PRIORITY`` (6 for events, the rule's level for alerts, 4 for
loss markers), ``SYSLOG_IDENTIFIER``, and every key of the record's JSON object as ``KWATCH_<KEY>`` (paths as their
exact bytes, which journalctl shows as a byte array when they are not UTF-8; lists and objects as JSON).

Pure: :func:`encode_entry`, :func:`record_fields`. I/O: :class:`JournalWriter`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import struct
from collections.abc import Callable, Iterable, Sequence

from kwatch.metrics.stats import OutputStats
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.record import Record

_FIELD_NAME = re.compile(rb"[A-Z0-9][A-Z0-9_]{0,63}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
SEND_TIMEOUT = 1.0  # seconds a send may wait for journald before the entry is counted as lost


def encode_entry(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The native-protocol serialisation of an entry (raises ValueError on a bad field name)."""
    out = bytearray()
    for name, value in fields:
        if _FIELD_NAME.fullmatch(name) is None or name[:1].isdigit():
            raise ValueError(f"bad journal field name {name!r}")
        if b"\n" in value:
            out += name + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += name + b"=" + value + b"\n"
    return bytes(out)


def _value(v: object) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")  # json_path's surrogates back to the path's bytes
    if isinstance(v, bool):
        return b"1" if v else b"0"
    if isinstance(v, (int, float)):
        return str(v).encode()
    return json.dumps(v, ensure_ascii=True, separators=(",", ":")).encode()


def summary(data: dict[str, object]) -> str:
    """The MESSAGE line of a record."""
    kind = data.get("kind")
    if kind == "loss":
        return f"kwatch: {data.get('lost')} records lost ({data.get('backend')}): {data.get('reason', 'capture loss')}"
    path = str(data.get("path", "")).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if "new_path" in data:
        path += " -> " + str(data["new_path"]).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    who = f" pid={data['pid']}" if "pid" in data else ""
    who += f" comm={data['comm']!s}" if "comm" in data else ""
    if kind == "alert":
        return f"kwatch alert {data.get('rule')}: {data.get('message')}: {data.get('op')} {path}{who}"
    return f"kwatch {data.get('op')} {path}{who}"


def record_fields(rec: Record, identifier: str) -> list[tuple[bytes, bytes]]:
    fields = [
        (b"MESSAGE", summary(rec.data).encode("utf-8", "backslashreplace")),
        (b"PRIORITY", str(rec.priority).encode()),
        (b"SYSLOG_IDENTIFIER", identifier.encode()),
    ]
    for key, v in rec.data.items():
        fields.append((b"KWATCH_" + key.upper().encode("ascii"), _value(v)))
    return fields


class JournalWriter:
    """Sends records to journald. A record journald cannot take (socket missing, timeout) is counted as lost; a
    marker entry says how many once a send succeeds again."""

    def __init__(self, spec: OutputSpec, stats: OutputStats, *, loss_marker: Callable[[int, str], Record]) -> None:
        self.spec = spec
        self.stats = stats
        self.loss_marker = loss_marker
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(SEND_TIMEOUT)
        self._pending_loss = 0

    def send(self, entry: bytes) -> None:
        """One entry: a datagram, or a sealed memfd when it is too big for one (raises OSError)."""
        try:
            self.sock.sendto(entry, self.spec.socket)
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        fd = os.memfd_create("kwatch-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0,
                              self.spec.socket)
        finally:
            os.close(fd)

    def write(self, records: Sequence[Record]) -> None:
        for i, rec in enumerate(records):
            if self._pending_loss:
                try:
                    self.send(encode_entry(record_fields(self.loss_marker(self._pending_loss, "journald did not take "
                                                                          "the entries"), self.spec.identifier)))
                    self._pending_loss = 0
                except OSError:
                    pass
            entry = encode_entry(record_fields(rec, self.spec.identifier))
            try:
                self.send(entry)
            except OSError:
                # journald is gone or stuck: the rest of the batch would fail too, or wait a timeout each
                self.stats.errors += 1
                self.stats.connected = False
                lost = len(records) - i
                self.stats.lost += lost
                self._pending_loss += lost
                return
            self.stats.connected = True
            self.stats.records += 1
            self.stats.bytes += len(entry)

    def close(self) -> None:
        self.sock.close()

"""A bounded on-disk FIFO of fleet batches, in front of the NATS server, kept across restarts.

Every batch the publisher makes is appended here first (one ``write`` per batch) and removed when the server has
acknowledged it, so a batch waits on disk while the server is unreachable and is sent in order when it is back; a
restarted daemon sends what the last one left. Batches live in segment files ``seg-<first seq>`` of about
``SEGMENT_BYTES``; a segment is deleted once all its batches are acknowledged.

A frame is a header (length, CRC-32 of the rest, first sequence number, record count, boot id as 16 bytes) and the
batch's lines. Opening the spool checks every frame: a torn or corrupt frame at the end of a segment (a crash while
appending) is cut off, with what follows it; the records it held were never acknowledged, and the count of cut bytes
is returned to the caller to announce.

The sequence numbers go on across restarts: :class:`SeqState` keeps, in ``seq`` in the spool directory, the boot id
and the end of a reserved block of numbers (written once per :data:`SEQ_BLOCK` records), and a restarted daemon
starts after the block, so a message id is never reused with the same boot id.

Not thread-safe: the publisher thread alone uses it (the backlog counters are plain ints read at scrape time).
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kwatch.outputs.fleet import Batch

SEGMENT_BYTES = 8 << 20
SEQ_BLOCK = 1 << 20
_HEAD = struct.Struct("<IIQI16s")  # body length, crc32 (of everything after it), first seq, count, boot
_PREFIX = "seg-"


@dataclass
class _Frame:
    offset: int
    length: int  # header + body
    first_seq: int
    count: int
    boot: str

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass
class _Segment:
    path: str
    size: int = 0
    frames: deque[_Frame] = field(default_factory=deque)


def encode_frame(batch: Batch) -> bytes:
    rest = struct.pack("<QI16s", batch.first_seq, batch.count, bytes.fromhex(batch.boot)) + batch.body
    return struct.pack("<II", len(batch.body), zlib.crc32(rest)) + rest


def decode_frames(data: bytes) -> tuple[list[tuple[int, Batch]], int]:
    """The whole frames at the start of ``data`` as (offset, batch), and the length they cover (the rest is torn)."""
    out = []
    off = 0
    while off + _HEAD.size <= len(data):
        length, crc, first, count, boot = _HEAD.unpack_from(data, off)
        end = off + _HEAD.size + length
        if end > len(data) or zlib.crc32(data[off + 8 : end]) != crc:
            break
        out.append((off, Batch(boot.hex(), first, count, data[off + _HEAD.size : end])))
        off = end
    return out, off


class Spool:
    def __init__(self, directory: str, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self.segments: deque[_Segment] = deque()
        self.bytes = 0
        self.records = 0
        self.last_seq = 0
        self.last_boot = ""
        self.repaired_bytes = 0
        self._fd = -1
        self._load()

    def _load(self) -> None:
        names = sorted(n for n in os.listdir(self.dir) if n.startswith(_PREFIX))
        for name in names:
            path = os.path.join(self.dir, name)
            with open(path, "rb") as f:
                data = f.read()
            frames, good = decode_frames(data)
            if good < len(data):
                self.repaired_bytes += len(data) - good
                os.truncate(path, good)
            if not frames:
                os.unlink(path)
                continue
            seg = _Segment(path, good)
            for off, b in frames:
                seg.frames.append(_Frame(off, _HEAD.size + len(b.body), b.first_seq, b.count, b.boot))
                self.records += b.count
                self.last_seq, self.last_boot = b.last_seq, b.boot
            self.bytes += good
            self.segments.append(seg)

    def append(self, batch: Batch) -> bool:
        """Append a batch; False (nothing written) when the spool would grow past ``max_bytes``."""
        frame = encode_frame(batch)
        if self.bytes + len(frame) > self.max_bytes and self.bytes > 0:
            return False
        seg = self.segments[-1] if self.segments else None
        if seg is None or seg.size >= self.segment_bytes or self._fd < 0:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if seg is None or seg.size >= self.segment_bytes:
                seg = _Segment(os.path.join(self.dir, f"{_PREFIX}{batch.boot}-{batch.first_seq:020d}"))
                self.segments.append(seg)
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        done = os.write(self._fd, frame)
        if done != len(frame):  # disk full: undo, so the segment holds whole frames only
            os.ftruncate(self._fd, seg.size)
            raise OSError(28, f"short write to the spool ({done} of {len(frame)} bytes)")
        seg.frames.append(_Frame(seg.size, len(frame), batch.first_seq, batch.count, batch.boot))
        seg.size += len(frame)
        self.bytes += len(frame)
        self.records += batch.count
        self.last_seq, self.last_boot = batch.last_seq, batch.boot
        return True

    def head(self) -> Batch | None:
        """The oldest batch not yet acknowledged (read back from the file: the page cache has it)."""
        got = self.head_run(0, 1)
        return got[0] if got is not None else None

    def head_run(self, max_bytes: int, max_frames: int) -> tuple[Batch, int] | None:
        """The oldest batches merged into one: (batch, how many were merged). Consecutive frames of the first
        segment, of one boot and numbered without a gap, at most ``max_frames`` of them, whose bodies add up to at
        most ``max_bytes`` (the first one always). One read of the file (the page cache has it)."""
        if not self.segments or not self.segments[0].frames:
            return None
        seg = self.segments[0]
        first = seg.frames[0]
        body_bytes = first.length - _HEAD.size
        last = first
        n = 1
        for fr in itertools.islice(seg.frames, 1, max_frames):
            size = fr.length - _HEAD.size
            if fr.boot != first.boot or fr.first_seq != last.last_seq + 1 or body_bytes + size > max_bytes:
                break
            body_bytes += size
            last = fr
            n += 1
        with open(seg.path, "rb") as f:
            f.seek(first.offset)
            data = f.read(last.offset + last.length - first.offset)
        frames, _ = decode_frames(data)
        if len(frames) != n:
            raise OSError(5, f"spool frames at {first.offset} of {seg.path} cannot be read back")
        if n == 1:
            return frames[0][1], 1
        return Batch(first.boot, first.first_seq, last.last_seq - first.first_seq + 1,
                     b"".join(b.body for _, b in frames)), n

    def drop_stored(self, stored: Callable[[str, int], bool]) -> tuple[int, int]:
        """Pop the oldest batches while ``stored(boot, last seq)`` says the server holds them; (records, body
        bytes) popped."""
        records = body = 0
        while self.segments and self.segments[0].frames:
            fr = self.segments[0].frames[0]
            if not stored(fr.boot, fr.last_seq):
                break
            records += fr.count
            body += fr.length - _HEAD.size
            self.pop()
        return records, body

    def pop(self, n: int = 1) -> None:
        """The ``n`` oldest batches were acknowledged: forget them; delete each segment whose last one they were."""
        for _ in range(n):
            seg = self.segments[0]
            fr = seg.frames.popleft()
            self.records -= fr.count
            self.bytes -= fr.length
            if not seg.frames:
                if len(self.segments) == 1 and self._fd >= 0:  # the segment being appended to
                    os.close(self._fd)
                    self._fd = -1
                self.segments.popleft()
                os.unlink(seg.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SeqState:
    """Sequence numbers that go on across restarts within one boot (see the module docstring)."""

    def __init__(self, directory: str, boot: str, spooled_boot: str = "", spooled_last: int = 0) -> None:
        self.path = os.path.join(directory, "seq")
        self.boot = boot
        start = 1
        try:
            with open(self.path) as f:
                saved_boot, saved_end = f.read().split()
            if saved_boot == boot:
                start = int(saved_end)
        except (OSError, ValueError):
            pass
        if spooled_boot == boot:
            start = max(start, spooled_last + 1)
        self.next = start
        self.reserved = start
        self._reserve()

    def _reserve(self) -> None:
        self.reserved = self.next + SEQ_BLOCK
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.boot} {self.reserved}\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)

    def take(self, n: int) -> int:
        """The first of ``n`` new consecutive sequence numbers."""
        first = self.next
        self.next += n
        if self.next > self.reserved:
            self._reserve()
        return first

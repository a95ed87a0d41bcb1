"""A BPF ring buffer consumer that reads records in bulk straight from the mmap'ed map.

Layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (read-write for us); from the next page, read-only, the
producer page (producer_pos) and then the data area mapped twice in a row, so a record that wraps around the end is
still contiguous in our view. Each record has an 8-byte header: u32 length with BUSY (bit 31, still being written)
and DISCARD (bit 30) flags, u32 page offset; records are 8-byte aligned. No ctypes call per record: one mmap read
per record header, and the consumer position is written once per batch. The walk over record headers runs in C
when ``_recordc`` is built (:func:`scan` is the Python reference).

The two positions are shared with producers running on other CPUs, so each is read and written as one aligned
8-byte access (:func:`u64_cell`). ``struct.pack_into`` is not one: CPython writes a ``Q`` byte by byte, and a
producer that read the consumer position half-written (seen as 0 in a debug map) found the ring "full" and failed
its reserve with the buffer nearly empty: those were the rare losses at 200k events/s (kernel/bpf/ringbuf.c,
__bpf_ringbuf_reserve: ``new_prod_pos - cons_pos > rb->mask``).
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable
from typing import TypeVar

from kwatch.capture.record import recordc

T = TypeVar("T")

_BUSY = 1 << 31
_DISCARD = 1 << 30
_U32 = struct.Struct("<I")


def u64_cell(buf: mmap.mmap | memoryview, offset: int = 0) -> memoryview:
    """A one-element native ``Q`` view of the aligned 8 bytes at ``offset``: indexing it is a single 8-byte load
    or store (CPython's memoryview packs native formats with a fixed-size memcpy), never a byte-wise copy."""
    if offset % 8:
        raise ValueError(f"offset {offset} is not 8-byte aligned")
    return memoryview(buf)[offset : offset + 8].cast("Q")


def scan(data: memoryview | bytes, pos: int, prod: int, mask: int, limit: int) -> tuple[list[int], int]:
    """The body offsets of the complete records from consumer position ``pos`` up to producer position ``prod``
    (at most ``limit``), and the position after them: the walk stops at a record still being written (BUSY) and
    skips discarded ones. ``data`` is the data area mapped twice, so a record is contiguous at ``pos & mask``.
    The Python reference of ``_recordc.scan`` (same arguments, same result)."""
    u32 = _U32.unpack_from
    offsets: list[int] = []
    append = offsets.append
    n = 0
    while pos < prod and n < limit:
        off = pos & mask
        hdr = u32(data, off)[0]
        if hdr & _BUSY:
            break
        length = hdr & 0x3FFFFFFF  # without BUSY and DISCARD
        if not hdr & _DISCARD:
            append(off + 8)
            n += 1
        pos += (length + 15) & ~7  # 8-byte header, 8-byte alignment
    return offsets, pos


_scan: Callable[[memoryview | bytes, int, int, int, int], tuple[list[int], int]] = (
    recordc.scan if recordc is not None else scan
)


class RingBuffer:
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map of ``size`` bytes (a power of two, multiple of the page)."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.fd = map_fd
        self.size = size
        self._mask = size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._view = memoryview(self._prod)
        self._data = self._view[page:]
        self._cons_pos = u64_cell(self._cons)
        self._prod_pos = u64_cell(self._view)
        self._pos = int(self._cons_pos[0])
        self._epoll = select.epoll()
        # edge-triggered: a wait returns on the kernel's next wake-up, not at once because records it did not
        # announce are waiting (see :meth:`wait_signal`)
        self._epoll.register(map_fd, select.EPOLLIN | select.EPOLLET)

    def wait(self, timeout: float | None) -> bool:
        """Block until the kernel signals data (or timeout); True if signalled or data is already there."""
        if self.pending():
            return True
        return self.wait_signal(timeout)

    def wait_signal(self, timeout: float | None) -> bool:
        """Block until the kernel's next wake-up (or timeout), whatever is pending now; True if woken."""
        return bool(self._epoll.poll(-1 if timeout is None else timeout))

    def pending(self) -> int:
        """Bytes the producer has committed or reserved beyond our position."""
        return int(self._prod_pos[0] - self._pos)

    def produced(self) -> int:
        """The producer position: the end of the last record reserved (committed or still BUSY) by now."""
        return int(self._prod_pos[0])

    def consumed(self) -> int:
        """Our position: every record before it has been returned by :meth:`drain` (a BUSY one stops it)."""
        return self._pos

    def drain(self, decode: Callable[[memoryview, list[int]], list[T]], limit: int = 1 << 30) -> list[T]:
        """Decode every complete record available (up to ``limit`` records) and release them to the kernel.

        ``decode(view, offsets)`` gets the data view and the offsets of the record bodies; it must copy what it
        keeps, because the space is handed back to the kernel when drain returns.
        """
        prod = int(self._prod_pos[0])
        offsets, pos = _scan(self._data, self._pos, prod, self._mask, limit)
        out = decode(self._data, offsets) if offsets else []
        if pos != self._pos:
            self._pos = pos
            # smp_store_release in the kernel's view: one aligned 8-byte store, after our loads of the records (x86 TSO)
            self._cons_pos[0] = pos
        return out

    def close(self) -> None:
        self._epoll.close()
        self._cons_pos.release()
        self._prod_pos.release()
        self._data.release()
        self._view.release()
        self._prod.close()
        self._cons.close()

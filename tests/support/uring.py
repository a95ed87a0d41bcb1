"""Just enough io_uring to submit one operation and wait for it, with ctypes and mmap (no liburing).

Run as a script in a child process (the BPF backend leaves out kwatch's own process):
    python tests/support/uring.py mkdirat PATH | unlinkat PATH | renameat OLD NEW | write PATH DATA
Exits 0 when the operation's completion says it succeeded, else prints the errno and exits 1.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys

SYS_SETUP, SYS_ENTER = 425, 426  # the same on x86_64 and aarch64
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
ENTER_GETEVENTS = 1
AT_FDCWD = -100
OPS = {"writev": 2, "mkdirat": 37, "unlinkat": 36, "renameat": 35, "write": 23}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def submit(op: str, fd: int, addr: int, length: int, off: int = 0, op_flags: int = 0) -> int:
    """One SQE, submitted and waited for; the completion's result (negative errno on failure)."""
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    ring = _libc.syscall(SYS_SETUP, 4, params)
    if ring < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    try:
        sq_entries, cq_entries = struct.unpack_from("II", params.raw, 0)
        # io_sqring_offsets at 40: head, tail, ring_mask, ring_entries, flags, dropped, array
        _, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("7I", params.raw, 40)
        # io_cqring_offsets at 80: head, tail, ring_mask, ring_entries, overflow, cqes
        cq_head, _cq_tail, cq_mask, _, _, cqes = struct.unpack_from("6I", params.raw, 80)
        sq = mmap.mmap(ring, sq_array + sq_entries * 4, offset=OFF_SQ_RING)
        cq = mmap.mmap(ring, cqes + cq_entries * 16, offset=OFF_CQ_RING)
        sqes = mmap.mmap(ring, sq_entries * 64, offset=OFF_SQES)
        sqe = bytearray(64)
        struct.pack_into("BBHiQQII", sqe, 0, OPS[op], 0, 0, fd, off, addr, length, op_flags)
        struct.pack_into("Q", sqe, 32, 0x6B77)  # user_data
        sqes[0:64] = bytes(sqe)
        tail = struct.unpack_from("I", sq, sq_tail)[0]
        struct.pack_into("I", sq, sq_array + (tail & struct.unpack_from("I", sq, sq_mask)[0]) * 4, 0)
        struct.pack_into("I", sq, sq_tail, tail + 1)
        if _libc.syscall(SYS_ENTER, ring, 1, 1, ENTER_GETEVENTS, None, 0) < 0:
            raise OSError(ctypes.get_errno(), "io_uring_enter")
        head = struct.unpack_from("I", cq, cq_head)[0]
        idx = head & struct.unpack_from("I", cq, cq_mask)[0]
        _, res, _ = struct.unpack_from("QiI", cq, cqes + idx * 16)
        struct.pack_into("I", cq, cq_head, head + 1)
        return int(res)
    finally:
        os.close(ring)


def main(argv: list[str]) -> int:
    op = argv[0]
    keep = [ctypes.create_string_buffer(os.fsencode(a)) for a in argv[1:]]
    addrs = [ctypes.addressof(b) for b in keep]
    if op == "mkdirat":
        res = submit(op, AT_FDCWD, addrs[0], 0o755)
    elif op == "unlinkat":
        res = submit(op, AT_FDCWD, addrs[0], 0)
    elif op == "renameat":
        res = submit(op, AT_FDCWD, addrs[0], AT_FDCWD & 0xFFFFFFFF, off=addrs[1])
    elif op == "write":
        fd = os.open(argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
        data = os.fsencode(argv[2])
        res = submit(op, fd, addrs[1], len(data), off=0)
        os.close(fd)
    else:
        raise SystemExit(f"unknown op {op}")
    if res < 0:
        print(f"io_uring {op}: {os.strerror(-res)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

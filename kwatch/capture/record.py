"""The Python mirror of ``struct kw_event`` (``bpf/kwatch.h``) and the decoder from raw records to FileEvents.

``KwEvent`` (ctypes) states the layout field by field; ``HEADER`` (a precompiled ``struct.Struct``) is derived from it
and is what the hot path uses. ``tests/test_record_layout.py`` checks both against the BTF of the compiled object.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from kwatch.events import FT_UNKNOWN, FileEvent, Op, join

SLOTS = 4
COMM_LEN = 16


class KwEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("ret", ctypes.c_int32),
        ("op", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("ftype", ctypes.c_uint32),
        ("owner_uid", ctypes.c_int32),
        ("owner_gid", ctypes.c_int32),
        ("len", ctypes.c_uint16 * SLOTS),
        ("trunc", ctypes.c_uint16),
        ("in_root", ctypes.c_uint16),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class KwConfig(ctypes.Structure):
    _fields_ = [
        ("op_mask", ctypes.c_uint32),
        ("self_tgid", ctypes.c_uint32),
        ("use_roots", ctypes.c_uint32),
        ("use_excl", ctypes.c_uint32),
    ]


class KwInodeKey(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("dev", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


_CODES: dict[Any, str] = {
    ctypes.c_uint64: "Q",
    ctypes.c_uint32: "I",
    ctypes.c_int32: "i",
    ctypes.c_uint16: "H",
}


def _struct_format(cls: type[ctypes.Structure]) -> str:
    fmt = "<"
    for item in cls._fields_:
        ctype: Any = item[1]
        if ctype in _CODES:
            fmt += _CODES[ctype]
        elif issubclass(ctype, ctypes.Array):
            elem = ctype._type_
            fmt += f"{ctype._length_}s" if elem is ctypes.c_char else _CODES[elem] * ctype._length_
        else:  # pragma: no cover - a new field type must be added to _CODES
            raise TypeError(f"no struct code for {ctype}")
    return fmt


HEADER = struct.Struct(_struct_format(KwEvent))
HEADER_SIZE = HEADER.size
assert ctypes.sizeof(KwEvent) == HEADER_SIZE, "kw_event: struct format and ctypes layout disagree"

_OPS = {int(op): op for op in Op}
_unpack = HEADER.unpack_from


def decode(buf: memoryview | bytes, off: int) -> FileEvent:
    """Decode the record at ``buf[off:]`` (header then its slot strings) into a FileEvent."""
    (ts, cg, pid, tid, ppid, uid, gid, ret, op, flags, mode, ftype, ouid, ogid, l0, l1, l2, l3, trunc, _in_root,
     _pad, comm) = _unpack(buf, off)
    p = off + HEADER_SIZE
    base = bytes(buf[p : p + l0])
    p += l0
    path = base
    if l1:
        name = bytes(buf[p : p + l1])
        if not l0 and name[:1] != b"/":
            trunc |= 1  # the kernel could not resolve the base directory: never guess one
        path = join(base or b"/", name)
        p += l1
    kind = _OPS[op]
    new_path = target = None
    if kind is Op.SYMLINK:
        p += l2
        target = bytes(buf[p : p + l3])
    elif l2 or l3:
        base2 = bytes(buf[p : p + l2])
        p += l2
        name2 = bytes(buf[p : p + l3])
        if not l2 and name2[:1] != b"/":
            trunc |= 4
        new_path = join(base2 or b"/", name2)
    nul = comm.find(b"\0")
    return FileEvent(
        op=kind,
        path=path,
        new_path=new_path,
        target=target,
        pid=pid,
        tid=tid,
        ppid=ppid,
        uid=uid,
        gid=gid,
        comm=comm if nul < 0 else comm[:nul],
        cgroup_id=cg,
        ts_ns=ts,
        ret=ret,
        flags=flags,
        mode=mode if kind in (Op.CHMOD, Op.MKDIR, Op.CREATE) else None,
        owner=(ouid, ogid) if kind is Op.CHOWN else None,
        ftype=ftype or FT_UNKNOWN,
        truncated=bool(trunc),
        backend="bpf",
    )

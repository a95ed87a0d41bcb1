"""The Python mirror of ``struct kw_event`` (``bpf/kwatch.h``) and the decoder from raw records to FileEvents.

``KwEvent`` (ctypes) states the layout field by field; ``HEADER`` (a precompiled ``struct.Struct``) is derived from it
and is what the hot path uses. ``tests/unit/test_record_layout.py`` checks both against the BTF of the compiled object.
"""

from __future__ import annotations

import ctypes
import gc
import os
import struct
from collections.abc import Callable
from typing import Any

from kwatch.events import FileEvent, Op, join

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
        ("mntns", ctypes.c_uint32),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


MAX_ROOT_PATHS = 16


class KwConfig(ctypes.Structure):
    _fields_ = [
        ("op_mask", ctypes.c_uint32),
        ("self_tgid", ctypes.c_uint32),
        ("use_roots", ctypes.c_uint32),
        ("use_excl", ctypes.c_uint32),
        ("wake_us", ctypes.c_uint32),
        ("wake_bytes", ctypes.c_uint32),
        ("n_root_inos", ctypes.c_uint32),
        ("cfg_gen", ctypes.c_uint32),
        ("root_ino", ctypes.c_uint64 * MAX_ROOT_PATHS),
    ]


ROOT_PATH_MAX = 256


class KwRootPath(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("path", ctypes.c_char * ROOT_PATH_MAX)]


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
_OPS_BY_NUMBER: list[Op | None] = [_OPS.get(i) for i in range(max(_OPS) + 1)]
# plain ints: hashing or comparing an enum member costs a Python-level call per record
_MODE_OPS = frozenset({int(Op.CHMOD), int(Op.MKDIR), int(Op.CREATE)})
_CHOWN = int(Op.CHOWN)
_unpack = HEADER.unpack_from
_new = tuple.__new__


def _own_mntns() -> int:
    """kwatch's mount namespace (the inode number of /proc/self/ns/mnt; 0 when /proc does not say). kwatch never
    changes its namespace, so this is read once."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return 0


#: records whose paths are relative to this mount namespace (or to an unknown one: 0) are decoded as host paths;
#: the others carry their namespace in FileEvent.mntns
OWN_MNTNS = _own_mntns()
#: how many records of another mount namespace were decoded so far (a consumer compares it before looking for them)
foreign_decoded = 0


def decode_batch(buf: memoryview | bytes, offsets: list[int]) -> list[FileEvent]:
    """Decode the records at ``offsets`` in ``buf`` (each: header, then its slot strings) into FileEvents.

    The hot path of the BPF backend. The C decoder (``_recordc``, built by ``make ext``) does the common record
    shapes and calls :func:`decode_one` for the others; without it, :func:`decode_batch_py` does all. Either way the
    cyclic GC is paused: a batch allocates thousands of acyclic tuples, and each allocation burst would otherwise
    trigger collections that traverse them for nothing.
    """
    return _gc_paused(_c_decode if _c_decode is not None else _decode, buf, offsets)


def decode_batch_py(buf: memoryview | bytes, offsets: list[int]) -> list[FileEvent]:
    """The reference decoder, in Python: the same result as :func:`decode_batch` (tests compare the two)."""
    return _gc_paused(_decode, buf, offsets)


def _gc_paused(
    decode: Callable[[memoryview | bytes, list[int]], list[FileEvent]], buf: memoryview | bytes, offsets: list[int]
) -> list[FileEvent]:
    was = gc.isenabled()
    gc.disable()
    try:
        return decode(buf, offsets)
    finally:
        if was:
            gc.enable()


def decode_one(buf: memoryview | bytes, off: int) -> FileEvent:
    """The record at ``off``, by the Python decoder (the C decoder's fallback for unusual shapes)."""
    return _decode(buf, [off])[0]


_comms: dict[bytes, bytes] = {}


def _decode(buf: memoryview | bytes, offsets: list[int]) -> list[FileEvent]:
    global foreign_decoded
    out: list[FileEvent] = []
    own = OWN_MNTNS
    append = out.append
    ops = _OPS_BY_NUMBER
    unpack = _unpack
    size = HEADER_SIZE
    comms = _comms
    mode_ops = _MODE_OPS
    for off in offsets:
        (ts, cg, pid, tid, ppid, uid, gid, ret, op, flags, mode, ftype, ouid, ogid, l0, l1, l2, l3, trunc, _in_root,
         mntns, raw_comm) = unpack(buf, off)
        if mntns == own or not mntns:
            mntns = None
        else:
            foreign_decoded += 1
        p = off + size
        kind = ops[op]
        comm = comms.get(raw_comm)
        if comm is None:
            comm = raw_comm.partition(b"\0")[0]
            if len(comms) < 4096:
                comms[raw_comm] = comm
        if l1 or l2 or l3:
            path, new_path, target, trunc = _names(buf, p, kind, l0, l1, l2, l3, trunc)
            append(_new(FileEvent, (
                kind, path, new_path, target, pid, tid, ppid, uid, gid, comm, cg, ts, ret, flags,
                mode if op in mode_ops else None, (ouid, ogid) if op == _CHOWN else None, ftype, trunc != 0, None,
                "bpf", None, mntns,
            )))
        else:
            append(_new(FileEvent, (
                kind, buf[p : p + l0].tobytes() if type(buf) is memoryview else buf[p : p + l0], None, None, pid,
                tid, ppid, uid, gid, comm, cg, ts, ret, flags, mode if op in mode_ops else None,
                (ouid, ogid) if op == _CHOWN else None, ftype, trunc != 0, None, "bpf", None, mntns,
            )))
    return out


def _names(
    buf: memoryview | bytes, p: int, kind: Op, l0: int, l1: int, l2: int, l3: int, trunc: int
) -> tuple[bytes, bytes | None, bytes | None, int]:
    """Join base and name slots into (path, new_path, target, trunc) for name-based calls."""
    base = bytes(buf[p : p + l0])
    p += l0
    path = base
    if l1:
        name = bytes(buf[p : p + l1])
        if not l0 and name[:1] != b"/":
            trunc |= 1  # the kernel could not resolve the base directory: never guess one
        path = join(base or b"/", name)
        p += l1
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
    return path, new_path, target, trunc


def decode(buf: memoryview | bytes, off: int) -> FileEvent:
    """Decode the one record at ``buf[off:]``."""
    return decode_batch(buf, [off])[0]


def _load_c() -> Any:
    try:
        from kwatch.capture import _recordc  # type: ignore[attr-defined]
    except ImportError:
        return None
    _recordc.configure(FileEvent, list(_OPS_BY_NUMBER), decode_one, OWN_MNTNS)
    return _recordc


#: The C module (``kwatch/capture/_recordc.c``), or None when it is not built; ``KWATCH_PURE_PYTHON=1`` ignores it.
recordc: Any = None if os.environ.get("KWATCH_PURE_PYTHON") else _load_c()
_c_decode: Any = recordc.decode if recordc is not None else None

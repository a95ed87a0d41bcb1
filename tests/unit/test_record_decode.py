"""The C record decoder and ring walk (``kwatch/capture/_recordc.c``) against the Python reference in record.py.

``make test`` builds the C module, so its absence is a failure here, not a skip: a broken build must not hide
behind the (slower) fallback.
"""

from __future__ import annotations

import ctypes
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kwatch.capture import record, ringbuf
from kwatch.capture.record import SLOTS, KwEvent, decode_batch_py
from kwatch.events import Op

recordc = record.recordc


def rec(op: int, slots: list[bytes], *, pid: int = 4242, trunc: int = 0, comm: bytes = b"tar", mode: int = 0o644,
        owner: tuple[int, int] = (-1, -1), ret: int = 0, flags: int = 0o101, ftype: int = 0o100000,
        mntns: int = 0) -> bytes:
    ev = KwEvent()
    ev.mntns = mntns
    ev.ts_ns = 1_234_567_890_123
    ev.cgroup_id = 77
    ev.pid = pid
    ev.tid = pid + 1
    ev.ppid = 1
    ev.uid = 1000
    ev.gid = 100
    ev.ret = ret
    ev.op = op
    ev.flags = flags
    ev.mode = mode
    ev.ftype = ftype
    ev.owner_uid, ev.owner_gid = owner
    ev.comm = comm
    ev.len = (ctypes.c_uint16 * SLOTS)(*[len(s) for s in slots] + [0] * (SLOTS - len(slots)))
    ev.trunc = trunc
    return bytes(ev) + b"".join(slots)


def ring(bodies: list[bytes], flags: list[int] | None = None) -> tuple[bytes, list[int]]:
    """Records in ring buffer layout (8-byte header, 8-byte aligned) and the offsets of their bodies."""
    out = b""
    offsets = []
    for i, body in enumerate(bodies):
        hdr = len(body) | (flags[i] if flags else 0)
        offsets.append(len(out) + 8)
        out += struct.pack("<II", hdr, 0) + body + b"\0" * (-len(body) % 8)
    return out, offsets


D = b"/srv/data/dir"
CASES = [
    ("resolved_path", rec(int(Op.CLOSE_WRITE), [D + b"/f.c"])),
    ("dir_plus_plain_name", rec(int(Op.CREATE), [D, b"f.c"])),
    ("root_dir_plus_name", rec(int(Op.MKDIR), [b"/", b"top"], ftype=0o40000)),
    ("name_with_slash", rec(int(Op.UNLINK), [D, b"a/b"])),
    ("name_dot", rec(int(Op.CHMOD), [D, b"."])),
    ("name_dotdot", rec(int(Op.RMDIR), [D, b".."])),
    ("name_with_dotdot_inside", rec(int(Op.UNLINK), [D, b"x/../y"])),
    ("absolute_name_no_base", rec(int(Op.UNLINK), [b"", b"/etc/x"])),
    ("relative_name_no_base", rec(int(Op.UNLINK), [b"", b"lost"])),
    ("rename_two_paths", rec(int(Op.RENAME), [D, b"a", D, b"b"])),
    ("link_two_paths", rec(int(Op.LINK), [D, b"a", b"/srv", b"b"])),
    ("symlink_target", rec(int(Op.SYMLINK), [D, b"s", b"", b"../t"])),
    ("chown_owner", rec(int(Op.CHOWN), [D + b"/f"], owner=(0, 65534))),
    ("chown_unchanged", rec(int(Op.CHOWN), [D + b"/f"], owner=(-1, 5))),
    ("truncated_flag", rec(int(Op.CLOSE_WRITE), [b"deep/tail"], trunc=1)),
    ("hostile_name", rec(int(Op.CREATE), [D, b"$(rm -rf ~) \n'\"\xff\xfe"])),
    ("full_comm", rec(int(Op.UTIMES), [D + b"/f"], comm=b"0123456789abcdef")),
    ("empty_comm", rec(int(Op.UTIMES), [D + b"/f"], comm=b"")),
    ("big_pid_negative_ret", rec(int(Op.TRUNCATE), [D + b"/f"], pid=4_000_000_000, ret=-1)),
    ("unknown_op", rec(0, [D + b"/f"])),
    ("own_mount_namespace", rec(int(Op.CREATE), [D, b"f"], mntns=record.OWN_MNTNS)),
    ("other_mount_namespace", rec(int(Op.CREATE), [D, b"f"], mntns=record.OWN_MNTNS + 1)),
    ("other_mount_namespace_path", rec(int(Op.CLOSE_WRITE), [D + b"/f"], mntns=record.OWN_MNTNS + 1)),
]


@pytest.mark.parametrize("decode", [record.decode_batch, decode_batch_py], ids=["default", "python"])
def test_a_path_of_another_mount_namespace_carries_it(decode: object) -> None:
    """kwatch's own namespace and an unknown one (0) give host paths (mntns None); another one is named, and
    counted, so a consumer knows the path is not a host path."""
    assert os.stat("/proc/self/ns/mnt").st_ino == record.OWN_MNTNS
    other = record.OWN_MNTNS + 1
    bodies = [rec(int(Op.CREATE), [D, b"f"], mntns=n) for n in (record.OWN_MNTNS, 0, other)]
    bodies.append(rec(int(Op.RENAME), [D, b"a", D, b"b"], mntns=other))
    buf, offsets = ring(bodies)
    before = record.foreign_decoded
    got = decode(memoryview(buf), offsets)  # type: ignore[operator]
    assert [(e.path, e.mntns) for e in got] == [(D + b"/f", None), (D + b"/f", None), (D + b"/f", other),
                                               (D + b"/a", other)]
    assert record.foreign_decoded - before == 2


def test_c_decoder_is_built() -> None:
    assert recordc is not None, "kwatch/capture/_recordc.so is missing: `make ext` builds it"


needs_c = pytest.mark.skipif(recordc is None, reason="C decoder not built (test_c_decoder_is_built fails)")


@needs_c
@pytest.mark.parametrize("body", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_c_and_python_agree(body: bytes) -> None:
    buf, offsets = ring([body])
    view = memoryview(buf)
    assert recordc.decode(view, offsets) == decode_batch_py(view, offsets)


@needs_c
def test_whole_batch_of_mixed_shapes_and_processes() -> None:
    bodies = [c[1] for c in CASES if c[0] != "unknown_op"] * 3
    bodies += [rec(int(Op.CREATE), [D, b"n%d" % i], pid=i % 3 + 10, comm=b"p%d" % (i % 2)) for i in range(50)]
    buf, offsets = ring(bodies)
    got = recordc.decode(memoryview(buf), offsets)
    assert got == decode_batch_py(memoryview(buf), offsets)
    assert [e.pid for e in got[-50:]] == [i % 3 + 10 for i in range(50)]
    assert got[0].backend == "bpf" and got[0].op is Op.CLOSE_WRITE


@needs_c
def test_records_past_the_buffer_are_refused() -> None:
    body = rec(int(Op.CREATE), [D, b"name"])
    with pytest.raises(ValueError, match="past the buffer"):
        recordc.decode(body[:-2], [0])  # the slot strings are cut
    with pytest.raises(ValueError, match="past the buffer"):
        recordc.decode(body, [len(body) - 10])  # the header is cut
    with pytest.raises(ValueError, match="past the buffer"):
        recordc.decode(body, [-1])


names = st.binary(min_size=0, max_size=40)
# what the kernel writes into a base slot (0 and 2): an absolute directory, or nothing when it could not resolve one
bases = st.one_of(st.just(b""), st.just(b"/"), names.map(lambda b: b"/" + b))
slot_lists = st.tuples(bases, names, bases, names).flatmap(lambda t: st.integers(1, 4).map(lambda n: list(t[:n])))
shapes = st.tuples(st.sampled_from([int(o) for o in Op if o <= Op.UTIMES]), slot_lists, st.integers(0, 15),
                   st.integers(1, 5))


@needs_c
@settings(max_examples=400, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=12))
def test_property_c_matches_python(items: list[tuple[int, list[bytes], int, int]]) -> None:
    bodies = [rec(op, slots, trunc=trunc, pid=pid) for op, slots, trunc, pid in items]
    buf, offsets = ring(bodies)
    view = memoryview(buf)
    assert recordc.decode(view, offsets) == decode_batch_py(view, offsets)


BUSY, DISCARD = 1 << 31, 1 << 30
SCAN_CASES = [
    ("all_complete", [0, 0, 0], 3),
    ("busy_stops_the_walk", [0, BUSY, 0], 1),
    ("discarded_skipped", [DISCARD, 0, DISCARD, 0], 2),
    ("busy_first", [BUSY, 0], 0),
]


@needs_c
@pytest.mark.parametrize(("flags", "complete"), [(c[1], c[2]) for c in SCAN_CASES], ids=[c[0] for c in SCAN_CASES])
def test_ring_walk_c_and_python_agree(flags: list[int], complete: int) -> None:
    bodies = [rec(int(Op.CREATE), [D, b"f%d" % i]) for i in range(len(flags))]
    buf, offsets = ring(bodies, flags)
    size = 1 << 16
    data = memoryview(buf + b"\0" * (size - len(buf)))

    py = ringbuf.scan(data, 0, len(buf), size - 1, 1 << 30)
    c = recordc.scan(data, 0, len(buf), size - 1, 1 << 30)
    assert c == py
    assert len(c[0]) == complete
    stop = next((i for i, f in enumerate(flags) if f & BUSY), len(flags))
    assert c[0] == [o for o, f in zip(offsets[:stop], flags[:stop], strict=True) if not f & DISCARD]
    assert c[1] == (offsets[stop] - 8 if stop < len(flags) else len(buf))


@needs_c
@pytest.mark.parametrize("which", ["c", "python"])
def test_ring_walk_limit_and_wrap(which: str) -> None:
    walk = recordc.scan if which == "c" else ringbuf.scan
    bodies = [rec(int(Op.CREATE), [D, b"f%d" % i]) for i in range(5)]
    buf, offsets = ring(bodies)
    size = 1 << 12
    data = memoryview(buf + b"\0" * (2 * size - len(buf)))
    got, pos = walk(data, 0, len(buf), size - 1, 2)
    assert got == offsets[:2] and pos == offsets[2] - 8
    # positions grow without bound; the walk reads at pos & mask
    got, pos = walk(data, 5 * size, 5 * size + len(buf), size - 1, 100)
    assert got == offsets and pos == 5 * size + len(buf)

"""The kernel record and config structs: the Python mirror must match the BTF of the compiled BPF object."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import pytest
from conftest import BPF_OBJECT

from kwatch.capture import record

STRUCTS = [
    ("kw_event", record.KwEvent),
    ("kw_config", record.KwConfig),
    ("kw_inode_key", record.KwInodeKey),
    ("kw_root_path", record.KwRootPath),
]


@pytest.fixture(scope="module")
def btf_types() -> dict[str, dict[str, object]]:
    if not BPF_OBJECT.exists():
        pytest.fail(f"{BPF_OBJECT} missing: run `make bpf`")
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run(
        [bpftool, "-j", "btf", "dump", "file", str(BPF_OBJECT), "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types = json.loads(out)["types"]
    return {t["name"]: t for t in types if t.get("kind") == "STRUCT" and t.get("name")}


@pytest.mark.parametrize(("c_name", "py_struct"), STRUCTS, ids=[s[0] for s in STRUCTS])
def test_struct_matches_btf(
    btf_types: dict[str, dict[str, object]], c_name: str, py_struct: type[ctypes.Structure]
) -> None:
    btf = btf_types[c_name]
    assert btf["size"] == ctypes.sizeof(py_struct)
    members = btf["members"]
    assert isinstance(members, list)
    btf_layout = [(m["name"], m["bits_offset"] // 8) for m in members]
    py_layout = [(name, getattr(py_struct, name).offset) for name, _ in py_struct._fields_]
    assert py_layout == btf_layout


def test_header_struct_agrees_with_ctypes() -> None:
    assert record.HEADER_SIZE == ctypes.sizeof(record.KwEvent) == 96


def test_decode_joins_base_and_name() -> None:
    ev = record.KwEvent(op=6, pid=7, tid=7, uid=0, gid=0, comm=b"rm")
    ev.len[0] = len(b"/srv/a")
    ev.len[1] = len(b"../b/./c")
    raw = bytes(ev) + b"/srv/a" + b"../b/./c"
    out = record.decode(raw, 0)
    assert (out.op.name, out.path, out.comm, out.truncated) == ("UNLINK", b"/srv/b/c", b"rm", False)


def test_decode_flags_unresolved_base() -> None:
    ev = record.KwEvent(op=6, comm=b"rm")
    ev.len[1] = 1
    out = record.decode(bytes(ev) + b"x", 0)
    assert out.truncated

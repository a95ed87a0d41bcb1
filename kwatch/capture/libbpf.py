"""A thin ctypes binding of Debian's ``libbpf.so.1``: open, size, load and attach a BPF object; touch its maps.

Only what kwatch uses is bound. libbpf 1.x returns NULL/negative errno and sets errno; every failure here becomes a
:class:`BpfError` that carries libbpf's own log lines (the verifier log on a load failure), so an admin sees why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from typing import Any

from kwatch import libc
from kwatch.capture.base import CaptureError


class BpfError(CaptureError):
    """libbpf refused: the message holds the operation, errno text and libbpf's log."""


class _BtfType(ctypes.Structure):
    """``struct btf_type`` (include/uapi/linux/btf.h): for a FUNC, ``type`` is its FUNC_PROTO; for a FUNC_PROTO,
    the return type (0: void)."""

    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("type", ctypes.c_uint32)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_lib: ctypes.CDLL | None = None
_log: list[str] = []
_print_cb: Any = None  # keep the callback alive as long as libbpf may call it


#: libbpf's level of warnings; the verifier's log of a refused program comes at this level, as one message of up to
#: megabytes whose end says why: it is formatted whole (other messages are short)
_LIBBPF_WARN = 0
_WARN_FORMAT_MAX = 16 << 20


def _on_print(level: int, fmt: bytes | None, args: int | None) -> int:
    # libbpf hands us a printf format and a va_list; let libc format it.
    size = _WARN_FORMAT_MAX if level == _LIBBPF_WARN else 4096
    text = libc.vsnprintf(fmt or b"", args, size).decode("utf-8", "replace")
    # one entry per line, so the tail of the log holds the verifier's last lines (its verdict)
    _log.extend(ln for ln in text.splitlines() if ln)
    del _log[:-400]
    return 0


def lib() -> ctypes.CDLL:
    """Load libbpf.so.1 once and declare the prototypes kwatch uses."""
    global _lib, _print_cb
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lb = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError(f"cannot load libbpf ({name}): {e}; install Debian's libbpf1") from e
    p, i, u32, u64, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_char_p
    protos: dict[str, tuple[Any, list[Any]]] = {
        "bpf_object__open_file": (p, [s, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__find_map_by_name": (p, [p, s]),
        "bpf_object__next_program": (p, [p, p]),
        "bpf_program__name": (s, [p]),
        "bpf_program__section_name": (s, [p]),
        "bpf_program__set_autoload": (i, [p, ctypes.c_bool]),
        "bpf_program__attach": (p, [p]),
        "bpf_link__destroy": (i, [p]),
        "bpf_map__fd": (i, [p]),
        "bpf_map__set_max_entries": (i, [p, u32]),
        "bpf_map_update_elem": (i, [i, p, p, u64]),
        "bpf_map_lookup_elem": (i, [i, p, p]),
        "bpf_map_delete_elem": (i, [i, p]),
        "bpf_map_create": (i, [i, s, u32, u32, u32, p]),
        "libbpf_num_possible_cpus": (i, []),
        "libbpf_set_print": (p, [_PRINT_FN]),
        "btf__parse": (p, [s, p]),
        "btf__load_vmlinux_btf": (p, []),
        "btf__free": (None, [p]),
        "btf__find_by_name_kind": (i, [p, s, u32]),
        "btf__type_by_id": (ctypes.POINTER(_BtfType), [p, u32]),
        "btf__resolve_type": (i, [p, u32]),
    }
    for fname, (res, args) in protos.items():
        fn = getattr(lb, fname)
        fn.restype = res
        fn.argtypes = args
    _print_cb = _PRINT_FN(_on_print)
    lb.libbpf_set_print(_print_cb)
    _lib = lb
    return lb


def _fail(what: str, err: int) -> BpfError:
    err = abs(err)
    tail = "\n".join(_log[-30:])
    hint = ""
    if err == errno.EPERM:
        hint = " (BPF needs root or CAP_BPF+CAP_PERFMON)"
    msg = f"{what}: {os.strerror(err) if err else 'failed'}{hint}"
    if tail:
        msg += "\nlibbpf said:\n" + tail
    return BpfError(msg)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise _fail(what, -rc if rc != -1 else ctypes.get_errno())
    return rc


class BpfMap:
    """A map of a loaded object, addressed by its fd."""

    def __init__(self, handle: int, name: str) -> None:
        self._h = handle
        self.name = name

    @property
    def fd(self) -> int:
        return _check(lib().bpf_map__fd(self._h), f"map {self.name}: fd")

    def set_max_entries(self, n: int) -> None:
        _check(lib().bpf_map__set_max_entries(self._h, n), f"map {self.name}: set_max_entries({n})")

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        _check(lib().bpf_map_update_elem(self.fd, k, v, flags), f"map {self.name}: update")

    def lookup(self, key: bytes, value_len: int) -> bytes | None:
        """The raw value (for per-CPU maps pass ``round_up(value_size, 8) * ncpus``), None when absent."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value_len)
        rc = lib().bpf_map_lookup_elem(self.fd, k, v)
        if rc < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            raise _fail(f"map {self.name}: lookup", err)
        return v.raw

    def delete(self, key: bytes) -> bool:
        k = ctypes.create_string_buffer(key, len(key))
        rc = lib().bpf_map_delete_elem(self.fd, k)
        if rc < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return False
            raise _fail(f"map {self.name}: delete", err)
        return True


class BpfProgram:
    def __init__(self, handle: int) -> None:
        self._h = handle
        self.name: str = lib().bpf_program__name(handle).decode()
        self.section: str = lib().bpf_program__section_name(handle).decode()

    def set_autoload(self, on: bool) -> None:
        _check(lib().bpf_program__set_autoload(self._h, on), f"program {self.name}: set_autoload")

    def attach(self) -> int:
        link = lib().bpf_program__attach(self._h)
        if not link:
            raise _fail(f"attach {self.name} ({self.section})", ctypes.get_errno())
        return int(link)


class BpfObject:
    """An opened (then loaded) BPF object file and its attached links."""

    def __init__(self, path: str) -> None:
        lb = lib()
        handle = lb.bpf_object__open_file(path.encode(), None)
        if not handle:
            raise _fail(f"open BPF object {path}", ctypes.get_errno())
        self._h: int | None = handle
        self._links: list[int] = []
        self.path = path

    def programs(self) -> Iterator[BpfProgram]:
        prog = lib().bpf_object__next_program(self._handle(), None)
        while prog:
            yield BpfProgram(prog)
            prog = lib().bpf_object__next_program(self._handle(), prog)

    def map(self, name: str) -> BpfMap:
        m = lib().bpf_object__find_map_by_name(self._handle(), name.encode())
        if not m:
            raise BpfError(f"{self.path}: no map named {name}")
        return BpfMap(m, name)

    def load(self) -> None:
        del _log[:]
        _check(lib().bpf_object__load(self._handle()), f"load BPF object {self.path}")

    def attach(self, prog: BpfProgram) -> None:
        self._links.append(prog.attach())

    def close(self) -> None:
        lb = lib()
        for link in self._links:
            lb.bpf_link__destroy(link)
        self._links.clear()
        if self._h:
            lb.bpf_object__close(self._h)
            self._h = None

    def _handle(self) -> int:
        if not self._h:
            raise BpfError("BPF object already closed")
        return self._h


def possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    return int(_check(n, "count possible CPUs"))



# BTF kinds (include/uapi/linux/btf.h), as :func:`func_return_kind` names them
_BTF_KINDS = {0: "void", 1: "int", 2: "ptr", 6: "enum", 19: "enum"}
_BTF_KIND_FUNC = 12


def func_return_kind(name: str, btf_path: str | None = None) -> str | None:
    """What the kernel function ``name`` returns according to BTF: "int", "ptr", "void", "enum" or another kind's
    number as text; None when the BTF has no such function. ``btf_path``: a BTF or ELF file (default: the running
    kernel's, /sys/kernel/btf/vmlinux). Typedefs and qualifiers are looked through."""
    lb = lib()
    btf = lb.btf__parse(btf_path.encode(), None) if btf_path else lb.btf__load_vmlinux_btf()
    if not btf:
        raise _fail(f"read BTF of {btf_path or 'the running kernel'}", ctypes.get_errno())
    try:
        fid = lb.btf__find_by_name_kind(btf, name.encode(), _BTF_KIND_FUNC)
        if fid < 0:
            return None
        proto = lb.btf__type_by_id(btf, lb.btf__type_by_id(btf, fid).contents.type)
        ret = proto.contents.type
        if ret == 0:
            return "void"
        rid = lb.btf__resolve_type(btf, ret)
        kind = (lb.btf__type_by_id(btf, rid).contents.info >> 24) & 0x1F if rid > 0 else 0
        return _BTF_KINDS.get(kind, str(kind))
    finally:
        lb.btf__free(btf)

"""The one ctypes binding of libc: the calls Python's ``os`` module lacks, each typed once here.

Every function raises ``OSError`` (with the errno libc left) when the call fails, like ``os`` does, so callers
handle errors one way. A function is looked up in libc the first time it is called: a libc without it (too old a
glibc) fails that call with ENOSYS, not the import of every module that uses this one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any, Final

__all__ = [
    "StatFs",
    "fanotify_init",
    "fanotify_mark",
    "inotify_add_watch",
    "inotify_init1",
    "inotify_rm_watch",
    "mount",
    "open_by_handle_at",
    "openat2",
    "statfs",
    "syncfs",
    "vsnprintf",
]

_libc: Final = ctypes.CDLL(None, use_errno=True)


class StatFs(ctypes.Structure):
    """struct statfs for LP64 Linux (x86_64, arm64, ...): seven longs, then f_fsid."""

    _fields_ = (
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    )


# name -> (restype, argtypes); None argtypes: variadic (syscall), the caller passes ctypes values
_SIGNATURES: Final[dict[str, tuple[Any, list[Any] | None]]] = {
    "syscall": (ctypes.c_long, None),
    "syncfs": (ctypes.c_int, [ctypes.c_int]),
    "mount": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]),
    "inotify_init1": (ctypes.c_int, [ctypes.c_int]),
    "inotify_add_watch": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]),
    "inotify_rm_watch": (ctypes.c_int, [ctypes.c_int, ctypes.c_int]),
    "fanotify_init": (ctypes.c_int, [ctypes.c_uint, ctypes.c_uint]),
    "fanotify_mark": (ctypes.c_int, [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]),
    "open_by_handle_at": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
    "statfs": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(StatFs)]),
    "vsnprintf": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]),
}
_bound: dict[str, Any] = {}


def _fn(name: str) -> Any:
    fn = _bound.get(name)
    if fn is None:
        try:
            fn = getattr(_libc, name)
        except AttributeError:
            raise OSError(errno.ENOSYS, f"this libc has no {name}() (glibc >= 2.14 has every call kwatch uses)") from None
        fn.restype, argtypes = _SIGNATURES[name]
        if argtypes is not None:
            fn.argtypes = argtypes
        _bound[name] = fn
    return fn


def _check(rc: int, what: str, path: bytes | None = None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return rc


# openat2 came after the syscall tables were unified (5.1), so it is number 437 on every architecture.
_SYS_OPENAT2: Final = 437


# struct open_how (include/uapi/linux/openat2.h): flags, mode, resolve, each a u64.
_OPEN_HOW: Final = struct.Struct("=QQQ")
_openat2_fn: Any = None


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """The openat2(2) system call (glibc has no wrapper); the new descriptor."""
    global _openat2_fn
    fn = _openat2_fn
    if fn is None:
        # syscall(2) is variadic; called through a prototype of fixed integer and pointer arguments (what the
        # x86-64 and arm64 Linux ABIs pass a variadic call's integer arguments in), ctypes converts plain ints and
        # bytes itself. The per-call ctypes objects (c_long, c_int, c_char_p, a Structure, byref) of a variadic
        # call were most of the cost of one open of the rsync sender, once per file.
        proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                 ctypes.c_size_t, use_errno=True)
        fn = _openat2_fn = proto(("syscall", _libc))
    # the kernel only reads open_how: an immutable bytes object is a valid buffer for it
    fd = fn(_SYS_OPENAT2, dir_fd, path, _OPEN_HOW.pack(flags, mode, resolve), _OPEN_HOW.size)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def io_uring_setup(nr: int, entries: int) -> int:
    """io_uring_setup(2) (syscall number ``nr``: it differs by architecture; glibc has no wrapper) with zeroed
    parameters: the ring's descriptor. Only ``kwatch doctor`` calls it, to see whether io_uring is enabled."""
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    return _check(int(_fn("syscall")(ctypes.c_long(nr), ctypes.c_uint(entries), params)), "io_uring_setup")


def syncfs(fd: int) -> None:
    _check(_fn("syncfs")(fd), "syncfs")


def mount(source: bytes, target: bytes, fstype: bytes, flags: int = 0) -> None:
    _check(_fn("mount")(source, target, fstype, flags, None), f"mount {fstype.decode()}", target)


def inotify_init1(flags: int) -> int:
    return _check(_fn("inotify_init1")(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
    """The watch descriptor."""
    return _check(_fn("inotify_add_watch")(fd, path, mask), "inotify_add_watch", path)


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_fn("inotify_rm_watch")(fd, wd), "inotify_rm_watch")


def fanotify_init(flags: int, event_f_flags: int) -> int:
    return _check(_fn("fanotify_init")(flags, event_f_flags), "fanotify_init")


def fanotify_mark(fd: int, flags: int, mask: int, dirfd: int, path: bytes | None) -> None:
    _check(_fn("fanotify_mark")(fd, flags, mask, dirfd, path), "fanotify_mark", path)


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """``handle`` is a ``struct file_handle`` (its header, then the bytes)."""
    return _check(_fn("open_by_handle_at")(mount_fd, handle, flags), "open_by_handle_at")


def statfs(path: bytes) -> StatFs:
    buf = StatFs()
    _check(_fn("statfs")(path, ctypes.byref(buf)), "statfs", path)
    return buf


def vsnprintf(fmt: bytes, args: int | None, size: int = 4096) -> bytes:
    """Format a printf ``fmt`` with a ``va_list`` (what a C library's log callback hands over)."""
    buf = ctypes.create_string_buffer(size)
    _fn("vsnprintf")(buf, ctypes.c_size_t(size), fmt, ctypes.c_void_p(args))
    return buf.value

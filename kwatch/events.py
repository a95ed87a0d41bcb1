"""The one event model every capture backend produces and every consumer reads.

Pure code: no I/O. Paths are ``bytes`` end to end (Linux names need not be UTF-8); they are decoded only for display
and JSON, by :func:`display_path` and :func:`json_path`.

A backend fills what it can know and leaves the rest ``None``: fanotify knows no ppid or comm of its own, inotify knows
no process at all. Nothing is invented.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Mapping
from typing import NamedTuple


class Op(enum.IntEnum):
    """Operation kinds. The numbers are the kernel record's ``op`` field (``bpf/kwatch.h``: ``enum kw_op``)."""

    OPEN_WRITE = 1  # an existing regular file opened for writing (or with O_TRUNC)
    CREATE = 2  # a regular file created by open/creat (O_CREAT that really created it)
    CLOSE_WRITE = 3  # a regular file that was open for writing was closed
    MKDIR = 4
    RMDIR = 5
    UNLINK = 6
    RENAME = 7  # path -> new_path; flags carry RENAME_EXCHANGE / RENAME_NOREPLACE / RENAME_WHITEOUT
    SYMLINK = 8  # path is the new link, target its content
    LINK = 9  # path is the existing file, new_path the new hard link
    CHMOD = 10
    CHOWN = 11
    XATTR = 12  # setxattr or removexattr family
    TRUNCATE = 13
    UTIMES = 14
    LOSS = 15  # marker: events were lost before this point (``lost`` says how many, None if unknown)
    MODIFY = 16  # data written (fanotify/inotify only; the BPF backend reports OPEN_WRITE/CLOSE_WRITE instead)
    ATTRIB = 17  # metadata changed, which change unknown (fanotify/inotify; BPF says CHMOD/CHOWN/XATTR/UTIMES)

    @property
    def label(self) -> str:
        # asked for every record: a list indexed by the value, as Enum's ``name`` (a Python-level descriptor) and
        # ``lower`` were a tenth of building an output record
        return _LABELS[self]


_LABELS: list[str] = [""] * (max(Op) + 1)
for _op in Op:
    _LABELS[_op] = _op.name.lower()

OP_BY_LABEL: dict[str, Op] = {op.label: op for op in Op}

#: Ops that change only metadata; the config keyword ATTRIB matches all of them.
ATTRIB_OPS = frozenset({Op.CHMOD, Op.CHOWN, Op.XATTR, Op.UTIMES, Op.ATTRIB})

# rename(2) flags, from include/uapi/linux/fs.h
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

# Values of FileEvent.ftype: the S_IFMT bits of the object the event is about (0 when unknown).
FT_UNKNOWN = 0
FT_REG = 0o100000
FT_DIR = 0o040000
FT_LNK = 0o120000
#: names of the S_IFMT values, as JSON output gives them
FT_NAMES = {FT_REG: "file", FT_DIR: "dir", FT_LNK: "symlink", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
            stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev"}


class FileEvent(NamedTuple):
    """One file operation that succeeded. Immutable; derive a changed copy with ``ev._replace(...)``.

    ``path`` is absolute and normalised (no ``.``/``..`` components, no double slashes). ``truncated`` is true when a
    path was longer than the kernel walk could resolve; such a path is a suffix and must not be acted on as if whole.

    A tuple, not a dataclass, because the BPF consumer builds a million of these a second: ``tuple.__new__`` costs a
    fifth of a generated ``__init__``.
    """

    op: Op
    path: bytes
    new_path: bytes | None = None
    target: bytes | None = None
    pid: int | None = None
    tid: int | None = None
    ppid: int | None = None
    uid: int | None = None
    gid: int | None = None
    comm: bytes | None = None
    cgroup_id: int | None = None
    ts_ns: int | None = None  # CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns); None when the backend has no clock
    ret: int | None = None
    flags: int = 0  # open(2) flags, rename(2) flags, AT_* flags: as the syscall got them
    mode: int | None = None  # chmod mode, or the mode a file/dir was created with
    owner: tuple[int, int] | None = None  # chown: (uid, gid) as passed, -1 meaning unchanged
    ftype: int = FT_UNKNOWN
    truncated: bool = False
    lost: int | None = None  # for Op.LOSS only
    backend: str = ""
    extra: Mapping[str, object] | None = None  # backend-specific details (e.g. why a loss happened)
    #: the mount namespace (its inode number, as /proc/PID/ns/mnt shows it) the paths are relative to, when it is not
    #: kwatch's own: a process in a container or after `unshare -m` named them from its own root and mounts, so they
    #: are not host paths (docs/capture.md, "Mount namespaces"). None: kwatch's namespace, or not known.
    mntns: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.ftype == FT_DIR or self.op in (Op.MKDIR, Op.RMDIR)

    def paths(self) -> tuple[bytes, ...]:
        """Every path this event touches (one, or two for rename/link)."""
        return (self.path,) if self.new_path is None else (self.path, self.new_path)


def normalize(path: bytes) -> bytes:
    """Lexically normalise an absolute path: collapse ``//``, drop ``.``, resolve ``..`` against the prefix.

    The kernel resolves the base directory exactly; a name given to a syscall may still hold ``..``. Resolving it
    lexically is what the syscall did unless a component before the ``..`` is a symlink, which is documented.
    """
    if not path.startswith(b"/"):
        raise ValueError(f"not an absolute path: {path!r}")
    out: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out:
                out.pop()
            continue
        out.append(part)
    return b"/" + b"/".join(out)


def join(base: bytes, name: bytes) -> bytes:
    """The absolute path of ``name`` as a syscall resolved it relative to the directory ``base``.

    ``base`` comes normalised from the kernel's walk; a plain name (no ``/``, not ``.`` or ``..``) needs no further
    work, which is most names (the hot path of the BPF decoder).
    """
    if b"/" not in name and name not in (b".", b"..", b""):
        return base + b"/" + name if base != b"/" else b"/" + name
    if name.startswith(b"/"):
        return normalize(name)
    return normalize(base + b"/" + name)


def display_path(path: bytes) -> str:
    """A path for humans: undecodable bytes as ``\\xNN``, control characters escaped so one event is one line."""
    text = path.decode("utf-8", "backslashreplace")
    if any(c < " " or c == "\x7f" for c in text):
        text = "".join(c if " " <= c != "\x7f" else f"\\x{ord(c):02x}" for c in text)
    return text


def json_path(path: bytes) -> str:
    """A path for JSON: UTF-8 text where it is UTF-8, lone surrogates (PEP 383) for other bytes.

    ``json_path(p).encode("utf-8", "surrogateescape") == p`` always holds, so a machine reading the JSON gets the exact bytes back.
    JSON encoders write such surrogates as ``\\udcNN`` escapes.
    """
    return path.decode("utf-8", "surrogateescape")

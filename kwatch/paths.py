"""Relative paths as bytes: the one safety check of a path relative to a root, and the one "is under / rebase /
parent" helper. Pure: no I/O.

Two kinds of path meet here. Paths *relative to a root* (the replication paths, the agent protocol's paths) are
``/``-separated bytes without a leading slash, and the root itself is ``b""``: every relative path is under it.
Absolute paths (what capture reports) start with ``/``, and ``b"/"`` is the root there. The same three functions
serve both: :func:`is_under` treats ``b""`` and ``b"/"`` as the top of everything.
"""

from __future__ import annotations

import errno
from typing import Final

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "UnsafePathError",
    "check_relpath",
    "is_under",
    "parent",
    "plain_relpath",
    "rebase",
]

PATH_MAX: Final = 4096  # Linux PATH_MAX, including the terminating NUL the kernel counts
NAME_MAX: Final = 255


class UnsafePathError(ValueError):
    """A relative path that could escape or confuse the target root; ``errno`` says how (ENAMETOOLONG for a name
    or path too long for Linux, EINVAL otherwise)."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


def plain_relpath(path: bytes) -> bool:
    """The common case of :func:`check_relpath` in a few scans of the whole path instead of a loop over its
    components (it runs for every file on both ends of a transfer): True only for a path that the full check
    accepts; anything else (including every path longer than NAME_MAX) goes through the full check.
    """
    if not 0 < len(path) <= NAME_MAX or path[0] == 0x2F or path[-1] == 0x2F or b"\0" in path or b"//" in path:
        return False
    if b"." not in path:
        return True
    wrapped = b"/" + path + b"/"
    return b"/./" not in wrapped and b"/../" not in wrapped


def check_relpath(path: object) -> bytes:
    """Return ``path`` if it is a safe path relative to the target root, else raise :class:`UnsafePathError`.

    Safe means: ``bytes``; not empty; not absolute; no NUL; no empty component (``a//b``, trailing ``/``); no ``.``
    or ``..`` component; each component at most NAME_MAX bytes and the whole under PATH_MAX. This is lexical only:
    the receiver must still refuse to follow symlinks inside the root when it resolves the path (O_NOFOLLOW /
    openat2 RESOLVE_BENEATH), which no byte check can do for it.
    """
    if type(path) is bytes and plain_relpath(path):
        return path
    if not isinstance(path, bytes):
        raise UnsafePathError(f"path must be bytes, not {type(path).__name__}")
    if not path:
        raise UnsafePathError("empty path")
    if len(path) >= PATH_MAX:
        raise UnsafePathError(f"path of {len(path)} bytes is longer than PATH_MAX: {path[:64]!r}...", errno.ENAMETOOLONG)
    if b"\0" in path:
        raise UnsafePathError(f"NUL byte in path {path!r}")
    if path.startswith(b"/"):
        raise UnsafePathError(f"absolute path {path!r} (paths are relative to the target root)")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            what = "empty component (double or trailing slash)" if not part else f"{part.decode()!r} component"
            raise UnsafePathError(f"{what} in path {path!r}")
        if len(part) > NAME_MAX:
            raise UnsafePathError(f"component longer than NAME_MAX in path {path[:64]!r}...", errno.ENAMETOOLONG)
    return path


def is_under(path: bytes, top: bytes) -> bool:
    """True when ``path`` is ``top`` or inside it. ``top`` ``b""`` (a relative root) or ``b"/"`` (the absolute
    root) holds every path of its kind."""
    if top in (b"", b"/"):
        return True
    return path == top or (path.startswith(top) and path[len(top) : len(top) + 1] == b"/")


def below_any(rel: bytes, tops: set[bytes]) -> bool:
    """Whether a directory above the relative ``rel`` (not ``rel`` itself) is in ``tops``."""
    i = rel.rfind(b"/")
    while i > 0:
        if rel[:i] in tops:
            return True
        i = rel.rfind(b"/", 0, i)
    return False


def rebase(path: bytes, old: bytes, new: bytes) -> bytes:
    """``path`` (under ``old``: see :func:`is_under`) moved to the same place under ``new``."""
    return new + path[len(old) :]


def parent(path: bytes) -> bytes:
    """The directory holding a relative ``path``; ``b""`` (the root) for a top-level name."""
    i = path.rfind(b"/")
    return path[:i] if i >= 0 else b""

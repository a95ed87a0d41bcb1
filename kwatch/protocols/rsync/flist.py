"""rsync file-list entries: encode and decode with the XMIT_* flags, the end-of-list marker, and the sort order.

Pure. Covers what kwatch sends: regular files, directories, symlinks (``-l``), permissions (``-p``), mtimes
with nanoseconds (``-t``, protocol 31 ``XMIT_MOD_NSEC``), hard links (``-H``, protocol >= 30: the names of one
inode are ``XMIT_HLINKED``, the first of them in list order also ``XMIT_HLINK_FIRST``, and each later one carries
the list index of the first instead of its attributes), and ``--delete-missing-args`` entries (mode 0 = delete
this path). Ownership, devices, ACLs/xattrs and ``--checksum`` sums are not sent (the client never asks the
daemon for them, so the entry layout below is complete for the options it sends).

Follows rsync's flist.c ``send_file_entry`` / ``recv_file_entry`` (the compression of a name against the
previous one, and "same as previous" flags for mode and mtime), ``write_end_of_flist``, and ``f_name_cmp`` for
the order in which both sides index the list.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from typing import Any

from kwatch.paths import UnsafePathError, check_relpath
from kwatch.protocols.errors import LocalProtocolError, RemoteProtocolError
from kwatch.protocols.rsync.codec import (
    Reader,
    dec_int,
    dec_varint,
    dec_varint30,
    dec_varlong,
    dec_varlong30,
    enc_int,
    enc_shortint,
    enc_varint,
    enc_varint30,
    enc_varlong,
    enc_varlong30,
)

XMIT_TOP_DIR = 1 << 0
XMIT_SAME_MODE = 1 << 1
XMIT_EXTENDED_FLAGS = 1 << 2
XMIT_SAME_UID = 1 << 3
XMIT_SAME_GID = 1 << 4
XMIT_SAME_NAME = 1 << 5
XMIT_LONG_NAME = 1 << 6
XMIT_SAME_TIME = 1 << 7
XMIT_NO_CONTENT_DIR = 1 << 8  # directories only, protocol >= 30
XMIT_HLINKED = 1 << 9
XMIT_USER_NAME_FOLLOWS = 1 << 10
XMIT_GROUP_NAME_FOLLOWS = 1 << 11
XMIT_HLINK_FIRST = 1 << 12  # protocol >= 30, with XMIT_HLINKED (the same bit as XMIT_IO_ERROR_ENDLIST)
XMIT_IO_ERROR_ENDLIST = 1 << 12
XMIT_MOD_NSEC = 1 << 13
XMIT_SAME_ATIME = 1 << 14
XMIT_CRTIME_EQ_MTIME = 1 << 17

MAXPATHLEN = 4096
# Flags this implementation understands on a received entry; anything else means options we did not ask for.
_KNOWN_FLAGS = (
    XMIT_TOP_DIR | XMIT_SAME_MODE | XMIT_EXTENDED_FLAGS | XMIT_SAME_UID | XMIT_SAME_GID | XMIT_SAME_NAME
    | XMIT_LONG_NAME | XMIT_SAME_TIME | XMIT_NO_CONTENT_DIR | XMIT_IO_ERROR_ENDLIST | XMIT_MOD_NSEC
)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file-list entry. ``name`` is relative to the transfer root, ``/``-separated bytes; ``mode`` 0 marks a
    missing argument to delete (``--delete-missing-args``)."""

    name: bytes
    mode: int
    size: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    link_target: bytes | None = None
    top_dir: bool = False
    content_dir: bool = True  # directories: the receiver may delete extraneous entries inside
    #: (st_dev, st_ino) of a non-directory with several names: the names of one inode in a list are sent as hard
    #: links of each other (``-H``); None for everything else.
    inode: tuple[int, int] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _dir_xflags(e: FileEntry, protocol: int) -> int:
    """The flags a directory entry carries for being the top or not a content directory (none for others)."""
    if not e.is_dir:
        return 0
    if protocol < 30:
        return XMIT_TOP_DIR if e.top_dir else 0
    if e.top_dir and not e.content_dir:  # an implied parent directory (FLAG_IMPLIED_DIR)
        return XMIT_TOP_DIR | XMIT_NO_CONTENT_DIR
    if not e.content_dir:
        return XMIT_NO_CONTENT_DIR
    return XMIT_TOP_DIR if e.top_dir else 0


def _shared_prefix(last: bytes, name: bytes) -> int:
    """How many leading bytes ``name`` shares with the previous entry's (at most 255: one byte says it)."""
    n = 0
    while n < len(last) and n < len(name) and n < 255 and name[n] == last[n]:
        n += 1
    return n


def sort_key(e: FileEntry) -> bytes:
    """The order of flist.c ``f_name_cmp`` (protocol >= 29): within a directory, non-directories sort before
    directories, directory names compare with a trailing slash, a directory sorts just before its content, and
    the top ``.`` sorts first.

    One bytes string per entry (sorting compares them in C): each component is a type byte (0 a non-directory, 1
    a directory), its name (a directory's with the trailing slash) and a NUL, which no name byte sorts below, so
    a name ends before a longer one it begins and an ancestor before its content."""
    if e.name == b".":
        return b""
    head, _, last = e.name.rpartition(b"/")
    key = b"\x01" + head.replace(b"/", b"/\x00\x01") + b"/\x00" if head else b""
    return key + (b"\x01" + last + b"/\x00" if e.is_dir else b"\x00" + last + b"\x00")


def hlink_indexes(entries: list[FileEntry]) -> list[int | None]:
    """For each entry (in list order), what :meth:`FlistEncoder.encode` needs for ``-H``: -1 for the first name of
    an inode, the list index of that first name for a later one, None for an entry without an ``inode``."""
    firsts: dict[tuple[int, int], int] = {}
    out: list[int | None] = []
    for i, e in enumerate(entries):
        if e.inode is None or e.is_dir or not e.mode:
            out.append(None)
            continue
        first = firsts.setdefault(e.inode, i)
        out.append(-1 if first == i else first)
    return out


def check_name(name: bytes) -> None:
    """Reject names a receiver must never act on (:func:`kwatch.paths.check_relpath`); ``.`` is the transfer root."""
    if name == b".":
        return
    try:
        check_relpath(name)
    except UnsafePathError as e:
        raise ValueError(f"unsafe file-list name: {e}") from None


class FlistEncoder:
    """Encodes entries in order; keeps the "same as previous" state of flist.c ``send_file_entry``."""

    def __init__(self, protocol: int, varint_flags: bool) -> None:
        self.protocol = protocol
        self.varint_flags = varint_flags
        self._lastname = b""
        self._mode = -1
        self._mtime: int | None = None
        self._count = 0  # entries encoded: the list index of the next one
        self._firsts: dict[int, FileEntry] = {}  # list index -> the first name of an inode

    def encode(self, e: FileEntry, hlink: int | None = None) -> bytes:
        """One entry. ``hlink``: with ``-H``, -1 for the first name of an inode in the list, or the list index of
        that first name for a later one (flist.c send_file_entry, protocol >= 30); None for no hard link."""
        try:
            check_name(e.name)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if e.mode != 0 and not (e.is_reg or e.is_dir or e.is_link):
            raise LocalProtocolError(f"unsupported file type {e.mode:#o} for {e.name!r}")
        ndx = self._count
        self._count += 1
        if hlink is not None and hlink >= 0:
            first = self._firsts.get(hlink)
            if first is None:
                raise LocalProtocolError(f"hard link of {e.name!r} to list index {hlink}, not a first name")
            # the receiver gives this name the first one's attributes (and its "same as previous" state follows
            # them): two stats of one inode may differ if it changed between them, the list must not
            e = dataclasses.replace(first, name=e.name, top_dir=e.top_dir)
        elif hlink is not None:
            self._firsts[ndx] = e
        xflags = _dir_xflags(e, self.protocol)
        if e.mode == self._mode:
            xflags |= XMIT_SAME_MODE
        else:
            self._mode = e.mode
        # No -o/-g: rsync sets both "same" bits when ownership is not preserved.
        xflags |= XMIT_SAME_UID | XMIT_SAME_GID
        if e.mtime == self._mtime:
            xflags |= XMIT_SAME_TIME
        else:
            self._mtime = e.mtime
        if e.mtime_nsec and self.protocol >= 31:
            xflags |= XMIT_MOD_NSEC
        if hlink is not None:
            if self.protocol < 30 or e.is_dir or e.mode == 0:
                raise LocalProtocolError(f"hard link of {e.name!r}: only non-directories, protocol >= 30")
            xflags |= XMIT_HLINKED | (XMIT_HLINK_FIRST if hlink < 0 else 0)
        l1 = _shared_prefix(self._lastname, e.name)
        suffix = e.name[l1:]
        if l1 > 0:
            xflags |= XMIT_SAME_NAME
        if len(suffix) > 255:
            xflags |= XMIT_LONG_NAME
        out = bytearray()
        if self.varint_flags:
            out += enc_varint(xflags or XMIT_EXTENDED_FLAGS)
        else:
            if not xflags and not e.is_dir:
                xflags |= XMIT_TOP_DIR  # harmless on a non-dir; a 0 byte would end the list
            if (xflags & 0xFF00) or not xflags:
                xflags |= XMIT_EXTENDED_FLAGS
                out += enc_shortint(xflags)
            else:
                out.append(xflags)
        if xflags & XMIT_SAME_NAME:
            out.append(l1)
        if xflags & XMIT_LONG_NAME:
            out += enc_varint30(len(suffix), self.protocol)
        else:
            out.append(len(suffix))
        out += suffix
        if hlink is not None and hlink >= 0:
            # A later name of an inode: the receiver takes size, times and mode from the first name (the "same as
            # previous" state above was still updated, as flist.c does before its ``goto the_end``).
            out += enc_varint(hlink)
            self._lastname = e.name
            return bytes(out)
        out += enc_varlong30(e.size, 3, self.protocol)
        if not xflags & XMIT_SAME_TIME:
            out += enc_varlong(e.mtime, 4) if self.protocol >= 30 else enc_int(e.mtime)
        if xflags & XMIT_MOD_NSEC:
            out += enc_varint(e.mtime_nsec)
        if not xflags & XMIT_SAME_MODE:
            out += enc_int(e.mode)
        if e.is_link:
            target = e.link_target or b""
            out += enc_varint30(len(target), self.protocol)
            out += target
        self._lastname = e.name
        return bytes(out)

    def end(self, io_error: int = 0) -> bytes:
        """flist.c ``write_end_of_flist``."""
        if self.varint_flags:
            return enc_varint(0) + enc_varint(io_error)
        if io_error:
            return enc_shortint(XMIT_EXTENDED_FLAGS | XMIT_IO_ERROR_ENDLIST) + enc_varint(io_error)
        return b"\x00"


def _load_c() -> Any:
    if os.environ.get("KWATCH_PURE_PYTHON"):
        return None
    try:
        from kwatch.protocols.rsync import _flistc  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _flistc


#: The C encoder (``_flistc.c``, built by ``make ext``), or None; ``KWATCH_PURE_PYTHON=1`` ignores it.
flistc: Any = _load_c()


def encode_list(entries: list[FileEntry], protocol: int) -> bytes | None:
    """A whole list's entries as :class:`FlistEncoder` (varint flags, no hard links) writes them, by the C encoder:
    one call instead of one per entry. None when it is not built or declines the list (an old protocol, a name or
    type the Python encoder refuses with a reason)."""
    if flistc is None:
        return None
    out: bytes | None = flistc.encode(entries, protocol)
    return out


@dataclass(frozen=True, slots=True)
class EndOfList:
    io_error: int


class FlistDecoder:
    """Decodes entries sent with the options kwatch uses (``-rlpt``, ``-H`` with ``hard_links``; no ``-o/-g/-D``),
    for tests and for validating golden captures. ``decode`` is atomic: on :class:`NeedMore` the state is
    unchanged. A hard-linked entry's ``inode`` is ``(0, list index of the first name of its inode)``."""

    def __init__(self, protocol: int, varint_flags: bool, preserve_links: bool = True,
                 hard_links: bool = False) -> None:
        self.protocol = protocol
        self.varint_flags = varint_flags
        self.preserve_links = preserve_links
        self.hard_links = hard_links and protocol >= 30
        self._lastname = b""
        self._mode = 0
        self._mtime = 0
        self._count = 0
        self._firsts: dict[int, FileEntry] = {}

    def decode(self, r: Reader) -> FileEntry | EndOfList:
        start = r.pos
        try:
            return self._decode(r)
        except BaseException:
            r.pos = start
            raise

    def _decode(self, r: Reader) -> FileEntry | EndOfList:
        if self.varint_flags:
            xflags = dec_varint(r)
            if xflags == 0:
                return EndOfList(dec_varint(r))
        else:
            xflags = r.byte()
            if xflags == 0:
                return EndOfList(0)
            if xflags & XMIT_EXTENDED_FLAGS:
                xflags |= r.byte() << 8
                if xflags == XMIT_EXTENDED_FLAGS | XMIT_IO_ERROR_ENDLIST:
                    return EndOfList(dec_varint(r))
        known = _KNOWN_FLAGS | (XMIT_HLINKED | XMIT_HLINK_FIRST if self.hard_links else 0)
        if xflags & ~known:
            raise RemoteProtocolError(f"file-list flags {xflags:#x} need options this client did not send")
        l1 = r.byte() if xflags & XMIT_SAME_NAME else 0
        l2 = dec_varint30(r, self.protocol) if xflags & XMIT_LONG_NAME else r.byte()
        if l1 > len(self._lastname) or l1 + l2 >= MAXPATHLEN or l2 < 0:
            raise RemoteProtocolError(f"bad file-list name lengths {l1}+{l2}")
        name = self._lastname[:l1] + r.take(l2)
        try:
            check_name(name)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from None
        ndx = self._count
        if self.hard_links and xflags & XMIT_HLINKED and not xflags & XMIT_HLINK_FIRST:
            first_ndx = dec_varint(r)
            first = self._firsts.get(first_ndx)
            if first is None:
                raise RemoteProtocolError(f"{name!r} hard-links list index {first_ndx}, not the first name of an "
                                          f"inode before it")
            self._lastname, self._mode, self._mtime = name, first.mode, first.mtime
            self._count += 1
            return dataclasses.replace(first, name=name, top_dir=False)
        size = dec_varlong30(r, 3, self.protocol)
        if size < 0:
            raise RemoteProtocolError(f"negative size for {name!r}")
        mtime = self._mtime
        if not xflags & XMIT_SAME_TIME:
            mtime = dec_varlong(r, 4) if self.protocol >= 30 else dec_int(r)
        nsec = dec_varint(r) if xflags & XMIT_MOD_NSEC else 0
        if not 0 <= nsec < 10**9:
            raise RemoteProtocolError(f"bad mtime nanoseconds {nsec} for {name!r}")
        mode = self._mode
        if not xflags & XMIT_SAME_MODE:
            mode = dec_int(r) & 0xFFFFFFFF
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            raise RemoteProtocolError(f"unsupported file mode {mode:#o} for {name!r}")
        target = None
        if self.preserve_links and stat.S_ISLNK(mode):
            n = dec_varint30(r, self.protocol)
            if not 0 < n < MAXPATHLEN:
                raise RemoteProtocolError(f"bad symlink length {n} for {name!r}")
            target = r.take(n)
        is_dir = stat.S_ISDIR(mode)
        if xflags & XMIT_HLINKED and (is_dir or not mode):
            raise RemoteProtocolError(f"hard-linked entry {name!r} is a directory or a deletion")
        self._lastname, self._mode, self._mtime = name, mode, mtime
        self._count += 1
        entry = FileEntry(
            name=name,
            mode=mode,
            size=size,
            mtime=mtime,
            mtime_nsec=nsec,
            link_target=target,
            top_dir=bool(xflags & XMIT_TOP_DIR) and is_dir,
            content_dir=not (is_dir and xflags & XMIT_NO_CONTENT_DIR),
            inode=(0, ndx) if xflags & XMIT_HLINKED else None,
        )
        if xflags & XMIT_HLINKED:
            self._firsts[ndx] = entry
        return entry

"""The hard-link index: which source paths the mirror holds as one inode, by the source's ``(dev, ino)``.

Live replication sees a file's data change under one name (``write`` to ``a``) while other names of that inode
(``b``) get no event; and the agent lands new data with rename(2) from a temporary, which gives the mirror's ``a`` a
new inode and leaves ``b`` with the old data. The engine therefore remembers, for every regular file with
``st_nlink > 1`` it put on the mirror (or found there after a rescan), the names of that inode, so that after sending
new data it links the other names to it again, and a new link (``link(2)``) becomes a hard link on the mirror
instead of a copy.

The index holds the *source's* names of an inode, whether or not the mirror has each of them yet: a name whose
put or link failed (a full disk, a dropped read) is still a name to link again when the data is next sent, or it is
left behind as a stale copy. Such a name is *in doubt* (:meth:`LinkIndex.doubt`) until a batch lands it: it is
relinked, never used as the name other names are linked to (:meth:`LinkIndex.sure`). Any path can be in doubt, linked
or not yet: a file whose put failed may get its second name (``ln``) before the retry, and the mirror's older copy
under its name must not become that new name's data.

Bookkeeping (no I/O but :func:`is_inode`): the index can be stale (an inode number reused, a name replaced without an
event we could see), so the engine checks every name against the source (``lstat``: same ``(dev, ino)``) before
using it, and the mirror checks every link against the size and mtime the sender expects there. Only linked files
are tracked, so it stays small on ordinary trees.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from kwatch.paths import is_under

Key = tuple[int, int]  # (st_dev, st_ino) on the source


def is_inode(src: bytes, rel: bytes, key: Key) -> bool:
    """True when the source's ``rel`` (below ``src``) is the regular file ``key``: the check before a name the index
    holds is used (it may be stale)."""
    try:
        st = os.lstat(os.path.join(src, rel))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == key


class LinkIndex:
    """``(dev, ino)`` -> the relative paths the mirror has as one inode (as far as the engine knows)."""

    def __init__(self) -> None:
        self._by_key: dict[Key, set[bytes]] = {}
        self._by_path: dict[bytes, Key] = {}
        self._doubt: set[bytes] = set()  # names the mirror may not hold as their inode (see the module docstring)

    def __len__(self) -> int:
        return len(self._by_path)

    def names(self, key: Key) -> frozenset[bytes]:
        return frozenset(self._by_key.get(key, ()))

    def sure(self, key: Key) -> frozenset[bytes]:
        """The names of ``key`` the mirror should hold as that inode (none of them in doubt)."""
        return frozenset(p for p in self._by_key.get(key, ()) if p not in self._doubt)

    def in_doubt(self, path: bytes) -> bool:
        return path in self._doubt

    def key_of(self, path: bytes) -> Key | None:
        return self._by_path.get(path)

    def keys_under(self, top: bytes) -> set[Key]:
        """The inodes with a name at or below ``top``."""
        return {k for p, k in self._by_path.items() if is_under(p, top)}

    def add(self, key: Key, paths: Iterable[bytes]) -> None:
        """Record ``paths`` as names of ``key`` (a path recorded under another key moves here), landed: not in
        doubt."""
        for p in paths:
            self.discard(p)
            self._by_key.setdefault(key, set()).add(p)
            self._by_path[p] = key

    def doubt(self, paths: Iterable[bytes]) -> None:
        """The mirror may not hold ``paths`` as the source has them: their put or link failed or was dropped."""
        self._doubt.update(paths)

    def trust(self, paths: Iterable[bytes]) -> None:
        """``paths`` landed (put or linked without an error): no longer in doubt."""
        self._doubt.difference_update(paths)

    def discard(self, path: bytes) -> None:
        self._doubt.discard(path)
        key = self._by_path.pop(path, None)
        if key is None:
            return
        names = self._by_key[key]
        names.discard(path)
        if not names:
            del self._by_key[key]

    def discard_under(self, top: bytes) -> None:
        """Forget ``top`` and everything below it (``b""``: everything)."""
        if top == b"":
            self._by_key.clear()
            self._by_path.clear()
            self._doubt.clear()
            return
        for p in [p for p in self._by_path if is_under(p, top)]:
            self.discard(p)
        self._doubt.difference_update([p for p in self._doubt if is_under(p, top)])

    def rename(self, old: bytes, new: bytes) -> None:
        """Follow ``rename(old, new)``: names at or below ``old`` move below ``new``; what was at ``new`` is gone."""
        if old == new or old == b"":
            return
        moved = [(p, self._by_path[p]) for p in self._by_path if is_under(p, old)]
        doubts = [p for p in self._doubt if is_under(p, old)]
        self.discard_under(new)
        self.discard_under(old)
        for p, key in moved:
            self.add(key, (new + p[len(old):],))
        self._doubt.update(new + p[len(old):] for p in doubts)

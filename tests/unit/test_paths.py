"""kwatch.paths: the one "is under / rebase / parent" helper and the relative-path check (pure)."""

from __future__ import annotations

import errno

import pytest

from kwatch.paths import UnsafePathError, check_relpath, is_under, parent, rebase

UNDER = [
    ("relative root holds everything", b"a/b", b"", True),
    ("relative root holds itself", b"", b"", True),
    ("absolute root holds everything", b"/etc/passwd", b"/", True),
    ("itself", b"a/b", b"a/b", True),
    ("child", b"a/b/c", b"a/b", True),
    ("sibling with the same prefix", b"a/bc", b"a/b", False),
    ("parent is not under its child", b"a", b"a/b", False),
    ("absolute child", b"/srv/x/y", b"/srv/x", True),
    ("absolute sibling with the same prefix", b"/srv/xy", b"/srv/x", False),
]


@pytest.mark.parametrize(("name", "path", "top", "want"), UNDER, ids=[c[0] for c in UNDER])
def test_is_under(name: str, path: bytes, top: bytes, want: bool) -> None:
    assert is_under(path, top) is want, name


@pytest.mark.parametrize(
    ("path", "old", "new", "want"),
    [(b"a/b/c", b"a/b", b"x", b"x/c"), (b"a/b", b"a/b", b"x/y", b"x/y"), (b"/m/a/f", b"/m/a", b"/m/b", b"/m/b/f")],
)
def test_rebase(path: bytes, old: bytes, new: bytes, want: bytes) -> None:
    assert rebase(path, old, new) == want


@pytest.mark.parametrize(("path", "want"), [(b"a/b/c", b"a/b"), (b"a", b""), (b"", b"")])
def test_parent(path: bytes, want: bytes) -> None:
    assert parent(path) == want


@pytest.mark.parametrize(
    ("path", "err"),
    [(b"", errno.EINVAL), (b"/a", errno.EINVAL), (b"a/../b", errno.EINVAL), (b"a//b", errno.EINVAL),
     (b"x" * 256, errno.ENAMETOOLONG), (b"a/" * 2048, errno.ENAMETOOLONG)],
)
def test_check_relpath_errno(path: bytes, err: int) -> None:
    with pytest.raises(UnsafePathError) as ei:
        check_relpath(path)
    assert ei.value.errno == err

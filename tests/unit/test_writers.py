"""Finding files open for writing in /proc: the fdinfo and link parsing (tables), and a scan that must find what a
real process holds open (and nothing else)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kwatch.replicate.writers import candidate, scan_writers, writable

# (name, /proc/<pid>/fdinfo/<n> text, open for writing)
FDINFO_CASES = [
    ("read_only", b"pos:\t0\nflags:\t0100000\nmnt_id:\t25\nino:\t1234\n", False),
    ("write_only", b"pos:\t0\nflags:\t0100001\nmnt_id:\t25\nino:\t1234\n", True),
    ("read_write", b"pos:\t4096\nflags:\t0100002\nmnt_id:\t25\n", True),
    ("append_cloexec_write_only", b"pos:\t0\nflags:\t02102001\n", True),  # O_CLOEXEC|O_LARGEFILE|O_APPEND|O_WRONLY
    ("o_path", b"pos:\t0\nflags:\t012100000\n", False),  # O_PATH|O_LARGEFILE|O_CLOEXEC: access mode 0
    ("no_flags_line", b"pos:\t0\nmnt_id:\t25\n", False),
    ("garbage_flags", b"flags:\tzz\n", False),
    ("empty", b"", False),
]


@pytest.mark.parametrize(("name", "text", "want"), FDINFO_CASES, ids=[c[0] for c in FDINFO_CASES])
def test_writable(name: str, text: bytes, want: bool) -> None:
    assert writable(text) is want


# (name, root, readlink of /proc/<pid>/fd/<n>, path relative to root or None)
LINK_CASES = [
    ("file_under_root", b"/src", b"/src/d/f", b"d/f"),
    ("root_itself", b"/src", b"/src", None),
    ("sibling_with_the_root_as_prefix", b"/src", b"/srcx/f", None),
    ("elsewhere", b"/src", b"/var/log/syslog", None),
    ("pipe", b"/src", b"pipe:[1234]", None),
    ("socket", b"/src", b"socket:[99]", None),
    ("anon_inode", b"/src", b"anon_inode:[eventfd]", None),
    ("root_is_slash", b"/", b"/a/b", b"a/b"),
    ("non_utf8_name", b"/src", b"/src/\xff\xfe", b"\xff\xfe"),
    ("deleted_is_left_to_the_caller", b"/src", b"/src/f (deleted)", b"f (deleted)"),
]


@pytest.mark.parametrize(("name", "root", "link", "want"), LINK_CASES, ids=[c[0] for c in LINK_CASES])
def test_candidate(name: str, root: bytes, link: bytes, want: bytes | None) -> None:
    assert candidate(root, link) == want


HOLDER = r"""
import os, sys
root = sys.argv[1].encode()
fds = [
    os.open(root + b"/src/w", os.O_WRONLY | os.O_CREAT),
    os.open(root + b"/src/r", os.O_RDONLY),
    os.open(root + b"/src/rw", os.O_RDWR | os.O_CREAT),
    os.open(root + b"/src/d/deep \xff", os.O_WRONLY | os.O_CREAT | os.O_APPEND),
    os.open(root + b"/src/gone", os.O_WRONLY | os.O_CREAT),
    os.open(root + b"/src/replaced", os.O_WRONLY | os.O_CREAT),
    os.open(root + b"/outside", os.O_WRONLY | os.O_CREAT),
    os.open(root + b"/src/d", os.O_RDONLY | os.O_DIRECTORY),
]
fds.append(os.dup(fds[2]))  # two descriptors on one file
os.unlink(root + b"/src/gone")
os.rename(root + b"/src/other", root + b"/src/replaced")
print("ready", flush=True)
sys.stdin.read()
"""


def test_scan_finds_what_a_process_holds_open_for_writing(tmp_path: Path) -> None:
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "r").write_bytes(b"r")
    (tmp_path / "src" / "other").write_bytes(b"o")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        found = scan_writers(os.fsencode(tmp_path / "src"))
        assert found == {b"w": 1, b"rw": 2, b"d/deep \xff": 1}
        assert scan_writers(os.fsencode(tmp_path / "src"), exclude_pids=[p.pid]) == {}
    finally:
        p.communicate(b"")
    assert scan_writers(os.fsencode(tmp_path / "src")) == {}

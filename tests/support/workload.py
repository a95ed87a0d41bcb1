"""Scripted file workloads for the capture tests, each run in a child process in a fresh directory.

A :class:`Workload` is a name, a ``setup`` script (run before the capture source starts, so it makes no events) and a
``script`` (run while capturing). Both are Python run with ``python -B -c`` with the working directory set to the
watched root; the prelude imports ``os`` and ``ctypes`` and defines ``OUT`` (a directory beside the root, outside
the watched tree) and ``renameat2``. Expected results live in the backend's test module, keyed by workload name,
as ``(op, path, new_path)`` with paths relative to the root (``../out/x`` for the outside directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from timescale import scaled

from kwatch.events import FileEvent, Op, join

PRELUDE = """\
import ctypes, os, sys
OUT = os.environ["KW_OUT"]
_libc = ctypes.CDLL(None, use_errno=True)
def renameat2(a, b, flags):
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
"""

DEEP = "/".join(["d"] * 70)  # deeper than 64 levels (a bound a kernel-side path walk may have)


@dataclass(frozen=True)
class Workload:
    name: str
    script: str
    setup: str = ""


@dataclass(frozen=True)
class Layout:
    base: Path
    root: Path  # the watched tree; the child's working directory
    out: Path  # outside the watched tree

    @classmethod
    def make(cls, tmp: Path) -> Layout:
        root, out = tmp / "w", tmp / "out"
        root.mkdir()
        out.mkdir()
        return cls(tmp, root, out)

    def abs(self, rel: str | bytes) -> bytes:
        return join(os.fsencode(self.root), os.fsencode(rel))


def _python(code: str, layout: Layout) -> subprocess.Popen[bytes]:
    env = dict(os.environ, KW_OUT=str(layout.out))
    return subprocess.Popen([sys.executable, "-B", "-c", PRELUDE + code], cwd=layout.root, env=env)


def run_setup(w: Workload, layout: Layout) -> None:
    if w.setup:
        p = _python(w.setup, layout)
        if p.wait() != 0:
            raise RuntimeError(f"setup of workload {w.name} failed")


def run_child(w: Workload, layout: Layout) -> int:
    """Run the workload to completion; return the child's pid (the one fanotify must report)."""
    p = _python(w.script, layout)
    if p.wait() != 0:
        raise RuntimeError(f"workload {w.name} failed")
    return p.pid


class _Readable(Protocol):
    def read(self, timeout: float | None = None) -> list[FileEvent]: ...


def collect(src: _Readable, quiet: float = 0.3, limit: float = 30.0) -> list[FileEvent]:
    """Every event until the source stays quiet for ``quiet`` seconds."""
    out: list[FileEvent] = []
    deadline = time.monotonic() + scaled(limit)
    while time.monotonic() < deadline:
        got = src.read(scaled(quiet))
        if not got:
            break
        out.extend(got)
    return out


Triple = tuple[Op, bytes, bytes | None]


def triples(events: Iterable[FileEvent]) -> list[Triple]:
    return [(e.op, e.path, e.new_path) for e in events]


def expected(layout: Layout, spec: Sequence[tuple[Op, str | bytes] | tuple[Op, str | bytes, str | bytes]]) -> list[Triple]:
    out: list[Triple] = []
    for item in spec:
        op, rel = item[0], item[1]
        new = layout.abs(item[2]) if len(item) == 3 else None
        out.append((op, layout.abs(rel), new))
    return out


NONUTF8 = b"bad-\xff\xfe-name"

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("create_write_close", 'f = open("f", "w"); f.write("hello"); f.close()'),
        Workload("create_empty", 'open("e", "w").close()'),
        Workload("mkdir", 'os.mkdir("d")'),
        Workload("mkdir_rmdir", 'os.mkdir("d"); os.rmdir("d")'),
        Workload("rmdir", 'os.rmdir("d")', setup='os.mkdir("d")'),
        Workload("unlink", 'os.unlink("f")', setup='open("f", "w").close()'),
        Workload("rename_same_dir", 'os.rename("f", "g")', setup='open("f", "w").close()'),
        Workload(
            "rename_across_dirs",
            'os.rename("a/f", "b/g")',
            setup='os.mkdir("a"); os.mkdir("b"); open("a/f", "w").close()',
        ),
        Workload("rename_over_existing", 'os.rename("a", "b")', setup='open("a", "w").close(); open("b", "w").close()'),
        Workload(
            "rename_dir_then_write",
            'os.rename("a", "c"); f = open("c/s/f", "a"); f.write("y"); f.close()',
            setup='os.makedirs("a/s"); open("a/s/f", "w").close()',
        ),
        Workload("rename_exchange", 'renameat2("a", "b", 2)', setup='open("a", "w").close(); open("b", "w").close()'),
        Workload("move_out", 'os.rename("f", OUT + "/f")', setup='open("f", "w").close()'),
        Workload("move_in", 'os.rename(OUT + "/g", "g")', setup='open(OUT + "/g", "w").close()'),
        Workload(
            "move_dir_in",
            'os.rename(OUT + "/t", "t")',
            setup='os.makedirs(OUT + "/t/u"); open(OUT + "/t/u/f", "w").close(); open(OUT + "/t/g", "w").close()',
        ),
        Workload("move_dir_out", 'os.rename("t", OUT + "/t")', setup='os.makedirs("t/u"); open("t/u/f", "w").close()'),
        Workload("symlink", 'os.symlink("some/target", "l")'),
        Workload("hardlink", 'os.link("f", "h")', setup='open("f", "w").close()'),
        Workload("chmod", 'os.chmod("f", 0o600)', setup='open("f", "w").close()'),
        Workload("chown", 'os.chown("f", 1234, 1234)', setup='open("f", "w").close()'),
        Workload("truncate", 'os.truncate("f", 1)', setup='open("f", "w").write("abc")'),
        Workload("setxattr", 'os.setxattr("f", "user.k", b"v")', setup='open("f", "w").close()'),
        Workload("utime", 'os.utime("f", (1, 1))', setup='open("f", "w").close()'),
        Workload("chmod_dir", 'os.chmod("d", 0o700)', setup='os.mkdir("d")'),
        Workload(
            "dirfd_relative",
            'fd = os.open("sub", os.O_RDONLY | os.O_DIRECTORY)\n'
            'w = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd); os.write(w, b"x"); os.close(w)\n'
            'os.rename("f", "g", src_dir_fd=fd, dst_dir_fd=fd)\n'
            'os.unlink("g", dir_fd=fd)',
            setup='os.mkdir("sub")',
        ),
        Workload("absolute_path", 'open(os.getcwd() + "/./x/../abs", "w").close()', setup='os.mkdir("x")'),
        Workload("name_with_spaces_quotes", "open(\"a b 'c\\\" d\", \"w\").close()"),
        Workload("name_with_newline", 'open("line1\\nline2", "w").close()'),
        Workload("name_non_utf8", f'open({NONUTF8!r}, "w").close()'),
        Workload("deep_tree_create", f'os.makedirs("{DEEP}"); open("{DEEP}/f", "w").close()'),
        Workload("deep_tree_write", f'open("{DEEP}/f", "w").close()', setup=f'os.makedirs("{DEEP}")'),
        Workload("new_dir_race", 'os.mkdir("n"); f = open("n/f", "w"); f.write("x"); f.close()'),
        Workload(
            "lifecycle_one_process",
            'f = open("f", "w"); f.write("x"); os.chmod("f", 0o600); f.close(); os.unlink("f")',
        ),
        Workload(
            "tree_create_remove",
            'os.makedirs("q/r"); open("q/r/f", "w").close(); os.unlink("q/r/f"); os.rmdir("q/r"); os.rmdir("q")',
        ),
        Workload(
            "rename_dir_chain",
            'os.makedirs("x/y"); open("x/y/f", "w").close(); os.rename("x", "x2"); os.rename("x2/y", "y2"); '
            'open("y2/g", "w").close()',
        ),
    ]
}


def burst_script(n: int) -> str:
    return f'for i in range({n}):\n    open(f"f{{i}}", "w").close(); os.unlink(f"f{{i}}")'

"""Test helper: run ``kwatch replicate`` as a real process (live BPF capture), wait for mirrors, read its batch log.

- :class:`LiveReplicate` starts ``kwatch replicate SRC TARGET...`` with its log in a file, waits until capture is
  attached and every target finished its initial reconcile, and can stop it cleanly or ``kill -9`` it (or its agents).
  The capture backend is pinned (``bpf`` unless the test names another) and checked against the ready line, so a
  BPF test never passes on a silent fallback.
- Batch lines (agent: ``batch N: ...``, rsync: ``rsync batch N: ...``) carry a sequence number per target:
  :meth:`LiveReplicate.wait_batches` waits for the next batch lines after a log offset, or for batch N, because a
  batch line is written after the mirror already shows the batch (a test that reads it at once races the logger).
- :func:`wait_identical` polls :func:`treecmp.tree_differences` (bounded) until a mirror equals the source.
- :func:`build_tarball` makes a source tree of a few thousand files with odd names (spaces, newlines, non-UTF-8 bytes,
  shell metacharacters, 255-byte names), symlinks, odd modes and old mtimes, and packs it with GNU tar.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from timescale import scaled
from treecmp import tree_differences

REPO = Path(__file__).resolve().parents[2]
KWATCH = str(REPO / ".venv" / "bin" / "kwatch")
START_TIMEOUT = scaled(60.0)

_BATCH_RE = re.compile(
    r"target (?P<target>.+?): batch (?P<seq>\d+): (?P<puts>\d+) puts, (?P<deltas>\d+) deltas, (?P<renames>\d+) "
    r"renames, (?P<deletes>\d+) deletes, (?P<rescans>\d+) rescans; (?P<literal>\d+) literal \+ (?P<matched>\d+) "
    r"matched bytes; (?P<errors>\d+) errors"
)
_RSYNC_BATCH_RE = re.compile(
    r"target (?P<target>.+?): rsync batch (?P<seq>\d+): (?:all|\d+) paths, (?P<puts>\d+) files sent, (?P<deletes>\d+) "
    r"deleted, \d+ held open for writing; (?P<literal>\d+) literal \+ (?P<matched>\d+) matched bytes"
)
_READY_RE = re.compile(r"kwatch: replicating .* with the (?P<backend>\w+) backend; Ctrl-C to stop")
BATCH_TIMEOUT = 60.0
_AGENT_RE = re.compile(r"target (?P<target>.+?): agent up \(pid (?P<pid>\d+)")


@dataclass(frozen=True)
class BatchLine:
    """One batch line of either path; an rsync session reports no deltas, renames, rescans or errors (0 here)."""

    target: str
    seq: int
    puts: int
    deletes: int
    literal: int
    matched: int
    deltas: int = 0
    renames: int = 0
    rescans: int = 0
    errors: int = 0
    rsync: bool = False


class LiveReplicate:
    """One ``kwatch replicate`` process; the log (stderr) goes to ``log_path``."""

    def __init__(self, src: Path, targets: list[str], log_path: Path, extra: list[str] | None = None,
                 backend: str = "bpf", prefix: list[str] | None = None) -> None:
        self.src = src
        self.prefix = prefix or []  # argv before kwatch's, e.g. netlab.NetLab.argv("src") for a test network host
        self.targets = targets
        self.log_path = log_path
        self.extra = extra or []
        assert "--backend" not in self.extra, "name the backend with backend=, so it is pinned and checked"
        self.backend = backend
        self.proc: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []  # every process this object started, for the cleanup
        self.starts = 0

    def start(self, *, wait_targets: bool = True) -> LiveReplicate:
        offset = self.log_size()
        argv = [*self.prefix, KWATCH, "replicate", str(self.src), *self.targets, "--settle", "0.05", "--max-delay", "1",
                "--backend", self.backend, *self.extra]
        with open(self.log_path, "ab") as log:
            log.write(f"==== start {self.starts}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.started.append(self.proc)
        self.starts += 1
        try:
            return self._wait_ready(offset, wait_targets)
        except BaseException:
            self.kill_all()
            raise

    def _wait_ready(self, offset: int, wait_targets: bool) -> LiveReplicate:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_text(offset)
            ready = _READY_RE.search(text)
            if ready is not None and ready["backend"] != self.backend:
                raise AssertionError(f"asked for the {self.backend} backend, got {ready['backend']}:\n{text[-3000:]}")
            live = ready is not None
            done = {b.target for b in self.batches(offset)}
            if live and (not wait_targets or all(t in done for t in self.targets)):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"kwatch replicate exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"kwatch replicate not ready after {START_TIMEOUT}s:\n{self.log_text(offset)[-3000:]}")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def batches(self, offset: int = 0, target: str | None = None) -> list[BatchLine]:
        """The batch lines (agent and rsync) from ``offset`` on, in log order."""
        text = self.log_text(offset)
        found: list[tuple[int, BatchLine]] = []
        for rx, rsync in ((_BATCH_RE, False), (_RSYNC_BATCH_RE, True)):
            for m in rx.finditer(text):
                d = m.groupdict()
                name = d.pop("target")
                b = BatchLine(name, rsync=rsync, **{k: int(v) for k, v in d.items()})
                if target is None or b.target == target:
                    found.append((m.start(), b))
        return [b for _, b in sorted(found, key=lambda x: x[0])]

    def last_seq(self, target: str | None = None) -> int:
        """The sequence number of the latest batch line (0: none yet) of ``target`` (default: the only one)."""
        lines = self.batches(0, target or self._one_target())
        return lines[-1].seq if lines else 0

    def wait_batches(self, offset: int = 0, *, seq: int | None = None, target: str | None = None,
                     timeout: float = BATCH_TIMEOUT) -> list[BatchLine]:
        """Wait until the log holds, after ``offset``, a batch line of ``target`` (default: the only target) with a
        sequence number of at least ``seq`` (default: any); returns the batch lines after ``offset``.

        The line of a batch is written once its session ended, after the mirror may already show the batch: a test
        that measures a step waits here for the step's line before it reads it, or before it takes the offset of
        the next step (else the first step's line is counted against the second).
        """
        name = target or self._one_target()
        deadline = time.monotonic() + scaled(timeout)
        while True:
            lines = self.batches(offset, name)
            if lines and (seq is None or lines[-1].seq >= seq):
                return lines
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"kwatch replicate exited ({self.proc.returncode}) before batch "
                                     f"{seq or 'any'}:\n{self.log_text(offset)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no batch line {seq or ''} of {name} within {timeout}s after offset {offset}:\n"
                                     f"{self.log_text(offset)[-3000:]}")
            time.sleep(0.05)

    def _one_target(self) -> str:
        assert len(self.targets) == 1, "several targets: name one"
        return self.targets[0]

    def agent_pids(self, offset: int = 0) -> dict[str, int]:
        """The latest agent pid of each target (as the log tells it)."""
        return {m["target"]: int(m["pid"]) for m in _AGENT_RE.finditer(self.log_text(offset))}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        # its BPF programs and maps are torn down before it is reaped: over 10 s on a loaded machine
        self.proc.wait(START_TIMEOUT)
        self.proc = None

    def stop(self, timeout: float = 40.0) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"kwatch replicate did not stop within {timeout}s") from None
        return proc.returncode

    def kill_all(self) -> None:
        """SIGKILL every process this object started that still runs (by pid, nothing else)."""
        for p in self.started:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.proc = None

    def __enter__(self) -> LiveReplicate:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


def wait_identical(src: Path | bytes, mirror: Path | bytes, timeout: float, *, what: str = "",
                   live: LiveReplicate | None = None, setid: bool = True) -> float:
    """Poll until ``mirror`` equals ``src`` (treecmp); returns the seconds it took, fails with the differences."""
    timeout = scaled(timeout)
    t0 = time.monotonic()
    diffs: list[str] = []
    while True:
        try:
            diffs = tree_differences(src, mirror, setid=setid)
        except FileNotFoundError as e:  # a file vanished between listdir and lstat: the mirror is moving
            diffs = [f"tree changed while compared: {e}"]
        if not diffs:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.1)
    tail = live.log_text()[-4000:] if live is not None else ""
    shown = "\n  ".join(diffs[:40])
    raise AssertionError(f"{what}: mirror {mirror!r} not identical after {timeout}s ({len(diffs)} differences):\n"
                         f"  {shown}\n---- replicate log tail ----\n{tail}")


# ---------------------------------------------------------------------------------------------------------------
# the untar workload

ODD_NAMES: tuple[bytes, ...] = (
    b"space name",
    b"new\nline",
    b"tab\there",
    b"\xff\xfe not utf-8 \xe9",
    "ünïcødé ✓".encode(),
    b"-dash-first",
    b"...",
    b"..dots",
    b"back\\slash",
    b"quote'\"",
    b"$(touch PWNED)",
    b"`id`;rm -rf x",
    b"*glob?[a]",
    b"x" * 255,
    b" leading and trailing ",
    b"\x01ctl\x7f",
)


def _content(i: int, size: int) -> bytes:
    head = f"file {i} size {size}\n".encode()
    return (head * (size // len(head) + 1))[:size]


def build_tree(root: Path, files: int = 3000, seed: int = 7) -> None:
    """A tree of ``files`` regular files in nested directories (plus symlinks), names from :data:`ODD_NAMES`."""
    import random

    rnd = random.Random(seed)
    base = os.fsencode(root)
    os.makedirs(base, exist_ok=True)
    dirs = [b""]
    for d in range(60):
        parent = rnd.choice(dirs)
        name = ODD_NAMES[d % len(ODD_NAMES)] if d < len(ODD_NAMES) else ODD_NAMES[d % len(ODD_NAMES)][:240] + b"-%d" % d
        rel = parent + b"/" + name if parent else name
        if len(rel) > 3000:
            rel = name + b"-top%d" % d
        os.makedirs(base + b"/" + rel, exist_ok=True)
        dirs.append(rel)
    old = 1_500_000_000_000_000_000
    for i in range(files):
        d = dirs[i % len(dirs)]
        odd = ODD_NAMES[i % len(ODD_NAMES)]
        name = (odd[:200] + b".%d" % i) if i % 3 == 0 else b"f%05d.txt" % i
        rel = d + b"/" + name if d else name
        size = rnd.choice((0, 1, 100, 700, 4096, 5000, 20_000)) if i % 97 else rnd.choice((150_000, 700_000))
        path = base + b"/" + rel
        with open(path, "wb") as f:
            f.write(_content(i, size))
        os.chmod(path, rnd.choice((0o644, 0o600, 0o755, 0o444, 0o640)))
        if i % 5 == 0:
            os.utime(path, ns=(old + i * 1_000_003, old + i * 1_000_003))
        if i % 50 == 0:
            target = rnd.choice((name, b"../" + name, b"/etc/passwd", b"dangling-" + odd[:50]))
            os.symlink(target, base + b"/" + rel + b".lnk")
    for i, d in enumerate(dirs[1:]):
        os.chmod(base + b"/" + d, (0o755, 0o750, 0o711)[i % 3])


def build_tarball(work: Path, files: int = 3000) -> Path:
    """Build the odd-names tree under ``work`` and pack it with GNU tar; returns the tarball."""
    staging = work / "staging"
    build_tree(staging, files)
    tarball = work / "tree.tar"
    subprocess.run(["tar", "cf", str(tarball), "-C", str(staging), "."], check=True, timeout=120)
    return tarball


def untar(tarball: Path, dest: Path) -> None:
    subprocess.run(["tar", "xf", str(tarball), "-C", str(dest)], check=True, timeout=120)


def python() -> str:
    return sys.executable

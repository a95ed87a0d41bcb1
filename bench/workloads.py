"""The deterministic workloads of the capture benchmark.

Owns:

- the source tarball: Debian's ``linux-source-6.1`` package, fetched with ``apt-get download`` into ``bench/cache/``
  (gitignored) and unpacked to ``linux-source-6.1.tar.xz``;
- the FIXED subset tar built from it: every member under :data:`SUBSET_DIRS` (plus the top-level files), sorted by
  name, owner/group normalised to root, written uncompressed in GNU format — so the same package version always gives
  the same bytes (its sha256 goes into the results), and an untar is file-system work, not decompression;
  ``--quick`` uses :data:`QUICK_DIRS` (a few hundred files);
- the churn workload: ``bench/churn.c`` (create, write, close, unlink in a loop, optionally paced), compiled into
  ``bench/cache/churn``; a pure Python fallback is not provided on purpose (its own interpreter cost would hide the
  capture cost being measured).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import BENCH_DIR, CACHE, BenchError, Finished, Runner

PACKAGE = "linux-source-6.1"
#: Top-level directories of the kernel tree that make up the subset (with the top-level files: about 20.7k files).
SUBSET_DIRS = (
    "Documentation", "include", "fs", "net", "kernel", "lib", "mm", "block", "crypto", "security", "init", "ipc",
    "io_uring", "virt", "certs", "usr", "LICENSES",
)
QUICK_DIRS = ("kernel",)
SUBSET_VERSION = 1  # bump when the selection rule changes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_tarball() -> Path:
    """``bench/cache/linux-source-6.1.tar.xz``, downloading and unpacking the Debian package if needed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    txz = CACHE / f"{PACKAGE}.tar.xz"
    if txz.exists():
        return txz
    debs = sorted(glob.glob(str(CACHE / f"{PACKAGE}_*.deb")))
    if not debs:
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, capture_output=True, text=True, timeout=600)
        debs = sorted(glob.glob(str(CACHE / f"{PACKAGE}_*.deb")))
        if r.returncode != 0 or not debs:
            raise BenchError(
                f"apt-get download {PACKAGE} failed ({r.stderr.strip()[-300:]}); run `apt-get update` first"
            )
    tmp = txz.with_suffix(".xz.part")
    with tmp.open("wb") as out:
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", debs[-1]], stdout=subprocess.PIPE)
        assert fsys.stdout is not None
        r2 = subprocess.run(["tar", "-xO", f"./usr/src/{PACKAGE}.tar.xz"], stdin=fsys.stdout, stdout=out, timeout=600)
        fsys.stdout.close()
        if fsys.wait() != 0 or r2.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BenchError(f"cannot unpack {debs[-1]}")
    tmp.rename(txz)
    return txz


def package_version() -> str:
    debs = sorted(glob.glob(str(CACHE / f"{PACKAGE}_*.deb")))
    return Path(debs[-1]).name.removeprefix(f"{PACKAGE}_").removesuffix("_all.deb") if debs else "unknown"


@dataclass(frozen=True)
class TarWorkload:
    path: Path
    files: int
    dirs: int
    symlinks: int
    bytes: int
    sha256: str
    package: str

    def describe(self) -> dict[str, object]:
        return {
            "tar": self.path.name, "files": self.files, "dirs": self.dirs, "symlinks": self.symlinks,
            "bytes": self.bytes, "sha256": self.sha256, "package": self.package,
        }


def subset_tar(quick: bool = False) -> TarWorkload:
    """The fixed subset tar (built once, then reused from the cache; its sha256 identifies it)."""
    dirs = QUICK_DIRS if quick else SUBSET_DIRS
    name = f"{PACKAGE}-{'quick' if quick else 'subset'}-v{SUBSET_VERSION}.tar"
    out = CACHE / name
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return TarWorkload(out, info["files"], info["dirs"], info["symlinks"], info["bytes"], info["sha256"],
                           info["package"])
    src = source_tarball()
    top = f"{PACKAGE}/"
    wanted = tuple(f"{top}{d}/" for d in dirs)
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(src, "r:xz") as tf:
        for m in tf:
            name_ = m.name + ("/" if m.isdir() else "")
            rest = name_[len(top):] if name_.startswith(top) else None
            if rest is None:
                continue
            keep = name_.startswith(wanted) or any(f"{top}{d}/" == name_ for d in dirs)
            if not quick and "/" not in rest and m.isfile():
                keep = True  # Makefile, README, MAINTAINERS...
            if not keep and m.isdir() and rest == "":
                keep = True
            if not keep or not (m.isfile() or m.isdir() or m.issym()):
                continue
            data = None
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                data = f.read()
            members.append((m, data))
    members.sort(key=lambda md: md[0].name)
    files = dirs_n = links = size = 0
    part = out.with_suffix(".tar.part")
    with tarfile.open(part, "w", format=tarfile.GNU_FORMAT) as w:
        for m, data in members:
            m.uid = m.gid = 0
            m.uname = m.gname = "root"
            if m.isfile():
                files += 1
                size += m.size
                w.addfile(m, io.BytesIO(data or b""))
            else:
                dirs_n += m.isdir()
                links += m.issym()
                w.addfile(m)
    part.rename(out)
    info = {"files": files, "dirs": dirs_n, "symlinks": links, "bytes": size, "sha256": _sha256(out),
            "package": f"{PACKAGE} {package_version()}", "dirs_selected": list(dirs)}
    meta.write_text(json.dumps(info, indent=1))
    return subset_tar(quick)


def untar_argv(tar: TarWorkload, dest: Path) -> list[str]:
    # --no-same-owner would skip the chown of each file; root extracts with ownership (the usual case for a
    # package manager), so keep tar's default: every file gets create, write, close, chown, chmod, utimes
    return ["tar", "-xf", str(tar.path), "-C", str(dest)]


# ---- churn ---------------------------------------------------------------------------------------------------------

CHURN_SRC = BENCH_DIR / "churn.c"


def built(src: Path, name: str, argv: Callable[[Path], list[str]]) -> Path:
    """``bench/cache/NAME`` built from ``src`` by ``argv(output)`` (a compiler command), again when ``src`` is newer."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    part = out.with_name(name + ".part")
    r = subprocess.run(argv(part), capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"cannot compile {src}: {r.stderr.strip()}")
    os.replace(part, out)
    return out


def c_program(src: Path, name: str) -> Path:
    """A bench helper program compiled by the system C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise BenchError(f"no C compiler for {src}: apt-get install gcc")
    return built(src, name, lambda out: [cc, "-O2", "-Wall", "-o", str(out), str(src)])


def churn_binary() -> Path:
    """``bench/cache/churn``, (re)compiled when ``bench/churn.c`` is newer."""
    return c_program(CHURN_SRC, "churn")


@dataclass(frozen=True)
class ChurnWorkload:
    iterations: int
    rate: float = 0.0  # iterations per second, 0 = flat out
    write_bytes: int = 64
    names: int = 64
    mode: str = "churn"  # or "chmod": one fchmodat per iteration

    @property
    def events_per_iter(self) -> int:
        """Events the BPF backend reports per iteration: CREATE, CLOSE_WRITE, UNLINK; or one CHMOD."""
        return 1 if self.mode == "chmod" else 3

    @property
    def setup_events(self) -> int:
        """Events before the timed loop: chmod mode first creates its files (CREATE and CLOSE_WRITE each)."""
        return 2 * self.names if self.mode == "chmod" else 0

    def argv(self, dest: Path) -> list[str]:
        return [str(churn_binary()), str(dest), str(self.iterations), str(self.rate), str(self.write_bytes),
                str(self.names), self.mode]

    def describe(self) -> dict[str, object]:
        ops = "fchmodat" if self.mode == "chmod" else "openat(O_CREAT) + write + close + unlink"
        return {"iterations": self.iterations, "rate": self.rate, "write_bytes": self.write_bytes,
                "names": self.names, "mode": self.mode, "ops": ops}


def run_churn(runner: Runner, wl: ChurnWorkload, dest: Path, timeout: float) -> tuple[Finished, float]:
    """Run the churn in ``dest``; (process result, the loop's own elapsed seconds as it measured them)."""
    res = runner.run(wl.argv(dest), timeout=timeout)
    if res.rc != 0:
        raise BenchError(f"churn failed (rc {res.rc}): {res.stderr.strip()}")
    _, ns = res.stdout.split()
    return res, int(ns) / 1e9


def run_churn_parallel(
    runner: Runner, wl: ChurnWorkload, dests: list[Path], timeout: float
) -> tuple[float, float, float]:
    """One churn process per directory of ``dests``, all at once; (slowest loop seconds, wall seconds, total CPU)."""
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(tempfile.TemporaryFile()) for _ in dests]
        t0 = time.monotonic()
        kids = [runner.start(wl.argv(d), stdout=o, stderr=o) for d, o in zip(dests, outs, strict=True)]
        deadline = t0 + timeout
        for k in kids:
            if k.reap(max(0.0, deadline - time.monotonic())) is None:
                for k2 in kids:
                    k2.stop()
                raise BenchError(f"churn did not finish within {timeout:.0f} s")
        wall = time.monotonic() - t0
        loops = []
        cpu = 0.0
        for k, o in zip(kids, outs, strict=True):
            o.seek(0)
            text = o.read().decode(errors="replace")
            assert k.finished is not None
            if k.finished.rc != 0:
                raise BenchError(f"churn failed (rc {k.finished.rc}): {text.strip()}")
            loops.append(int(text.split()[1]) / 1e9)
            cpu += k.finished.cpu
            runner.children.remove(k)
        return max(loops), wall, cpu

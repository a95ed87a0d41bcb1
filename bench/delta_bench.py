"""Micro-benchmark of the delta engine (kwatch.replicate.delta); not a test.

Builds a basis file of random bytes (default 256 MiB) and a new version with scattered 4 KiB edits, one
insertion (a shift) and one deletion, then reports MB/s for signature and delta, the wire cost (signature + literal
bytes + op overhead) and checks that patch rebuilds the new file. If ``rdiff`` (librsync) is installed, the same
three steps run through it and the ratios are printed.

    .venv/bin/python bench/delta_bench.py [--size-mib 256] [--edits 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kwatch.replicate.delta import Copy, DeltaStats, Literal, PatchResult, Signature, delta, patch, signature

T = TypeVar("T")


def make_files(directory: Path, size: int, edits: int, seed: int) -> tuple[Path, Path, int]:
    rng = random.Random(seed)
    basis = directory / "basis.bin"
    new = directory / "new.bin"
    chunk = 16 << 20
    with basis.open("wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n
    data = bytearray(basis.read_bytes())
    changed = 0
    for _ in range(edits):
        off = rng.randrange(0, size - 4096)
        data[off : off + 4096] = rng.randbytes(4096)
        changed += 4096
    # one insertion and one deletion, so the rolling search has shifted data to find
    ins = rng.randrange(size // 4, size // 2)
    data[ins:ins] = rng.randbytes(777)
    dele = rng.randrange(size // 2, 3 * size // 4)
    del data[dele : dele + 333]
    changed += 777
    new.write_bytes(bytes(data))
    return basis, new, changed


REPEAT = 3  # best of REPEAT runs: the machine is shared and the page cache is warm only after the first pass


def timed(label: str, nbytes: int, fn: Callable[[], T]) -> tuple[float, T]:
    dt = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        result = fn()
        dt = min(dt, time.perf_counter() - t0)
    print(f"  {label:<28} {dt:7.3f} s  {nbytes / dt / 1e6:8.1f} MB/s  (best of {REPEAT})")
    return dt, result


def bench_kwatch(basis: Path, new: Path) -> dict[str, float]:
    size = basis.stat().st_size
    nsize = new.stat().st_size
    print("kwatch.replicate.delta")

    def do_sig() -> Signature:
        with basis.open("rb") as f:
            return signature(f)

    t_sig, sig = timed("signature", size, do_sig)
    ops: list[Copy | Literal] = []

    def do_delta() -> DeltaStats:
        with new.open("rb") as f:
            stream = delta(sig, f)
            ops[:] = list(stream)
            return stream.stats

    t_delta, stats = timed("delta", nsize, do_delta)
    out = basis.parent / "out.bin"

    def do_patch() -> PatchResult:
        with basis.open("rb") as b, out.open("wb") as o:
            return patch(b, ops, o, sig.block_size)

    t_patch, _ = timed("patch", nsize, do_patch)
    same = out.read_bytes() == new.read_bytes()
    out.unlink()
    literal = stats.literal_bytes
    # op overhead as framed by the agent protocol: ~10 bytes per copy run, ~6 per literal header
    overhead = sum(10 if isinstance(op, Copy) else 6 for op in ops)
    wire = sig.wire_size + literal + overhead
    print(
        f"  block size {sig.block_size}, {sig.count} blocks, signature {sig.wire_size} B, "
        f"literal {literal} B in {len(ops)} ops; wire total {wire} B = {100 * wire / size:.3f}% of the file; "
        f"patched copy identical: {same}"
    )
    return {"sig": t_sig, "delta": t_delta, "patch": t_patch, "wire": float(wire), "literal": float(literal)}


def bench_rdiff(basis: Path, new: Path) -> dict[str, float] | None:
    rdiff = shutil.which("rdiff")
    if rdiff is None:
        print("rdiff not installed (apt install rdiff): no comparison")
        return None
    size = basis.stat().st_size
    nsize = new.stat().st_size
    d = basis.parent
    print(f"librsync rdiff ({rdiff}; blake2 strong sums, its own sqrt block size)")
    sig, dlt, out = d / "rdiff.sig", d / "rdiff.delta", d / "rdiff.out"
    t_sig, _ = timed(
        "signature", size, lambda: subprocess.run([rdiff, "--force", "signature", basis, sig], check=True)
    )
    t_delta, _ = timed(
        "delta", nsize, lambda: subprocess.run([rdiff, "--force", "delta", sig, new, dlt], check=True)
    )
    t_patch, _ = timed(
        "patch", nsize, lambda: subprocess.run([rdiff, "--force", "patch", basis, dlt, out], check=True)
    )
    same = out.read_bytes() == new.read_bytes()
    wire = sig.stat().st_size + dlt.stat().st_size
    print(
        f"  signature {sig.stat().st_size} B, delta {dlt.stat().st_size} B; wire total {wire} B = "
        f"{100 * wire / size:.3f}% of the file; patched copy identical: {same}"
    )
    for p in (sig, dlt, out):
        p.unlink()
    return {"sig": t_sig, "delta": t_delta, "patch": t_patch, "wire": float(wire)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--edits", type=int, default=64, help="number of scattered 4 KiB overwrites")
    ap.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--unrelated-mib",
        type=int,
        default=64,
        help="also time delta against an unrelated file this big (0: skip)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        basis, new, changed = make_files(Path(tmp), args.size_mib << 20, args.edits, args.seed)
        print(
            f"basis {basis.stat().st_size} B, new {new.stat().st_size} B, ~{changed} B changed; cpus {os.cpu_count()}"
        )
        ours = bench_kwatch(basis, new)
        theirs = bench_rdiff(basis, new)
        if theirs:
            print("ratios (rdiff time / kwatch time; >1 means kwatch is faster; wire: kwatch / rdiff):")
            for k in ("sig", "delta", "patch"):
                print(f"  {k:<8} {theirs[k] / ours[k]:6.2f}x")
            print(f"  wire     {ours['wire'] / theirs['wire']:6.2f}")
        if args.unrelated_mib:
            unrelated(Path(tmp), args.unrelated_mib << 20, args.seed)


def unrelated(directory: Path, size: int, seed: int) -> None:
    """Worst case for the rolling search: nothing matches, every window of the new file is checked."""
    rng = random.Random(seed + 1)
    basis, new = directory / "u-basis.bin", directory / "u-new.bin"
    basis.write_bytes(rng.randbytes(size))
    new.write_bytes(rng.randbytes(size))
    print(f"unrelated files of {size} B (worst case: roll through everything)")
    with basis.open("rb") as f:
        sig = signature(f)

    def run() -> int:
        with new.open("rb") as f:
            return sum(1 for _ in delta(sig, f))

    t_ours, _ = timed("kwatch delta", size, run)
    rdiff = shutil.which("rdiff")
    if rdiff:
        s, d = directory / "u.sig", directory / "u.delta"
        subprocess.run([rdiff, "signature", basis, s], check=True)
        t_theirs, _ = timed(
            "rdiff delta", size, lambda: subprocess.run([rdiff, "--force", "delta", s, new, d], check=True)
        )
        print(f"  ratio rdiff/kwatch {t_theirs / t_ours:6.2f}x")


if __name__ == "__main__":
    main()

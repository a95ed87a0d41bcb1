"""The rsync push suite (``python -m bench.run rsync``): kwatch's native rsync client against an ``rsync -a`` exec,
both pushing the same batch to the same loopback ``rsync --daemon`` (tests/support/rsyncd.py starts it).

Two batches, alternating the tools, medians: the whole tree into an empty module (``--delete``), then the same tree
after scattered edits (a few bytes in 1% of the files and a 4 KiB edit in a large file) into a module holding the
old version, so both tools send deltas. Figures: wall seconds, bytes sent (kwatch: the client's own count; rsync:
``--stats``), literal vs matched bytes where the tool says.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import alternate, machine, median, scratch_dir
from bench.report import machine_line, update_section

REPO = Path(__file__).resolve().parent.parent
EDITED_MTIME = 1_700_000_000  # 2023-11-14, whole seconds
START, END = "<!-- bench:rsync:start -->", "<!-- bench:rsync:end -->"


def _tree(dest: Path, files: int, big: int) -> None:
    """A deterministic tree: ``files`` small files in nested directories and one ``big``-byte file."""
    rnd = __import__("random").Random(7)
    for i in range(files):
        d = dest / f"d{i % 37}" / f"e{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.c").write_bytes(rnd.randbytes(200 + (i * 131) % 9000))
    with (dest / "big.bin").open("wb") as f:
        for _ in range(0, big, 1 << 20):  # randbytes of more than 256 MiB at once overflows
            f.write(rnd.randbytes(1 << 20))


def _edit(dest: Path, files: int) -> None:
    for i in range(0, files, 100):
        p = dest / f"d{i % 37}" / f"e{i % 5}" / f"f{i}.c"
        with p.open("r+b") as f:
            f.write(b"EDITED")
    with (dest / "big.bin").open("r+b") as f:
        f.seek((dest / "big.bin").stat().st_size // 2)
        f.write(b"\xa5" * 4096)
    # A fixed time in another second than the tree was made in: rsync's default --modify-window of 0 compares whole
    # seconds only, so with "now" it skipped every file made within the same second (on a fast machine the big file
    # and often the whole small tree) and compared its bytes for less work, leaving a mirror that differs.
    for p in dest.rglob("*"):
        os.utime(p, (EDITED_MTIME, EDITED_MTIME))


def _rsync_exec(src: Path, url: str) -> tuple[float, int]:
    t = time.monotonic()
    p = subprocess.run(["rsync", "-a", "--delete", "--stats", f"{src}/", url], capture_output=True, text=True,
                       timeout=600)
    wall = time.monotonic() - t
    if p.returncode:
        raise RuntimeError(f"rsync failed: {p.stderr[-300:]}")
    m = re.search(r"Total bytes sent: ([\d,]+)", p.stdout)
    return wall, int(m.group(1).replace(",", "")) if m else -1


def _native(src: Path, url: str) -> tuple[float, int, int, int]:
    from kwatch.replicate.rsync_transport import push

    t = time.monotonic()
    r = push(os.fsencode(src), url, None, delete=True)
    wall = time.monotonic() - t
    if r.errors:
        raise RuntimeError(f"kwatch push: {r.errors[:3]}")
    return wall, r.bytes_sent, r.literal_bytes, r.matched_bytes


def main(args: argparse.Namespace, out: Path) -> int:
    sys.path.insert(0, str(REPO / "tests" / "support"))
    from rsyncd import RsyncDaemon

    files, big = (300, 8 << 20) if args.quick else (5000, 256 << 20)
    # quick: 5 runs of a small tree, so the guard rail (bench/guards.py) reads the best of 5: one run on a loaded
    # machine varied 8x for kwatch's push and 3x for rsync's
    runs = args.runs or (5 if args.quick else 3)
    rows: dict[tuple[str, str], list[tuple[float, int, int | None, int | None]]] = {}
    with scratch_dir() as base:
        src, old = base / "src", base / "old"
        src.mkdir()
        _tree(src, files, big)
        shutil.copytree(src, old, symlinks=True)
        _edit(src, files)  # src = the edited version; old = what the module holds before the second batch
        with RsyncDaemon(base / "rsyncd") as d:
            module = d.module_path("push")
            url = d.url("push")
            for _, tool in alternate(["kwatch", "rsync"], runs):
                for batch in ("whole tree", "edits"):
                    shutil.rmtree(module)
                    if batch == "edits":
                        shutil.copytree(old, module, symlinks=True)
                    else:
                        module.mkdir()
                    if tool == "kwatch":
                        wall, sent, lit, matched = _native(src, url)
                        rows.setdefault((batch, tool), []).append((wall, sent, lit, matched))
                    else:
                        wall, sent = _rsync_exec(src, url)
                        rows.setdefault((batch, tool), []).append((wall, sent, None, None))
                    print(f"bench: rsync: {batch:10} {tool:6} {wall:7.3f} s  {sent:>12,} B sent", file=sys.stderr)
    mach = machine()
    lines = [
        f"Native rsync push vs `rsync -a --delete` exec, same batch, same loopback daemon; {files} files + one "
        f"{big >> 20} MiB file; medians of {runs}; {machine_line(mach)}.",
        "",
        "| batch | tool | seconds | x rsync | bytes sent | literal / matched (kwatch) |",
        "|---|---|---:|---:|---:|---|",
    ]
    result: dict[str, Any] = {"files": files, "big": big, "runs": runs, "rows": []}
    for batch in ("whole tree", "edits"):
        base_wall = median([r[0] for r in rows[(batch, "rsync")]])
        for tool in ("kwatch", "rsync"):
            rs = rows[(batch, tool)]
            wall = median([r[0] for r in rs])
            sent = int(median([float(r[1]) for r in rs]) or 0)
            extra = f"{rs[0][2]:,} / {rs[0][3]:,}" if rs[0][2] is not None else ""
            ratio = f"{wall / base_wall:.2f}" if wall and base_wall else "-"
            lines.append(f"| {batch} | {tool} | {wall:.3f} | {ratio} | {sent:,} | {extra} |")
            result["rows"].append({"batch": batch, "tool": tool, "seconds": wall, "best_seconds": min(r[0] for r in rs),
                                   "bytes_sent": sent})
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rsync.md").write_text(md)
    (out / "rsync.json").write_text(__import__("json").dumps(result, indent=2))
    print(md)
    if getattr(args, "write_readme", False) and not args.quick:
        print(update_section(md, START, END), file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover - run through bench.run
    raise SystemExit("run it as: python -m bench.run rsync")


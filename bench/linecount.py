"""Counts the lines a printing observer writes, standing in for its terminal (``tool | python -m bench.linecount``).

Reads stdin in 1 MiB chunks (a C-speed count per chunk, so its own CPU is small; the capture suite adds it to the
observer's CPU anyway). Lines holding ``--marker`` are not counted; the first one seen touches ``--ready`` (bpftrace
prints a marker from its BEGIN probe). At end of input it writes ``{"lines": N, "bytes": M}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.linecount")
    ap.add_argument("--out", required=True)
    ap.add_argument("--marker", default="")
    ap.add_argument("--ready", default="")
    args = ap.parse_args(argv)
    marker = args.marker.encode()
    lines = size = markers = 0
    tail = b""
    while chunk := os.read(0, 1 << 20):  # what the pipe holds, up to 1 MiB
        size += len(chunk)
        lines += chunk.count(b"\n")
        if marker:
            # a marker may straddle two chunks: look at the seam too
            seen = (tail + chunk).count(marker) - tail.count(marker)
            if seen:
                if not markers and args.ready:
                    Path(args.ready).write_text("ready")
                markers += seen
            tail = chunk[-len(marker):]
    Path(args.out).write_text(json.dumps({"lines": lines - markers, "bytes": size, "markers": markers}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

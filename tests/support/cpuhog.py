"""Run a command while one busy process per core keeps the machine loaded (``make test-loaded``).

``python tests/support/cpuhog.py [--seconds N] -- COMMAND...``: starts ``os.cpu_count()`` spinning processes, runs COMMAND,
kills the spinners (by the pids started here) and exits with COMMAND's status. Each spinner also ends by itself
once its parent is gone or after ``--seconds`` (default 2 hours), so a killed run leaves no load behind.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SPIN = """
import os, sys, time
parent, until = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while os.getppid() == parent and time.monotonic() < until:
    for _ in range(200_000):
        pass
"""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=7200.0, help="the longest a spinner runs (default 2 h)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command to run")
    n = os.cpu_count() or 1
    hogs = [subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid()), str(args.seconds)]) for _ in range(n)]
    print(f"cpuhog: {n} spinners ({', '.join(str(h.pid) for h in hogs)}) while running {' '.join(cmd)}",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        return subprocess.call(cmd)
    finally:
        for h in hogs:
            h.kill()
            h.wait(10)
        print(f"cpuhog: command took {time.monotonic() - t0:.0f}s under load", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

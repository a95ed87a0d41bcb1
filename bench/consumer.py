"""The counting kwatch consumer: opens a capture backend on a tree, reads batches, counts, prints nothing.

Run as its own process by the capture suite, so that its CPU time is the cost of capture alone (kernel program,
ring buffer or fanotify reads, decoding, filtering) without the terminal formatting of ``kwatch trace``::

    python -m bench.consumer --backend bpf --ready FILE --out FILE.json DIR

It touches ``--ready`` once the source is open (the kernel side is attached), counts until SIGTERM/SIGINT, then
drains what is still queued (until reads have come back empty for :data:`DRAIN_QUIET` seconds: a record a preempted
producer has reserved but not committed yet stops a drain without being lost) and writes its counts as JSON to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from types import FrameType

from kwatch.capture.base import CaptureFilter, Source
from kwatch.capture.select import open_source
from kwatch.events import Op

_stop = False
DRAIN_QUIET = 1.0


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _stop
    _stop = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.consumer")
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--backend", default="bpf")
    ap.add_argument("--ready", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ringbuf-mib", type=int, default=0, help="BPF ring buffer size (0: the backend default)")
    ap.add_argument("--no-ops", action="store_true", help="capture no op (the cost of the attached programs alone)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    filt = CaptureFilter.make(roots=[os.path.abspath(d) for d in args.dirs], exclude_pids=[os.getpid()],
                              ops=[] if args.no_ops else None)
    t_open = time.monotonic()
    src: Source
    if args.backend == "bpf" and args.ringbuf_mib:
        from kwatch.capture.bpf import BpfSource

        src = BpfSource(filt, ringbuf_bytes=args.ringbuf_mib << 20)
    else:
        src = open_source(filt, args.backend)
    open_s = time.monotonic() - t_open
    Path(args.ready).write_text(str(os.getpid()))
    events = loss_markers = 0
    lost: int | None = 0
    by_op: dict[Op, int] = {}
    first = last = None
    quiet_since: float | None = None
    reads = 0
    try:
        while True:
            batch = src.read(0.1)
            reads += 1
            if not batch:
                if _stop:
                    now = time.monotonic()
                    quiet_since = quiet_since if quiet_since is not None else now
                    if now - quiet_since >= DRAIN_QUIET:
                        break
                    time.sleep(0.01)
                continue
            quiet_since = None
            now = time.monotonic()
            first = first if first is not None else now
            last = now
            for ev in batch:
                if ev.op is Op.LOSS:
                    loss_markers += 1
                    if ev.lost is None:
                        lost = None
                    elif lost is not None:
                        lost += ev.lost
                    continue
                events += 1
                k = ev.op
                by_op[k] = by_op.get(k, 0) + 1
    finally:
        st = src.stats()
        src.close()
    Path(args.out).write_text(json.dumps({
        "backend": src.name, "events": events, "by_op": {op.label: n for op, n in by_op.items()}, "loss_markers": loss_markers, "lost": lost,
        "stats_lost": st.lost, "filtered": st.filtered, "reads": reads, "open_s": round(open_s, 3),
        "first_batch": first, "last_batch": last,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

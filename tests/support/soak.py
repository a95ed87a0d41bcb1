"""``make soak``: a seeded random schedule of the fault matrix's faults (tests/support/faultlab.py) over N minutes, for the
agent over ssh and for ``rsync://`` in turn, through a test network (tests/support/netlab.py).

Each cycle: a stretch of the workload with one fault injected while it runs (those that hold a state, such as a
partition or a full disk, end before the stretch does; a slow or lossy link stays until the mirror converged), then
the time until the mirror is identical to the source (hard links included: the same paths share an inode). The
mirror is checked throughout for files under final names with content the source never had there. Prints a summary (faults, batches, reconnects, time to converge after each
fault: median and max, bytes sent against bytes written, fd/RSS drift of ``kwatch replicate``, the final identity
check) and exits non-zero on any violation or a mirror that did not converge within ``--converge`` seconds.

``python tests/support/soak.py --minutes 2 --seed 1`` (``make soak SOAK_MINUTES=2 SOAK_SEED=1``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from faultlab import FAULTS, Churn, Rig, build_untar_tree, converge, fd_count, rss_kib

SOAK_FAULTS = [f for f in FAULTS if f != "partition-60s"]


def soak(kind: str, base: Path, seconds: float, rnd: random.Random, bound: float) -> dict[str, object]:
    staging = base / "staging"
    build_untar_tree(staging, 300, rnd.randrange(1 << 30))
    tarball = base / "tree.tar"
    subprocess.run(["tar", "cf", str(tarball), "-C", str(staging), "."], check=True, timeout=60)
    faults = [f for f in SOAK_FAULTS if kind in FAULTS[f][1]]
    took: dict[str, list[float]] = {}
    samples: list[tuple[int, int, int]] = []  # (pid, fds, rss KiB) at each convergence
    violations: list[str] = []
    written = 0
    with Rig(kind, base / "rig", mirror_fs_mib=48) as rig:
        assert rig.live is not None
        churn = Churn(rig.src, tarball, staging, ops=400, seconds=4.0, seed=rnd.randrange(1 << 30))
        mirror = os.fsencode(rig.mirror)
        stop = threading.Event()

        def checker() -> None:
            while not stop.is_set():
                violations.extend(churn.check_mirror(mirror))

        check = threading.Thread(target=checker, name="checker")
        check.start()
        t_end = time.monotonic() + seconds
        try:
            while time.monotonic() < t_end:
                fault = rnd.choice(faults)
                fn, _kinds, duration = FAULTS[fault]
                writer = threading.Thread(target=churn.run, name="churn")
                writer.start()
                time.sleep(rnd.uniform(0.2, 1.5))  # the fault's moment within the stretch: part of the schedule
                fn(rig, True)
                if duration:
                    time.sleep(duration)
                    fn(rig, False)
                writer.join(120)
                if churn.error is not None:
                    raise churn.error
                t = converge(rig, bound, f"{kind} after {fault}")
                if not duration:
                    fn(rig, False)
                took.setdefault(fault, []).append(t)
                samples.append((rig.live.pid, fd_count(rig.live.pid), rss_kib(rig.live.pid)))
                print(f"soak {kind}: {fault}: identical {t:.1f}s after the stretch ended", flush=True)
        finally:
            stop.set()
            check.join(60)
        violations.extend(churn.check_mirror(mirror))
        final = converge(rig, bound, f"{kind} final")
        for dirpath, _dirs, names in os.walk(rig.src):
            for n in names:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    written += os.path.getsize(p)
        log = rig.live.log_text()
        batches = rig.live.batches()
    last_pid = samples[-1][0] if samples else 0
    mine = [s for s in samples if s[0] == last_pid]
    all_took = [t for ts in took.values() for t in ts]
    return {
        "kind": kind,
        "faults": {f: len(ts) for f, ts in took.items()},
        "batches": len(batches),
        "reconnects": log.count("retrying in"),  # each failure of the link is followed by one attempt
        "converge_median": statistics.median(all_took) if all_took else 0.0,
        "converge_max": max(all_took, default=0.0),
        "sent": sum(b.literal for b in batches),
        "source_bytes": written,
        "fd_drift": (mine[-1][1] - mine[0][1]) if mine else 0,
        "rss_drift_kib": (mine[-1][2] - mine[0][2]) if mine else 0,
        "drift_over": len(mine),
        "violations": sorted(set(violations)),
        "final_identical_after": final,
        "operations": churn.done,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="total soak time, split between ssh and rsync")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", default="ssh,rsync")
    ap.add_argument("--converge", type=float, default=120.0, help="seconds allowed to an identical mirror")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    rnd = random.Random(args.seed)
    results = []
    ok = True
    t0 = time.monotonic()
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"kwatch-soak-{kind}-") as tmp:
            try:
                r = soak(kind, Path(tmp), args.minutes * 60 / len(kinds), rnd, args.converge)
            except AssertionError as e:
                print(f"soak {kind}: FAILED: {e}", flush=True)
                ok = False
                continue
            results.append(r)
    print(f"\nsoak summary (seed {args.seed}, {args.minutes} min requested, {time.monotonic() - t0:.0f}s taken):")
    for r in results:
        bad = r["violations"]
        assert isinstance(bad, list)
        ok = ok and not bad
        print(f"  {r['kind']}: faults {r['faults']}; {r['operations']} operations; {r['batches']} batches; "
              f"{r['reconnects']} reconnects; converge median {r['converge_median']:.1f}s max "
              f"{r['converge_max']:.1f}s; {r['sent']} literal bytes sent for a {r['source_bytes']}-byte source; "
              f"kwatch replicate drift over {r['drift_over']} samples: {r['fd_drift']:+d} fds, "
              f"{r['rss_drift_kib']:+d} KiB RSS; final identical after {r['final_identical_after']:.1f}s; "
              f"{len(bad)} violations")
        for v in bad[:20]:
            print(f"    {v}")
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Latency benchmark (issue 17): an untar replicated through the test network (tests/support/netlab.py) at 50 and 200 ms
RTT, by kwatch over ssh (its agent), kwatch to ``rsync://``, lsyncd ``default.rsync`` (delay 0) to the same rsync
daemon, and one ``rsync -a --delete`` to it run once the untar has ended.

Every tool runs in the source host's namespace and reaches the mirror host only through the lab's wire, whose
forwarder counts the bytes of every frame each way (so all tools are measured alike, headers included).
``to identical s`` is from the end of the untar to the first poll (tests/support/treecmp.py, every 0.05 s) that finds the
mirror equal to the source; for the one-shot rsync it includes the rsync run. ``--repeat N`` runs every tool N times,
the tools taking turns (so a change in the machine's load falls on all of them alike); the table gives each run's
figure and the median, and the ratios are of medians.

``.venv/bin/python -m bench.netlatency [--files N] [--rtt 50,200] [--tools ...] [--repeat N]``; writes
bench/out/netlatency.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))

from faultlab import build_untar_tree  # noqa: E402
from livereplicate import KWATCH, LiveReplicate  # noqa: E402
from netlab import NetLab  # noqa: E402
from rsyncd import RsyncDaemon  # noqa: E402
from sshd import Sshd  # noqa: E402
from treecmp import tree_differences  # noqa: E402

#: kwatch-rsyncd-ahead (not run by default): kwatch-rsyncd with --ahead (batches that create and change go while
#: earlier ones are in flight; experimental)
TOOLS = ("kwatch-ssh", "kwatch-rsyncd", "lsyncd-d0", "oneshot-rsync")
OUT = REPO / "bench" / "out"


def _wait(cond: object, timeout: float, what: str) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def one(tool: str, rtt_ms: int, tarball: Path, base: Path, timeout: float = 600.0) -> dict[str, object]:
    src = base / "src"
    src.mkdir()
    with NetLab() as lab:
        probe = lambda h, p: lab.connect("mirror", h, p, timeout=0.5)  # noqa: E731
        lab.set_shape(delay_ms=rtt_ms / 2)
        rsyncd = RsyncDaemon(base / "rsyncd", host=lab.mirror_ip, prefix=lab.argv("mirror"), probe=probe).start()
        sshd: Sshd | None = None
        live: LiveReplicate | None = None
        helper: subprocess.Popen[bytes] | None = None
        mirror = rsyncd.module_path("push")
        try:
            if tool == "kwatch-ssh":
                sshd = Sshd(base / "sshd", host=lab.mirror_ip, prefix=lab.argv("mirror"), probe=probe).start()
                mirror = base / "mirror"
                mirror.mkdir()
                live = LiveReplicate(src, [sshd.target(mirror)], base / "replicate.log",
                                     ["-e", sshd.ssh_command, "--agent-command", KWATCH], prefix=lab.argv("src"))
                live.start()
            elif tool in ("kwatch-rsyncd", "kwatch-rsyncd-ahead"):
                extra = ["--ahead"] if tool == "kwatch-rsyncd-ahead" else []
                live = LiveReplicate(src, [rsyncd.url("push")], base / "replicate.log", extra, prefix=lab.argv("src"))
                live.start()
            elif tool == "lsyncd-d0":
                log = base / "lsyncd.log"
                conf = base / "lsyncd.lua"
                conf.write_text(
                    f"settings {{\n  logfile = {json.dumps(str(log))},\n  nodaemon = true,\n  insist = false,\n}}\n"
                    f"sync {{\n  default.rsync,\n  source = {json.dumps(str(src))},\n"
                    f"  target = {json.dumps(rsyncd.url('push'))},\n  delay = 0,\n  rsync = {{ archive = true }},\n}}\n")
                helper = subprocess.Popen([*lab.argv("src"), "lsyncd", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)

                def started() -> bool:
                    return log.exists() and re.search(r"Startup of .* finished", log.read_text()) is not None

                _wait(started, 60, "lsyncd did not start")
            w0 = lab.wire_stats()
            t0 = time.monotonic()
            subprocess.run(["tar", "xf", str(tarball), "-C", str(src)], check=True, timeout=600)
            t_untar = time.monotonic()
            if tool == "oneshot-rsync":
                subprocess.run([*lab.argv("src"), "rsync", "-a", "--delete", f"{src}/", rsyncd.url("push")],
                               check=True, timeout=timeout)
            def identical() -> bool:
                try:
                    return not tree_differences(src, mirror)
                except FileNotFoundError:  # a temporary renamed away while listed: the mirror is still moving
                    return False

            _wait(identical, timeout, f"{tool} did not converge")
            t_done = time.monotonic()
            w1 = lab.wire_stats()
            return {"tool": tool, "rtt_ms": rtt_ms, "untar_s": t_untar - t0, "to_identical_s": t_done - t_untar,
                    "bytes_to_mirror": w1["bytes_a_to_b"] - w0["bytes_a_to_b"],
                    "bytes_back": w1["bytes_b_to_a"] - w0["bytes_b_to_a"]}
        finally:
            if live is not None:
                live.kill_all()
            if helper is not None:
                helper.kill()
                helper.wait(10)
            if sshd is not None:
                sshd.stop()
            rsyncd.stop()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rtt", default="50,200", help="RTTs in ms, comma-separated")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool, taking turns")
    args = ap.parse_args(argv)
    rows = []
    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory(prefix="kwatch-netlat-") as tmp:
        staging = Path(tmp) / "staging"
        build_untar_tree(staging, args.files, 9)
        tarball = Path(tmp) / "tree.tar"
        subprocess.run(["tar", "cf", str(tarball), "-C", str(staging), "."], check=True, timeout=120)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file() and not p.is_symlink())
        for rtt in (int(x) for x in args.rtt.split(",")):
            for rep in range(args.repeat):
                for tool in tools:
                    with tempfile.TemporaryDirectory(prefix=f"kwatch-netlat-{tool}-", dir=tmp) as run:
                        r = one(tool, rtt, tarball, Path(run))
                    rows.append(r)
                    print(f"{rtt} ms RTT {tool} run {rep + 1}: identical {r['to_identical_s']:.2f}s after the untar "
                          f"({r['untar_s']:.2f}s); {r['bytes_to_mirror']} bytes to the mirror, {r['bytes_back']} back",
                          flush=True)
    text = _table(rows, args.files, size)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "netlatency.md").write_text(text)
    print(text)
    return 0


def _table(rows: list[dict[str, object]], files: int, size: int) -> str:
    """One line per (RTT, tool): every run's time to identical, the median, and the medians' ratios to the one-shot
    rsync and to lsyncd (a ratio above 1 against lsyncd: faster than lsyncd by that factor)."""
    lines = [f"# Untar replication through the test network ({files} files, {size} bytes of file data)", "",
             "| RTT | tool | to identical s (each run) | median s | vs one-shot rsync | lsyncd / tool | "
             "bytes to mirror (median) | bytes back (median) |",
             "|---|---|---|---|---|---|---|---|"]
    med: dict[tuple[object, str], float] = {}
    for r in rows:
        key = (r["rtt_ms"], str(r["tool"]))
        if key not in med:
            med[key] = statistics.median(float(x["to_identical_s"]) for x in rows  # type: ignore[arg-type]
                                         if (x["rtt_ms"], x["tool"]) == key)
    for (rtt, tool), m in med.items():
        runs = [x for x in rows if (x["rtt_ms"], x["tool"]) == (rtt, tool)]
        each = ", ".join(f"{float(x['to_identical_s']):.2f}" for x in runs)  # type: ignore[arg-type]
        base = med.get((rtt, "oneshot-rsync"))
        lsyncd = med.get((rtt, "lsyncd-d0"))
        vs_base = f"{m / base:.2f}x" if base else "-"
        vs_lsyncd = f"{lsyncd / m:.2f}x" if lsyncd and m else "-"
        sent = statistics.median(int(x["bytes_to_mirror"]) for x in runs)  # type: ignore[call-overload]
        back = statistics.median(int(x["bytes_back"]) for x in runs)  # type: ignore[call-overload]
        lines.append(f"| {rtt} ms | {tool} | {each} | {m:.2f} | {vs_base} | {vs_lsyncd} | {sent:.0f} | {back:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

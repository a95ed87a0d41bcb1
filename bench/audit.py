"""The audit outputs at a fixed event rate: does the file or the JetStream output lose anything at a sustained rate?

``python -m bench.run audit [--audit-rate 120000] [--audit-records 1000000]``. For each output (``file``, ``nats``):
``kwatch trace DIR -q --backend bpf --output KIND`` (bench/observers.py ``KwatchAudit``: its own nats-server, the
spool, every record with its process context) while ``bench/churn`` runs paced at ``rate`` events/s (3 events per
iteration) until it has made ``records`` events. Counted from the output's far side, not from kwatch's own figures:

- ``nats``: the stream is read back whole from the server after the run (each message by its stream sequence): event records stored,
  duplicates, gaps or reordering in the host's sequence numbers (each message's ``Kwatch-Seq``/``Kwatch-Count``);
  while the churn runs, the host's last stored sequence number is polled every 0.2 s (the stream's last message), so
  the rate the server took records at and the backlog at the churn's end are the server's view too;
- ``file``: the lines in the file (rotation off: ``max_bytes=0``), counted after the run; while it runs, its size.

``lost`` = events produced - event records stored, after the output has drained (waited for, up to 120 s, before
kwatch is stopped: records still spooled are not lost, they are late, and ``drain_s`` says how late). ``sustained``
is the stored records over the time from the churn's start to the last record stored: with ``drain_s`` near 0 it is
the churn's own rate, i.e. the output kept up. The churn's real rate is reported beside the target (a loaded machine
may not reach it; the result then says so rather than pretending). CPU: kwatch + its server, and the churn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BenchError, Cleanup, Runner, empty_dir, machine, proc_cpu, scratch_dir, tmpfs
from bench.observers import KwatchAudit, RunCtx
from bench.report import machine_line, publish
from bench.workloads import ChurnWorkload

POLL_S = 0.2
BATCH_MAX = 4096  # records per write in the output-only runs: what one capture read hands over at most
CHURN_BIN = Path(__file__).resolve().parent / "cache" / "churn"
DRAIN_TIMEOUT = 120.0
STREAM = "KWATCH"  # kwatch's default stream and subject prefix (kwatch/outputs/config.py)
EVENT_PREFIX = b'{"kind":"event"'
CHURN = b'"comm":"churn"'


def _is_churn_event(line: bytes) -> bool:
    """An event record of the churn's (what the run produced; nothing else runs in the watched tree)."""
    return line.startswith(EVENT_PREFIX) and CHURN in line


class NatsProbe:
    """A NATS client on a thread of its own: the stream's last stored sequence number now, and the whole stream
    read back at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nats probe", daemon=True)
        self.thread.start()
        self.nc: Any = None
        self.js: Any = None
        self._call(self._connect())

    def _call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self) -> None:
        import nats

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream(timeout=10)

    async def _upto(self) -> int:
        import nats.js.errors

        from kwatch.outputs import fleet

        try:
            info = await self.js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            return 0
        if not info.state.last_seq:
            return 0
        msg = await self.js.get_msg(STREAM, info.state.last_seq)
        upto = fleet.stored_upto(msg.headers)
        return upto[1] if upto else 0

    def upto(self) -> int:
        """The host's last stored record sequence number (records are numbered from 1 in a fresh spool)."""
        return int(self._call(self._upto()))

    async def _read_all(self) -> dict[str, int]:
        from kwatch.outputs import fleet

        info = await self.js.stream_info(STREAM)
        res = {"messages": info.state.messages, "records": 0, "events": 0, "duplicates": 0, "gaps": 0,
               "out_of_order": 0}
        expect = 1
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await self.js.get_msg(STREAM, seq)
            unpacked = fleet.unpack(m.headers, m.data)
            if unpacked is None:
                continue
            _, _, first, lines = unpacked
            if first < expect:
                res["duplicates" if first + len(lines) <= expect else "out_of_order"] += 1
            elif first > expect:
                res["gaps"] += first - expect
            expect = max(expect, first + len(lines))
            res["records"] += len(lines)
            res["events"] += sum(1 for ln in lines if _is_churn_event(ln))
        return res

    def read_all(self) -> dict[str, int]:
        return dict(self._call(self._read_all(), timeout=600.0))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self.nc.close(), 10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)


def _drain(stored_now: Callable[[], int], produced: int, t0: float, series: list[tuple[float, int]]
           ) -> tuple[int, float | None]:
    """Wait (up to DRAIN_TIMEOUT) until the far side holds as many records as were produced: (what it held when
    the producer ended, when it held them all, seconds from ``t0``; None: never)."""
    at_end = stored_now()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        cur = stored_now()
        series.append((time.monotonic() - t0, cur))
        if cur >= produced:
            return at_end, time.monotonic() - t0
        time.sleep(0.02)
    return at_end, None


def _far_side(counts: dict[str, int], produced: int, at_end: int, t_end: float, t_drained: float | None,
              series: list[tuple[float, int]]) -> dict[str, Any]:
    """A run's figures from the far side's counts and the stored-records series (seconds from the start)."""
    last_t = t_drained if t_drained is not None else series[-1][0]
    return {
        "produced": produced,
        "stored_events": counts["events"],
        "stored_records": counts["records"],
        "lost": produced - counts["events"],
        **{k: counts[k] for k in ("duplicates", "gaps", "out_of_order") if k in counts},
        "behind_at_end": max(0, produced - at_end),
        "drain_s": round(max(0.0, last_t - t_end), 2),
        "sustained_per_s": round(counts["events"] / last_t) if last_t else None,
        "series": series,
    }


def _file_lines(path: Path) -> tuple[int, int]:
    lines = events = 0
    with path.open("rb") as f:
        for ln in f:
            lines += 1
            events += _is_churn_event(ln)
    return lines, events


class LineCounter:
    """The lines in a growing file, counted as it grows (only the new bytes are read each time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def __call__(self) -> int:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self.offset)
            while chunk := f.read(1 << 20):
                self.offset += len(chunk)
                self.lines += chunk.count(b"\n")
        return self.lines


def rate_run(runner: Runner, watch: Path, tmp: Path, kind: str, rate: float, records: int, run_id: str
             ) -> dict[str, Any]:
    """One output at one paced rate; see the module docstring."""
    wl = ChurnWorkload(records // 3, rate=rate / 3)
    produced = wl.iterations * wl.events_per_iter
    obs = KwatchAudit(kind, ",max_bytes=0" if kind == "file" else "")
    empty_dir(watch)
    obs.start(RunCtx(runner, watch, tmp, run_id))
    cpu0 = [proc_cpu(c.pid) or 0.0 for c in obs.children]  # kwatch's start (BPF loading) is not the output's cost
    probe: NatsProbe | None = None
    series: list[tuple[float, int]] = []
    try:
        if kind == "nats":
            probe = NatsProbe(obs.nats_url)
            stored_now = probe.upto
        else:
            stored_now = LineCounter(obs.path)
        churn = runner.start(wl.argv(watch), stdout=(tmp / f"churn-{run_id}.out").open("wb"))
        t0 = time.monotonic()
        while churn.reap(POLL_S) is None:
            series.append((time.monotonic() - t0, stored_now()))
            if time.monotonic() - t0 > 600:
                churn.stop()
                raise BenchError("the churn did not finish within 600 s")
        t_end = time.monotonic() - t0
        fin = churn.finished
        assert fin is not None
        if fin.rc != 0:
            raise BenchError(f"churn failed (rc {fin.rc})")
        loop_s = int((tmp / f"churn-{run_id}.out").read_text().split()[1]) / 1e9
        at_end, t_drained = _drain(stored_now, produced, t0, series)
        if probe is not None:
            counts = probe.read_all()
            probe.close()  # before its server stops
            probe = None
        res = obs.stop()
        cpus = [(c.finished.cpu if c.finished is not None else 0.0) - c0 for c, c0 in zip(obs.children, cpu0,
                                                                                           strict=True)]
        if kind == "file":
            lines, events = _file_lines(obs.path)
            counts = {"records": lines, "events": events}
    except BaseException:
        obs.abort()
        raise
    finally:
        if probe is not None:
            probe.close()
    return {
        "output": kind,
        "target_events_per_s": rate,
        "produced_per_s": round(produced / loop_s),
        **_far_side(counts, produced, at_end, t_end, t_drained, series),
        "churn_s": round(loop_s, 3),
        "kwatch_and_server_cpu_s": round(res.cpu_s, 2),
        "kwatch_cpu_s": round(cpus[0], 2),
        "server_cpu_s": round(sum(cpus[1:]), 2),
        "churn_cpu_s": round(fin.cpu, 2),
        "kwatch_lost": res.lost,
    }


def _records(n: int, watch: Path) -> list[Any]:
    """``n`` event records like the churn's (its ops, paths, process and context), made before the clock starts."""
    from kwatch.context import ProcInfo
    from kwatch.events import FileEvent, Op
    from kwatch.outputs.record import event_record

    info = ProcInfo(exe=str(CHURN_BIN).encode(), auid=4294967295, ses=4294967295, pcomm=b"python3", user="root",
                    group="root", cgroup="/user.slice/user-0.slice/session-1.scope", unit="session-1.scope",
                    mntns=4026531841)
    ops = (Op.CREATE, Op.CLOSE_WRITE, Op.UNLINK)
    t = time.time_ns()
    return [event_record(FileEvent(ops[i % 3], b"%s/c%d" % (bytes(watch), i // 3 % 64), pid=4242, ppid=4241,
                                   uid=0, gid=0, comm=b"churn", backend="bpf", ts_ns=None, mntns=4026531841),
                         t + i, "bench", info) for i in range(n)]


def output_run(runner: Runner, tmp: Path, kind: str, rate: float, records: int, run_id: str) -> dict[str, Any]:
    """The output alone, in this process: records like the churn's handed to it at ``rate`` per second, in batches
    as the capture hands them, by the thread that would be the capture's; counted on the far side as above."""
    from kwatch.metrics.stats import OutputStats
    from kwatch.outputs.config import parse_output_option
    from kwatch.outputs.sink import open_output

    obs = KwatchAudit(kind, ",max_bytes=0" if kind == "file" else "")
    obs.children = []
    ctx = RunCtx(runner, tmp, tmp, run_id)
    probe: NatsProbe | None = None
    try:
        spec, problems = parse_output_option(obs._server(ctx) + obs.options)
        if spec is None:
            raise BenchError(f"output option: {problems}")
        pool = _records(3 * 64 * 32, tmp / "watched")  # more than BATCH_MAX: a batch is a slice of it
        stats = OutputStats(spec.name, kind)
        output = open_output(spec, stats, "bench")
        if kind == "nats":
            probe = NatsProbe(obs.nats_url)
            stored_now = probe.upto
        else:
            stored_now = LineCounter(obs.path)
        server_cpu0 = sum(proc_cpu(c.pid) or 0.0 for c in obs.children)
        cpu0 = time.process_time()
        series: list[tuple[float, int]] = []
        written = 0
        t0 = time.monotonic()
        next_poll = t0
        while written < records:
            now = time.monotonic()
            due = min(records, int(rate * (now - t0))) - written
            if due <= 0:
                time.sleep(0.002)
                continue
            n = min(due, BATCH_MAX)
            k = written % len(pool)
            batch = pool[k : k + n]
            if len(batch) < n:
                batch += pool[: n - len(batch)]
            assert len(batch) == n
            output.write(batch)
            written += n
            if now >= next_poll:
                series.append((now - t0, stored_now()))
                next_poll = now + POLL_S
        t_end = time.monotonic() - t0
        at_end, t_drained = _drain(stored_now, records, t0, series)
        cpu = time.process_time() - cpu0
        output.close()
        if probe is not None:
            counts = probe.read_all()
            probe.close()
            probe = None
        else:
            lines, events = _file_lines(obs.path)
            counts = {"records": lines, "events": events}
        server_cpu = sum(proc_cpu(c.pid) or 0.0 for c in obs.children) - server_cpu0
    finally:
        if probe is not None:
            probe.close()
        for c in obs.children:
            c.stop()
    return {
        "output": kind,
        "target_records_per_s": rate,
        "offered_per_s": round(records / t_end),
        **_far_side(counts, records, at_end, t_end, t_drained, series),
        "output_lost": stats.lost,
        "bench_process_cpu_s": round(cpu, 2),
        "server_cpu_s": round(server_cpu, 2),
        "line_bytes": round(sum(len(r.line) for r in pool) / len(pool)),
    }


def _dgr(r: dict[str, Any]) -> str:
    return " / ".join(str(r[k]) for k in ("duplicates", "gaps", "out_of_order")) if "gaps" in r else "-"


def main(args: argparse.Namespace, out: Path) -> int:
    rate = float(args.audit_rate)
    records = 60_000 if args.quick and not args.audit_records else int(args.audit_records or 1_000_000)
    runs = args.runs or 1
    modes = [args.audit_only] if args.audit_only else ["output", "pipeline"]
    mach = machine()
    outs: list[dict[str, Any]] = []
    pipes: list[dict[str, Any]] = []
    with Cleanup() as stack:
        runner = Runner()
        stack.callback(runner.close)
        base = stack.enter_context(tmpfs() if args.fs == "tmpfs" else scratch_dir(Path("/var/tmp")))
        watch = base / "watched"
        watch.mkdir()
        tmp = base / "observer-files"
        tmp.mkdir()
        kinds = []
        for k in ("file", "nats"):
            if args.observers and k not in {x for part in args.observers for x in part.split(",")}:
                continue
            why = KwatchAudit(k).unavailable()
            if why:
                print(f"bench: audit: {k}: not measured: {why}", file=sys.stderr)
            else:
                kinds.append(k)
        if not kinds:
            raise BenchError("no output can be measured here")
        for i in range(runs):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                if "output" in modes:
                    r = output_run(runner, tmp, kind, rate, records, f"output-{kind}-{i}")
                    r["run"] = i
                    outs.append(r)
                    print(f"bench: audit: output {kind:4} run {i}: offered {r['produced']:,} at "
                          f"{r['offered_per_s']:,}/s, stored {r['stored_events']:,}, lost {r['lost']:,}, behind "
                          f"at end {r['behind_at_end']:,}, drained +{r['drain_s']} s, sustained "
                          f"{r['sustained_per_s']:,}/s, cpu writer {r['bench_process_cpu_s']} s, server "
                          f"{r['server_cpu_s']} s", file=sys.stderr)
                if "pipeline" in modes:
                    r = rate_run(runner, watch, tmp, kind, rate, records, f"audit-{kind}-{i}")
                    r["run"] = i
                    pipes.append(r)
                    print(f"bench: audit: pipeline {kind:4} run {i}: produced {r['produced']:,} at "
                          f"{r['produced_per_s']:,}/s, stored {r['stored_events']:,}, lost {r['lost']:,}, behind "
                          f"at end {r['behind_at_end']:,}, drained +{r['drain_s']} s, sustained "
                          f"{r['sustained_per_s']:,}/s, cpu kwatch {r['kwatch_cpu_s']} s, server "
                          f"{r['server_cpu_s']} s, churn {r['churn_cpu_s']} s", file=sys.stderr)
    lines = [f"Audit outputs at a paced {rate:,.0f} records/s, {records:,} per run, counted on the output's far "
             f"side; {machine_line(mach)}.", ""]
    if outs:
        lines += [
            "The output alone (records like the churn's handed to it in batches of up to "
            f"{BATCH_MAX} by one thread, as the capture's thread does):",
            "",
            "| output | run | offered /s | offered | stored | lost | dup / gap / reorder | behind at end | drain s "
            "| sustained /s | writer process CPU s | server CPU s | line bytes |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['output']} | {r['run']} | {r['offered_per_s']:,} | {r['produced']:,} | "
                  f"{r['stored_events']:,} | {r['lost']:,} | {_dgr(r)} | {r['behind_at_end']:,} | {r['drain_s']} | "
                  f"{r['sustained_per_s']:,} | {r['bench_process_cpu_s']} | {r['server_cpu_s']} | "
                  f"{r['line_bytes']} |" for r in outs]
        lines.append("")
    if pipes:
        lines += [
            "The whole pipeline: `kwatch trace DIR -q --backend bpf --output KIND` while `bench/churn` is paced at "
            "the rate (3 events per iteration):",
            "",
            "| output | run | target /s | churn reached /s | produced | stored | lost | dup / gap / reorder "
            "| behind at churn end | drain s | sustained /s | kwatch CPU s | server CPU s | churn CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['output']} | {r['run']} | {r['target_events_per_s']:,.0f} | {r['produced_per_s']:,} | "
                  f"{r['produced']:,} | {r['stored_events']:,} | {r['lost']:,} | {_dgr(r)} | "
                  f"{r['behind_at_end']:,} | {r['drain_s']} | {r['sustained_per_s']:,} | {r['kwatch_cpu_s']} | "
                  f"{r['server_cpu_s']} | {r['churn_cpu_s']} |" for r in pipes]
    md = "\n".join(lines) + "\n"
    publish("audit", md, {"machine": mach, "rate": rate, "records": records, "output": outs, "pipeline": pipes},
            out, write_doc=False)
    lost = sum(r["lost"] for r in outs + pipes)
    return 1 if args.quick and lost else 0
